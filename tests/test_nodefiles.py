"""Files every node opens (`model.image_weights`, `model.bert_path`): s3:// downloads into the
node cache (once, re-fetched when changed, size-checked, one download among concurrent
processes), models built from s3:// URLs, and the driver's pre-flight check on a local Ray.

S3 is the session's moto server over HTTP. GET requests are counted with a botocore event hook
on the process's real S3 client, so "no second download" is observed on the wire.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest

from composeae.config import Config, replace
from composeae import storage
from composeae.errors import UserError
from composeae.run.nodefiles import (CACHE_ENV, check_node_files, missing_on_nodes,
                                     MissingNodeFile, resolve_local)

from fixtures_models import CORPUS, save_tiny_bert
GET_EVENT = "before-parameter-build.s3.GetObject"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


@pytest.fixture
def gets(s3_server):
    """A list that records the key of every GetObject this process sends."""
    seen: list[str] = []

    def record(params, **_):
        seen.append(params["Key"])

    events = storage.s3_client().meta.events
    events.register(GET_EVENT, record)
    yield seen
    events.unregister(GET_EVENT, record)


def put(url: str, data: bytes) -> None:
    storage.write_bytes(url, data)


def version_dirs(cache: Path) -> list[Path]:
    return [v for entry in cache.iterdir() if entry.is_dir() for v in entry.iterdir()]


def leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]


# --- local paths ---------------------------------------------------------------------------------

def test_local_paths_come_back_as_they_are(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert resolve_local(str(weights), "model.image_weights") == str(weights)
    assert resolve_local(str(tmp_path), "model.bert_path") == str(tmp_path)

    missing = tmp_path / "nope.pth"
    with pytest.raises(MissingNodeFile) as err:
        resolve_local(str(missing), "model.image_weights")
    assert str(err.value) == (f"model.image_weights: {missing} does not exist on node "
                              f"{socket.gethostname()}")
    with pytest.raises(UserError, match=r"^model.bert_path: .* is not a directory on node "):
        resolve_local(str(weights), "model.bert_path")
    with pytest.raises(UserError, match=r"^model.image_weights: .* is not a file on node "):
        resolve_local(str(tmp_path), "model.image_weights")


# --- s3:// objects -------------------------------------------------------------------------------

def test_resnet_weights_from_s3_download_once(s3_bucket, cache, gets, tmp_path):
    import torch
    import torchvision

    from composeae.run.build import create_model
    from composeae.models.text import WordTokenizer

    torch.manual_seed(5)
    source = torchvision.models.resnet18(weights=None)
    local = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), local)
    url = f"{s3_bucket}/weights/resnet18.pth"
    storage.upload_file(str(local), url)

    cfg = replace(Config(), model={"name": "tirg", "embed_dim": 32, "image_dim": 32,
                                   "text_dim": 24, "word_dim": 16, "image_encoder": "resnet18",
                                   "image_weights": url})
    model = create_model(cfg.model, cfg.loss, WordTokenizer.from_corpus(CORPUS))
    assert torch.equal(model.image_encoder.backbone.conv1.weight, source.conv1.weight)
    assert gets == ["weights/resnet18.pth"]

    path = resolve_local(url, "model.image_weights")
    assert Path(path).read_bytes() == local.read_bytes()
    stat = os.stat(path)
    again = resolve_local(url, "model.image_weights")
    assert again == path
    assert os.stat(again).st_ino == stat.st_ino and os.stat(again).st_mtime_ns == stat.st_mtime_ns
    assert gets == ["weights/resnet18.pth"]  # the cached copy served both: no second GET
    assert Path(path).is_relative_to(cache) and not leftovers(cache)


def test_changed_object_is_fetched_again(s3_bucket, cache, gets):
    url = f"{s3_bucket}/w.pth"
    put(url, b"a" * 1000)
    first = resolve_local(url, "model.image_weights")
    assert Path(first).read_bytes() == b"a" * 1000
    put(url, b"b" * 1000)  # same size, new content: the ETag tells them apart
    second = resolve_local(url, "model.image_weights")
    assert second != first and Path(second).read_bytes() == b"b" * 1000
    assert gets == ["w.pth", "w.pth"]
    assert not Path(first).exists()  # the superseded version was removed
    assert len(version_dirs(cache)) == 1


def test_size_mismatch_is_rejected_and_nothing_is_cached(s3_bucket, s3_server, cache):
    import boto3

    url = f"{s3_bucket}/w.pth"
    put(url, b"old" * 100)
    bucket, key = storage.split_s3(url)
    other_writer = boto3.client("s3", endpoint_url=s3_server)
    replaced = []

    def replace_once(**_):
        # Another writer replaces the object between the HEAD that sized it and the GET.
        if not replaced:
            other_writer.put_object(Bucket=bucket, Key=key, Body=b"new" * 150)
            replaced.append(True)

    events = storage.s3_client().meta.events
    events.register(GET_EVENT, replace_once)
    try:
        with pytest.raises(OSError, match=r"downloaded 450 bytes of .* ContentLength is 300"):
            resolve_local(url, "model.image_weights")
    finally:
        events.unregister(GET_EVENT, replace_once)
    assert replaced and version_dirs(cache) == [] and not leftovers(cache)
    # The next resolve sizes the new object and caches it whole.
    assert Path(resolve_local(url, "model.image_weights")).read_bytes() == b"new" * 150


def test_missing_object_bucket_and_prefix_name_the_key(s3_bucket, cache):
    with pytest.raises(MissingNodeFile, match=r"^model.image_weights: s3://.*/nope.pth does not "
                                              r"exist on node "):
        resolve_local(f"{s3_bucket}/nope.pth", "model.image_weights")
    with pytest.raises(MissingNodeFile, match=r"^model.bert_path: s3://.*/nope does not exist"):
        resolve_local(f"{s3_bucket}/nope", "model.bert_path")
    with pytest.raises(UserError, match=r"^model.bert_path: bucket 'no-such-bucket-x' does not "
                                        r"exist") as err:
        resolve_local("s3://no-such-bucket-x/bert", "model.bert_path")
    assert "\n" not in str(err.value)


def _resolve_in_child(url: str, barrier, results) -> None:
    from composeae import storage
    from composeae.run.nodefiles import resolve_local

    count = [0]

    def slow_get(**_):
        count[0] += 1
        time.sleep(0.5)  # a slow transfer: the others arrive while it is running

    storage.s3_client().meta.events.register(GET_EVENT, slow_get)
    barrier.wait()
    try:
        results.put((resolve_local(url, "model.image_weights"), count[0]))
    except Exception as exc:  # reported to the test rather than left to its timeout
        results.put((f"failed: {exc!r}", count[0]))


def test_concurrent_processes_download_once(s3_bucket, cache):
    url = f"{s3_bucket}/shared.pth"
    data = os.urandom(3 << 20)
    put(url, data)
    # fork: the children start at once with the modules imported (spawn spends seconds importing
    # torch in each); they inherit the endpoint and the cache directory through the environment,
    # and storage.s3_client gives each its own client. This test runs before the module's Ray
    # instance starts, so no Ray thread is forked.
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(url, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    answers = [results.get(timeout=60) for _ in procs]
    assert not [path for path, _ in answers if path.startswith("failed")], answers
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    paths = {path for path, _ in answers}
    assert len(paths) == 1
    assert sum(count for _, count in answers) == 1  # one process downloaded, three waited
    assert Path(paths.pop()).read_bytes() == data
    assert len(version_dirs(cache)) == 1 and not leftovers(cache)


# --- s3:// prefixes: a save_pretrained BERT directory --------------------------------------------

def test_bert_from_s3_prefix_builds_tokenizer_model_and_checkpoint(s3_bucket, cache, gets,
                                                                  tmp_path):
    import torch

    from composeae.checkpoint import checkpoint_state
    from composeae.run.build import build_tokenizer, create_model, model_from_checkpoint

    local = tmp_path / "bert"
    local.mkdir()
    saved = save_tiny_bert(local)
    url = f"{s3_bucket}/models/tiny-bert"
    names = sorted(p.name for p in local.iterdir())
    for name in names:
        storage.upload_file(str(local / name), storage.join(url, name))

    tokenizer = build_tokenizer("bert", [], bert_path=url)
    cfg = replace(Config(), model={"name": "tirg", "embed_dim": 32, "image_dim": 32,
                                   "text_dim": 16, "text_encoder": "bert", "bert_path": url})
    model = create_model(cfg.model, cfg.loss, tokenizer)
    loaded = model.text_encoder.encoder.bert
    assert torch.equal(loaded.embeddings.word_embeddings.weight,
                       saved.embeddings.word_embeddings.weight)
    assert tokenizer.encode(["add a red circle"], 8)[0].shape[1] >= 3
    # The tokenizer and the model shared one download of each file.
    assert sorted(gets) == sorted(f"models/tiny-bert/{name}" for name in names)

    rebuilt, _ = model_from_checkpoint(checkpoint_state(model, cfg))
    assert torch.equal(rebuilt.text_encoder.encoder.bert.embeddings.word_embeddings.weight,
                       saved.embeddings.word_embeddings.weight)
    assert len(gets) == len(names)  # loading the checkpoint found the cache too


# --- the driver's pre-flight check on a local Ray ------------------------------------------------

def test_check_is_skipped_when_no_node_file_is_set():
    import ray

    was = ray.is_initialized()
    check_node_files(Config())  # would raise outside Ray if it tried any Ray work
    assert ray.is_initialized() == was


@pytest.fixture(scope="module")
def ray_local(s3_server, tmp_path_factory):
    """A local Ray whose workers inherit the S3 endpoint and their own node cache directory."""
    import ray

    worker_cache = tmp_path_factory.mktemp("node-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(worker_cache))
        ray.init(address="local", num_cpus=2)
    node = next(n for n in ray.nodes() if n["Alive"])
    yield worker_cache, f"{node['NodeManagerHostname']} ({node['NodeManagerAddress']})"
    ray.shutdown()


def with_files(**model) -> Config:
    return replace(Config(), model=model)


def test_check_names_key_and_node_of_a_missing_path(ray_local, tmp_path):
    _, node = ray_local
    weights = tmp_path / "resnet18.pth"
    with pytest.raises(UserError) as err:
        check_node_files(with_files(image_weights=str(weights)))
    assert str(err.value) == f"model.image_weights: {weights} does not exist on node {node}"

    weights.write_bytes(b"x")
    with pytest.raises(UserError) as err:
        check_node_files(with_files(image_weights=str(weights), bert_path=str(tmp_path / "bert")))
    message = str(err.value)
    assert "\n" not in message
    assert message == f"model.bert_path: {tmp_path / 'bert'} does not exist on node {node}"


def test_check_passes_for_existing_paths(ray_local, tmp_path):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"x")
    check_node_files(with_files(image_weights=str(weights), bert_path=str(tmp_path)))


def test_check_warms_each_node_cache_from_s3(ray_local, s3_bucket, gets, monkeypatch):
    worker_cache, node = ray_local
    url = f"{s3_bucket}/weights/r.pth"
    put(url, b"w" * 500)
    check_node_files(with_files(image_weights=url))
    # The node's task downloaded it; this process, sharing the node's cache, finds it there.
    monkeypatch.setenv(CACHE_ENV, str(worker_cache))
    assert Path(resolve_local(url, "model.image_weights")).read_bytes() == b"w" * 500
    assert gets == []

    with pytest.raises(UserError) as err:
        check_node_files(with_files(bert_path=f"{s3_bucket}/missing-bert"))
    assert str(err.value) == f"model.bert_path: {s3_bucket}/missing-bert does not exist on node {node}"


def test_missing_on_nodes_lists_each_missing_path_and_node(ray_local, tmp_path, s3_bucket):
    _, node = ray_local
    present = tmp_path / "data"
    present.mkdir()
    paths = {"--data": str(present), "--checkpoint": str(tmp_path / "nowhere"),
             "data.url": f"{s3_bucket}/not-checked-here"}
    assert missing_on_nodes(paths) == {"--checkpoint": [node]}
    assert missing_on_nodes({}) == {}
