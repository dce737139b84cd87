"""The sharded gallery on the local Ray: shard actors answer as one process does; the service
with two shards answers a burst of concurrent queries in batches as one-by-one search does,
and swaps a promotion in, shard actors and all, under a request loop without a failed request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from composeae.errors import UserError
from composeae.serve.index import read_block_rows, read_manifest
from composeae.serve.search import top_k
from composeae.serve.runs import split_blocks
from composeae.serve.sharded import GalleryShard, ShardedGallery
from composeae.testing.checkpoints import random_checkpoint
from composeae.testing.clients import SearchClients
from composeae.testing.galleries import synthetic_blocks, unit_rows, write_index
from composeae.testing.localcluster import free_port


def test_blocks_split_into_contiguous_runs_of_about_equal_rows():
    assert split_blocks([10] * 9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert split_blocks([100, 1, 1, 1, 100], 2) == [(0, 2), (2, 5)]
    assert split_blocks([5, 5], 2) == [(0, 1), (1, 2)]
    with pytest.raises(UserError, match="shards must be from 1 to the index's 2 blocks"):
        split_blocks([5, 5], 3)


def test_sharded_search_equals_one_process(ray_local, tmp_path):
    url = write_index(tmp_path / "index", synthetic_blocks(5000, 32, block_rows=600,
                                                           clusters=50), 32)
    blocks = read_manifest(url)["blocks"]
    rows = torch.from_numpy(np.concatenate([read_block_rows(url, b["name"]) for b in blocks]))
    queries = torch.from_numpy(unit_rows(np.random.default_rng(1), 40, 32))
    queries[3] = rows[4321].float()  # its own row would come first: left out below
    exclude = [None] * 40
    exclude[3], exclude[7] = 4321, 17
    expected = top_k(queries, rows.float(), 10, exclude=exclude)
    gallery = ShardedGallery(url, 3, "float16", num_cpus=0.25)
    got = gallery.top_k(queries, 10, exclude)
    assert torch.equal(got[1], expected[1])
    assert torch.allclose(got[0], expected[0], atol=1e-6)
    assert 4321 not in got[1][3].tolist()
    held = [m["rows"] for m in gallery.memory()]
    assert sum(held) == 5000 and max(held) <= 2400  # each shard holds about a third
    assert gallery.top_k(queries[:2], 6000)[1].shape == (2, 5000)  # k past the gallery
    # A shard mapping its blocks from the files (one per block) answers as one holding them.
    first, end = gallery.row_ranges[1]
    mapped = GalleryShard(url, blocks[3:6], first, "mmap")
    assert len(mapped.parts) == 3 and mapped.rows == end - first
    scores, found = mapped.top_k(queries.numpy(), 10, exclude)
    part = top_k(queries, rows[first:end].float(), 10)
    assert np.array_equal(found, (part[1] + first).numpy())  # rows 17 and 4321 lie elsewhere
    assert np.allclose(scores, part[0].numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def sharded_service(ray_local, css_tiny, tmp_path_factory):
    """A local registry with versions 1 and 2 indexed, `champion` -> 1, served with two shard
    actors per version and batches of up to 8 requests."""
    from ray import serve

    from composeae.registry.store import ModelRegistry
    from composeae.serve.app import build_app
    from composeae.serve.auth import Access
    from composeae.serve.index import build_index, registry_index_url, resolve_model

    url = str(tmp_path_factory.mktemp("registry") / "registry")
    registry = ModelRegistry.create(url)
    for seed in (0, 1):
        checkpoint = random_checkpoint(css_tiny, tmp_path_factory.mktemp(f"ckpt{seed}"), seed)
        version = registry.register(checkpoint, run_name=f"run-{seed}",
                                    record={"model": "composeae"})[0]["version"]
        build_index(resolve_model(None, url, str(version)), css_tiny,
                    registry_index_url(url, version), workers=2)
    registry.promote(1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(url, "champion", poll_s=0.5, num_cpus=0.5, access=Access(None),
                        settings={"shards": 2, "shard_cpus": 0.25, "batch": 8}),
              name="sharded", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "registry": registry, "url": url}
    serve.delete("sharded")
    serve.shutdown()


def _shard_actors() -> int:
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address,
                        filters=[("state", "=", "ALIVE")], limit=1000)
    return sum(a.class_name.endswith("GalleryShard") for a in alive)


def test_a_burst_of_queries_is_answered_in_batches_as_one_by_one(sharded_service):
    from composeae.serve.app import load_version

    base, url = sharded_service["base"], sharded_service["url"]
    local = load_version(url, 1)  # one process, exact, no shards
    refs = local.index.ids[::30][:8]
    texts = ["make the red circle blue", "add a small cube", "remove the triangle",
             "make it large", "make the green sphere red", "add a blue circle",
             "remove the cube", "make the small square yellow"]

    def ask(i: int) -> requests.Response:
        return requests.post(f"{base}/search", json={"ref": refs[i], "text": texts[i], "k": 5},
                             timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        expected = local.search(texts[i], 5, ref=refs[i])["results"]
        got = answer.json()["results"]
        assert [r["id"] for r in got] == [r["id"] for r in expected]
        assert np.allclose([r["score"] for r in got], [r["score"] for r in expected], atol=1e-3)
    status = requests.get(f"{base}/status", timeout=30).json()
    assert status["search"] == "exact, 2 shards" and status["batch"] == 8
    assert status["largest_batch"] > 1  # concurrent requests were grouped


def test_two_shards_swap_a_promotion_in_under_a_request_loop(sharded_service):
    base, registry = sharded_service["base"], sharded_service["registry"]
    ref = _an_id(sharded_service)
    assert _shard_actors() == 2
    with SearchClients(base, [ref], 2, text="make the circle red", k=3) as loop:
        _wait_for(loop, 1)
        registry.promote(2, reason="test: a new champion")
        _wait_for(loop, 2)
        time.sleep(1.0)
    assert loop.answers and all(status == 200 for _, status, _ in loop.answers)
    for answers in loop.per_client:
        versions = [v for _, _, v in answers]
        # Old version, then new, never back: every shard switched together.
        assert versions[0] == 1 and versions[-1] == 2
        assert sum(a != b for a, b in zip(versions, versions[1:])) == 1
    # The old version's shard actors end once nothing holds them.
    deadline = time.monotonic() + 60
    while _shard_actors() != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _shard_actors() == 2


def _an_id(service) -> str:
    from composeae.serve.index import load_index, registry_index_url

    return load_index(registry_index_url(service["url"], 1), rows=False).ids[7]


def _wait_for(loop: SearchClients, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c and c[-1][2] == version for c in loop.per_client):
            return
        time.sleep(0.1)
    raise AssertionError(f"version {version} never answered every client")


@pytest.mark.parametrize("flags, message", [
    (["--shards", "99"], "shards must be from 1 to the index's 8 blocks, got 99"),
    (["--shards", "2", "--probe", "4"], "--shards searches exactly"),
    (["--probe", "3"], "this index is exact"),
    (["--batch", "0"], "--batch must be 1 or more, got 0"),
    (["--shards", "2", "--shard-cpus", "0"], "--shard-cpus must be more than 0"),
])
def test_bad_serve_search_flags_are_one_line(sharded_service, capsys, flags, message):
    from composeae.cli import main
    from composeae.testing.console import own_lines

    assert main(["serve", "--registry", sharded_service["url"], *flags]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
