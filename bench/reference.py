"""Reference algorithm of the official code (re-stated): the baseline of the benchmarks.

These functions re-state, in plain Python / numpy, what the official TIRG and ComposeAE code
computes, so the benchmarks can time it beside composeae's versions:

* soft triplet loss (`img_text_composition_models.py: compute_soft_triplet_loss_` and
  `torch_functions.py: pairwise_distances, MyTripletLossFunc`): the nested-loop triplet sampler,
  the per-triplet forward loop, and the backward loop of the legacy autograd Function (which no
  longer runs on current PyTorch, hence the re-statement as plain functions);
* recall@K (`test_retrieval.py: test`): per-query similarity row, np.argsort, then Python list
  membership of the target label in the top K.

They are written for clarity of correspondence with that algorithm, not speed, and are not part of
the library.
"""

from __future__ import annotations

import random

import numpy as np
import torch


# -- soft triplet -------------------------------------------------------------------------------


def sample_triplets(batch_size: int, rng: random.Random) -> list[list[int]]:
    """All (i, j, k) with j the other member of i's pair and k of another pair, shuffled per anchor;
    the first 3 per anchor are kept. Indices run over [query; target] (2B items)."""
    labels = list(range(batch_size)) + list(range(batch_size))
    triplets: list[list[int]] = []
    for i in range(len(labels)):
        triplets_i = []
        for j in range(len(labels)):
            if labels[i] == labels[j] and i != j:
                for k in range(len(labels)):
                    if labels[i] != labels[k]:
                        triplets_i.append([i, j, k])
        rng.shuffle(triplets_i)
        triplets += triplets_i[:3]
    return triplets


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (N, N) via |a|^2 + |b|^2 - 2 a.b, clamped at 0."""
    x_norm = (x**2).sum(1).view(-1, 1)
    dist = x_norm + x_norm.view(1, -1) - 2.0 * torch.mm(x, x.t())
    return torch.clamp(dist, 0.0, np.inf)


def triplet_forward(features: torch.Tensor, triplets: list[list[int]]) -> tuple[float, np.ndarray]:
    """Mean over triplets of log(1 + exp(d_ij - d_ik)); returns (loss, distances for backward)."""
    distances = pairwise_distances(features).cpu().numpy()
    loss = 0.0
    triplet_count = 0.0
    for i, j, k in triplets:
        triplet_count += 1.0
        loss += np.log(1 + np.exp(distances[i, j] - distances[i, k]))
    return loss / triplet_count, distances


def triplet_backward(features: torch.Tensor, distances: np.ndarray, triplets: list[list[int]],
                     grad_output: float = 1.0) -> torch.Tensor:
    """The legacy Function's backward: per triplet, f = sigmoid(d_ij - d_ik) times feature
    differences (without the factor 2 of the true gradient), then copied back row by row."""
    features_np = features.cpu().numpy()
    grad_features = features.clone() * 0.0
    grad_np = grad_features.cpu().numpy()
    count = len(triplets)
    for i, j, k in triplets:
        f = 1.0 - 1.0 / (1.0 + np.exp(distances[i, j] - distances[i, k]))
        grad_np[i, :] += f * (features_np[i, :] - features_np[j, :]) / count
        grad_np[j, :] += f * (features_np[j, :] - features_np[i, :]) / count
        grad_np[i, :] += -f * (features_np[i, :] - features_np[k, :]) / count
        grad_np[k, :] += -f * (features_np[k, :] - features_np[i, :]) / count
    for i in range(features_np.shape[0]):
        grad_features[i, :] = torch.from_numpy(grad_np[i, :])
    return grad_features * grad_output


def soft_triplet_step(query: torch.Tensor, target: torch.Tensor,
                      rng: random.Random) -> tuple[float, torch.Tensor]:
    """Sampler, forward and backward for normalised-and-scaled query/target (B, D), as one official
    training step runs them; returns (loss, gradient w.r.t. [query; target] (2B, D))."""
    triplets = sample_triplets(query.shape[0], rng)
    features = torch.cat([query, target])
    loss, distances = triplet_forward(features, triplets)
    return loss, triplet_backward(features, distances, triplets)


# -- recall@K --------------------------------------------------------------------------------


def recall_at_k(queries: np.ndarray, gallery: np.ndarray, query_labels: list[str],
                gallery_labels: list[str], exclude: list[int] | None = None,
                ks: tuple[int, ...] = (1, 5, 10, 50, 100)) -> dict[str, float]:
    """Row-normalise both sets, then for each query: one similarity row, mask its excluded gallery
    item, np.argsort, and look the query's label up in the labels of the top K."""
    queries = queries.copy()
    gallery = gallery.copy()
    for i in range(queries.shape[0]):
        queries[i, :] /= np.linalg.norm(queries[i, :])
    for i in range(gallery.shape[0]):
        gallery[i, :] /= np.linalg.norm(gallery[i, :])
    depth = max(ks) + 10
    nn_result = []
    for i in range(queries.shape[0]):
        sims = queries[i : (i + 1), :].dot(gallery.T)
        if exclude is not None and exclude[i] >= 0:
            sims[0, exclude[i]] = -10e10
        nn_result.append(np.argsort(-sims[0, :])[:depth])
    nn_labels = [[gallery_labels[nn] for nn in nns] for nns in nn_result]
    out = {}
    for k in ks:
        hits = 0.0
        for i, nns in enumerate(nn_labels):
            if query_labels[i] in nns[:k]:
                hits += 1
        out[f"R@{k}"] = hits / len(nn_labels)
    return out
