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


def _registry_like_copy(local_index: str, tmp_path: Path, version: int = 1) -> str:
    """A copy of the test index whose manifest names registry version `version`, as
    `composeae index --registry` writes it."""
    import json
    import shutil

    copy = str(tmp_path / "index")
    shutil.copytree(local_index, copy)
    manifest = json.loads((Path(copy) / "manifest.json").read_text())
    manifest["model"]["version"] = version
    (Path(copy) / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _expected(index_url: str):
    import json

    from composeae.serve.confine import Expected

    manifest = json.loads((Path(index_url) / "manifest.json").read_text())
    return Expected(1, manifest["model"]["checkpoint"], manifest["data"]["url"])


def _edit(path: Path, change) -> None:
    import json

    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["blocks"][0].update(shard="/etc/passwd"), "is not a plain file name"),
    (lambda m: m["blocks"][0].update(shard="../../../../etc/passwd"), "is not a plain file name"),
    (lambda m: m["blocks"][0].update(name="../../../etc/passwd"), "is not a plain file name"),
    (lambda m: m["data"].update(url="/etc"), "is not the version's dataset"),
    (lambda m: m["data"].update(url="s3://another-bucket/css"), "is not the version's dataset"),
    (lambda m: m["data"].update(url=m["data"]["url"] + "/../.."), "not an absolute, normal"),
    (lambda m: m["model"].update(version=None), "not for version 1"),
    (lambda m: m["model"].update(version="1; rm"), "is not a version number"),
    (lambda m: m["model"].update(checkpoint="/etc/passwd"), "not from the version's checkpoint"),
    (lambda m: m.update(count=m["count"] + 1), "blocks hold"),
    (lambda m: m.update(ann={"file": "../../etc/passwd"}), "not a plain name under ann/"),
], ids=["absolute shard", "shard ../", "block ../", "other dataset", "other bucket",
        "dataset ../", "no version", "odd version", "other checkpoint", "count", "ann ../"])
def test_a_crafted_manifest_is_refused_with_nothing_read(local_index, tmp_path, monkeypatch,
                                                         change, message):
    from composeae.errors import UserError
    from composeae.serve.index import load_index

    index = _registry_like_copy(local_index, tmp_path)
    expect = _expected(index)
    _edit(Path(index) / "manifest.json", change)
    opened = []
    open_read = storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda url: (opened.append(url), open_read(url))[1])
    with pytest.raises(UserError, match=message) as refused:
        load_index(index, expect=expect)
    assert str(refused.value).startswith(f"refusing the index at {index}: ")
    assert opened == [str(Path(index) / "manifest.json")]  # nothing else was read


@pytest.mark.parametrize("change, message", [
    (lambda b: b["pointers"][0].__setitem__(0, 10**9), "outside its shard"),
    (lambda b: b["pointers"][0].__setitem__(2, "html"), "with another file type"),
    (lambda b: b["ids"].pop(), "ids, labels and pointers are not"),
    (lambda b: b["ids"].__setitem__(0, 7), "id that is not a non-empty string"),
    (lambda b: b.update(count=b["count"] - 1), "does not hold the"),
])
def test_blocks_are_checked_against_the_manifest_and_the_shards(local_index, tmp_path,
                                                                 change, message):
    from composeae.errors import UserError
    from composeae.serve.index import load_index

    index = _registry_like_copy(local_index, tmp_path)
    assert len(load_index(index, expect=_expected(index))) == 240  # the copy itself loads
    block = sorted((Path(index) / "blocks").glob("*.json"))[0]
    _edit(block, change)
    with pytest.raises(UserError, match=message):
        load_index(index, expect=_expected(index))


def test_the_checkpoint_is_verified_against_the_manifests_sha256(local_index, tmp_path):
    from composeae.errors import UserError
    from composeae.serve.index import load_index
    from composeae.serve.search import Searcher

    index = _registry_like_copy(local_index, tmp_path)
    _edit(Path(index) / "manifest.json",
          lambda m: m["model"].update(checkpoint_sha256="0" * 64))
    with pytest.raises(UserError, match="is not the checkpoint it should be: its sha256 is"):
        Searcher.load(load_index(index))


def test_renamed_serve_flags_are_refused_naming_the_new_ones(tmp_path, capsys):
    for flag in ("--poll", "--read-timeout"):
        assert main(["serve", "--registry", str(tmp_path), flag, "5"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--poll-s" in err[0] and "--read-timeout-s" in err[0]
