"""Nightly retraining: tonight's challenger against the champion in the model registry.

`run_night(cfg, date)` is `composeae nightly` (and `jobs/nightly.py`, which every schedule runs):

1. A night already registered (a version from run `nightly-<date>`) is finished: the flow only
   completes what a killed night may have left (its promotion, its report) and changes nothing.
2. New data: with `nightly.new_data: synth_day`, CSS-synth gets the night's seeded slice appended
   to its training shards (idempotent per date). The manifest's fingerprint (a hash of its shard
   sha256s) is then compared with the newest version's: nothing new and no `force` is a clean
   no-op.
3. The challenger trains as Ray Train run `nightly-<date>` (so a killed night resumes it),
   warm-started from the champion's weights unless `nightly.warm_start` is false or the model
   settings changed.
4. Champion and challenger are scored on the same frozen split in one evaluation job.
5. The challenger is registered with the decision; it is promoted to `nightly.alias` only when
   it beats the champion's `nightly.metric` by more than `nightly.margin_points`, and then only after
   its gallery index (`composeae.serve.index`) is built, so the service never follows the
   alias to a model without one.
6. A report (JSON and HTML) goes to the registry's `reports/<date>.*` and `reports/latest.html`.

The library logs its progress through `logging` (the command line shows it) and returns a
`Night`; it prints nothing itself.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from composeae import storage
from composeae.config import Config, config_to_dict, nightly_metric, replace, worker_range
from composeae.data.revisions import append_synth_day, fingerprint, parse_day
from composeae.data.shardset import read_manifest
from composeae.nightly.report import write_night_report
from composeae.registry.store import AliasMoved, ModelRegistry
from composeae.report.tables import recall_keys
from composeae.run.cluster import absolute_paths
from composeae.run.driver import (check_outside_job_copy, describe, ensure_dataset, prepare_run,
                                  resume_as_started, run_training)
from composeae.run.eval_job import evaluate_checkpoints

log = logging.getLogger(__name__)

RUN_PREFIX = "nightly-"


@dataclass(frozen=True)
class Night:
    """What one night did."""
    date: str
    status: str
    """`promoted`, `kept` (registered, not promoted), `no-op` (nothing new) or `done` (the date
    was already registered: nothing changed)."""
    reason: str
    version: dict[str, Any] | None = None
    """The challenger's registry version (None for a no-op)."""
    champion: dict[str, Any] | None = None
    """The alias's version before tonight's decision."""
    tables: dict[str, dict[str, float]] = field(default_factory=dict)
    """{"challenger": table, "champion": table} on the frozen split."""
    report_url: str | None = None


def parse_date(text: str | None) -> str:
    """`YYYY-MM-DD` (default: today in UTC)."""
    if text is None:
        return datetime.now(timezone.utc).date().isoformat()
    return parse_day(text)


def code_version() -> str:
    """The package version, plus the git commit when the code runs from a checkout."""
    try:
        text = version("composeae")
    except PackageNotFoundError:
        text = "unknown"
    root = Path(__file__).resolve().parents[2]  # the checkout: composeae/nightly/flow.py
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return text
    if commit.returncode == 0 and commit.stdout.strip():
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{text}+g{commit.stdout.strip()}{'.dirty' if dirty else ''}"
    return text


def decide(challenger: dict[str, float], champion: dict[str, float] | None, key: str,
           margin: float) -> tuple[bool, str]:
    """Promote or not, and the sentence that says why (values are fractions; the sentence
    speaks in points, like the recall tables)."""
    new = challenger[key]
    if champion is None:
        return True, f"no champion yet: the first model is promoted ({key} {100 * new:.2f})"
    old = champion[key]
    gain = 100 * (new - old)
    verdict = (f"challenger {key} {100 * new:.2f} against champion {100 * old:.2f}: "
               f"{gain:+.2f} points, margin {100 * margin:.2f}")
    if new > old + margin:
        return True, f"{verdict}: promoted"
    return False, f"{verdict}: not promoted"


