"""Registering any checkpoint by hand: `composeae registry add URL --checkpoint CKPT`.

The nightly job registers its own challengers; this puts a `composeae train` run, a sweep's best
trial or `make demo`'s model into the registry the same way, so it can be indexed and served.
A version records what the checkpoint says about itself: its resolved config and model name, the
run's final recall table (`metrics.json` beside a run's `final/` checkpoint), the run's URL and
the fingerprint of the dataset it was trained on. With `data`, the version's gallery index is
built (`composeae.serve.index`) and, with `promote`, the alias moves only once the index exists,
by compare-and-swap against the value it had before the index was built.

The claim name is a digest of the checkpoint's bytes: adding the same weights twice finds the
version the first call made instead of registering a second one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from composeae import storage
from composeae.checkpoint import MODEL_FILE, load_checkpoint
from composeae.data.revisions import fingerprint
from composeae.data.shardset import read_manifest
from composeae.errors import UserError
from composeae.registry.store import ModelRegistry
from composeae.run.layout import FINAL_CHECKPOINT, METRICS_FILE
from composeae.storage import absolute_url

RUN_PREFIX = "add-"


@dataclass(frozen=True)
class Added:
    """What `add_checkpoint` did."""
    version: dict[str, Any]
    created: bool
    """False: these weights were registered already (the earlier version is returned)."""
    index_url: str | None = None
    promoted: dict[str, Any] | None = None
    """The alias event when the version was promoted."""


def checkpoint_dir(url: str) -> str:
    """The checkpoint directory of `url`: a run (its `final/`), a checkpoint directory, or its
    `model.pt`; `UserError` when none holds a `model.pt`."""
    url = absolute_url(url).rstrip("/")
    parent, _, name = url.rpartition("/")
    if name == MODEL_FILE:
        url = parent
    for candidate in (url, storage.join(url, FINAL_CHECKPOINT)):
        if storage.exists(storage.join(candidate, MODEL_FILE)):
            return candidate
    raise UserError(f"no checkpoint at {url} (neither {MODEL_FILE} nor "
                    f"{FINAL_CHECKPOINT}/{MODEL_FILE} found)")


def _run_of(ckpt_dir: str) -> str | None:
    """The run directory of a run's final checkpoint (where its metrics.json lies), else None."""
    parent, _, name = ckpt_dir.rstrip("/").rpartition("/")
    if name == FINAL_CHECKPOINT and storage.exists(storage.join(parent, METRICS_FILE)):
        return parent
    return None


def _data_fingerprint(data_url: str) -> str | None:
    try:
        return fingerprint(read_manifest(data_url))
    except (UserError, OSError):
        return None  # the training data is gone or elsewhere: the lineage says so


def version_record(ckpt_dir: str, checkpoint: dict[str, Any], sha256: str) -> dict[str, Any]:
    """The version's record: config, evaluation table and lineage of a checkpoint."""
    config = checkpoint["config"]
    run = _run_of(ckpt_dir)
    table: dict[str, float] = {}
    if run is not None:
        metrics = json.loads(storage.read_text(storage.join(run, METRICS_FILE)))
        table = {k: float(v) for k, v in metrics.items()
                 if k.startswith("test/") and isinstance(v, (int, float))}
    data_url = config["data"]["url"]
    split = config["eval"].get("test_split", "test")
    metric = f"{split}/{config['eval']['selection_metric']}"
    return {
        "date": datetime.now(timezone.utc).date().isoformat(),
        "model": checkpoint["model_name"],
        "config": config,
        "evaluation": {"split": split, "data": data_url, "table": table},
        "data": {"url": data_url, "fingerprint": _data_fingerprint(data_url)},
        "run_url": run,
        "checkpoint_sha256": sha256,
        "parent": None,
        "decision": {"metric": metric, "promote": False, "reason": "added by hand"},
    }


def add_checkpoint(registry_url: str, checkpoint_url: str, *, data: str | None = None,
                   split: str = "test", promote: bool = False, alias: str = "champion",
                   workers: int | None = None) -> Added:
    """Register `checkpoint_url` in the registry at `registry_url` (created when missing);
    with `data`, build the version's gallery index; with `promote` (which needs `data`), then
    move `alias` to it."""
    if promote and data is None:
        raise UserError("--promote needs --data: the service follows the alias, so the "
                        "version's index is built before the alias moves")
    ckpt_dir = checkpoint_dir(checkpoint_url)
    model_file = storage.join(ckpt_dir, MODEL_FILE)
    sha256 = hashlib.sha256(storage.read_bytes(model_file)).hexdigest()
    checkpoint = load_checkpoint(model_file)  # not a composeae checkpoint: one line, here
    registry = ModelRegistry.create(absolute_url(registry_url))
    before = registry.aliases().aliases.get(alias)
    record = version_record(ckpt_dir, checkpoint, sha256)
    if data is not None:
        record["index"] = {"data": absolute_url(data), "split": split}
    version, created = registry.register(ckpt_dir, run_name=RUN_PREFIX + sha256[:16],
                                         record=record)
    if data is None:
        return Added(version, created)

    from composeae.serve.index import build_version_index

    built = build_version_index(registry.url, version["version"], data, split, workers=workers)
    event = None
    if promote:
        event = registry.promote(version["version"], alias=alias, expect=before,
                                 reason=f"registry add of {ckpt_dir}")
    return Added(version, created, built.url, event)
