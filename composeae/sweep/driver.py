"""The Ray Tune driver: `composeae tune --config SWEEP.yaml`.

Each trial is a Tune function trainable that acts as a Ray Train driver: it builds the trial's
experiment config from the sweep (`composeae.sweep`), builds a `TorchTrainer` through the same
seams as `composeae train` (`composeae.run.driver`) with Tune's `TuneReportCallback`, and fits it.
So a trial reports once per evaluation (ASHA's `training_iteration` counts evaluations) and once
more at its end with its test recall. The data and the tokenizer are prepared once per sweep,
never per trial, so trials never race to build shards.

Layout of a sweep at `<storage>/<name>/` (the names are `composeae.run.layout`'s):

    <trial dirs>/          Tune's own (result.json, progress.csv, events of Ray's TBX logger)
    runs/<name>-<trial>/   each trial's Train run (checkpoints, metrics.json, report, events)
    hparams/               one TensorBoard HParams entry per finished trial
    summary.{csv,md,html}  the sweep's page, rewritten while the search runs
    best.yaml              the best trial as an experiment config for `composeae train`
    best.json              the best trial: id, parameters, validation and test recall
    sweep.yaml             the resolved sweep file as it started (a resumed sweep is compared)

A Train run is named from its trial id, so a restarted trial resumes its run. Running the same
sweep again (same name and storage) restores it with `Tuner.restore`: finished trials are kept,
unfinished ones resume.
"""

from __future__ import annotations

import os

import json
from dataclasses import dataclass
from typing import Any

from composeae import storage
from composeae.config import Config, replace, worker_range
from composeae.report.tblog import write_hparams
from composeae.run import layout
from composeae.run.cluster import check_local_paths_on_nodes, check_storage_on_nodes, init_ray
from composeae.run.commands import say
from composeae.run.driver import (PreparedRun, build_trainer, check_outside_job_copy, finish_run,
                                  prepare_run)
from composeae.run.eval_job import evaluate_checkpoint
from composeae.run.nodefiles import check_node_files
from composeae.sweep.best import (best_config_yaml, best_row, best_trial, reported_trials,
                                  trial_params)
from composeae.sweep.spec import Sweep
from composeae.sweep.values import is_finite_number, plain


def _trial_run_storage(sweep: Sweep) -> str:
    return storage.join(sweep.experiment_url, layout.SWEEP_RUNS_DIR)


def trial_config(sweep: Sweep, params: dict[str, Any], trial_id: str) -> Config:
    """The experiment config of trial `trial_id`: its Train run lives under the sweep."""
    cfg = sweep.trial_config(params, name=sweep.trial_run_name(trial_id))
    return replace(cfg, train={"storage": _trial_run_storage(sweep)})


def _trial(params: dict[str, Any], sweep: Sweep, prepared: PreparedRun) -> None:
    """One trial: a Train driver reporting to Tune through `TuneReportCallback`."""
    from ray import tune  # deferred: see run_sweep
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(sweep, params, tune.get_context().get_trial_id())
    result = build_trainer(prepared, cfg, callbacks=[TuneReportCallback()]).fit()
    finish_run(prepared, cfg, result)


@dataclass(frozen=True)
class SweepSummary:
    """The outcome of a sweep, written as `best.json` and `best.yaml` in the sweep directory."""
    url: str
    trials: int
    finished: int
    stopped_early: int
    errored: int
    trial_seconds: float
    """Training time summed over trials (what the sweep cost in trial-seconds)."""
    best_trial: str
    best_params: dict[str, Any]
    best_val: dict[str, float]
    """The best trial's validation recall (of the weights its checkpoint keeps)."""
    best_test: dict[str, float]
    """Those weights scored on the test split (never used to choose)."""
    best_checkpoint: str
    best_yaml: str


