"""Evaluation: embed queries and gallery across ranks, gather, score recall@K by the hit rule.

Each rank embeds its own slice of the query and gallery shards (uneven slices are fine: nothing
here is a DDP collective except the final gather). The gathered embeddings are scored with the
pure functions of `composeae.metrics`, using the schema's hit rule: a gallery item answers a
query when its label equals the query's target label within the same group. The dataset's
manifest says whether the query's own reference image leaves its ranking (on for every dataset
but FashionIQ) and whether queries are also ranked against one joint gallery of all groups
(FashionIQ: ComposeAE's protocol, reported as `joint/R@K` beside the per-category `R@K`).

`evaluate_checkpoint` is `composeae eval`: the same code on Ray Train workers for a checkpoint.
`evaluate_with_retrievals` also returns the top-K gallery images of a few fixed queries
(`composeae.retrievals`), for the pictures of the run report and of `composeae eval --report`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from composeae import retrievals
from composeae.config import Config, DataConfig, EvalConfig
from composeae.distributed import autocast_context, gather_objects
from composeae.metrics import (encode_labels, first_hit_rank, recall_from_ranks,
                               subset_recall_at_k)


@torch.no_grad()
def _embed(model, batches, image_key: str, text_key: str | None, meta_keys: tuple[str, ...],
           device: torch.device, precision: str) -> dict[str, Any]:
    """Embed one rank's batches: {"emb": (N, E) float32 numpy, <meta key>: list[str]}."""
    parts: list[np.ndarray] = []
    meta: dict[str, list[str]] = {k: [] for k in meta_keys}
    for batch in batches:
        images = batch[image_key].to(device, non_blocking=True)
        with autocast_context(device, precision):
            emb = (model.compose(images, list(batch[text_key])) if text_key
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
                             precision: str = "auto", num_queries: int = retrievals.NUM_QUERIES,
                             k: int = retrievals.K) -> tuple[dict[str, float], dict | None]:
    """`evaluate`, and what the model retrieves for `num_queries` fixed queries of the split:
    `composeae.retrievals.top_k`'s record (None when `num_queries` is 0). Both are the same on
    every rank."""
    from composeae.data import schema, shardset
    from composeae.data.stream import eval_batches
    from composeae.data.shardset import read_manifest

    manifest = read_manifest(data.url)
    was_training = model.training
    model.eval()
    try:
        batches = functools.partial(eval_batches, data, split, batch_size=eval_cfg.batch_size,
                                    rank=rank, world_size=world_size)
        local_q = _embed(model, batches(schema.QUERIES), "reference", data.text_mode,
                         QUERY_KEYS, device, precision)
        local_g = _embed(model, batches(schema.GALLERY), "image", None, GALLERY_KEYS, device,
                         precision)
    finally:
        model.train(was_training)
    queries = _merge(gather_objects(local_q), QUERY_KEYS)
    gallery = _merge(gather_objects(local_g), GALLERY_KEYS)
    exclude = shardset.exclude_reference(manifest)
    metrics = score(queries, gallery, eval_cfg, exclude_reference=exclude,
                    joint=shardset.joint_gallery(manifest))
    record = (retrievals.top_k(queries, gallery, num_queries=num_queries, k=k,
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


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """A small text table of R@K values (as percentages, like the papers); a legend line says
    which gallery each column used when the joint gallery was scored too."""
    keys = [k for k in metrics if "R@" in k or "Rs@" in k]
    widths = [max(10, len(k)) for k in keys]
    head = " ".join(f"{k:>{w}}" for k, w in zip(keys, widths))
    row = " ".join(f"{100 * metrics[k]:>{w}.2f}" for k, w in zip(keys, widths))
    legend = ("R@K: one gallery per category (mean over categories); joint/R@K: one gallery of "
              "all categories" if any(JOINT in k for k in keys) else "")
    return "\n".join(x for x in (title, head, row, legend) if x)


def _eval_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from composeae.checkpoint import load_checkpoint
    from composeae.run.build import model_from_checkpoint
    from composeae.config import config_from_dict

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    cfg = config_from_dict(config["cfg"])
    results = []
    for checkpoint in config["checkpoints"]:
        model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
        model.to(device)
        results.append(evaluate_with_retrievals(
            model, cfg.data, config["split"], cfg.eval, rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(), device=device, precision=cfg.train.precision,
            num_queries=config.get("retrievals", 0)))
        del model
    if ctx.get_world_rank() == 0:
        # Every rank holds the same tables; rank 0's travel back through Ray, wherever it runs.
        ray.get(config["box"].put.remote(results))


def evaluate_checkpoints(checkpoints: list[str], data_url: str, *, split: str = "test",
                         num_workers: int | None = None) -> list[dict[str, float]]:
    """Recall of each checkpoint on `data_url`'s `split`, in one Ray Train job (the same workers,
    shards and evaluation settings for all, so tables compare like with like); returns one
    {"<split>/R@K": value} per checkpoint. The first checkpoint's config sets the evaluation
    settings and workers. Prints nothing (the command line prints the tables)."""
    return [table for table, _ in _evaluation_job(checkpoints, data_url, split=split,
                                                  num_workers=num_workers)]


def _evaluation_job(checkpoints: list[str], data_url: str, *, split: str,
                    num_workers: int | None, num_queries: int = 0
                    ) -> list[tuple[dict[str, float], dict | None]]:
    """`evaluate_checkpoints`, each table with its retrieval record (with `num_queries`)."""
    import tempfile
    import uuid

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from composeae.checkpoint import load_checkpoint
    from composeae.config import config_from_dict, config_to_dict, replace
    from composeae.data.shardset import has_split
    from composeae.driver import (absolute_paths, absolute_url, check_local_paths_on_nodes,
                                  init_ray, result_box)
    from composeae.errors import UserError

    checkpoints = [absolute_url(c) for c in checkpoints]
    cfg: Config = config_from_dict(load_checkpoint(checkpoints[0])["config"])
    cfg = absolute_paths(replace(cfg, data={"url": data_url}))
    if not has_split(cfg.data, split):
        raise UserError(f"dataset {data_url} has no split {split!r}")
    init_ray(cfg)
    names = (["--checkpoint"] if len(checkpoints) == 1
             else [f"checkpoint {i + 1}" for i in range(len(checkpoints))])
    check_local_paths_on_nodes({"--data": cfg.data.url} | dict(zip(names, checkpoints)))
    box = result_box()
    with tempfile.TemporaryDirectory() as tmp:
        TorchTrainer(
            _eval_worker,
            train_loop_config={"checkpoints": checkpoints, "cfg": config_to_dict(cfg),
                               "split": split, "box": box, "retrievals": num_queries},
            scaling_config=ScalingConfig(num_workers=num_workers or cfg.ray.num_workers,
                                         use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            # Nothing is checkpointed: the storage only holds Ray's own run bookkeeping.
            run_config=RunConfig(name=f"eval-{split}-{uuid.uuid4().hex[:8]}", storage_path=tmp),
        ).fit()
    results = ray.get(box.get.remote())
    ray.kill(box)
    return [({f"{split}/{k}": v for k, v in table.items()}, record) for table, record in results]


def evaluate_checkpoint(checkpoint: str, data_url: str, *, split: str = "test",
                        num_workers: int | None = None) -> dict[str, float]:
    """`evaluate_checkpoints` for one checkpoint: `composeae eval`."""
    return evaluate_checkpoints([checkpoint], data_url, split=split, num_workers=num_workers)[0]


def evaluate_checkpoint_with_retrievals(checkpoint: str, data_url: str, *, split: str = "test",
                                        num_workers: int | None = None,
                                        num_queries: int = retrievals.NUM_QUERIES
                                        ) -> tuple[dict[str, float], dict]:
    """`evaluate_checkpoint` and the checkpoint's retrievals for `num_queries` fixed queries of
    the split (`composeae.retrievals.top_k`'s record): `composeae eval --report`."""
    return _evaluation_job([checkpoint], data_url, split=split, num_workers=num_workers,
                           num_queries=num_queries)[0]
