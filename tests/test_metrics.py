"""recall@K against a naive full-sort oracle written here."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import composeae.metrics as metrics
from composeae.metrics import encode_labels, first_hit_rank, NO_HIT
from support.metrics import recall_at_k

KS = (1, 2, 5, 10, 50, 100)


def oracle_ranks(query, gallery, query_labels, gallery_labels, exclude=None, query_groups=None,
                 gallery_groups=None, normalize=True):
    """For each query: drop excluded and other-group items, sort the rest by similarity
    (descending) with non-hits before hits on ties, and return the position of the first hit."""
    q, g = query.double(), gallery.double()
    if normalize:
        q, g = q / q.norm(dim=1, keepdim=True), g / g.norm(dim=1, keepdim=True)
    sims = (q @ g.T).numpy()
    query_labels, gallery_labels = query_labels.tolist(), gallery_labels.tolist()
    if query_groups is not None:
        query_groups, gallery_groups = query_groups.tolist(), gallery_groups.tolist()
    ranks = []
    for i in range(q.shape[0]):
        dropped = set()
        if exclude is not None:
            row = exclude[i].reshape(-1).tolist()
            dropped = {j for j in row if j >= 0}
        valid = [j for j in range(g.shape[0]) if j not in dropped
                 and (query_groups is None or gallery_groups[j] == query_groups[i])]
        hits = np.array([int(gallery_labels[j] == query_labels[i]) for j in valid])
        order = np.lexsort((hits, -sims[i, valid]))  # last key first: similarity, then hit
        first = np.flatnonzero(hits[order])
        ranks.append(int(first[0]) if first.size else NO_HIT)
    return torch.tensor(ranks)


def oracle_recall(ranks, ks=KS):
    return {f"R@{k}": float(np.mean([r < k for r in ranks.tolist()])) for k in ks}


def random_case(num_query=41, num_gallery=67, dim=12, num_labels=25, seed=0, integer=False):
    gen = torch.Generator().manual_seed(seed)
    if integer:  # small integers: exact dot products with many exact ties
        query = torch.randint(-2, 3, (num_query, dim), generator=gen).float()
        gallery = torch.randint(-2, 3, (num_gallery, dim), generator=gen).float()
    else:
        query = torch.randn(num_query, dim, generator=gen)
        gallery = torch.randn(num_gallery, dim, generator=gen)
    gallery_labels = torch.randint(0, num_labels, (num_gallery,), generator=gen)
    # Most queries have a label present in the gallery; a few have none.
    query_labels = torch.randint(0, num_labels + 3, (num_query,), generator=gen)
    exclude = torch.randint(-1, num_gallery, (num_query,), generator=gen)
    return query, gallery, query_labels, gallery_labels, exclude


@pytest.fixture(params=["gather", "mask"])
def hit_path(request, monkeypatch):
    """Run each test through both ways of reading the hits' similarities."""
    monkeypatch.setattr(metrics, "_GATHER_MAX_FRACTION", 1 if request.param == "gather" else 10**9)
    return request.param


@functools.cache
def labelled_case(num_labels):
    """A random case and its oracle ranks, computed once per label count."""
    q, g, ql, gl, ex = random_case(num_labels=num_labels, seed=num_labels)
    return q, g, ql, gl, ex, oracle_ranks(q, g, ql, gl, exclude=ex)


@pytest.mark.parametrize("chunk_size", [1, 7, 41, 1000])
@pytest.mark.parametrize("num_labels", [4, 25, 200])
def test_recall_matches_oracle_with_exclusions(hit_path, chunk_size, num_labels):
    # 4 labels: many label-level duplicates per query; 200: most queries have 0 or 1 hit.
    q, g, ql, gl, ex, ranks = labelled_case(num_labels)
    got = recall_at_k(q, g, ql, gl, ks=KS, exclude=ex, chunk_size=chunk_size)
    assert got == pytest.approx(oracle_recall(ranks))
    assert torch.equal(first_hit_rank(q, g, ql, gl, exclude=ex, chunk_size=chunk_size), ranks)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_ties_rank_non_hits_first_and_match_oracle(hit_path, chunk_size):
    q, g, ql, gl, ex = random_case(num_labels=6, integer=True, seed=5)
    # Exact duplicates of gallery rows under other labels force ties with the hits.
    g = torch.cat([g, g[:20]])
    gl = torch.cat([gl, (gl[:20] + 1) % 6])
    ranks = oracle_ranks(q, g, ql, gl, exclude=ex, normalize=False)
    got = first_hit_rank(q, g, ql, gl, exclude=ex, chunk_size=chunk_size, normalize=False)
    assert torch.equal(got, ranks)


