"""The `composeae registry ...` commands: read and steer the model registry by hand.

    composeae registry ls URL                     versions, their scores and aliases
    composeae registry show URL VERSION|ALIAS     one version's record (JSON)
    composeae registry history URL                promotions, rollbacks and alias changes
    composeae registry promote URL VERSION [--alias champion] [--reason TEXT]
    composeae registry rollback URL [--alias champion] [--reason TEXT]
    composeae registry alias URL NAME VERSION | composeae registry alias URL NAME --delete

`register(subparsers)` adds them to the top-level parser. A missing registry, version or alias,
and a corrupt `aliases.json`, end in one line (`UserError`).
"""

from __future__ import annotations

import argparse
import json

from composeae.errors import UserError
from composeae.registry.store import ModelRegistry
from composeae.storage import absolute_url


def register(subparsers) -> None:
    registry = subparsers.add_parser(
        "registry", help="list, inspect, promote and roll back registered models",
        description="The model registry (a directory or s3:// prefix) that the nightly job writes.")
    commands = registry.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func, *, ref: bool = False) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument("url", metavar="URL")
        if ref:
            p.add_argument("ref", metavar="VERSION|ALIAS")
        p.set_defaults(func=func)
        return p

    command("ls", "versions with their scores and aliases", run_ls)
    command("show", "one version's record as JSON", run_show, ref=True)
    command("history", "promotions, rollbacks and alias changes", run_history)
    p = command("promote", "point an alias (default champion) at a version", run_promote, ref=True)
    p.add_argument("--alias", default="champion")
    p.add_argument("--reason", default="promoted by hand")
    p = command("rollback", "point an alias back at its previous version", run_rollback)
    p.add_argument("--alias", default="champion")
    p.add_argument("--reason", default="rolled back by hand")
    p = command("alias", "set or delete any alias", run_alias)
    p.add_argument("name", metavar="NAME")
    p.add_argument("ref", metavar="VERSION|ALIAS", nargs="?")
    p.add_argument("--delete", action="store_true", help="remove the alias")
    p.add_argument("--reason", default="")


def _open(url: str):
    return ModelRegistry.open(absolute_url(url))


def _score(record: dict) -> str:
    metric = (record.get("decision") or {}).get("metric")
    table = (record.get("evaluation") or {}).get("table") or {}
    return f"{100 * table[metric]:.2f}" if metric in table else "-"


def format_versions(registry) -> str:
    aliases = registry.aliases().aliases
    by_version: dict[int, list[str]] = {}
    for name, number in sorted(aliases.items()):
        by_version.setdefault(number, []).append(name)
    rows = [("version", "date", "model", "score", "promoted", "aliases", "run")]
    metric = ""
    for number in registry.versions():
        record = registry.version(number)
        decision = record.get("decision") or {}
        metric = decision.get("metric", metric)
        rows.append((str(number), record.get("date") or "-", record.get("model", "-"),
                     _score(record), "yes" if decision.get("promote") else "no",
                     ",".join(by_version.get(number, [])) or "-", record.get("run_name", "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    pointers = ", ".join(f"{k} -> {v}" for k, v in sorted(aliases.items())) or "no aliases"
    lines = [f"registry {registry.url}: {len(rows) - 1} version(s); {pointers}"
             + (f"; score is {metric}" if metric else "")]
    lines += ["  ".join(c.rjust(w) if i in (0, 3) else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return "\n".join(lines)


def run_ls(args: argparse.Namespace) -> None:
    print(format_versions(_open(args.url)))


def run_show(args: argparse.Namespace) -> None:
    registry = _open(args.url)
    record = registry.resolve(args.ref)
    aliases = [k for k, v in registry.aliases().aliases.items() if v == record["version"]]
    print(json.dumps(dict(record, aliases=sorted(aliases)), indent=2, sort_keys=True))


def run_history(args: argparse.Namespace) -> None:
    for event in _open(args.url).history():
        target = "deleted" if event.get("version") is None else f"-> {event['version']}"
        print(f"{event['revision']:>5}  {event['time']}  {event['action']:<8} "
              f"{event['alias']} {target} (was {event.get('previous')})  {event.get('reason', '')}")


def run_promote(args: argparse.Namespace) -> None:
    registry = _open(args.url)
    number = registry.resolve(args.ref)["version"]
    event = registry.promote(number, alias=args.alias, reason=args.reason)
    print(f"{args.alias} -> version {number} (was {event['previous']})")


def run_rollback(args: argparse.Namespace) -> None:
    event = _open(args.url).rollback(args.alias, reason=args.reason)
    print(f"{args.alias} -> version {event['version']} (rolled back from {event['previous']})")


def run_alias(args: argparse.Namespace) -> None:
    registry = _open(args.url)
    if args.delete:
        if args.ref is not None:
            raise UserError("registry alias --delete takes no VERSION")
        event = registry.delete_alias(args.name, reason=args.reason)
        print(f"{args.name} deleted (was version {event['previous']})")
        return
    if args.ref is None:
        raise UserError("registry alias needs a VERSION (or --delete)")
    number = registry.resolve(args.ref)["version"]
    event = registry.set_alias(args.name, number, reason=args.reason)
    print(f"{args.name} -> version {number} (was {event['previous']})")
