"""The `composeae nightly` subcommand; `register(subparsers)` adds it to the top-level parser."""

from __future__ import annotations

import argparse

from composeae.config import add_override_option, load_config
from composeae.run.cluster import release_ray
from composeae.run.commands import say


def register(subparsers) -> None:
    p = subparsers.add_parser("nightly",
                              help="train tonight's challenger and promote it if it wins")
    p.add_argument("--config", required=True, help="experiment YAML with a nightly section "
                                                   "(jobs/configs/nightly.yaml)")
    p.add_argument("--date", default=None, metavar="YYYY-MM-DD",
                   help="the night (default: today, UTC); fixed per scheduled job so a retry "
                        "resumes the same night")
    p.add_argument("--force", action="store_true",
                   help="train a challenger even when the data has not changed")
    add_override_option(p)
    p.set_defaults(func=run_nightly)


def run_nightly(args: argparse.Namespace) -> None:
    from composeae.nightly.flow import format_comparison, run_night  # deferred: imports torch

    night = run_night(load_config(args.config, args.set), args.date, force=args.force)
    release_ray()
    if night.tables:
        say(format_comparison(night, "recall on the frozen split (%)"))
    say(f"{night.status}: {night.reason}")
    if night.version is not None:
        say(f"version: {night.version['version']} ({night.version['checkpoint']})")
    if night.report_url:
        say(f"report: {night.report_url}")
