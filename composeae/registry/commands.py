"""The `composeae registry ...` commands: read and steer the model registry by hand.

    composeae registry ls URL                     versions, their scores and aliases
    composeae registry show URL VERSION|ALIAS     one version's record (JSON)
    composeae registry history URL                promotions, rollbacks and alias changes
    composeae registry promote URL VERSION [--alias champion] [--expect N|none] [--reason TEXT]
    composeae registry rollback URL [--alias champion] [--expect N] [--reason TEXT]
    composeae registry alias URL NAME VERSION | composeae registry alias URL NAME --delete
    composeae registry add URL --checkpoint CKPT [--data URL [--split test] [--promote]]

`--expect` makes a promotion or rollback a compare-and-swap: it happens only while the alias
still holds that version, and otherwise ends in one line saying where the alias is now.
`register(subparsers)` adds them to the top-level parser. A missing registry, version or alias,
and a corrupt `aliases.json`, end in one line (`UserError`).
"""

from __future__ import annotations

import argparse
import json

from composeae.errors import UserError
from composeae.registry.add import add_checkpoint
from composeae.registry.store import ANY, ModelRegistry
from composeae.run.cluster import release_ray
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
    p.add_argument("--expect", default=None, metavar="N|none",
                   help="only if the alias still holds version N (none: is not set yet)")
    p.add_argument("--reason", default="promoted by hand")
    p = command("rollback", "point an alias back at its previous version", run_rollback)
    p.add_argument("--alias", default="champion")
    p.add_argument("--expect", default=None, metavar="N",
                   help="only if the alias still holds version N")
    p.add_argument("--reason", default="rolled back by hand")
    p = command("add", "register a checkpoint (a run, its final/ or a model.pt); with --data "
                       "build its gallery index, with --promote then move the alias", run_add)
    p.add_argument("--checkpoint", required=True, help="run or checkpoint URL (path or s3://)")
    p.add_argument("--data", default=None, help="dataset whose gallery the version's index holds")
    p.add_argument("--split", default="test", help="gallery split (default: test)")
    p.add_argument("--promote", action="store_true",
                   help="move --alias to the version once its index exists (needs --data)")
    p.add_argument("--alias", default="champion")
    p.add_argument("--workers", type=int, default=None, help="most embedding actors at once")
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


def _expected(text: str | None, *, none_allowed: bool) -> object:
    if text is None:
        return ANY
    if none_allowed and text.lower() == "none":
        return None
    value = text.lower().lstrip("v")
    if not value.isdigit():
        raise UserError(f"--expect must be a version number{' or none' if none_allowed else ''}"
                        f", got {text!r}")
    return int(value)


def run_promote(args: argparse.Namespace) -> None:
    expect = _expected(args.expect, none_allowed=True)
    registry = _open(args.url)
    number = registry.resolve(args.ref)["version"]
    event = registry.promote(number, alias=args.alias, reason=args.reason, expect=expect)
    print(f"{args.alias} -> version {number} (was {event['previous']})")


def run_rollback(args: argparse.Namespace) -> None:
    expect = _expected(args.expect, none_allowed=False)
    event = _open(args.url).rollback(args.alias, reason=args.reason, expect=expect)
    print(f"{args.alias} -> version {event['version']} (rolled back from {event['previous']})")


def run_add(args: argparse.Namespace) -> None:
    added = add_checkpoint(args.url, args.checkpoint, data=args.data, split=args.split,
                           promote=args.promote, alias=args.alias, workers=args.workers)
    release_ray()
    version = added.version
    table = version["evaluation"]["table"]
    scores = ", ".join(f"{k} {100 * v:.2f}" for k, v in sorted(table.items())) or \
        "no evaluation table (no run metrics.json beside the checkpoint)"
    verb = "added as" if added.created else "already registered as"
    print(f"{version['source_checkpoint']} {verb} version {version['version']} "
          f"({version['model']}; {scores})")
    if added.index_url is not None:
        print(f"index: {added.index_url}")
    if added.promoted is not None:
        print(f"{args.alias} -> version {version['version']} (was {added.promoted['previous']})")


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
