"""The `composeae train` and `composeae eval` subcommands.

`register(subparsers)` adds them to the top-level parser (`composeae.cli`). The handlers print
the tables; the library they call prints nothing. Heavy modules (torch, Ray) are imported inside
the handlers, so building the parser stays quick.
"""

from __future__ import annotations

import argparse
import json

from composeae import storage
from composeae.config import add_override_option, resolve_config
from composeae.run.cluster import release_ray


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on Ray Train")
    p.add_argument("--config", required=True, help="experiment YAML (jobs/configs/*.yaml)")
    add_override_option(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("eval", help="evaluate a checkpoint: recall@K table")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file or directory (path or s3://)")
    p.add_argument("--data", required=True, help="dataset URL (path or s3://)")
    p.add_argument("--split", default=None,
                   help="evaluation split (default: the checkpoint's eval.test_split)")
    p.add_argument("--out", default=None, help="write the recall table as JSON here")
    p.add_argument("--report", default=None, metavar="OUT.html",
                   help="write an HTML page here (path or s3://): the recall table and the top-5 "
                        "gallery images of a few fixed queries, the correct ones outlined")
    p.set_defaults(func=run_eval)


def say(line: str) -> None:
    """One line of a command's output, flushed at once (Ray's lines interleave with it)."""
    print(line, flush=True)


def run_train(args: argparse.Namespace) -> None:
    # deferred: the driver imports torch and the models
    from composeae.report.tables import format_table
    from composeae.run.driver import describe, prepare_run, resume_as_started, run_training

    resolved = resolve_config(args.config, args.set)
    if resolved.batch_moved:  # the workers moved, or the global batch did
        say(resolved.batch_note)
    cfg, note = resume_as_started(resolved.cfg)
    if note:
        say(note)
    prepared = prepare_run(cfg)
    say(describe(prepared.cfg))
    summary = run_training(prepared)
    release_ray()
    if summary.already_finished:
        say(f"run {prepared.cfg.train.name} had already finished (step "
            f"{summary.metrics['step']}): nothing to train")
    say(format_table(summary.test, f"test recall of {prepared.cfg.model.name} (%), "
                                   f"best step {summary.metrics['best_step']}"))
    say(f"run: {summary.run_url}")
    say(f"checkpoint: {summary.checkpoint_url}")


def run_eval(args: argparse.Namespace) -> None:
    # deferred: the evaluation job imports torch and the models
    from composeae.report.run_page import write_eval_report
    from composeae.report.tables import format_table
    from composeae.run.eval_job import (checkpoint_test_split, evaluate_checkpoint,
                                        evaluate_checkpoint_with_retrievals)

    args.split = args.split or checkpoint_test_split(args.checkpoint)
    if args.report:
        table, record = evaluate_checkpoint_with_retrievals(args.checkpoint, args.data,
                                                            split=args.split)
    else:
        table = evaluate_checkpoint(args.checkpoint, args.data, split=args.split)
    release_ray()
    if args.out:
        storage.write_text(args.out, json.dumps(table, indent=2) + "\n")
    if args.report:
        write_eval_report(args.report, args.checkpoint, args.data, args.split, table, record)
        say(f"report: {args.report}")
    say(format_table(table, title=f"recall on {args.data} [{args.split}] (%)"))
    say(f"checkpoint: {args.checkpoint}")