def test_collapsed_embeddings_score_zero_whatever_the_gallery_order(hit_path):
    query, gallery = torch.ones(5, 4), torch.ones(30, 4)
    query_labels = torch.arange(5)
    gallery_labels = torch.arange(30)  # query i's only hit is gallery item i: first in order
    # All 30 similarities tie: the 29 non-hits rank ahead of the hit.
    got = recall_at_k(query, gallery, query_labels, gallery_labels, ks=(1, 10, 29, 30))
    assert got == {"R@1": 0.0, "R@10": 0.0, "R@29": 0.0, "R@30": 1.0}


@pytest.mark.parametrize("chunk_size", [4, 100])
def test_groups_restrict_each_query_to_its_own_gallery(hit_path, chunk_size):
    q, g, ql, gl, ex = random_case(num_labels=10, seed=2)
    gen = torch.Generator().manual_seed(7)
    qg = torch.randint(0, 3, (q.shape[0],), generator=gen)
    gg = torch.randint(0, 4, (g.shape[0],), generator=gen)  # group 3 has no queries
    got = first_hit_rank(q, g, ql, gl, exclude=ex, query_groups=qg, gallery_groups=gg,
                         chunk_size=chunk_size)
    ranks = oracle_ranks(q, g, ql, gl, exclude=ex, query_groups=qg, gallery_groups=gg)
    assert torch.equal(got, ranks)
    # One group for everything is the same as no groups.
    assert torch.equal(first_hit_rank(q, g, ql, gl, exclude=ex, query_groups=torch.zeros_like(qg),
                                      gallery_groups=torch.zeros_like(gg), chunk_size=chunk_size),
                       oracle_ranks(q, g, ql, gl, exclude=ex))
    # A group whose gallery is empty: all its queries miss.
    got = first_hit_rank(q, g, ql, gl, query_groups=torch.full_like(qg, 9), gallery_groups=gg)
    assert (got == NO_HIT).all()


def test_k_beyond_the_gallery_and_label_duplicates(hit_path):
    q, g, ql, gl, ex = random_case(num_query=9, num_gallery=12, num_labels=3, seed=3)
    got = recall_at_k(q, g, ql, gl, ks=(1, 11, 12, 13, 1000), exclude=ex)
    ranks = oracle_ranks(q, g, ql, gl, exclude=ex)
    assert got == pytest.approx(oracle_recall(ranks, ks=(1, 11, 12, 13, 1000)))
    has_valid_hit = ranks != NO_HIT
    assert got["R@1000"] == pytest.approx(has_valid_hit.double().mean().item())


def test_excluding_the_only_hit_is_a_miss_and_several_exclusions_work(hit_path):
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    query_labels = torch.tensor([0, 1])
    gallery_labels = torch.tensor([0, 1, 1])
    ranks = first_hit_rank(query, gallery, query_labels, gallery_labels,
                           exclude=torch.tensor([0, -1]))
    assert ranks.tolist() == [NO_HIT, 1]
    two = torch.tensor([[-1, 0], [1, 0]])  # query 1: drop items 1 and 0, its hit 2 is then first
    ranks = first_hit_rank(query, gallery, query_labels, gallery_labels, exclude=two)
    assert ranks.tolist() == [NO_HIT, 0]
    q, g, ql, gl, _ = random_case(seed=8)
    gen = torch.Generator().manual_seed(1)
    multi = torch.randint(-1, g.shape[0], (q.shape[0], 3), generator=gen)
    assert torch.equal(first_hit_rank(q, g, ql, gl, exclude=multi, chunk_size=5),
                       oracle_ranks(q, g, ql, gl, exclude=multi))


