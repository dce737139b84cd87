"""The `composeae shards ...` commands: synth, convert, ls, verify.

`register(subparsers)` adds the `shards` command to the top-level parser; each subcommand sets
`func`, which the CLI calls with the parsed arguments. Bad input raises `UserError`.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from composeae import storage
from composeae.data import schema
from composeae.data.revisions import append_synth_day
from composeae.data.shardset import read_manifest
from composeae.errors import UserError


_URL_HELP = "dataset directory or s3://bucket/prefix"


def register(subparsers) -> None:
    """Add `shards {synth,convert,ls,verify}` to an argparse subparsers object."""
    shards = subparsers.add_parser(
        "shards", help="build, list and verify WebDataset shard sets",
        description="Build, list and verify WebDataset shard sets (local directory or s3://).")
    commands = shards.add_subparsers(dest="shards_command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="generate the CSS-synth benchmark")
    synth.add_argument("--out", required=True, metavar="URL", help=_URL_HELP)
    synth.add_argument("--preset", default="small",
                       choices=("tiny", "small", "full", "catalogue"),
                       help="tiny (tests), small (demo), full (about TIRG's CSS size), "
                            "catalogue (208,000 test gallery images); default small")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in px (default 64)")
    synth.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes rendering images (default 1; the bytes do not change)")
    synth.add_argument("--day", metavar="YYYY-MM-DD", default=None,
                       help="append that day's seeded new training scenes to the CSS-synth "
                            "dataset at --out instead (what the nightly job does)")
    synth.add_argument("--day-sources", type=int, default=50, metavar="N",
                       help="source scenes in a --day slice (default 50)")
    synth.set_defaults(func=run_synth)

    convert = commands.add_parser("convert", help="convert a downloaded dataset into shards")
    convert.add_argument("dataset", metavar="DATASET",
                         help="registered converter name (an unknown name lists them)")
    convert.add_argument("--src", required=True, metavar="DIR", help="the dataset as downloaded")
    convert.add_argument("--out", required=True, metavar="URL", help=_URL_HELP)
    convert.set_defaults(func=run_convert)

    ls = commands.add_parser("ls", help="show a dataset's manifest as a table")
    ls.add_argument("url", metavar="URL")
    ls.set_defaults(func=run_ls)

    verify = commands.add_parser("verify", help="re-hash every shard against the manifest")
    verify.add_argument("url", metavar="URL")
    verify.set_defaults(func=run_verify)


def run_synth(args: argparse.Namespace) -> None:
    from composeae.data.synth import generate  # late: keeps `composeae --help` light

    if args.day is not None:
        added = append_synth_day(args.out, args.day, sources=args.day_sources)
        print(f"day {args.day}: {added} training samples appended" if added
              else f"day {args.day} is already in the dataset: nothing appended")
        print(format_manifest(read_manifest(args.out), args.out))
        return
    manifest = generate(args.out, preset=args.preset, seed=args.seed, image_size=args.image_size,
                        workers=args.workers)
    print(format_manifest(manifest, args.out))


def run_convert(args: argparse.Namespace) -> None:
    from composeae.data import sources  # late: the converters register themselves on import

    # `convert` rejects an unknown dataset (listing the known ones) and a missing --src.
    manifest = sources.convert(args.dataset, Path(args.src), args.out)
    print(format_manifest(manifest, args.out))


def run_ls(args: argparse.Namespace) -> None:
    print(format_manifest(read_manifest(args.url), args.url))


def format_manifest(manifest: dict, url: str) -> str:
    """The manifest as a table: split, kind, shards, samples, bytes."""
    rows = [("split", "kind", "shards", "samples", "bytes")]
    for split, kinds in manifest["splits"].items():
        for kind, entry in kinds.items():
            rows.append((split, kind, str(len(entry["shards"])), str(entry["count"]),
                         str(sum(s["bytes"] for s in entry["shards"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{manifest.get('name', '?')} at {url}"]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _hash(url: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with storage.open_read(url) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def verify(url: str) -> tuple[list[str], int]:
    """Re-hash every shard of the dataset at `url`: (problems found, shards checked)."""
    manifest = read_manifest(url)
    problems, checked = [], 0
    if not storage.exists(storage.join(url, manifest["corpus"])):
        problems.append(f"missing {manifest['corpus']}")
    for split, kinds in manifest["splits"].items():
        for kind, entry in kinds.items():
            for shard in entry["shards"]:
                checked += 1
                try:
                    sha, size = _hash(storage.join(url, shard["name"]))
                except FileNotFoundError:
                    problems.append(f"missing {shard['name']}")
                    continue
                if sha != shard["sha256"] or size != shard["bytes"]:
                    problems.append(f"mismatch {shard['name']}: sha256 {sha[:12]}.. ({size} "
                                    f"bytes), manifest {shard['sha256'][:12]}.. "
                                    f"({shard['bytes']} bytes)")
    return problems, checked


def run_verify(args: argparse.Namespace) -> None:
    problems, checked = verify(args.url)
    for problem in problems:
        print(problem)
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the dataset at {args.url}")
    print(f"ok: {checked} shards match {schema.MANIFEST} at {args.url}")
