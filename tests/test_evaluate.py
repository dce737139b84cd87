"""The evaluation hit rule on gathered embeddings: exclusion, groups and Recall_subset@K."""

from __future__ import annotations

import json

import pytest
import torch

from composeae.config import EvalConfig
from composeae.report.tables import format_table
from composeae.evaluate import score

GALLERY_IDS = ["a", "b", "c", "d"]
# Gallery embeddings: four orthogonal directions.
GALLERY = {"emb": torch.eye(4), "image_id": GALLERY_IDS, "label": GALLERY_IDS,
           "group": [""] * 4}


def queries(subsets) -> dict:
    # q0: reference a, target c; nearest is its own reference a (excluded), then c.
    # q1: reference b, target d; nearest is c, then d.
    emb = torch.tensor([[1.0, 0.0, 0.8, 0.1], [0.0, 0.5, 0.9, 0.7]])
    return {"emb": emb, "query_id": ["q0", "q1"], "reference_id": ["a", "b"],
            "target_label": ["c", "d"], "target_id": ["c", "d"], "group": ["", ""],
            "subset": subsets}


def test_reference_is_excluded_and_subsets_are_scored():
    got = score(queries([["a", "b", "c"], ["b", "c", "d"]]), GALLERY, EvalConfig(ks=(1, 2, 5)))
    assert got == pytest.approx({"R@1": 0.5, "R@2": 1.0, "R@5": 1.0,
                                 "Rs@1": 0.5, "Rs@2": 1.0, "Rs@3": 1.0})
    assert "Rs@1" in format_table(got)


def test_no_subsets_no_subset_recall():
    got = score(queries([[], []]), GALLERY, EvalConfig(ks=(1, 2)))
    assert got == pytest.approx({"R@1": 0.5, "R@2": 1.0})


def test_groups_keep_galleries_apart():
    gallery = dict(GALLERY, group=["x", "x", "y", "y"])
    q = queries([[], []])
    q["group"] = ["x", "y"]  # q0's target c sits in group y: it can never be found
    got = score(q, gallery, EvalConfig(ks=(1, 2)))
    assert got == pytest.approx({"R@1": 0.0, "R@2": 0.5})


def test_score_with_reference_kept_and_a_joint_gallery():
    gallery = dict(GALLERY, group=["x", "x", "y", "y"])
    q = queries([[], []])
    q["group"] = ["x", "y"]
    q["target_label"] = q["target_id"] = ["b", "d"]
    q["reference_id"] = ["a", "c"]
    # Kept, q0's reference a (its nearest) is ranked first; removed, its target b is.
    kept = score(q, gallery, EvalConfig(ks=(1, 2)), exclude_reference=False, joint=True)
    removed = score(q, gallery, EvalConfig(ks=(1, 2)), exclude_reference=True)
    assert removed["R@1"] > kept["R@1"]
    assert set(kept) == {"R@1", "R@2", "joint/R@1", "joint/R@2"}
    assert "joint/R@1" in format_table(kept) and "one gallery of all categories" in format_table(kept)


# --- FashionIQ end to end: converter manifest -> shards -> embeddings -> recall ----------------

class MeanColour(torch.nn.Module):
    """An image-only embedder: the mean colour of the image (the fixture's images are plain)."""

    def embed_target(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # (B, 3, S, S) -> (B, 3)

    def compose(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.embed_target(images)

    def tokenize_fn(self) -> None:
        return None  # it never reads the modifier: the loader has nothing to tokenise


def test_fashioniq_keeps_the_reference_in_the_ranking(tmp_path):
    from composeae.config import DataConfig
    from composeae import storage
    from composeae.data import schema, sources
    from composeae.data.shardset import read_manifest
    from composeae.evaluate import evaluate

    import fixtures_datasets as fx

    # Each category's val gallery is its query's reference and target, in different colours.
    layout = fx.fashioniq_layout(1, {c: [(f"{c}-r", f"{c}-t")] for c in ("dress", "shirt", "toptee")})
    out = str(tmp_path / "out")
    sources.convert("fashioniq", fx.make_fashioniq(tmp_path / "src", *layout), out)
    manifest = read_manifest(out)
    assert manifest["params"][schema.EXCLUDE_REFERENCE] is False

    def recall() -> dict:
        return evaluate(MeanColour(), DataConfig(url=out, image_size=8, loader_workers=0), "val",
                        EvalConfig(ks=(1, 2, 6), batch_size=2), rank=0, world_size=1,
                        device=torch.device("cpu"), precision="fp32")

    kept = recall()
    # The reference is its own nearest image: no target at rank 1, each at rank 2 of 2; in the
    # joint gallery of all six images, still never first.
    assert kept == pytest.approx({"R@1": 0.0, "R@2": 1.0, "R@6": 1.0, "joint/R@1": 0.0,
                                  "joint/R@2": kept["joint/R@2"], "joint/R@6": 1.0})
    # An older manifest without the property removes the reference: the target is first.
    del manifest["params"][schema.EXCLUDE_REFERENCE]
    storage.write_text(f"{out}/{schema.MANIFEST}", json.dumps(manifest))
    removed = recall()
    assert removed["R@1"] == 1.0 != kept["R@1"]


def test_retrievals_of_fixed_queries_are_read_back_and_drawn(tmp_path):
    import re

    from composeae.config import DataConfig
    from composeae.data import sources
    from composeae.evaluate import evaluate, evaluate_with_retrievals
    from composeae.report.retrievals import render_section

    import fixtures_datasets as fx

    pairs = {c: [(f"{c}-r", f"{c}-t")] for c in ("dress", "shirt", "toptee")}
    layout = fx.fashioniq_layout(1, pairs)
    out = str(tmp_path / "out")
    sources.convert("fashioniq", fx.make_fashioniq(tmp_path / "src", *layout), out)
    args = (MeanColour(), DataConfig(url=out, image_size=8, loader_workers=0), "val",
            EvalConfig(ks=(1, 2), batch_size=2))
    kw = dict(rank=0, world_size=1, device=torch.device("cpu"), precision="fp32")
    metrics, record = evaluate_with_retrievals(*args, **kw, k=2)
    assert metrics == evaluate(*args, **kw)
    # FashionIQ keeps the reference: it comes first in its category's gallery, the target second.
    assert record["split"] == "val" and not record["exclude_reference"]
    assert len(record["queries"]) == 3
    for q in record["queries"]:
        assert [t["image_id"] for t in q["top"]] == [q["reference_id"], q["target_id"]]
        assert [t["hit"] for t in q["top"]] == [False, True] and q["first_hit_rank"] == 1
    assert evaluate_with_retrievals(*args, **kw, num_queries=0)[1] is None

    page = render_section(record, out)
    assert "could not be read" not in page and "stays in the ranking" in page
    assert len(re.findall(r'data-query="', page)) == 3
    assert len(re.findall(r'<figure class="result', page)) == 6
    # Exactly the targets are outlined, each the second of its row.
    rows = re.findall(r'<div class="query".*?</div>', page, re.S)
    assert [re.findall(r'<figure class="(result[^"]*)"', row) for row in rows] == \
        [["result", "result hit"]] * 3
    # Every image is inlined (3 references and 6 gallery images), scaled up pixelated.
    assert len(re.findall(r'<img class="px" src="data:image/(?:jpeg|png);base64,', page)) == 9
    assert "&ldquo;" in page  # the modifier text under each reference
