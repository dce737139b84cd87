"""The gallery index and search: a build on Ray Data (local and on moto S3), its no-op rebuild and
resume, search against the evaluation's own ranking, the command line's answers to bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from composeae.cli import main
from composeae.testing.checkpoints import random_checkpoint
from composeae.testing.console import own_lines
from composeae import storage


@pytest.fixture(scope="module")
def checkpoint(css_tiny, tmp_path_factory) -> str:
    return random_checkpoint(css_tiny, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def local_index(ray_local, css_tiny, checkpoint, tmp_path_factory) -> str:
    """A float32 index of the tiny test gallery (float32: compared with the evaluation exactly)."""
    from composeae.serve.index import build_index, resolve_model

    out = str(tmp_path_factory.mktemp("index") / "f32")
    done = build_index(resolve_model(checkpoint, None, None), css_tiny, out, dtype="float32",
                       workers=2)
    assert done.built
    return out


def _gallery_count(data_url: str, split: str = "test") -> int:
    from composeae.data.shardset import read_manifest

    return read_manifest(data_url)["splits"][split]["gallery"]["count"]


def test_index_on_s3_is_built_once_and_resumes_an_interrupted_build(ray_local, css_tiny,
                                                                     checkpoint, s3_bucket):
    from composeae.serve.index import BLOCKS, MANIFEST, build_index, load_index, resolve_model

    model = resolve_model(checkpoint, None, None)
    out = storage.join(s3_bucket, "indexes", "tiny")
    first = build_index(model, css_tiny, out, workers=2)
    m = first.manifest
    assert first.built and m["count"] == _gallery_count(css_tiny) == 240
    assert (m["dim"], m["dtype"], m["data"]["split"]) == (32, "float16", "test")
    assert m["model"]["checkpoint"].endswith("model.pt") and len(m["data"]["fingerprint"]) == 64
    index = load_index(out, memory_dtype="float16")
    assert index.embeddings.dtype == torch.float16 and len(set(index.ids)) == 240
    assert torch.equal(load_index(out).embeddings, index.embeddings.float())
    norms = index.embeddings.float().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
    # The pointer reads back the very image bytes of the shard.
    from composeae.data.tarstream import tar_samples
    from composeae.data.tarstream import open_shard

    with open_shard(index.shard_urls[0]) as stream:
        first_sample = next(iter(tar_samples(stream, index.shard_urls[0])))
    assert index.image(0) == (first_sample["img.png"], "image/png")

    again = build_index(model, css_tiny, out, workers=2)
    assert not again.built and again.manifest == m

    # Interrupted: no manifest and one block without its JSON; the rebuild embeds that one only.
    names = storage.listdir(storage.join(out, BLOCKS))
    storage.remove(storage.join(out, MANIFEST))
    storage.remove(storage.join(out, BLOCKS, names[0]))  # the first block's .json
    resumed = build_index(model, css_tiny, out, workers=2)
    assert resumed.built and resumed.resumed == len(m["blocks"]) - 1
    assert torch.equal(load_index(out, memory_dtype="float16").embeddings, index.embeddings)
    assert storage.listdir(storage.join(out, BLOCKS)) == names


def _evaluation_top10(checkpoint: str, data_url: str) -> tuple[list[dict], dict[str, str]]:
    """The evaluation's record of fixed queries with their top 10, and each query's text."""
    from composeae.checkpoint import load_checkpoint
    from composeae.run.build import model_from_checkpoint
    from composeae.config import replace
    from composeae.data import schema
    from composeae.data.stream import eval_batches
    from composeae.evaluate import evaluate_with_retrievals

    model, cfg = model_from_checkpoint(load_checkpoint(checkpoint))
    data = replace(cfg, data={"url": data_url}).data
    _, record = evaluate_with_retrievals(model, data, "test", cfg.eval, rank=0, world_size=1,
                                         device=torch.device("cpu"), num_queries=8, k=10)
    texts = {}
    for batch in eval_batches(data, "test", schema.QUERIES, 64, rank=0, world_size=1):
        texts.update(zip(batch["query_id"], batch[data.text_mode]))
    return record["queries"], texts


def test_search_ranks_as_the_evaluation_does(local_index, checkpoint, css_tiny):
    from composeae.serve.index import load_index
    from composeae.serve.search import Searcher

    queries, texts = _evaluation_top10(checkpoint, css_tiny)
    assert len(queries) == 8
    searcher = Searcher.load(load_index(local_index))
    for query in queries:
        result = searcher.search(texts[query["query_id"]], 10, ref=query["reference_id"])
        assert [r["id"] for r in result["results"]] == [t["image_id"] for t in query["top"]]
        assert np.allclose([r["score"] for r in result["results"]],
                           [t["similarity"] for t in query["top"]], atol=1e-4)
        assert query["reference_id"] not in {r["id"] for r in result["results"]}


def test_blockwise_top_k_equals_a_full_sort():
    from composeae.serve.search import top_k

    torch.manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
    gallery[500] = gallery[10]  # a tie across blocks: the lower row comes first
    queries = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    queries[0] = gallery[10]
    full = queries @ gallery.T
    full[1, 3] = full[4, 999] = float("-inf")
    expected = torch.sort(full, dim=1, descending=True, stable=True)
    for block in (64, None):
        scores, rows = top_k(queries, gallery, 7, block_rows=block,
                             exclude=[None, 3, None, None, 999])
        assert torch.equal(rows, expected.indices[:, :7])
        assert torch.allclose(scores, expected.values[:, :7])
        assert rows[0, :2].tolist() == [10, 500]
    # Float16 rows, upcast per block, rank exactly as the same values in float32.
    half = gallery.half()
    assert torch.equal(top_k(queries, half, 7, block_rows=64)[1],
                       top_k(queries, half.float(), 7)[1])


def test_search_command_prints_the_top_k_and_writes_the_page(local_index, tmp_path, capsys):
    from composeae.serve.index import load_index

    index = load_index(local_index)
    page = tmp_path / "page.html"
    assert main(["search", "--index", local_index, "--ref", index.ids[3], "--text",
                 "make the red circle blue", "--k", "4", "--html", str(page)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ranked = [line.split() for line in lines[1:5]]
    assert [r[0] for r in ranked] == ["1", "2", "3", "4"]
    assert all(r[2] in index.row_of for r in ranked)
    text = page.read_text()
    assert text.count("<img") == 5 and "make the red circle blue" in text  # reference + 4

    image = tmp_path / "ref.png"
    image.write_bytes(index.image(3)[0])
    assert main(["search", "--index", local_index, "--image", str(image), "--text",
                 "make the red circle blue", "--k", "5"]) == 0
    by_image = [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:6]]
    # The same picture as a file: the same ranking, the reference no longer left out.
    assert [i for i in by_image if i != index.ids[3]][:4] == [r[2] for r in ranked]


@pytest.mark.parametrize("args, message", [
    (["--ref", "no-such-image", "--text", "add a cube"], "no gallery image 'no-such-image'"),
    (["--ref", "ID", "--text", "  "], "modifier text is missing or empty"),
    (["--ref", "ID", "--text", "x", "--k", "0"], "k must be a whole number from 1 to 240"),
    (["--ref", "ID", "--text", "x", "--k", "241"], "k must be a whole number from 1 to 240"),
    (["--image", "/no/such.png", "--text", "x"], "cannot read --image"),
])
def test_bad_search_input_is_one_line(local_index, capsys, tmp_path, args, message):
    from composeae.serve.index import load_index

    args = [load_index(local_index).ids[0] if a == "ID" else a for a in args]
    assert main(["search", "--index", local_index, *args]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_missing_index_and_unreadable_image_are_one_line(tmp_path, local_index, capsys):
    assert main(["search", "--index", str(tmp_path / "none"), "--ref", "a", "--text", "x"]) == 2
    assert "no index at" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["search", "--index", local_index, "--image", str(junk), "--text", "x"]) == 2
    assert "reference image cannot be read" in capsys.readouterr().err
    assert main(["index", "--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "i")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err  # read first: it names the split