def run_sweep(sweep: Sweep) -> SweepSummary:
    """Run (or resume) the sweep on Ray and score its best trial on the test split."""
    # deferred: Ray takes seconds to import (and the page's callback subclasses Ray's)
    import ray
    from ray import tune

    from composeae.sweep.page.callback import SweepPageCallback

    sweep = sweep.absolute()
    prepared = prepare_run(sweep.base_config())  # once: trials never race to build shards
    init_ray(prepared.cfg)
    check_node_files(prepared.cfg)
    check_local_paths_on_nodes({"data.url": prepared.cfg.data.url})
    check_outside_job_copy("storage", sweep.storage)
    check_storage_on_nodes("storage", sweep.storage)

    trainable = tune.with_resources(tune.with_parameters(_trial, sweep=sweep, prepared=prepared),
                                    sweep.trial_resources())
    url = sweep.experiment_url
    started = storage.join(url, layout.SWEEP_FILE)
    cluster = ray.cluster_resources()
    placement = sweep.placement(cluster)
    say(placement)
    if tune.Tuner.can_restore(url):
        changed = (sweep.changes_from(storage.read_text(started)) if storage.exists(started)
                   else [])
        if changed:
            say(f"sweep {sweep.name} has changed since it started ({', '.join(changed)}): it "
                f"resumes as it started (Tune restores its saved search); to run the edited "
                f"sweep, give it a new name (--set name=...)")
        tuner = tune.Tuner.restore(url, trainable, resume_errored=True)
    else:
        storage.write_text(started, sweep.to_yaml())
        page = SweepPageCallback(url, sweep.page_spec(placement))
        # Tune's own records stay (CSV, JSON), but not its TensorBoard logger: the trials' Train
        # runs and `hparams/` already write each trial's curves and HParams entry, and Tune's
        # would show every trial a second time under another name.
        loggers = [tune.logger.CSVLoggerCallback(), tune.logger.JsonLoggerCallback()]
        tuner = tune.Tuner(
            trainable,
            tune_config=sweep.tune_config(sweep.concurrency(cluster)),
            # verbose=1: Tune's status table and trial ends, not every intermediate result.
            run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage, verbose=1,
                                      callbacks=[page, *loggers],
                                      failure_config=sweep.failure_config()))
    # Read by Tune when it adds its default loggers at `fit` (also of a restored sweep).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    grid = tuner.fit()
    return _summarise(sweep, prepared, grid)


def _summarise(sweep: Sweep, prepared: PreparedRun, grid) -> SweepSummary:
    results = reported_trials(sweep, grid)
    _write_hparams(sweep, results)
    best, row = best_trial(sweep, results)
    trial_id = best.metrics["trial_id"]
    params = trial_params(sweep, best.config)
    cfg = trial_config(sweep, params, trial_id)
    final = bool(best.metrics.get(layout.FINAL_FLAG))
    # The best weights of the trial: its `final` checkpoint when it ran to the end, else the
    # checkpoint of its best evaluation (ASHA stopped it later).
    name = layout.FINAL_CHECKPOINT if final else layout.checkpoint_dir_name(int(row["step"]))
    checkpoint = storage.join(layout.run_url(cfg), name)
    if final:
        test = {k: float(v) for k, v in best.metrics.items() if k.startswith("test/")}
    else:
        test = evaluate_checkpoint(checkpoint, prepared.cfg.data.url,
                                   split=cfg.eval.test_split,
                                   num_workers=worker_range(cfg.ray)[0])
        test = {f"test/{k.split('/', 1)[1]}": v for k, v in test.items()}
    val = {k: float(row[k]) for k in row.index
           if k.startswith("val/") and is_finite_number(row[k])}

    statuses = [_status(r) for r in grid]
    best_yaml = storage.join(sweep.experiment_url, layout.BEST_YAML)
    storage.write_text(best_yaml, best_config_yaml(sweep, params, trial_id=trial_id,
                                                   metrics={sweep.metric: val[sweep.metric]}))
    summary = SweepSummary(
        url=sweep.experiment_url, trials=len(statuses), finished=statuses.count("finished"),
        stopped_early=statuses.count("stopped"), errored=statuses.count("error"),
        trial_seconds=sum(float((r.metrics or {}).get("time_total_s", 0.0)) for r in grid),
        best_trial=trial_id, best_params=params, best_val=val, best_test=test,
        best_checkpoint=checkpoint, best_yaml=best_yaml)
    storage.write_text(storage.join(sweep.experiment_url, layout.BEST_JSON),
                       json.dumps(summary.__dict__, indent=2, default=str) + "\n")
    return summary


def _write_hparams(sweep: Sweep, results) -> None:
    """One TensorBoard HParams entry per trial that reported: its parameters beside the
    validation recall of its best evaluation (and test recall when it ran to the end)."""
    hparams = storage.join(sweep.experiment_url, layout.HPARAMS_DIR)
    for result in results:
        row = best_row(sweep, result)
        metrics = {k: float(row[k]) for k in row.index
                   if k.startswith("val/") and is_finite_number(row[k])}
        metrics |= {k: float(v) for k, v in result.metrics.items()
                    if k.startswith("test/") and is_finite_number(v)}
        metrics["stopped_early"] = float(_status(result) == "stopped")
        trial = result.metrics["trial_id"]
        # A resumed sweep summarises again: the trial's entry is replaced, not added twice.
        old = storage.join(hparams, trial)
        for name in storage.listdir(old):
            storage.remove(storage.join(old, name))
        write_hparams(hparams, trial_params(sweep, result.config), metrics,
                      run_name=trial, step=int(row["step"]))


def _status(result) -> str:
    if result.error is not None:
        return "error"
    return "finished" if (result.metrics or {}).get(layout.FINAL_FLAG) else "stopped"