def _warm_start_from(cfg: Config, champion: dict[str, Any] | None) -> tuple[str | None, str]:
    """The champion checkpoint to start from, or None and why not."""
    if champion is None:
        return None, "from scratch (no champion yet)"
    if not cfg.nightly.warm_start:
        return None, "from scratch (nightly.warm_start is false)"
    ours = dict(config_to_dict(cfg)["model"], image_weights=None)
    theirs = dict(champion["config"]["model"], image_weights=None)
    changed = sorted(k for k in ours if ours[k] != theirs.get(k))
    if changed:
        return None, (f"from scratch (the champion's model settings differ: "
                      f"{', '.join('model.' + k for k in changed)})")
    return champion["checkpoint"], f"warm start from version {champion['version']}"


def _new_data(cfg: Config, night: str) -> None:
    if cfg.nightly.new_data != "synth_day":
        return
    added = append_synth_day(cfg.data.url, night, sources=cfg.nightly.day_sources)
    if added:
        log.info("new data: CSS-synth day %s appended (%d training samples)", night, added)
    else:
        log.info("new data: CSS-synth day %s is already in the dataset", night)


def run_night(cfg: Config, night: str | None = None, *, force: bool = False) -> Night:
    """One night of champion/challenger retraining (see the module docstring)."""

    night = parse_date(night)
    cfg = absolute_paths(cfg)
    n = cfg.nightly
    check_outside_job_copy("nightly.registry", n.registry)
    check_outside_job_copy("train.storage", cfg.train.storage)
    registry = ModelRegistry.create(n.registry)
    run_name = RUN_PREFIX + night
    done = registry.find_run(run_name)
    if done is not None:
        return _finish(registry, cfg, night, done, created=False)

    champion = _champion(registry, n.alias)
    log.info("nightly %s: registry %s, %s", night, registry.url,
             f"{n.alias} version {champion['version']}" if champion else f"no {n.alias} yet")
    ensure_dataset(cfg)  # builds CSS-synth first when the config asks for it
    _new_data(cfg, night)
    data_print = fingerprint(read_manifest(cfg.data.url))
    numbers = registry.versions()
    newest = registry.version(numbers[-1]) if numbers else None
    if newest is not None and newest["data"]["fingerprint"] == data_print and not force:
        return Night(night, "no-op", f"nothing new since version {newest['version']} (data "
                     f"fingerprint {data_print[:12]}): no challenger tonight (--force trains "
                     f"one anyway)", champion=champion)

    init_from, how = _warm_start_from(cfg, champion)
    cfg = replace(cfg, train={"name": run_name, "init_from": init_from})
    log.info("challenger: run %s, %s; data fingerprint %s", run_name, how, data_print[:12])
    cfg, note = resume_as_started(cfg)  # a night run again resumes its run as it started
    if note:
        log.info("%s", note)
    log.info("%s", describe(cfg))
    summary = run_training(prepare_run(cfg))

    checkpoints = [summary.checkpoint_url] + ([champion["checkpoint"]] if champion else [])
    log.info("scoring the challenger%s on %s [%s]", " and the champion" if champion else "",
             cfg.data.url, n.split)
    tables = evaluate_checkpoints(checkpoints, cfg.data.url, split=n.split,
                                  num_workers=worker_range(cfg.ray)[0])
    key = nightly_metric(cfg)
    promote, reason = decide(tables[0], tables[1] if champion else None, key,
                             n.margin_points / 100)  # tables hold fractions
    record = {
        "date": night,
        "model": cfg.model.name,
        "config": config_to_dict(cfg),
        "evaluation": {"split": n.split, "data": cfg.data.url, "table": tables[0]},
        "data": {"url": cfg.data.url, "fingerprint": data_print},
        "code_version": code_version(),
        "run_url": summary.run_url,
        "parent": champion["version"] if init_from else None,
        "decision": {"alias": n.alias, "promote": promote, "reason": reason, "metric": key,
                     "margin": n.margin_points / 100,
                     "champion": champion["version"] if champion else None,
                     "champion_table": tables[1] if champion else None},
    }
    version, created = registry.register(summary.checkpoint_url, run_name=run_name,
                                         record=record)
    return _finish(registry, cfg, night, version, created=created)


