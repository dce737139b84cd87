"""Evaluating checkpoints as a Ray Train job: `composeae eval`, and the nightly comparison.

What belongs here: the driver side (`evaluate_checkpoints`, `evaluate_checkpoint` and
`evaluate_checkpoint_with_retrievals`) and the worker it runs (`_eval_worker`), which rebuilds
each checkpoint's model on its node and scores it with `composeae.evaluate`, the same code the
training loop uses. Ray is imported inside the functions that use it, as everywhere in the driver
code: it takes seconds to import.
"""

from __future__ import annotations

import tempfile
import uuid

from composeae.checkpoint import load_checkpoint
from composeae.config import Config, config_from_dict, config_to_dict, replace
from composeae.data.shardset import has_split
from composeae.errors import UserError
from composeae.evaluate import NUM_QUERIES, evaluate_with_retrievals
from composeae.run.build import model_from_checkpoint
from composeae.run.cluster import (absolute_paths, check_local_paths_on_nodes, init_ray,
                                   result_box, scaling_config, train_logging_config)
from composeae.storage import absolute_url


def _eval_worker(config: dict) -> None:
    """What every rank of the evaluation job runs: each checkpoint in turn, the same shards."""
    import ray  # deferred: see the module docstring
    import ray.train
    import ray.train.torch

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


def checkpoint_test_split(checkpoint: str) -> str:
    """The split a checkpoint's run was tested on (its `eval.test_split`: `val` for datasets
    whose test targets are not public): what `eval` and `index` use unless `--split` is given."""
    return config_from_dict(load_checkpoint(absolute_url(checkpoint))["config"]).eval.test_split


def evaluate_checkpoints(checkpoints: list[str], data_url: str, *, split: str | None = None,
                         num_workers: int | None = None) -> list[dict[str, float]]:
    """Recall of each checkpoint on `data_url`'s `split` (default: the first checkpoint's
    `eval.test_split`), in one Ray Train job (the same workers, shards and evaluation settings
    for all, so tables compare like with like); returns one {"<split>/R@K": value} per
    checkpoint. The first checkpoint's config sets the evaluation settings and workers. Prints
    nothing (the command line prints the tables)."""
    return [table for table, _ in _evaluation_job(checkpoints, data_url, split=split,
                                                  num_workers=num_workers)]


def _evaluation_job(checkpoints: list[str], data_url: str, *, split: str | None,
                    num_workers: int | None, num_queries: int = 0
                    ) -> list[tuple[dict[str, float], dict | None]]:
    """`evaluate_checkpoints`, each table with its retrieval record (with `num_queries`)."""
    import ray  # deferred: see _eval_worker
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    checkpoints = [absolute_url(c) for c in checkpoints]
    cfg: Config = config_from_dict(load_checkpoint(checkpoints[0])["config"])
    cfg = absolute_paths(replace(cfg, data={"url": data_url}))
    split = split or cfg.eval.test_split
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
            scaling_config=scaling_config(cfg, num_workers),
            # Nothing is checkpointed: the storage only holds Ray's own run bookkeeping.
            run_config=RunConfig(name=f"eval-{split}-{uuid.uuid4().hex[:8]}", storage_path=tmp,
                                 logging_config=train_logging_config(cfg)),
        ).fit()
    results = ray.get(box.get.remote())
    ray.kill(box)
    return [({f"{split}/{k}": v for k, v in table.items()}, record) for table, record in results]


def evaluate_checkpoint(checkpoint: str, data_url: str, *, split: str | None = None,
                        num_workers: int | None = None) -> dict[str, float]:
    """`evaluate_checkpoints` for one checkpoint: `composeae eval`."""
    return evaluate_checkpoints([checkpoint], data_url, split=split, num_workers=num_workers)[0]


def evaluate_checkpoint_with_retrievals(checkpoint: str, data_url: str, *,
                                        split: str | None = None,
                                        num_workers: int | None = None,
                                        num_queries: int = NUM_QUERIES
                                        ) -> tuple[dict[str, float], dict]:
    """`evaluate_checkpoint` and the checkpoint's retrievals for `num_queries` fixed queries of
    the split (`composeae.evaluate.top_k`'s record): `composeae eval --report`."""
    return _evaluation_job([checkpoint], data_url, split=split, num_workers=num_workers,
                           num_queries=num_queries)[0]
