"""The evaluation hit rule on gathered embeddings: exclusion, groups and Recall_subset@K."""

from __future__ import annotations

import pytest
import torch

from composeae.config import EvalConfig
from composeae.evaluate import format_table, score

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
