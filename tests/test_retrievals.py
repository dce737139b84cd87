"""The top-K retrievals of fixed queries: choice of queries, the hit rule, ties, the HTML."""

from __future__ import annotations

import re

import torch

from composeae.metrics import NO_HIT, encode_labels, first_hit_rank
from composeae.evaluate import pick_queries, top_k
from composeae.report.retrievals import render_section

IDS = ["a", "b", "c", "d", "e", "f"]


def gallery(groups=("",) * 6) -> dict:
    return {"emb": torch.eye(6), "image_id": IDS, "label": IDS, "group": list(groups)}


def queries(emb, reference, target, groups=None) -> dict:
    n = len(reference)
    return {"emb": torch.tensor(emb, dtype=torch.float32), "query_id": [f"q{i}" for i in range(n)],
            "reference_id": list(reference), "target_label": list(target),
            "target_id": list(target), "group": list(groups or [""] * n), "subset": [()] * n}


def ranked(record, i=0) -> list[str]:
    return [t["image_id"] for t in record["queries"][i]["top"]]


def test_fixed_queries_are_evenly_spaced_in_id_order_whatever_the_gather_order():
    ids = [f"q{i:03d}" for i in range(100)]
    picked = [ids[i] for i in pick_queries(ids, 4)]
    assert picked == ["q012", "q037", "q062", "q087"]
    shuffled = ids[::-1]
    assert [shuffled[i] for i in pick_queries(shuffled, 4)] == picked
    assert sorted(pick_queries(ids[:3], 6)) == [0, 1, 2]  # fewer queries than asked: all


def test_reference_is_left_out_and_hits_are_flagged():
    # Nearest to q0 is its own reference a, then c (the target), then b.
    q = queries([[1.0, 0.5, 0.8, 0, 0, 0]], ["a"], ["c"])
    record = top_k(q, gallery(), k=3, split="test")
    assert ranked(record) == ["c", "b", "d"]
    assert [t["hit"] for t in record["queries"][0]["top"]] == [True, False, False]
    assert record["queries"][0]["first_hit_rank"] == 0
    assert record["split"] == "test" and record["k"] == 3
    # A dataset that keeps the reference (FashionIQ) ranks it first.
    kept = top_k(q, gallery(), k=3, exclude_reference=False)
    assert ranked(kept) == ["a", "c", "b"] and kept["queries"][0]["first_hit_rank"] == 1


def test_only_the_query_group_is_ranked_and_a_miss_names_the_correct_image():
    groups = ["x", "x", "x", "y", "y", "y"]
    # q0 (group y) is nearest to a and b, which are group x's; its target f is last of y's.
    q = queries([[1.0, 0.9, 0, 0.5, 0.4, 0.1]], ["e"], ["f"], ["y"])
    record = top_k(q, gallery(groups), k=1)
    entry = record["queries"][0]
    assert ranked(record) == ["d"] and not entry["top"][0]["hit"]
    assert entry["first_hit_rank"] == 1 and entry["first_hit_id"] == "f"
    # A target of another group is never found.
    other = top_k(queries([[1.0, 0, 0, 0, 0, 0]], ["e"], ["a"], ["y"]), gallery(groups))
    assert other["queries"][0]["first_hit_rank"] is None
    assert not any(t["hit"] for t in other["queries"][0]["top"])


def test_ties_go_against_the_query_as_in_the_recall():
    # b (a miss) and c (the target) are equally similar: the miss is shown first.
    q = queries([[0, 1.0, 1.0, 0, 0, 0]], ["a"], ["c"])
    assert ranked(top_k(q, gallery(), k=2)) == ["b", "c"]


def test_first_hit_rank_agrees_with_the_metric():
    torch.manual_seed(0)
    n, g = 40, 30
    gal = {"emb": torch.randn(g, 8), "image_id": [f"i{j}" for j in range(g)],
           "label": [f"l{j % 7}" for j in range(g)], "group": [f"g{j % 2}" for j in range(g)]}
    q = {"emb": torch.randn(n, 8), "query_id": [f"q{i:02d}" for i in range(n)],
         "reference_id": [f"i{(3 * i) % g}" for i in range(n)],
         "target_label": [f"l{i % 7}" for i in range(n)], "target_id": [""] * n,
         "group": [f"g{i % 2}" for i in range(n)], "subset": [()] * n}
    record = top_k(q, gal, num_queries=n, k=5)
    position = {(grp, i): j for j, (grp, i) in enumerate(zip(gal["group"], gal["image_id"]))}
    exclude = torch.tensor([position.get(key, -1) for key in zip(q["group"], q["reference_id"])])
    q_labels, g_labels = encode_labels(q["target_label"], gal["label"])
    q_groups, g_groups = encode_labels(q["group"], gal["group"])
    ranks = first_hit_rank(q["emb"], gal["emb"], q_labels, g_labels, exclude=exclude,
                           query_groups=q_groups, gallery_groups=g_groups)
    got = {e["query_id"]: e["first_hit_rank"] for e in record["queries"]}
    want = {qid: (None if int(r) == NO_HIT else int(r)) for qid, r in zip(q["query_id"], ranks)}
    assert got == want
    for entry in record["queries"]:
        top = entry["top"]
        assert len(top) == 5 and all(t["image_id"] != entry["reference_id"] for t in top)
        assert [t["similarity"] for t in top] == sorted((t["similarity"] for t in top),
                                                         reverse=True)


def test_unreadable_images_still_give_the_section_with_its_outlines(tmp_path):
    q = queries([[1.0, 0.5, 0.8, 0, 0, 0], [0, 0, 0, 0, 1.0, 0.9]], ["a", "e"], ["c", "b"])
    record = top_k(q, gallery(), k=3, split="test")
    page = render_section(record, str(tmp_path / "nothing"))
    assert "could not be read" in page
    assert len(re.findall(r'<figure class="result', page)) == 6
    assert len(re.findall(r'<figure class="result hit"', page)) == 1
    # q1's target b is not among its three (f, then a, c, d tied with b and shown before it):
    # it follows, dashed, with its rank.
    assert page.count('<figure class="target"') == 1 and "correct at rank 5" in page
    assert render_section(None, "") == ""