def _champion(registry: ModelRegistry, alias: str) -> dict[str, Any] | None:
    number = registry.aliases().aliases.get(alias)
    return registry.version(number) if number is not None else None


def _alias_moved(registry: ModelRegistry, alias: str, compared: int | None) -> AliasMoved | None:
    current = registry.aliases().aliases.get(alias)
    return None if current == compared else AliasMoved(alias, compared, current)


def _finish(registry: ModelRegistry, cfg: Config, night: str, version: dict[str, Any], *,
            created: bool) -> Night:
    """Promote (once) and report a registered night. Safe to run again: a killed night stopped
    between registering and promoting is completed; a completed one is left as it is."""
    decision = version["decision"]
    alias = decision["alias"]
    promoted_before = any(e.get("action") == "promote" and e.get("version") == version["version"]
                          and e.get("alias") == alias for e in registry.history())
    moved = None
    if decision["promote"] and not promoted_before:
        # Only over the champion it was compared with: a promotion or rollback made by hand
        # since then stands (compare-and-swap on the alias, checked again as it moves).
        moved = _alias_moved(registry, alias, decision["champion"])
        if moved is None:
            # The service follows the alias: the new champion's index exists before it moves.
            from composeae.serve.index import build_version_index

            build_version_index(registry.url, version["version"], cfg.data.url,
                                cfg.nightly.split)
            try:
                registry.promote(version["version"], alias=alias, expect=decision["champion"],
                                 reason=f"nightly {night}: {decision['reason']}")
            except AliasMoved as exc:
                moved = exc
        if moved is not None:
            log.warning("nightly %s: version %s not promoted: %s changed under the night (%s)",
                        night, version["version"], alias, moved)
    champion = (registry.version(decision["champion"]) if decision["champion"] is not None
                else None)
    tables = {"challenger": version["evaluation"]["table"]}
    if decision["champion_table"] is not None:
        tables["champion"] = decision["champion_table"]
    status, reason = ("promoted" if decision["promote"] else "kept"), decision["reason"]
    if moved is not None:
        status, reason = "kept", (f"{reason}, but {alias} moved to "
                                  f"{'no version' if moved.actual is None else moved.actual} "
                                  f"since the comparison with "
                                  f"{'no champion' if moved.expected is None else moved.expected}"
                                  f": not promoted")
    if created or not storage.exists(registry.report_url(f"{night}.json")):
        write_night_report(registry, night, version, status, cfg.nightly.history_nights)
    if not created:
        verdict = "promoted" if decision["promote"] and moved is None else "not promoted"
        status, reason = "done", (f"night {night} is already version {version['version']} "
                                  f"({verdict}): nothing to do")
    return Night(night, status, reason, version=version, champion=champion, tables=tables,
                 report_url=registry.report_url(f"{night}.html"))


def format_comparison(night: Night, title: str = "") -> str:
    """The night's tables as text (percent): the champion's row, then the challenger's."""
    rows = []
    if "champion" in night.tables and night.champion is not None:
        rows.append((f"champion v{night.champion['version']}", night.tables["champion"]))
    rows.append((f"challenger v{night.version['version']}", night.tables["challenger"]))
    keys = recall_keys(night.tables["challenger"])
    width = max(len(name) for name, _ in rows)
    lines = [title] if title else []
    lines.append(" " * width + "".join(f"{k:>12}" for k in keys))
    lines += [f"{name:<{width}}" + "".join(f"{100 * table[k]:>12.2f}" for k in keys)
              for name, table in rows]
    return "\n".join(lines)
