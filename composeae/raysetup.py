"""Starting or joining Ray, and the storage path Ray Train writes runs to.

Inside `ray job submit` (RAY_ADDRESS is set) or with `ray.address` configured, the driver joins
that cluster. Otherwise it starts an embedded local Ray with `address="local"`, so a stray
cluster on the machine is never joined by accident.
"""

from __future__ import annotations

import os
from pathlib import Path

from composeae.config import Config


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
    ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True)


def ray_storage_path(url: str) -> str:
    """Ray Train's `storage_path`: absolute for local directories; `s3://` URLs go to pyarrow,
    which honours AWS_ENDPOINT_URL for S3-compatible servers."""
    if url.startswith("s3://"):
        return url
    return str(Path(url).resolve())
