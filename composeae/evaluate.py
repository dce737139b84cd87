"""Evaluation: embed queries and gallery across ranks, gather, score recall@K by the hit rule.

Each rank embeds its own slice of the query and gallery shards (uneven slices are fine: nothing
here is a DDP collective except the final gather). The gathered embeddings are scored with the
pure functions of `composeae.metrics`, using the schema's hit rule: a gallery item answers a
query when its label equals the query's target label within the same group. The dataset's
manifest says whether the query's own reference image leaves its ranking (on for every dataset
but FashionIQ) and whether queries are also ranked against one joint gallery of all groups
(FashionIQ: ComposeAE's protocol, reported as `joint/R@K` beside the per-category `R@K`).

`evaluate_with_retrievals` also returns what the model retrieves: the top-K gallery images of a
few fixed queries (`top_k`), a small JSON-able record for the pictures of the run report and of
`composeae eval --report` (drawn by `composeae.report.retrievals`). The queries are the same for
every run on a dataset: evenly spaced in the order of their query ids, whatever the ranks and
loader workers that gathered them. The order of the K images resolves ties of similarity against
the query, as `composeae.metrics` counts ranks: a correct image tied with a wrong one is shown
after it, so the page agrees with R@K.

What belongs here: embedding, gathering and scoring, pure of Ray and of any page; evaluating
checkpoints as a Ray job is `composeae.run.eval_job`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from composeae.config import DataConfig, EvalConfig
from composeae.data import schema, shardset
from composeae.data.device import device_batches
from composeae.data.stream import TOKENS, eval_batches
from composeae.distributed import autocast_context, gather_objects
from composeae.metrics import (encode_labels, first_hit_rank, recall_from_ranks,
                               subset_recall_at_k)

NUM_QUERIES = 6
"""Fixed queries shown per split."""
K = 5
"""Gallery images shown per query."""


@torch.no_grad()
def embed(model, batches, image_key: str, text_key: str | None, meta_keys: tuple[str, ...],
           device: torch.device, precision: str) -> dict[str, Any]:
    """Embed one rank's batches: {"emb": (N, E) float32 numpy, <meta key>: list[str]}.

    Batches as the stream makes them: images uint8 (B, S, S, 3) (normalised on the device) or
    float (B, 3, S, S); the text as loader-made "tokens" or as the strings of `text_key`."""
    parts: list[np.ndarray] = []
    meta: dict[str, list[str]] = {k: [] for k in meta_keys}
    for batch in device_batches(batches, device):
        images = batch[image_key]
        with autocast_context(device, precision):
            emb = (model.compose(images, batch[TOKENS] if TOKENS in batch
                                 else list(batch[text_key])) if text_key
                   else model.embed_target(images))
        parts.append(emb.float().cpu().numpy())
        for k in meta_keys:
            # Optional fields (a query's `subset`) are absent from older or other datasets.
            meta[k].extend(batch[k] if k in batch else [()] * len(images))
    meta["emb"] = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return meta


def _merge(parts: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    merged = {k: [v for p in parts for v in p[k]] for k in keys}
    embs = [p["emb"] for p in parts if len(p["emb"])]
    merged["emb"] = torch.from_numpy(np.concatenate(embs))
    return merged


QUERY_KEYS = ("query_id", "reference_id", "target_label", "target_id", "group", "subset")
GALLERY_KEYS = ("image_id", "label", "group")


def evaluate(model, data: DataConfig, split: str, eval_cfg: EvalConfig, *, rank: int,
             world_size: int, device: torch.device, precision: str = "auto") -> dict[str, float]:
    """Recall@K of `model` (unwrapped, any mode) on `split`; identical result on every rank."""
    return evaluate_with_retrievals(model, data, split, eval_cfg, rank=rank,
                                    world_size=world_size, device=device, precision=precision,
                                    num_queries=0)[0]


def evaluate_with_retrievals(model, data: DataConfig, split: str, eval_cfg: EvalConfig, *,
                             rank: int, world_size: int, device: torch.device,
                             precision: str = "auto", num_queries: int = NUM_QUERIES,
                             k: int = K) -> tuple[dict[str, float], dict | None]:
    """`evaluate`, and what the model retrieves for `num_queries` fixed queries of the split:
    `top_k`'s record (None when `num_queries` is 0). Both are the same on
    every rank."""
    manifest = shardset.read_manifest(data.url)
    was_training = model.training
    model.eval()
    try:
        batches = functools.partial(eval_batches, data, split, batch_size=eval_cfg.batch_size,
                                    rank=rank, world_size=world_size,
                                    tokenize=model.tokenize_fn(), normalise=False)
        local_q = embed(model, batches(schema.QUERIES), "reference", data.text_mode,
                         QUERY_KEYS, device, precision)
        local_g = embed(model, batches(schema.GALLERY), "image", None, GALLERY_KEYS, device,
                         precision)
    finally:
        model.train(was_training)
    queries = _merge(gather_objects(local_q), QUERY_KEYS)
    gallery = _merge(gather_objects(local_g), GALLERY_KEYS)
    exclude = shardset.exclude_reference(manifest)
    metrics = score(queries, gallery, eval_cfg, exclude_reference=exclude,
                    joint=shardset.joint_gallery(manifest))
    record = (top_k(queries, gallery, num_queries=num_queries, k=k,
                               exclude_reference=exclude, split=split) if num_queries else None)
    return metrics, record


JOINT = "joint/"
"""Key prefix of the recalls against the joint gallery of every group."""


def score(queries: dict[str, Any], gallery: dict[str, Any], eval_cfg: EvalConfig, *,
          exclude_reference: bool = True, joint: bool = False) -> dict[str, float]:
    """Apply the hit rule to gathered embeddings and metadata.

    R@K: each query is ranked against its group's gallery; with several groups (FashionIQ's
    categories) R@K is the mean over groups of each group's recall, as the standard protocol
    averages the categories. `exclude_reference`: the query's reference image (in its group)
    leaves its ranking. `joint`: also `joint/R@K`, every query against one gallery of all
    groups' images (each image once). Queries with a subset add Rs@K (CIRR).
    """
    metrics = _recall(queries, gallery, eval_cfg, exclude_reference)
    if any(queries["subset"]):
        position = _positions(gallery)
        # Candidate sets by gallery position, the reference left out, padded with -1: (Q, M).
        rows = [[position.get((group, m), -1) for m in subset if m != reference]
                for subset, reference, group
                in zip(queries["subset"], queries["reference_id"], queries["group"])]
        width = max(len(r) for r in rows)
        subsets = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)
        targets = torch.tensor([position.get((g, t), -1)
                                for g, t in zip(queries["group"], queries["target_id"])])
        metrics |= subset_recall_at_k(queries["emb"], gallery["emb"], subsets, targets)
    if joint:
        first = {}
        for i, image_id in enumerate(gallery["image_id"]):
            first.setdefault(image_id, i)  # an image in two groups' galleries counts once
        keep = list(first.values())
        joint_gallery = {"emb": gallery["emb"][keep], "image_id": list(first),
                         "label": [gallery["label"][i] for i in keep], "group": [""] * len(keep)}
        joint_queries = dict(queries, group=[""] * len(queries["group"]))
        metrics |= {JOINT + k: v for k, v in
                    _recall(joint_queries, joint_gallery, eval_cfg, exclude_reference).items()}
    return metrics


def _positions(gallery: dict[str, Any]) -> dict[tuple[str, str], int]:
    """(group, image id) -> gallery index: an image may sit in several groups' galleries."""
    return {key: i for i, key in enumerate(zip(gallery["group"], gallery["image_id"]))}


