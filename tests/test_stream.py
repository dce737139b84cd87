"""The streaming pipeline: equal batch counts per rank, exactly-once evaluation, skipped shards."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from composeae.config import DataConfig
from composeae import storage
from composeae.data import schema
from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.decode import IMAGE_MEAN, IMAGE_STD
from composeae.data.tarstream import StreamErrors, tar_members, tar_samples
from composeae.data.stream import eval_batches, TrainStream
from composeae.data.shardset import has_split, load_corpus
from composeae.data.synth import generate
from composeae.data.writer import gallery_sample, query_sample, triplet_sample, write_dataset
from composeae.data.shardset import read_manifest
from composeae.errors import UserError

UNEVEN = (7, 5, 3, 6, 4)


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def uneven_dataset(root: str, sizes=UNEVEN) -> str:
    """A dataset whose train, val query and val gallery shards hold `sizes` samples each.

    Written through `write_dataset` one shard at a time, then the manifests are merged: the
    writer itself only makes equal shards.
    """
    merged: dict = {}
    start = 0
    for index, size in enumerate(sizes):
        ids = range(start, start + size)
        part = os.path.join(root, f"part{index}")
        manifest = write_dataset(part, "uneven", {
            "train": {"triplets": [
                triplet_sample(f"t{i}", png(i), "png", png(i + 100), "png",
                               TripletMeta(f"r{i}", f"t{i}", f"mod {i}", f"all {i}", f"l{i}"))
                for i in ids]},
            "val": {
                "queries": [query_sample(f"q{i}", png(i), "png",
                                         QueryMeta(f"q{i}", f"r{i}", "m", "c", f"l{i}"))
                            for i in ids],
                "gallery": [gallery_sample(f"g{i}", png(i), "png", GalleryMeta(f"g{i}", f"l{i}"))
                            for i in ids]},
        }, {}, shard_size=size)
        for split, kinds in manifest["splits"].items():
            for kind, entry in kinds.items():
                shard = dict(entry["shards"][0], name=schema.shard_name(split, kind, index))
                os.replace(os.path.join(part, entry["shards"][0]["name"]),
                           os.path.join(root, shard["name"]))
                target = merged.setdefault(split, {}).setdefault(kind, {"count": 0, "shards": []})
                target["count"] += size
                target["shards"].append(shard)
        start += size
    storage.write_text(os.path.join(root, schema.CORPUS), "mod 0\n")
    storage.write_text(os.path.join(root, schema.MANIFEST), json.dumps(
        dict(manifest, splits=merged)))
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return uneven_dataset(str(tmp_path_factory.mktemp("uneven")))


def config(url: str, workers: int = 0, **kw) -> DataConfig:
    return DataConfig(url=url, image_size=8, loader_workers=workers, shuffle_buffer=4, **kw)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_same_number_of_batches(uneven, world_size, workers):
    data = config(uneven, workers)
    streams = [TrainStream(data, 2, rank=r, world_size=world_size, seed=0)
               for r in range(world_size)]
    steps = streams[0].steps_per_epoch
    assert all(s.steps_per_epoch == steps for s in streams)
    assert steps >= sum(UNEVEN) / (2 * world_size)
    for epoch in (0, 1):
        for stream in streams:
            batches = list(stream.epoch(epoch))
            assert len(batches) == steps
            assert all(b["reference"].shape == (2, 3, 8, 8) and len(b["modifier"]) == 2
                       for b in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_and_determinism(uneven, workers):
    stream = TrainStream(config(uneven, workers), 3, rank=0, world_size=1, seed=5)
    first = list(stream.epoch(0))
    batch = first[0]
    assert set(batch) >= {"reference", "target", "modifier", "complete", "target_label"}
    assert batch["target"].dtype == torch.float32
    assert [b["target_id"] for b in stream.epoch(0)] == [b["target_id"] for b in first]
    next(stream.epoch(1))  # abandoned after one batch: the next epoch still starts cleanly
    assert [b["target_id"] for b in stream.epoch(1)] != [b["target_id"] for b in first]
    assert len(list(stream.epoch(2))) == stream.steps_per_epoch
    # A modifier always travels with its own images: reference pixel value i <-> "mod i".
    mean, std = torch.tensor(IMAGE_MEAN)[0], torch.tensor(IMAGE_STD)[0]
    red = (batch["reference"][:, 0, 0, 0] * std + mean) * 255
    assert [round(v) for v in red.tolist()] == [int(m.split()[1]) for m in batch["modifier"]]


def test_one_rank_without_shuffle_sees_each_sample_once_per_epoch(uneven):
    data = DataConfig(url=uneven, image_size=8, loader_workers=0, shuffle_buffer=1)
    stream = TrainStream(data, 1, rank=0, world_size=1, seed=0)
    ids = [i for b in stream.epoch(3) for i in b["target_id"]]
    assert sorted(ids) == sorted(f"t{i}" for i in range(sum(UNEVEN)))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind,id_key,prefix",
                         [("queries", "query_id", "q"), ("gallery", "image_id", "g")])
def test_eval_delivers_every_sample_exactly_once(uneven, workers, kind, id_key, prefix):
    data = config(uneven, workers)
    for world_size in (1, 2, 3, 7):
        ids = [i for rank in range(world_size)
               for b in eval_batches(data, "val", kind, 4, rank=rank, world_size=world_size)
               for i in b[id_key]]
        assert sorted(ids) == sorted(f"{prefix}{i}" for i in range(sum(UNEVEN)))
    # Rank 6 of 7 has no shard: it yields nothing instead of failing.
    assert list(eval_batches(data, "val", kind, 4, rank=6, world_size=7)) == []


def test_query_and_gallery_batch_keys(css_tiny):
    data = DataConfig(url=css_tiny, image_size=32, loader_workers=0)
    query = next(eval_batches(data, "test", "queries", 5, rank=0, world_size=1))
    assert query["reference"].shape == (5, 3, 32, 32)
    assert set(query) >= {"modifier", "complete", "target_label", "reference_id", "query_id",
                          "group"}
    image = next(eval_batches(data, "test", "gallery", 5, rank=0, world_size=1))
    assert image["image"].shape == (5, 3, 32, 32)
    assert set(image) >= {"image_id", "label", "group"}
    assert has_split(data, "val") and not has_split(data, "dev")
    assert "remove" in " ".join(load_corpus(data))


def test_augment_keeps_shapes(css_tiny):
    data = DataConfig(url=css_tiny, image_size=32, loader_workers=0, augment=True, shuffle_buffer=8)
    batch = next(TrainStream(data, 4, rank=0, world_size=1, seed=0).epoch(0))
    assert batch["reference"].shape == batch["target"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_epoch_replays_exactly_and_leaves_the_callers_rng(css_tiny, workers):
    """A resumed run restarts the epoch in fresh workers and skips what it trained on: the
    batches it keeps must be the interrupted run's, crops and flips included, and decoding must
    not draw from the trainer's random state (dropout's)."""
    data = DataConfig(url=css_tiny, image_size=32, loader_workers=workers, augment=True,
                      shuffle_buffer=8)
    before = torch.get_rng_state()
    interrupted = TrainStream(data, 4, rank=0, world_size=1, seed=3)
    list(interrupted.epoch(0))  # its (persistent) workers have been through an epoch already
    first = list(interrupted.epoch(1))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)  # a resumed trainer's state differs; the augmentation must not care
    again = list(TrainStream(data, 4, rank=0, world_size=1, seed=3).epoch(1))[5:]
    assert len(again) == len(first) - 5
    for a, b in zip(first[5:], again):
        assert a["target_id"] == b["target_id"]
        assert torch.equal(a["reference"], b["reference"]) and torch.equal(a["target"], b["target"])
    # Another epoch crops differently: the seed is not one fixed crop per sample.
    other = {b["target_id"][0]: b["target"][0] for b in
             TrainStream(data, 4, rank=0, world_size=1, seed=3).epoch(2)}
    assert any(not torch.equal(other[b["target_id"][0]], b["target"][0])
               for b in first if b["target_id"][0] in other)


@pytest.fixture
def damaged(tmp_path) -> str:
    """The uneven dataset with val query shard 1 replaced by garbage and shard 3 truncated."""
    root = uneven_dataset(str(tmp_path / "damaged"))
    with open(os.path.join(root, "val-queries-000001.tar"), "wb") as f:
        f.write(os.urandom(3000))
    path = os.path.join(root, "val-queries-000003.tar")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_and_truncated_shards_are_skipped_and_counted(damaged, workers):
    errors = StreamErrors()
    ids = [i for b in eval_batches(config(damaged, workers), "val", "queries", 4, rank=0,
                                   world_size=1, errors=errors)
           for i in b["query_id"]]
    assert errors.shards == 2
    intact = [i for i in range(sum(UNEVEN)) if not 7 <= i < 12 and not 15 <= i < 21]
    assert set(ids) >= {f"q{i}" for i in intact}  # plus what preceded the truncation
    assert len(ids) == len(set(ids)) < sum(UNEVEN) - 5


def test_corrupt_train_shard_keeps_batch_counts(tmp_path):
    root = uneven_dataset(str(tmp_path / "d"))
    with open(os.path.join(root, "train-triplets-000002.tar"), "wb") as f:
        f.write(b"not a tar file" * 100)
    streams = [TrainStream(config(root, 2), 2, rank=r, world_size=2, seed=0) for r in range(2)]
    counts = [len(list(s.epoch(0))) for s in streams]
    assert counts == [streams[0].steps_per_epoch] * 2
    assert sum(s.skipped_shards for s in streams) >= 1


def test_all_shards_unreadable_fails_instead_of_spinning(tmp_path):
    root = uneven_dataset(str(tmp_path / "d"), sizes=(2, 2))
    for index in range(2):
        with open(os.path.join(root, schema.shard_name("train", "triplets", index)), "wb") as f:
            f.write(b"garbage" * 10)
    with pytest.raises(UserError, match="shards in a row could not be read"):
        list(TrainStream(config(root), 2, rank=0, world_size=1, seed=0).epoch(0))


def test_empty_or_missing_shard_sets_are_user_errors(tmp_path, css_tiny):
    with pytest.raises(UserError, match="no dataset at"):
        TrainStream(config(str(tmp_path)), 2, rank=0, world_size=1, seed=0)
    root = uneven_dataset(str(tmp_path / "d"), sizes=(2,))
    manifest = read_manifest(root)
    manifest["splits"]["train"]["triplets"] = {"count": 0, "shards": []}
    storage.write_text(os.path.join(root, schema.MANIFEST), json.dumps(manifest))
    with pytest.raises(UserError, match="has no train triplets shards"):
        TrainStream(config(root), 2, rank=0, world_size=1, seed=0)
    with pytest.raises(UserError, match="has no dev queries shards"):
        eval_batches(config(root), "dev", "queries", 2, rank=0, world_size=1)
    os.remove(os.path.join(root, "val-gallery-000000.tar"))
    with pytest.raises(UserError, match="1 of 1 shards listed in the manifest are missing"):
        eval_batches(config(root), "val", "gallery", 2, rank=0, world_size=1)


def test_stream_from_s3_matches_local(css_tiny, s3_bucket):
    url = s3_bucket + "/css-synth-tiny"
    assert generate(url, preset="tiny", seed=0) == read_manifest(css_tiny)
    for workers in (0, 2):
        local, remote = config(css_tiny, workers), config(url, workers)
        batches = [list(TrainStream(d, 8, rank=1, world_size=2, seed=0).epoch(0))
                   for d in (local, remote)]
        assert [b["target_id"] for b in batches[0]] == [b["target_id"] for b in batches[1]]
        assert torch.equal(batches[0][0]["target"], batches[1][0]["target"])
        ids = [[i for b in eval_batches(d, "test", "gallery", 16, rank=0, world_size=1)
                for i in b["image_id"]] for d in (local, remote)]
        assert sorted(ids[0]) == sorted(ids[1]) and len(ids[0]) == 240
    assert load_corpus(remote) == load_corpus(local)


def test_missing_bucket_in_stream_is_a_user_error(s3_server):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        TrainStream(config("s3://no-such-bucket/data"), 2, rank=0, world_size=1, seed=0)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    path = tmp_path / "x.tar"
    members = [("a/k1.json", b"{}"), ("d" * 120 + "/k2.ref.png", b"x" * 1000),
               ("k3.tgt.jpg", b""), ("\u00e9t\u00e9.json", b"y" * 513)]
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("a")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert list(tar_members(f)) == members
    with open(path, "rb") as f:
        keys = [s["__key__"] for s in tar_samples(f, "u")]
    assert keys == ["a/k1", "d" * 120 + "/k2", "k3", "\u00e9t\u00e9"]
    blob = path.read_bytes()
    with pytest.raises(EOFError, match="truncated"):
        list(tar_members(io.BytesIO(blob[: len(blob) // 4 // 512 * 512])))
    with pytest.raises(ValueError, match="not a tar header"):
        list(tar_members(io.BytesIO(os.urandom(512) + blob[512:])))


def test_images_keep_their_aspect_short_side_and_centre_crop():
    from composeae.data.decode import SampleDecoder

    # A 24 x 8 strip of red, green and blue squares: the centre crop is the green one; a
    # squashing resize would blend all three.
    strip = Image.new("RGB", (24, 8))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        strip.paste(colour, (8 * i, 0, 8 * i + 8, 8))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    sample = gallery_sample("k", buffer.getvalue(), "png", GalleryMeta("g", "l"))
    pixels = SampleDecoder("gallery", 4)(sample)["image"]
    assert pixels.shape == (4, 4, 3)
    assert pixels[1:3, 1:3].reshape(-1, 3).tolist() == [[0, 255, 0]] * 4
