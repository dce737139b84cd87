"""Ray for a run: starting or joining it, the worker resources, and checks on its nodes.

What belongs here: everything a driver asks of the Ray cluster before and around a Train run,
shared by training, evaluation jobs, sweeps and the nightly job: `init_ray` (join the configured
or job's cluster, or start an embedded local Ray with `address="local"`, so a stray cluster on
the machine is never joined by accident), `scaling_config` (the one `ScalingConfig` of a run's
workers), `absolute_paths` (paths Ray workers can open from any directory), `result_box` (a
value handed from rank 0 to the driver), `check_local_paths_on_nodes` and
`check_storage_on_nodes`.

Ray's own console lines that a user of `composeae train` on an embedded Ray does not need
(checkpoint bookkeeping, controller state transitions, moving and wrapping the model for DDP, a
deprecation notice about Ray Data options that Ray Train's state export reads) stay off the
console through settings, not by filtering text: Ray Train's console log level
(`train_logging_config`; its system log files, which the dashboard shows, keep every level) and
a Python warnings option for the embedded Ray's processes (`QUIET_WARNINGS`). A joined cluster
(`ray.address`, or `ray job submit`) keeps Ray's defaults, so `ray job logs` show everything.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from composeae.config import Config, replace, worker_range
from composeae.errors import UserError
from composeae.run.nodefiles import missing_on_nodes
from composeae.storage import absolute_url

STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
"""Ray's dashboard shows Train runs only when the Train controller runs with this set to 1."""
QUIET_WARNINGS = ("ignore::DeprecationWarning:"
                  "ray.data._internal.execution.interfaces.execution_options")
"""`PYTHONWARNINGS` for the processes of an embedded Ray: the Train controller builds Ray Data's
`ExecutionOptions`, whose own constructor sets a deprecated option. With any warnings option set,
Ray also leaves out its filter that shows each `RayDeprecationWarning` once per module
(`ray.util.annotations`), so Ray's deprecation notices follow Python's default: not shown outside
`__main__`."""


def _embedded(cfg: Config) -> bool:
    """True when this driver starts its own Ray rather than joining a cluster."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def init_ray(cfg: Config) -> None:
    """Join the configured or job's cluster, or start an embedded local Ray."""
    import ray  # deferred: Ray takes seconds to import, and most commands never need it

    if ray.is_initialized():
        return
    if not _embedded(cfg):
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # Processes of the embedded Ray inherit this environment: the Train page gets its runs, and
    # notices about Ray's internals stay off the console (a warnings option of one's own wins).
    os.environ.setdefault(STATE_TRACKING_ENV, "1")
    os.environ.setdefault("PYTHONWARNINGS", QUIET_WARNINGS)
    # Enough logical CPUs for the workers (plus the Train controller), whatever the core count.
    need = int(worker_range(cfg.ray)[1] * cfg.ray.cpus_per_worker) + 1
    # The dashboard stays on: people watch runs there, and Ray Train's cleanup polls its state API.
    ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), log_to_driver=True)


