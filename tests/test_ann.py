"""Approximate gallery indexes: built on tens of thousands of clustered rows, reloaded and
searched with agreement above a floor; the manifest's entry, a no-op rebuild and a resumed one;
exact answers at the widest settings; `composeae index --kind` and `search --probe/--rerank`
on a real index, and their bad values in one line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from composeae.cli import main
from composeae.serve.ann import AnnSpec, ann_top_k, check_knobs, load_ann
from composeae.serve.index import ANN, add_ann, read_block_rows, read_manifest
from composeae.serve.search import top_k
from composeae.testing.checkpoints import random_checkpoint
from composeae.testing.console import own_lines
from composeae.testing.galleries import synthetic_blocks, unit_rows, write_index

ROWS, DIM = 20_000, 64
FLOOR = 0.9
"""Agreement with the exact top 10 that both kinds must reach at the settings below (measured
0.95-0.98 on these rows: 200 clusters, queries near a gallery row)."""


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> tuple[str, torch.Tensor]:
    """A 20,000 x 64 float16 index folder of clustered rows, and its rows as float32."""
    url = write_index(tmp_path_factory.mktemp("ann") / "index",
                      synthetic_blocks(ROWS, DIM, block_rows=3000, clusters=200), DIM)
    return url, _rows(url)


def _rows(url: str) -> torch.Tensor:
    """An index folder's stored rows, all blocks, as float32."""
    blocks = read_manifest(url)["blocks"]
    return torch.from_numpy(np.concatenate([read_block_rows(url, b["name"]) for b in blocks])
                            ).float()


def _queries(rows: torch.Tensor, n: int = 200) -> tuple[torch.Tensor, list[int]]:
    """Queries near n gallery rows (the rows to leave out, as a query's reference is)."""
    rng = np.random.default_rng(5)
    near = rng.integers(len(rows), size=n)
    noise = torch.from_numpy(unit_rows(rng, n, rows.shape[1])) * 0.05
    return torch.nn.functional.normalize(rows[near] + noise, dim=1), [int(r) for r in near]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([len(set(x) & set(y)) / a.shape[1]
                          for x, y in zip(a.tolist(), b.tolist())]))


@pytest.mark.parametrize("spec, probe", [(AnnSpec("ivf", lists=64), 16),
                                         (AnnSpec("hnsw", m=16), 64)])
