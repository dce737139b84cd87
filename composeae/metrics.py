"""Retrieval metrics: pure functions of embeddings and integer labels.

What belongs here: recall@K and the per-query rank it is computed from, plus the helper that turns
the string labels of the data (captions, scene labels, image ids, categories) into integer ids.
No models, no I/O, no distributed code: evaluation gathers the embeddings first, then calls these.

A gallery item is a *hit* for a query when their labels are equal; label-level, caption-level and
id-level protocols differ only in what the caller uses as the label. Per query, a gallery item may
be excluded (the query's own reference image) and, with groups, only items of the query's group
are ranked (one gallery per FashionIQ category). Memory is O(chunk_size x G): the Q x G
similarity matrix is never formed.

Several groups: `recall_from_ranks` averages the groups' recalls (FashionIQ's category mean);
without groups it pools all queries.

Ties: the best hit's rank counts every valid non-hit whose similarity is greater than *or equal
to* the hit's (ties are resolved against the query). The result then does not depend on the order
of the gallery, and a collapsed model whose embeddings are all equal scores 0, not the recall of
whatever the gallery order happens to put first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NO_HIT", "encode_labels", "first_hit_rank", "recall_from_ranks", "subset_recall_at_k"]

NO_HIT = torch.iinfo(torch.int64).max
"""The rank of a query with no valid hit in its gallery: a miss at every K."""

# A chunk whose queries have at most G / _GATHER_MAX_FRACTION hits each reads the hits'
# similarities by index; with more (class-level labels) it goes through a (chunk, G) match mask.
_GATHER_MAX_FRACTION = 8

# Largest count of 1.0s that a float sum holds exactly.
_EXACT_FLOAT_COUNT = {torch.float32: 2**24, torch.float64: 2**53}


def encode_labels(*label_lists: Sequence[str]) -> list[Tensor]:
    """Map strings to int64 ids shared across all the lists (first-seen order), one tensor per
    list; equal strings get equal ids in every list."""
    ids: dict[str, int] = {}
    return [torch.tensor([ids.setdefault(label, len(ids)) for label in labels], dtype=torch.long)
            for labels in label_lists]


def _float(x: Tensor) -> Tensor:
    """Half precision is upcast: CPU half matmuls are slow and the rank test needs exact compares
    on one consistent set of values."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _ranks_one_gallery(query: Tensor, gallery: Tensor, query_labels: Tensor, gallery_labels: Tensor,
                       exclude: Tensor | None, chunk_size: int, normalize: bool) -> Tensor:
    """first_hit_rank for one gallery (groups already split off). query (Q, D), gallery (G, D)
    (normalised already when `normalize`), labels (Q,) / (G,), exclude (Q, E) or None."""
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    ranks = torch.full((num_query,), NO_HIT, dtype=torch.long, device=query.device)
    if num_gallery == 0:
        return ranks
    # Gallery indices grouped by label: the hits of label l are order[start(l):end(l)].
    order = torch.argsort(gallery_labels, stable=True)  # (G,)
    sorted_labels = gallery_labels[order]
    gallery_t = gallery.T  # (D, G) view, reused by every chunk's matmul
    # One (C, G) block reused by every chunk: the memory bound, and no fresh pages per chunk.
    block = torch.empty(min(chunk_size, num_query), num_gallery, dtype=query.dtype,
                        device=query.device)
    ones = torch.ones(num_gallery, dtype=query.dtype, device=query.device)
    for begin in range(0, num_query, chunk_size):
        q = query[begin : begin + chunk_size]  # (C, D)
        if normalize:
            q = F.normalize(q, dim=1)
        labels = query_labels[begin : begin + chunk_size]  # (C,)
        sims = torch.mm(q, gallery_t, out=block[: q.shape[0]])  # (C, G): the one O(C G D) step
        if exclude is not None:
            ex = exclude[begin : begin + chunk_size]  # (C, E), -1 = nothing excluded
            keep = ex >= 0
            rows = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(ex)
            sims[rows[keep], ex[keep]] = float("-inf")
        first = torch.searchsorted(sorted_labels, labels)  # (C,)
        count = torch.searchsorted(sorted_labels, labels, right=True) - first  # hits per query
        most = int(count.max())
        if most == 0:
            continue
        if most * _GATHER_MAX_FRACTION <= num_gallery:
            # Few hits per query: gather their similarities by index, (C, M).
            slot = torch.arange(most, device=q.device)
            is_hit = slot < count[:, None]  # (C, M); padding slots are not hits
            positions = (first[:, None] + slot).clamp_(max=num_gallery - 1)
            hit_sims = sims.gather(1, order[positions]).masked_fill_(~is_hit, float("-inf"))
        else:
            # Many hits per query (class-level labels): through a (C, G) label-match mask.
            hit_sims = sims.masked_fill(labels[:, None] != gallery_labels[None, :], float("-inf"))
        best = hit_sims.amax(dim=1)  # (C,): the best valid hit; -inf when there is none
        tied_hits = (hit_sims == best[:, None]).sum(dim=1)  # hits at exactly `best`, >= 1
        # Valid items with sim >= best, counted in place: 1.0 / 0.0 floats summed by a
        # matrix-vector product, several times faster than summing a bool mask and exact while
        # the count fits the float's mantissa (2^24 items in float32).
        if num_gallery < _EXACT_FLOAT_COUNT[query.dtype]:
            at_or_above = torch.mv(sims.ge_(best[:, None]), ones).long()  # (C,)
        else:
            at_or_above = (sims >= best[:, None]).sum(dim=1)
        found = best > float("-inf")
        ranks[begin : begin + q.shape[0]] = torch.where(found, at_or_above - tied_hits, NO_HIT)
    return ranks


