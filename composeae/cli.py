"""`composeae ...`: the command line.

The parser only: each package registers its own subcommands (`register(subparsers)` in its
`commands` module), and every subcommand is a thin call into the library. A `UserError` (bad
config, unknown model, missing data, unreachable bucket) ends with one line `error: ...` on
stderr and exit status 2. Nothing in the library imports this module.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from composeae import __version__
from composeae.config import add_override_option, format_resolved, resolve_config
from composeae.data import commands as shard_commands
from composeae.errors import UserError
from composeae.nightly import commands as nightly_commands
from composeae.registry import commands as registry_commands
from composeae.run import commands as run_commands
from composeae.serve import commands as serve_commands
from composeae.sweep import commands as sweep_commands


def _cmd_models(args: argparse.Namespace) -> None:
    from composeae.models import describe_models  # deferred: the models import torch

    for name, summary in describe_models().items():
        print(f"{name:<22} {summary}")


def _cmd_config_show(args: argparse.Namespace) -> None:
    resolved = resolve_config(args.config, args.set)
    print(format_resolved(resolved, f"{args.config}, resolved (defaults < file < profile "
                                    f"{resolved.cfg.ray.profile} < --set)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composeae", description="Composed image retrieval (ComposeAE and baselines) on Ray.")
    parser.add_argument("--version", action="version", version=f"composeae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=_cmd_models)
    config = sub.add_parser("config", help="inspect an experiment config "
                                           "(every key: docs/config.md)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="the resolved config as YAML, with the source of "
                                           "each value (default, file, profile, --set, derived)")
    p.add_argument("--config", required=True, help="experiment YAML (jobs/configs/*.yaml)")
    add_override_option(p)
    p.set_defaults(func=_cmd_config_show)
    shard_commands.register(sub)
    run_commands.register(sub)
    sweep_commands.register(sub)
    nightly_commands.register(sub)
    registry_commands.register(sub)
    serve_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Ray's log deduplication ignores every word with a digit, so it takes the step and
    # validation lines of a sweep's concurrent trials for repeats: it holds them back and prints
    # one "[repeated Nx across cluster]" line for all, hiding each trial's figures. Off for the
    # commands' drivers unless the user sets it (read when Ray is first imported, hence here).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
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