def _recall(queries: dict[str, Any], gallery: dict[str, Any], eval_cfg: EvalConfig,
            exclude_reference: bool) -> dict[str, float]:
    exclude = None
    if exclude_reference:
        position = _positions(gallery)
        exclude = torch.tensor([position.get(key, -1)
                                for key in zip(queries["group"], queries["reference_id"])],
                               dtype=torch.long)
    q_labels, g_labels = encode_labels(queries["target_label"], gallery["label"])
    q_groups, g_groups = encode_labels(queries["group"], gallery["group"])
    ranks = first_hit_rank(queries["emb"], gallery["emb"], q_labels, g_labels, exclude=exclude,
                           query_groups=q_groups, gallery_groups=g_groups,
                           chunk_size=eval_cfg.chunk_size)
    return recall_from_ranks(ranks, eval_cfg.ks, q_groups)


# -- what the model retrieves for a few fixed queries ----------------------------------------

def pick_queries(query_ids: list[str], n: int = NUM_QUERIES) -> list[int]:
    """Indices into `query_ids` of `n` queries evenly spaced in id order (all when fewer): the
    same queries whatever order the ranks gathered them in."""
    order = sorted(range(len(query_ids)), key=lambda i: query_ids[i])
    if n >= len(order):
        return order
    return [order[(2 * j + 1) * len(order) // (2 * n)] for j in range(n)]


def top_k(queries: dict[str, Any], gallery: dict[str, Any], *, num_queries: int = NUM_QUERIES,
          k: int = K, exclude_reference: bool = True, split: str = "") -> dict[str, Any]:
    """The K most similar gallery images of each fixed query, by the hit rule of the recall.

    queries / gallery: as `composeae.evaluate.score` gets them ("emb" (N, D) tensors and metadata
    lists). A query ranks the gallery images of its group, without the image of its reference id
    when `exclude_reference`; an image is correct (`hit`) when its label is the query's target
    label. Each query also carries `first_hit_rank` (0-based; the rank `first_hit_rank` of
    `composeae.metrics` gives it) and `first_hit_id`, None when no image of its gallery is correct.
    """
    picked = pick_queries(queries["query_id"], num_queries)
    record: dict[str, Any] = {"split": split, "k": k, "exclude_reference": exclude_reference,
                              "queries": []}
    if not picked or len(gallery["image_id"]) == 0:
        return record
    g_emb = F.normalize(gallery["emb"].float(), dim=1)
    q_emb = F.normalize(queries["emb"][picked].float(), dim=1)
    sims = torch.mm(q_emb, g_emb.T).numpy()  # (n, G): n is a handful
    g_ids = np.asarray(gallery["image_id"], dtype=object)
    g_labels = np.asarray(gallery["label"], dtype=object)
    g_groups = np.asarray(gallery["group"], dtype=object)
    for row, i in enumerate(picked):
        valid = g_groups == queries["group"][i]
        if exclude_reference:
            valid &= g_ids != queries["reference_id"][i]
        candidates = np.flatnonzero(valid)
        sim = sims[row, candidates]
        hit = g_labels[candidates] == queries["target_label"][i]
        # By similarity, highest first; among equal similarities the wrong images first.
        order = np.lexsort((hit, -sim))
        hits = np.flatnonzero(hit[order])
        first = int(hits[0]) if len(hits) else None
        record["queries"].append({
            "query_id": queries["query_id"][i],
            "reference_id": queries["reference_id"][i],
            "target_id": queries["target_id"][i],
            "target_label": queries["target_label"][i],
            "group": queries["group"][i],
            "top": [{"image_id": str(g_ids[candidates[j]]), "label": str(g_labels[candidates[j]]),
                     "similarity": round(float(sim[j]), 4), "hit": bool(hit[j])}
                    for j in order[:k]],
            "first_hit_rank": first,
            "first_hit_id": None if first is None else str(g_ids[candidates[order[first]]]),
        })
    return record