def first_hit_rank(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    *,
    exclude: Tensor | None = None,
    query_groups: Tensor | None = None,
    gallery_groups: Tensor | None = None,
    chunk_size: int = 1024,
    normalize: bool = True,
) -> Tensor:
    """0-based rank of each query's best-ranked hit among its valid gallery items, (Q,) int64.

    The rank is the number of valid non-hits whose similarity is >= the best hit's (see the
    module docstring on ties); NO_HIT when the query has no valid hit. A query hits at K exactly
    when its rank is < K.

    query (Q, D) and gallery (G, D) embeddings; query_labels (Q,) and gallery_labels (G,) int64
    (see `encode_labels`); a gallery item is a hit when its label equals the query's.
    exclude: (Q,) gallery index to drop per query, -1 for none (or (Q, E) for several).
    query_groups (Q,) / gallery_groups (G,): a query ranks only the gallery items of its group.
    chunk_size: queries per block; memory is O(chunk_size x G). normalize: cosine similarity
    (otherwise the raw dot product).
    """
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query (Q, D) and gallery (G, D) must share D; got {tuple(query.shape)} "
                         f"and {tuple(gallery.shape)}")
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    if query_labels.shape != (num_query,) or gallery_labels.shape != (num_gallery,):
        raise ValueError(f"labels must be ({num_query},) and ({num_gallery},); got "
                         f"{tuple(query_labels.shape)} and {tuple(gallery_labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("query_groups and gallery_groups must be given together")
    device = query.device
    query, gallery = _float(query), _float(gallery).to(device)
    if normalize:
        gallery = F.normalize(gallery, dim=1)  # (G, D), once; queries are normalised per chunk
    query_labels, gallery_labels = query_labels.to(device), gallery_labels.to(device)
    if exclude is not None:
        exclude = exclude.to(device)
        exclude = exclude[:, None] if exclude.dim() == 1 else exclude  # (Q, E)
        if exclude.shape[0] != num_query or exclude.dim() != 2:
            raise ValueError(f"exclude must be (Q,) or (Q, E) with Q = {num_query}; "
                             f"got {tuple(exclude.shape)}")
        if exclude.numel() and (int(exclude.min()) < -1 or int(exclude.max()) >= num_gallery):
            raise ValueError(f"exclude holds gallery indices in [0, {num_gallery}) or -1")
    if query_groups is None:
        return _ranks_one_gallery(query, gallery, query_labels, gallery_labels, exclude,
                                  chunk_size, normalize)

    query_groups, gallery_groups = query_groups.to(device), gallery_groups.to(device)
    if query_groups.shape != (num_query,) or gallery_groups.shape != (num_gallery,):
        raise ValueError(f"groups must be ({num_query},) and ({num_gallery},); got "
                         f"{tuple(query_groups.shape)} and {tuple(gallery_groups.shape)}")
    # One sub-gallery per group: items of other groups are never compared, so they cost nothing.
    ranks = torch.full((num_query,), NO_HIT, dtype=torch.long, device=device)
    position = torch.full((num_gallery,), -1, dtype=torch.long, device=device)
    for group in torch.unique(query_groups):
        query_idx = torch.nonzero(query_groups == group).squeeze(1)
        gallery_idx = torch.nonzero(gallery_groups == group).squeeze(1)
        if query_idx.numel() == num_query and gallery_idx.numel() == num_gallery:
            # One group holding everything: no sub-gallery copy.
            return _ranks_one_gallery(query, gallery, query_labels, gallery_labels, exclude,
                                      chunk_size, normalize)
        position.fill_(-1)
        position[gallery_idx] = torch.arange(gallery_idx.numel(), device=device)
        group_exclude = None
        if exclude is not None:
            # Re-index exclusions into the sub-gallery; items of other groups are gone anyway.
            ex = exclude[query_idx]  # (Qg, E)
            group_exclude = torch.where(ex >= 0, position[ex.clamp(min=0)], -1)
        ranks[query_idx] = _ranks_one_gallery(
            query[query_idx], gallery[gallery_idx], query_labels[query_idx],
            gallery_labels[gallery_idx], group_exclude, chunk_size, normalize)
    return ranks


def subset_recall_at_k(query: Tensor, gallery: Tensor, subsets: Tensor, targets: Tensor, *,
                       ks: Sequence[int] = (1, 2, 3), normalize: bool = True) -> dict[str, float]:
    """Recall_subset@K (CIRR): the target's rank among a small candidate set per query.

    query (Q, D), gallery (G, D); subsets (Q, M) gallery indices of each query's candidates,
    padded with -1 (the caller leaves the reference out); targets (Q,) the gallery index of each
    query's target. A query hits at K when fewer than K other candidates score at least as high
    as its target (ties count against it, as in `first_hit_rank`); a target outside its subset is a
    miss. Returns {"Rs@K": fraction}.
    """
    query, gallery = _float(query), _float(gallery)
    if normalize:
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    valid = subsets >= 0  # (Q, M)
    candidates = gallery[subsets.clamp(min=0)]  # (Q, M, D)
    sims = torch.einsum("qd,qmd->qm", query, candidates).masked_fill_(~valid, float("-inf"))
    is_target = valid & (subsets == targets[:, None])  # (Q, M)
    target_sim = sims.masked_fill(~is_target, float("-inf")).amax(dim=1)  # (Q,)
    found = is_target.any(dim=1)
    others = valid & ~is_target
    rank = (others & (sims >= target_sim[:, None])).sum(dim=1)  # (Q,) candidates at or above
    rank = torch.where(found, rank, torch.full_like(rank, NO_HIT))
    return {f"Rs@{k}": (rank < k).float().mean().item() for k in ks}


def recall_from_ranks(ranks: Tensor, ks: Sequence[int], groups: Tensor | None = None
                      ) -> dict[str, float]:
    """R@K from `first_hit_rank`'s ranks (Q,): the fraction of queries with rank < K; with
    `groups` (Q,), the mean over groups of each group's fraction (FashionIQ averages its
    categories, whatever their query counts). Returns {"R@K": value in [0, 1]}."""
    if ranks.numel() == 0:
        raise ValueError("recall needs at least one query")
    if groups is None:
        groups = torch.zeros_like(ranks)
    groups = groups.to(ranks.device)
    out = {}
    for k in ks:
        hit = (ranks < int(k)).double()
        per_group = [hit[groups == g].mean() for g in torch.unique(groups)]
        out[f"R@{int(k)}"] = torch.stack(per_group).mean().item()
    return out
