"""`composeae ...`: the command line.

Every subcommand is a thin call into the library. A `UserError` (bad config, unknown model,
missing data, unreachable bucket) ends with one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from composeae.errors import UserError


def _cmd_models(args: argparse.Namespace) -> None:
    from composeae.zoo import describe_models

    for name, summary in describe_models().items():
        print(f"{name:<22} {summary}")


def _say(line: str) -> None:
    print(line, flush=True)


def _release_ray() -> None:
    """Disconnect from Ray before the closing lines, so none of its shutdown chatter follows
    the table (inside `ray job submit` this only disconnects the driver)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _cmd_train(args: argparse.Namespace) -> None:
    from composeae.config import load_config
    from composeae.driver import describe, prepare_run, run_training
    from composeae.evaluate import format_table

    prepared = prepare_run(load_config(args.config, args.set))
    _say(describe(prepared.cfg))
    summary = run_training(prepared)
    _release_ray()
    _say(format_table(summary.test, f"test recall of {prepared.cfg.model.name} (%), "
                                    f"best step {summary.metrics['best_step']}"))
    _say(f"run: {summary.run_url}")
    _say(f"checkpoint: {summary.checkpoint_url}")


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from composeae.data import storage
    from composeae.evaluate import (evaluate_checkpoint, evaluate_checkpoint_with_retrievals,
                                    format_table)

    if args.report:
        table, record = evaluate_checkpoint_with_retrievals(args.checkpoint, args.data,
                                                            split=args.split)
    else:
        table = evaluate_checkpoint(args.checkpoint, args.data, split=args.split)
    _release_ray()
    if args.out:
        storage.write_text(args.out, json.dumps(table, indent=2) + "\n")
    if args.report:
        from composeae.report import write_eval_report

        write_eval_report(args.report, args.checkpoint, args.data, args.split, table, record)
        _say(f"report: {args.report}")
    _say(format_table(table, title=f"recall on {args.data} [{args.split}] (%)"))
    _say(f"checkpoint: {args.checkpoint}")


def _cmd_tune(args: argparse.Namespace) -> None:
    from composeae.data import storage
    from composeae.evaluate import format_table
    from composeae.sweep import load_sweep
    from composeae.tune import run_sweep

    sweep = load_sweep(args.config, args.set)
    _say(sweep.describe())
    summary = run_sweep(sweep)
    _release_ray()
    _say(f"{summary.trials} trials: {summary.finished} finished, {summary.stopped_early} stopped "
         f"early by the scheduler, {summary.errored} failed")
    params = ", ".join(f"{k}={v}" for k, v in summary.best_params.items())
    _say(f"best trial {summary.best_trial} ({sweep.metric} "
         f"{100 * summary.best_val[sweep.metric]:.2f}): {params}")
    _say(format_table(summary.best_val, "its validation recall (%)"))
    _say(format_table(summary.best_test, "its test recall (%)"))
    _say(f"sweep page: {storage.join(summary.url, 'summary.html')}")
    _say(f"train it again: composeae train --config {summary.best_yaml}")


def _cmd_nightly(args: argparse.Namespace) -> None:
    from composeae.config import load_config
    from composeae.nightly import format_comparison, run_night

    night = run_night(load_config(args.config, args.set), args.date, force=args.force)
    _release_ray()
    if night.tables:
        _say(format_comparison(night, "recall on the frozen split (%)"))
    _say(f"{night.status}: {night.reason}")
    if night.version is not None:
        _say(f"version: {night.version['version']} ({night.version['checkpoint']})")
    if night.report_url:
        _say(f"report: {night.report_url}")


def build_parser() -> argparse.ArgumentParser:
    from composeae import registry_commands
    from composeae.data import commands as shard_commands
    from composeae.serve import commands as serve_commands

    parser = argparse.ArgumentParser(
        prog="composeae", description="Composed image retrieval (ComposeAE and baselines) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=_cmd_models)

    shard_commands.register(sub)

    p = sub.add_parser("train", help="train a model on Ray Train")
    p.add_argument("--config", required=True, help="experiment YAML (jobs/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune (a sweep file)")
    p.add_argument("--config", required=True, help="sweep YAML (jobs/configs/sweeps/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep key (num_samples=8) or a config key "
                        "(section.key=value); repeatable")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("nightly", help="train tonight's challenger and promote it if it wins")
    p.add_argument("--config", required=True, help="experiment YAML with a nightly section "
                                                   "(jobs/configs/nightly.yaml)")
    p.add_argument("--date", default=None, metavar="YYYY-MM-DD",
                   help="the night (default: today, UTC); fixed per scheduled job so a retry "
                        "resumes the same night")
    p.add_argument("--force", action="store_true",
                   help="train a challenger even when the data has not changed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.set_defaults(func=_cmd_nightly)

    registry_commands.register(sub)
    serve_commands.register(sub)

    p = sub.add_parser("eval", help="evaluate a checkpoint: recall@K table")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or directory (path or s3://)")
    p.add_argument("--data", required=True, help="dataset URL (path or s3://)")
    p.add_argument("--split", default="test", help="evaluation split (default: test)")
    p.add_argument("--out", default=None, help="write the recall table as JSON here")
    p.add_argument("--report", default=None, metavar="OUT.html",
                   help="write an HTML page here (path or s3://): the recall table and the top-5 "
                        "gallery images of a few fixed queries, the correct ones outlined")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library's progress messages (e.g. building CSS-synth) as plain lines.
    logging.basicConfig(format="%(message)s", stream=sys.stdout)
    logging.getLogger("composeae").setLevel(logging.INFO)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
