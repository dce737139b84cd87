"""A dataset's manifest read for the stream and evaluation: shard URLs and dataset properties.

What belongs here: turning a dataset URL and its `manifest.json` into the shard list of one
split/kind (checked to be present with one listing), the corpus, and the properties that readers
act on (which train kind, reference exclusion, the joint gallery, the pairing rule), each with
its default for manifests written before the property existed. No tar reading, no decoding.
"""

from __future__ import annotations

import json

from composeae.config import DataConfig
from composeae import storage
from composeae.data import schema
from composeae.errors import UserError


def read_manifest(url: str) -> dict:
    """The manifest of the dataset at `url`; `UserError` when there is no (valid) dataset there."""
    manifest_url = storage.join(url, schema.MANIFEST)
    try:
        text = storage.read_text(manifest_url)
    except FileNotFoundError:
        raise UserError(f"no dataset at {url}: {schema.MANIFEST} not found") from None
    except IsADirectoryError:
        raise UserError(f"no dataset at {url}: {manifest_url} is a directory") from None
    except NotADirectoryError:
        raise UserError(f"no dataset at {url}: it is not a directory") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{manifest_url} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{manifest_url} is not a dataset manifest (no 'splits')")
    if manifest.get("version") != schema.MANIFEST_VERSION:
        raise UserError(f"{manifest_url} has version {manifest.get('version')!r}; this reader "
                        f"understands version {schema.MANIFEST_VERSION}")
    return manifest


def shard_list(url: str, manifest: dict, split: str, kind: str) -> list[dict]:
    """[{"url", "count"}] of one split/kind's shards; `UserError` when there are none."""
    entry = manifest["splits"].get(split, {}).get(kind)
    if not entry or not entry.get("shards") or not entry.get("count"):
        raise UserError(f"dataset at {url} has no {split} {kind} shards")
    names = [s["name"] for s in entry["shards"]]
    _check_present(url, names)
    return [{"url": storage.join(url, s["name"]), "count": int(s["count"])}
            for s in entry["shards"]]


def _check_present(url: str, names: list[str]) -> None:
    """One listing instead of a request per shard: fail early when shards are missing."""
    present = set(storage.listdir(url))
    missing = [n for n in names if n not in present]
    if missing:
        raise UserError(f"{len(missing)} of {len(names)} shards listed in the manifest are "
                        f"missing at {url}, e.g. {missing[0]}")


def train_kind(url: str, manifest: dict) -> str:
    """The kind the train split holds: fixed triplets or pairing groups."""
    kinds = [k for k in schema.TRAIN_KINDS if k in manifest["splits"].get(schema.TRAIN_SPLIT, {})]
    if not kinds:
        raise UserError(f"dataset at {url} has no {schema.TRAIN_SPLIT} shards")
    return kinds[0]


def exclude_reference(manifest: dict) -> bool:
    """Whether a query's own reference image leaves its ranking (older manifests: yes)."""
    return bool(manifest.get("params", {}).get(schema.EXCLUDE_REFERENCE, True))


def joint_gallery(manifest: dict) -> bool:
    """Whether queries are also ranked against one gallery of every group (FashionIQ)."""
    return bool(manifest.get("params", {}).get(schema.JOINT_GALLERY, False))


def pairing(url: str, manifest: dict) -> dict:
    """The pairing record of a group dataset (see `schema.PAIRING`)."""
    record = manifest.get("params", {}).get(schema.PAIRING)
    if not isinstance(record, dict) or not record.get("pairs_per_epoch"):
        raise UserError(f"dataset at {url} holds training groups but its manifest has no "
                        f"params.{schema.PAIRING}.pairs_per_epoch")
    return record


def has_split(data: DataConfig, split: str) -> bool:
    """Whether the dataset's manifest lists `split` (the writer refuses splits with no samples)."""
    return split in read_manifest(data.url)["splits"]


def load_corpus(data: DataConfig) -> list[str]:
    """Every training text of the dataset, one per entry (for vocabularies and tokenizers)."""
    manifest = read_manifest(data.url)
    corpus_url = storage.join(data.url, manifest["corpus"])
    try:
        return storage.read_text(corpus_url).splitlines()
    except FileNotFoundError:
        raise UserError(f"dataset at {data.url} has no corpus file {manifest['corpus']}") from None
