"""Pooled recall@K in one call: the reference form the metric tests state their cases in.

The library scores with `first_hit_rank` then `recall_from_ranks` (per-group means); this is the
same two steps for one pooled gallery, with the argument checks the tests exercise.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from composeae.metrics import first_hit_rank


def recall_at_k(
    query: Tensor,
    gallery: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10, 50, 100),
    exclude: Tensor | None = None,
    query_groups: Tensor | None = None,
    gallery_groups: Tensor | None = None,
    chunk_size: int = 1024,
    normalize: bool = True,
) -> dict[str, float]:
    """Fraction of queries with a hit among their top K gallery items, for each K in ks.

    query (Q, D) and gallery (G, D) embeddings; query_labels (Q,) and gallery_labels (G,) int64
    (see `encode_labels`); a gallery item is a hit when its label equals the query's.
    exclude: (Q,) gallery index to drop per query, -1 for none (or (Q, E) for several).
    query_groups (Q,) / gallery_groups (G,): a query ranks only the gallery items of its group.
    chunk_size: queries per block; memory is O(chunk_size x G). normalize: cosine similarity
    (otherwise the raw dot product). K larger than the valid gallery counts every query that has
    a valid hit. Returns {"R@1": ..., "R@5": ...} with values in [0, 1].
    """
    if query.shape[0] == 0:
        raise ValueError("recall needs at least one query")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers; got {tuple(ks)}")
    ranks = first_hit_rank(query, gallery, query_labels, gallery_labels, exclude=exclude,
                           query_groups=query_groups, gallery_groups=gallery_groups,
                           chunk_size=chunk_size, normalize=normalize)
    return {f"R@{int(k)}": (ranks < int(k)).double().mean().item() for k in ks}