def test_an_approximate_index_is_built_reloaded_and_agrees_with_exact(clustered, spec, probe,
                                                                      capsys):
    url, rows = clustered
    done = add_ann(url, spec)
    entry = done.manifest["ann"]
    assert done.built and entry["kind"] == spec.kind and entry["params"]["codes"] == "sq8"
    assert entry["factory"] == ("IVF64,SQ8" if spec.kind == "ivf" else "HNSW16,SQ8")
    path = os.path.join(url, entry["file"])
    assert os.listdir(os.path.join(url, ANN)) == [os.path.basename(path)]  # the other kind's gone
    # The manifest round trip: what is read back is what was written, knobs default from it.
    assert read_manifest(url) == done.manifest
    assert check_knobs(entry) == (entry["search"]["probe"], entry["search"]["rerank"])

    ann = load_ann(url, entry)
    assert ann.ntotal == ROWS
    queries, near = _queries(rows)
    _, exact = top_k(queries, rows, 10, exclude=near)
    scores, found = ann_top_k(ann, spec.kind, rows, queries, 10, probe, 4, near)
    agreement = _agreement(found, exact)
    print(f"{entry['factory']} probe {probe} rerank 4: agreement {agreement:.3f}")
    assert agreement >= FLOOR
    assert not (found == torch.tensor(near)[:, None]).any()  # the reference left out
    # Re-ranked scores are the exact inner products with the stored rows, best first.
    assert torch.allclose(scores, (queries[:, None] * rows[found]).sum(-1), atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()

    # A rebuild of the same is a no-op; an interrupted one (the file written, the manifest not)
    # reuses the file instead of training again.
    before = os.stat(path).st_mtime_ns
    assert not add_ann(url, spec).built
    manifest = read_manifest(url)
    del manifest["ann"]
    write_index_manifest(url, manifest)
    capsys.readouterr()
    again = add_ann(url, spec)
    assert again.built and again.manifest["ann"]["file"] == entry["file"]
    assert os.stat(path).st_mtime_ns == before


def write_index_manifest(url: str, manifest: dict) -> None:
    import json

    with open(os.path.join(url, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def test_the_widest_settings_give_the_exact_answer(tmp_path):
    """IVF with every list probed and every row re-ranked is exact search, ties and the left-out
    row included."""
    url = write_index(tmp_path / "small", synthetic_blocks(2000, 16, block_rows=500,
                                                           clusters=20), 16)
    rows = _rows(url)
    entry = add_ann(url, AnnSpec("ivf", lists=16)).manifest["ann"]
    ann = load_ann(url, entry)
    queries, near = _queries(rows, 50)
    exclude = [r if i % 2 else None for i, r in enumerate(near)]
    expected = top_k(queries, rows, 10, exclude=exclude)
    got = ann_top_k(ann, "ivf", rows, queries, 10, probe=16, rerank=200, exclude=exclude)
    assert torch.equal(got[1], expected[1])
    assert torch.allclose(got[0], expected[0], atol=1e-5)


@pytest.mark.parametrize("kind, lists, m, codes, message", [
    ("annoy", None, None, None, "--kind must be one of exact, ivf, hnsw, got 'annoy'"),
    ("hnsw", 8, None, None, "--lists applies to --kind ivf, not hnsw"),
    ("exact", None, None, "sq8", "--codes applies to --kind ivf or hnsw, not exact"),
    ("ivf", 0, None, None, "--lists must be from 1 to 65536, got 0"),
    ("ivf", None, None, "pq", "--codes must be one of sq8, flat, got 'pq'"),
])
def test_a_bad_kind_is_one_line(tmp_path, capsys, kind, lists, m, codes, message):
    args = ["index", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out",
            str(tmp_path / "i"), "--kind", kind]
    for flag, value in (("--lists", lists), ("--hnsw-m", m), ("--codes", codes)):
        if value is not None:
            args += [flag, str(value)]
    assert main(args) == 2
    err = own_lines(capsys.readouterr().err)
    assert err == [f"error: {message}"]
    assert not (tmp_path / "i").exists()


def test_index_kind_and_search_knobs_on_the_command_line(ray_local, css_tiny, tmp_path,
                                                         capsys, caplog):
    checkpoint = random_checkpoint(css_tiny, tmp_path / "ckpt")
    out = str(tmp_path / "index")
    build = ["index", "--checkpoint", checkpoint, "--data", css_tiny, "--out", out]
    with caplog.at_level("INFO", logger="composeae"):
        assert main(build + ["--kind", "ivf", "--lists", "8", "--workers", "2"]) == 0
    assert "approximate index: IVF8,SQ8" in capsys.readouterr().out
    progress = [r.getMessage() for r in caplog.records]
    assert "embedding the gallery: 8/8 blocks, 240/240 rows" in "\n".join(progress)
    assert any(line.startswith("embedding the gallery: ") and "rows/s, ETA" in line
               for line in progress)
    manifest = read_manifest(out)
    assert manifest["ann"]["search"] == {"probe": 8, "rerank": 4}
    assert manifest["ann"]["params"]["lists"] == 8 and manifest["count"] == 240
    # Filled by two Ray tasks (--workers 2), with a progress line as they finish.
    assert manifest["ann"]["filled_by"] == 2
    assert "adding rows in 2 tasks: 8/8 blocks, 240/240 rows" in "\n".join(progress)
    assert main(build + ["--kind", "ivf", "--lists", "8"]) == 0
    assert "up to date" in capsys.readouterr().out

    ref = _first_id(out)
    search = ["search", "--index", out, "--ref", ref, "--text", "make the red circle blue",
              "--k", "5"]

    def ranked(*extra) -> tuple[list[str], str]:
        assert main(search + list(extra)) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line.split()[2] for line in lines[1:6]], lines[0]

    exact, header = ranked("--exact")
    assert header.endswith("exact):")
    # Every list probed and every row re-ranked: the exact answer, through the IVF index.
    widest, header = ranked("--probe", "8", "--rerank", "100")
    assert widest == exact and "IVF8,SQ8, probe 8, rerank 100" in header

    for extra, message in [
        (["--probe", "0"], "probe must be a whole number from 1 to 8, got '0'"),
        (["--probe", "9"], "probe must be a whole number from 1 to 8, got '9'"),
        (["--rerank", "-1"], "rerank must be a whole number from 0 to 100"),
        (["--exact", "--probe", "2"], "--exact searches without the approximate index"),
    ]:
        assert main(search + extra) == 2
        err = own_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]

    # Back to exact: the blocks are kept (nothing embedded again), the approximate index goes.
    assert main(build + ["--kind", "exact"]) == 0
    capsys.readouterr()
    assert "ann" not in read_manifest(out) and os.listdir(os.path.join(out, ANN)) == []
    assert main(search + ["--probe", "2"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "this index is exact" in err[0]


def _first_id(url: str) -> str:
    import json

    name = read_manifest(url)["blocks"][0]["name"]
    with open(os.path.join(url, "blocks", name + ".json")) as f:
        return json.load(f)["ids"][0]


def test_an_ivf_index_filled_by_ray_tasks_is_the_one_process_fill(ray_local, tmp_path):
    """Three tasks fill copies of the trained index with their runs of blocks, merged in row
    order: every list holds the same ids in the same order, so searches answer alike."""
    import faiss

    from composeae.serve.ann import build_ann

    counts = [1500, 700, 1500, 1200, 900, 1600]
    url = write_index(tmp_path / "index", iter(unit_rows(np.random.default_rng(n), c, 32)
                                               for n, c in enumerate(counts)), 32)
    blocks = [lambda name=b["name"]: read_block_rows(url, name)
              for b in read_manifest(url)["blocks"]]
    lines: list[str] = []
    built = {}
    for workers in (1, 3):
        entry = build_ann(str(tmp_path / f"by-{workers}"), "b", AnnSpec("ivf", lists=32), blocks,
                          sum(counts), 32, lines.append, counts=counts, workers=workers)
        built[workers] = (entry, load_ann(str(tmp_path / f"by-{workers}"), entry))
    assert built[3][0].get("filled_by") == 3 and "filled_by" not in built[1][0]
    assert any(line.startswith("adding rows in 3 tasks: 6/6 blocks, 7,400/7,400 rows")
               for line in lines)
    one, three = (faiss.extract_index_ivf(built[w][1]) for w in (1, 3))
    assert one.ntotal == three.ntotal == sum(counts)
    for lst in range(one.nlist):
        size = one.invlists.list_size(lst)
        assert three.invlists.list_size(lst) == size
        ids = [faiss.rev_swig_ptr(x.invlists.get_ids(lst), size).copy() for x in (one, three)]
        assert np.array_equal(*ids)
    queries = unit_rows(np.random.default_rng(9), 50, 32)
    params = faiss.SearchParametersIVF(nprobe=8)
    a, b = (built[w][1].search(queries, 10, params=params) for w in (1, 3))
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
