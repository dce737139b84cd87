"""Storage (local, and S3 over HTTP) and dataset writing: atomicity, errors, exact round trips."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from composeae import storage
from composeae.data import schema
from composeae.data.schema import GalleryMeta, QueryMeta, TripletMeta
from composeae.data.writer import gallery_sample, query_sample, triplet_sample, write_dataset
from composeae.data.shardset import read_manifest
from composeae.errors import UserError


def small_splits() -> dict:
    """A hand-made dataset with every split and kind (bytes stand in for images)."""
    triplets = [triplet_sample(f"t{i}", b"ref%d" % i, "png", b"tgt%d" % i, "jpg",
                               TripletMeta(f"r{i}", f"g{i}", f"make it {i}", f"scene {i}", f"l{i}"))
                for i in range(7)]
    splits = {"train": {"triplets": triplets}}
    for split in ("val", "test"):
        splits[split] = {
            "queries": [query_sample(f"{split}q{i}", b"q%d" % i, "png",
                                     QueryMeta(f"{split}q{i}", f"r{i}", "add", "c", f"l{i}"))
                        for i in range(4)],
            "gallery": [gallery_sample(f"{split}g{i}", b"g%d" % i, "jpg",
                                       GalleryMeta(f"{split}g{i}", f"l{i}", caption="x"))
                        for i in range(5)],
        }
    return splits


def read_raw(url: str, manifest: dict, split: str, kind: str) -> list[dict]:
    """Every sample of split/kind through plain webdataset (the s3 scheme included)."""
    urls = [storage.join(url, s["name"]) for s in manifest["splits"][split][kind]["shards"]]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return [{k: v for k, v in s.items() if k != "__url__"} for s in pipeline]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A dataset URL on local disk or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "data")
    return request.getfixturevalue("s3_bucket") + "/datasets/small"


def test_round_trip_every_split_is_sample_exact(root):
    splits = small_splits()
    manifest = write_dataset(root, "small", splits, {"origin": "test"}, shard_size=3)
    assert read_manifest(root) == manifest
    assert manifest["splits"]["train"]["triplets"]["count"] == 7
    assert [s["count"] for s in manifest["splits"]["train"]["triplets"]["shards"]] == [3, 3, 1]
    for split, kinds in splits.items():
        for kind, samples in kinds.items():
            assert read_raw(root, manifest, split, kind) == samples
    corpus = storage.read_text(storage.join(root, schema.CORPUS)).splitlines()
    assert corpus[:4] == ["make it 0", "scene 0", "make it 1", "scene 1"]
    names = set(storage.listdir(root))
    assert {schema.MANIFEST, schema.CORPUS, "train-triplets-000002.tar"} <= names
    assert not [n for n in names if n.startswith(".")]


def test_empty_kind_is_an_error_and_leaves_nothing(root):
    splits = small_splits()
    splits["test"]["gallery"] = iter(())
    with pytest.raises(UserError, match="'test' kind 'gallery' has no samples"):
        write_dataset(root, "small", splits, {}, shard_size=3)
    assert storage.listdir(root) == []


def test_existing_dataset_is_not_overwritten(root):
    write_dataset(root, "small", small_splits(), {}, shard_size=3)
    with pytest.raises(UserError, match="already exists"):
        write_dataset(root, "small", small_splits(), {}, shard_size=3)


def test_bad_samples_are_rejected():
    with pytest.raises(ValueError, match="letters, digits"):
        triplet_sample("a.b", b"", "png", b"", "png", TripletMeta("r", "t", "m", "c", "l"))
    with pytest.raises(ValueError, match="extension"):
        gallery_sample("a", b"", "gif", GalleryMeta("a", "l"))


def test_meta_json_is_canonical():
    meta = QueryMeta("q", "r", "m", "c", "l")
    sample = query_sample("q", b"", "png", meta)
    assert json.loads(sample["json"])["reference_id"] == "r"
    assert sample["json"] == query_sample("q", b"", "png", meta)["json"]


def test_local_write_is_atomic_and_listdir(tmp_path):
    url = str(tmp_path / "a" / "b.txt")
    storage.write_text(url, "one")
    storage.write_text(url, "two")
    assert storage.read_text(url) == "two"
    assert storage.listdir(str(tmp_path / "a")) == ["b.txt"]
    assert storage.listdir(str(tmp_path / "nothing")) == []
    assert storage.exists(url) and not storage.exists(url + "x")


def test_s3_basics(s3_bucket, tmp_path):
    url = storage.join(s3_bucket, "dir", "x.bin")
    assert not storage.exists(url)
    storage.write_bytes(url, b"\x00\x01" * 1000)
    assert storage.exists(url)
    assert storage.read_bytes(url) == b"\x00\x01" * 1000
    local = tmp_path / "f.bin"
    local.write_bytes(b"payload")
    storage.upload_file(str(local), storage.join(s3_bucket, "dir", "sub", "f.bin"))
    assert storage.listdir(storage.join(s3_bucket, "dir")) == ["sub", "x.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3_bucket, "missing"))
    storage.remove(url)
    assert not storage.exists(url)
    # Pages written to a bucket carry their content type, so a browser shows them.
    page = storage.join(s3_bucket, "summary.html")
    storage.write_text(page, "<p>hi</p>")
    bucket, key = storage.split_s3(page)
    assert storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentType"] == "text/html"


def test_folder_markers_are_not_files(s3_bucket, tmp_path):
    """pyarrow's S3 filesystem (Ray Train's checkpoint uploads) writes an empty `folder/` key
    for each folder: listing and copying a checkpoint skip it rather than read it as a file."""
    import pyarrow.fs

    ckpt = storage.join(s3_bucket, "run", "final")
    local = tmp_path / "final"
    (local / "sub").mkdir(parents=True)
    (local / "model.pt").write_bytes(b"weights")
    (local / "sub" / "history.json").write_text("[]")
    fs, root = pyarrow.fs.FileSystem.from_uri(storage.join(s3_bucket, "run"))
    pyarrow.fs.copy_files(str(local), f"{root}/final", destination_filesystem=fs)
    bucket, key = storage.split_s3(ckpt)
    storage.s3_client().put_object(Bucket=bucket, Key=f"{key}/", Body=b"")  # as pyarrow may
    assert storage.list_files(ckpt) == ["model.pt", "sub/history.json"]
    assert storage.listdir(ckpt) == ["model.pt", "sub"]
    copied = storage.copy_tree(ckpt, str(tmp_path / "copy"))
    assert copied == ["model.pt", "sub/history.json"]
    assert (tmp_path / "copy" / "model.pt").read_bytes() == b"weights"


def test_missing_bucket_is_one_clear_line(s3_server):
    url = "s3://no-such-bucket-here/data"
    for call in (lambda: storage.exists(url), lambda: storage.read_bytes(url),
                 lambda: storage.listdir(url), lambda: read_manifest(url)):
        with pytest.raises(UserError, match="bucket 'no-such-bucket-here' does not exist"):
            call()
    with pytest.raises(UserError, match="does not exist"):
        write_dataset(url, "small", small_splits(), {})


def test_unreachable_endpoint_is_a_user_error(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(UserError, match="cannot reach the S3 endpoint for s3://b/x"):
        storage.exists("s3://b/x")


def test_s3_scheme_is_registered_in_webdataset():
    from webdataset.gopen import gopen_schemes

    assert gopen_schemes["s3"] is storage._gopen_s3
