"""Starting or joining Ray, and the storage path Ray Train writes runs to.

Inside `ray job submit` (RAY_ADDRESS is set) or with `ray.address` configured, the driver joins
that cluster. Otherwise it starts an embedded local Ray with `address="local"`, so a stray
cluster on the machine is never joined by accident.
"""

from __future__ import annotations

import os
from pathlib import Path

from composeae.config import Config, replace


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Enough logical CPUs for the workers (plus the Train controller), whatever the core count.
    need = int(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 1
    # The dashboard stays on: people watch runs there, and Ray Train's cleanup polls its state API.
    ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), log_to_driver=True)


def absolute_url(url: str) -> str:
    """A local path made absolute (Ray workers do not run in the driver's directory); `s3://`
    URLs unchanged (pyarrow and boto3 honour AWS_ENDPOINT_URL for S3-compatible servers)."""
    return url if url.startswith("s3://") else str(Path(url).resolve())


def absolute_paths(cfg: Config) -> Config:
    """The config with its dataset and run storage URLs made absolute."""
    return replace(cfg, data={"url": absolute_url(cfg.data.url)},
                   train={"storage": absolute_url(cfg.train.storage)})
