"""Datasets that grow: a fingerprint of what a manifest holds, and CSS-synth's daily slice.

The nightly job asks "is there anything new since the newest registered model was trained?" by
comparing `fingerprint(manifest)`: a hash of every shard's name and sha256, so appended,
replaced or removed shards all change it, and re-uploading identical bytes does not.

`append_synth_day` stands in for a day's new catalogue on CSS-synth: the day's seeded training
groups (`synth.day_plan`, disjoint from every evaluation scene) appended to the training shards
under the day's tag. The evaluation splits never change, so nights compare on the same queries.
"""

from __future__ import annotations

import hashlib
from datetime import date as Date

from composeae.data import schema
from composeae.data.shardset import read_manifest
from composeae.data.writer import append_shards
from composeae.errors import UserError


def fingerprint(manifest: dict) -> str:
    """sha256 over the sorted `split/kind/name sha256` lines of every shard."""
    lines = sorted(f"{split}/{kind}/{shard['name']} {shard['sha256']}"
                   for split, kinds in manifest["splits"].items()
                   for kind, entry in kinds.items() for shard in entry["shards"])
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def parse_day(text: str) -> str:
    """A `YYYY-MM-DD` date, checked (`UserError` naming it otherwise)."""
    try:
        return Date.fromisoformat(text).isoformat()
    except (TypeError, ValueError):
        raise UserError(f"a day must be a date YYYY-MM-DD, got {text!r}") from None


def day_tag(day: str) -> str:
    """`2026-11-29` -> `day20261129` (shard names carry it)."""
    return "day" + day.replace("-", "")


def append_synth_day(url: str, day: str, *, sources: int) -> int:
    """Append CSS-synth day `day` (YYYY-MM-DD) to the training shards at `url`; returns the
    samples added (0 when that day is already there)."""
    from composeae.data.synth import day_plan, train_samples  # deferred: the generator imports PIL

    day = parse_day(day)
    if sources <= 0:
        raise UserError(f"a day's slice needs at least one source scene, got {sources}")
    manifest = read_manifest(url)
    params = manifest.get("params", {})
    if params.get("generator") != "css-synth":
        raise UserError(f"nightly.new_data=synth_day needs a CSS-synth dataset; {url} holds "
                        f"{manifest.get('name', 'another dataset')}")
    days = list(params.get("days", []))
    if day in days:
        return 0
    groups = day_plan(params["preset"], params["seed"], day, sources)
    tag = day_tag(day)
    samples = train_samples(groups, params["image_size"], id_prefix=f"{schema.TRAIN_SPLIT}-{tag}")
    _, added = append_shards(url, schema.TRAIN_SPLIT, schema.TRIPLETS, samples, tag=tag,
                             params={"days": sorted(days + [day])})
    return added
