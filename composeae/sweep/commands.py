"""The `composeae tune` subcommand; `register(subparsers)` adds it to the top-level parser."""

from __future__ import annotations

import argparse

from composeae import storage
from composeae.config import add_override_option
from composeae.run import layout
from composeae.run.cluster import release_ray
from composeae.run.commands import say
from composeae.sweep.load import load_sweep
from composeae.sweep.plan import plan_trials


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="search hyperparameters with Ray Tune (a sweep file)")
    p.add_argument("--config", required=True, help="sweep YAML (jobs/configs/sweeps/*.yaml)")
    add_override_option(p, metavar="KEY=VALUE",
                        help="override a sweep key (num_samples=8) or a config key "
                             "(section.key=value); repeatable")
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> None:
    # deferred: the sweep driver imports torch and the models
    from composeae.report.tables import format_table
    from composeae.sweep.driver import run_sweep

    sweep = load_sweep(args.config, args.set)
    say(sweep.describe())
    if sweep.searcher == "random":
        say(plan_trials(sweep).describe(sweep))
    summary = run_sweep(sweep)
    release_ray()
    say(f"{summary.trials} trials: {summary.finished} finished, {summary.stopped_early} stopped "
        f"early by the scheduler, {summary.errored} failed")
    params = ", ".join(f"{k}={v}" for k, v in summary.best_params.items())
    say(f"best trial {summary.best_trial} ({sweep.metric} "
        f"{100 * summary.best_val[sweep.metric]:.2f}): {params}")
    say(format_table(summary.best_val, "its validation recall (%)"))
    say(format_table(summary.best_test, "its test recall (%)"))
    say(f"sweep page: {storage.join(summary.url, layout.SUMMARY_HTML)}")
    say(f"train it again: composeae train --config {summary.best_yaml}")