def test_dot_product_mode_and_half_precision_inputs():
    q, g, ql, gl, ex = random_case(seed=4)
    assert torch.equal(first_hit_rank(q, g, ql, gl, exclude=ex, normalize=False),
                       oracle_ranks(q, g, ql, gl, exclude=ex, normalize=False))
    q, g = q.round().bfloat16(), g.round().bfloat16()  # exact in bf16 and in float32
    assert torch.equal(first_hit_rank(q, g, ql, gl, normalize=False),
                       oracle_ranks(q.float(), g.float(), ql, gl, normalize=False))


def test_encode_labels_shares_ids_across_lists():
    queries, gallery = encode_labels(["red dress", "blue", "red dress"],
                                     ["blue", "green", "red dress"])
    assert queries.dtype == torch.long
    assert queries.tolist() == [0, 1, 0] and gallery.tolist() == [1, 2, 0]
    q, g, _, _, _ = random_case(num_query=3, num_gallery=3, seed=6)
    got = recall_at_k(q, g, queries, gallery, ks=(3,))
    assert got == {"R@3": 1.0}


def test_bad_arguments_are_rejected():
    q, g, ql, gl, ex = random_case(seed=0)
    with pytest.raises(ValueError):
        recall_at_k(q, g[:, :5], ql, gl)
    with pytest.raises(ValueError):
        recall_at_k(q, g, ql[:-1], gl)
    with pytest.raises(ValueError):
        recall_at_k(q, g, ql, gl, exclude=torch.full_like(ex, g.shape[0]))
    with pytest.raises(ValueError):
        recall_at_k(q, g, ql, gl, query_groups=torch.zeros_like(ql))
    with pytest.raises(ValueError):
        recall_at_k(q, g, ql, gl, ks=(0,))
    with pytest.raises(ValueError):
        recall_at_k(q[:0], g, ql[:0], gl)


def test_bool_count_fallback_matches_oracle(monkeypatch):
    # Galleries too large for an exact float count take the bool-mask count instead.
    monkeypatch.setattr(metrics, "_EXACT_FLOAT_COUNT", {torch.float32: 0, torch.float64: 0})
    q, g, ql, gl, ex, ranks = labelled_case(25)
    assert torch.equal(first_hit_rank(q, g, ql, gl, exclude=ex, chunk_size=7), ranks)
    q, g, ql, gl, ex = random_case(num_labels=6, integer=True, seed=5)
    assert torch.equal(first_hit_rank(q, g, ql, gl, exclude=ex, normalize=False),
                       oracle_ranks(q, g, ql, gl, exclude=ex, normalize=False))


def test_subset_recall_matches_a_loop_oracle():
    from composeae.metrics import subset_recall_at_k

    g = torch.Generator().manual_seed(11)
    query, gallery = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    gallery[7] = gallery[3]  # an exact tie inside some subsets
    subsets = torch.randint(0, 30, (40, 5), generator=g)
    subsets[::4, 4] = -1  # padding
    targets = subsets[:, 0].clone()
    targets[::9] = 29  # some targets outside their subset: misses
    got = subset_recall_at_k(query, gallery, subsets, targets, ks=(1, 2, 3))

    q, gal = torch.nn.functional.normalize(query, dim=1), torch.nn.functional.normalize(gallery, dim=1)
    hits = {1: 0, 2: 0, 3: 0}
    for i in range(40):
        members = [int(m) for m in subsets[i] if m >= 0]
        t = int(targets[i])
        if t not in members:
            continue
        mine = float(q[i] @ gal[t])
        rank = sum(1 for m in members if m != t and float(q[i] @ gal[m]) >= mine)
        for k in hits:
            hits[k] += rank < k
    assert got == pytest.approx({f"Rs@{k}": v / 40 for k, v in hits.items()})


def test_recall_from_ranks_averages_groups():
    from composeae.metrics import recall_from_ranks

    ranks = torch.tensor([0, 5, 0, 0])  # group 0: a hit at K=1; group 1: 2 of 3
    groups = torch.tensor([0, 1, 1, 1])
    assert recall_from_ranks(ranks, (1,)) == {"R@1": 0.75}
    assert recall_from_ranks(ranks, (1, 10), groups) == {"R@1": pytest.approx((1 + 2 / 3) / 2),
                                                         "R@10": 1.0}