def wait_for_resources(cfg: Config, poll_s: float = 2.0) -> None:
    """Return once the cluster holds `min` workers' CPUs (and GPUs); else fail in one line.

    On a joined cluster it waits up to `ray.wait_for_resources_s`, saying once what it waits
    for (Ray Train itself would wait silently forever); an embedded Ray fails at once."""
    import ray  # deferred: see init_ray

    workers = worker_range(cfg.ray)[0]
    need = {"CPU": workers * cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        need["GPU"] = float(workers)

    def short() -> dict[str, float]:
        have = ray.cluster_resources()
        return {res: have.get(res, 0.0) for res, amount in need.items()
                if have.get(res, 0.0) + 1e-9 < amount}

    missing = short()
    if not missing:
        return
    asked = " and ".join(f"{amount:g} {res}s" for res, amount in need.items())
    what = (f"{workers} worker(s) (ray.num_workers, ray.cpus_per_worker"
            f"{', ray.use_gpu' if cfg.ray.use_gpu else ''}) need {asked}")
    limit = 0.0 if _embedded(cfg) else cfg.ray.wait_for_resources_s
    if limit > 0:
        print(f"waiting up to {limit:g} s (ray.wait_for_resources_s) for the cluster to hold "
              f"{what}", flush=True)
        deadline = time.monotonic() + limit
        while missing and time.monotonic() < deadline:
            time.sleep(poll_s)
            missing = short()
        if not missing:
            return
    has = " and ".join(f"{amount:g} {res}s" for res, amount in missing.items())
    raise UserError(f"{what}; the cluster has {has}"
                    + (f" after {limit:g} s" if limit > 0 else ""))


def release_ray() -> None:
    """Disconnect from Ray before a command's closing lines, so none of its shutdown chatter
    follows them (inside `ray job submit` this only disconnects the driver)."""
    ray = sys.modules.get("ray")  # not imported: nothing to release (and no import to wait for)
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def worker_resources(ray_cfg) -> dict[str, float]:
    """What each Train worker reserves: `ray.cpus_per_worker` CPUs and, with `ray.use_gpu`,
    `ray.gpus_per_worker` GPUs (a fraction packs several workers on one GPU)."""
    return ({"CPU": ray_cfg.cpus_per_worker}
            | ({"GPU": ray_cfg.gpus_per_worker} if ray_cfg.use_gpu else {}))


def scaling_config(cfg: Config, num_workers: int | None = None):
    """The `ScalingConfig` of a run's workers: `ray.num_workers` (or `num_workers`; a
    `[min, max]` range makes the group elastic), `worker_resources` each, placed by
    `ray.placement_strategy`."""
    from ray.train import ScalingConfig  # deferred: see init_ray

    low, high = worker_range(cfg.ray)
    workers = num_workers or (high if low == high else (low, high))
    return ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                         resources_per_worker=worker_resources(cfg.ray),
                         placement_strategy=cfg.ray.placement_strategy,
                         elastic_resize_monitor_interval_s=cfg.ray.resize_check_s)


def train_logging_config(cfg: Config):
    """Ray Train's logging settings for a run's `RunConfig`: on an embedded Ray its `ray.train`
    loggers write WARNING and above to the console (the workers print their own progress), on
    a joined cluster Ray's default (INFO). Ray's system log files keep every level either way."""
    from ray.train import LoggingConfig  # deferred: see init_ray

    return LoggingConfig(log_level="WARNING" if _embedded(cfg) else "INFO")


def absolute_paths(cfg: Config) -> Config:
    """The config with its local paths made absolute: dataset, run storage, the model registry
    and the files every worker opens (`model.image_weights`, `model.bert_path`,
    `train.init_from`)."""
    files = {k: absolute_url(v) for k, v in (("image_weights", cfg.model.image_weights),
                                              ("bert_path", cfg.model.bert_path)) if v}
    train = {"storage": absolute_url(cfg.train.storage)}
    if cfg.train.init_from:
        train["init_from"] = absolute_url(cfg.train.init_from)
    return replace(cfg, data={"url": absolute_url(cfg.data.url)}, train=train, model=files,
                   nightly={"registry": absolute_url(cfg.nightly.registry)})


class _Box:
    """One value handed from a worker to the driver through Ray (a zero-CPU actor), so results
    never depend on a file the driver and rank 0 would both have to see."""

    def __init__(self) -> None:
        self.value: Any = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def result_box():
    """A `_Box` actor handle; pass it to workers, `ray.get(box.get.remote())` afterwards."""
    import ray  # deferred: see init_ray

    return ray.remote(num_cpus=0)(_Box).remote()


def check_local_paths_on_nodes(paths: dict[str, str]) -> None:
    """Each local path in {what: path} must exist on every node of the connected cluster.

    On one machine this is the driver's view; on a multi-node cluster a path that exists only on
    the driver's disk (a dataset or checkpoint the workers cannot read) fails here, in one line
    naming it and the node, instead of inside a worker. `s3://` URLs are skipped.
    """
    local = {what: path for what, path in paths.items() if not path.startswith("s3://")}
    for what, nodes in missing_on_nodes(local).items():
        raise UserError(f"{what}: {local[what]} does not exist on node {', '.join(nodes)} "
                        f"(use s3:// or a filesystem shared by every node)")


def check_storage_on_nodes(what: str, url: str) -> None:
    """A local `train.storage` (`what`) must be one directory that every node sees, a shared
    filesystem: rank 0 writes the checkpoints there and the driver reads them back. The driver
    makes the directory when it is missing and checks it like a data path; when a node cannot
    see it, what the driver made is removed again and the one-line error names the node.
    `s3://` URLs are skipped."""
    if url.startswith("s3://"):
        return
    made = []
    for folder in reversed([Path(url), *Path(url).parents]):
        if not folder.exists():
            folder.mkdir()
            made.append(folder)
    try:
        check_local_paths_on_nodes({what: url})
    except UserError:
        for folder in reversed(made):
            folder.rmdir()
        raise
