"""Confined reads of a gallery index: what its manifest and blocks name is checked before it
is read.

Whoever can write an index folder must not be able to make the service read anything else: an
index's manifest names a dataset URL, block names and the shard each block points into, and a
block names byte ranges inside that shard, which `GET /image/<id>` then returns. So, in order:

1. `check_manifest` (nothing read yet but the manifest): every name is a plain file name (no
   `/`, no `..`, no scheme: a join cannot leave the index or the dataset folder); the dataset URL
   is absolute and normal, and equals the one the registry version names when there is one (an
   index pointing into another bucket or directory is refused before anything there is read);
   counts, dims and the model's version and checkpoint are of the right types and agree with
   what the caller expects (`Expected`: the registry version the index is loaded for).
2. `check_dataset` (the dataset's own manifest read): every block's shard is a gallery shard
   the dataset lists for the index's split, and the gallery's fingerprint is the index's.
3. `check_block` (each block read): ids, labels and pointers agree with the block's count, the
   rows' shape and dtype with the manifest, and every byte range lies inside its shard's size.

Each refusal is one `UserError` line naming the index and what is wrong.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from composeae import storage
from composeae.data import schema
from composeae.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DTYPES = ("float16", "float32")
MAX_POINTER_BYTES = 64 * 2**20
"""Largest gallery image a pointer may name (a pointer is one ranged read into memory)."""


@dataclass(frozen=True)
class Expected:
    """What the caller knows the index must be: built for registry `version` from `checkpoint`
    (a `model.pt` URL) over the dataset at `data` (None: any dataset whose manifest lists the
    index's shards with the index's fingerprint)."""
    version: int | None
    checkpoint: str | None
    data: str | None = None


def _refuse(url: str, problem: str) -> UserError:
    return UserError(f"refusing the index at {url}: {problem}")


def _plain_name(value: Any) -> bool:
    return isinstance(value, str) and bool(_NAME.fullmatch(value)) and ".." not in value


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def normal_url(value: Any) -> bool:
    """An absolute local path or `s3://bucket/key` with no `.`, `..` or empty segments."""
    if not isinstance(value, str) or "\\" in value or "\x00" in value:
        return False
    if storage.is_s3(value):
        rest = value[len("s3://"):].rstrip("/")
        return bool(rest) and all(p not in ("", ".", "..") for p in rest.split("/"))
    return value.startswith("/") and posixpath.normpath(value) == value.rstrip("/") or value == "/"


def check_manifest(url: str, manifest: dict[str, Any], expect: Expected | None) -> None:
    """Step 1: the manifest alone (see the module docstring)."""
    if not _count(manifest.get("count")) or not _count(manifest.get("dim")) \
            or manifest.get("dtype") not in _DTYPES:
        raise _refuse(url, "its count, dim or dtype is missing or not a number")
    model, data, blocks = manifest.get("model"), manifest.get("data"), manifest.get("blocks")
    if not isinstance(model, dict) or not isinstance(data, dict) or not isinstance(blocks, list):
        raise _refuse(url, "its model, data or blocks entry is missing")
    if not normal_url(data.get("url")):
        raise _refuse(url, f"its dataset URL {str(data.get('url'))[:200]!r} is not an absolute, "
                           f"normal path or s3:// URL")
    if not isinstance(data.get("split"), str) or not isinstance(data.get("fingerprint"), str):
        raise _refuse(url, "its dataset split or fingerprint is missing")
    for block in blocks:
        if not isinstance(block, dict) or not _count(block.get("count")):
            raise _refuse(url, "a block entry has no count")
        for key in ("name", "shard"):
            if not _plain_name(block.get(key)):
                raise _refuse(url, f"block {key} {str(block.get(key))[:200]!r} is not a plain "
                                   f"file name (no '/', '..' or URL)")
    if sum(b["count"] for b in blocks) != manifest["count"]:
        raise _refuse(url, f"its blocks hold {sum(b['count'] for b in blocks)} rows, not the "
                           f"{manifest['count']} it states")
    ann = manifest.get("ann")
    if ann is not None:
        file = ann.get("file") if isinstance(ann, dict) else None
        folder, _, name = str(file).partition("/")
        if folder != "ann" or not _plain_name(name):
            raise _refuse(url, f"its approximate index file {str(file)[:200]!r} is not a plain "
                               f"name under ann/")
    version = model.get("version")
    if version is not None and (not _count(version) or version == 0):
        raise _refuse(url, f"its model version {str(version)[:50]!r} is not a version number")
    if not isinstance(model.get("checkpoint"), str) \
            or not _SHA256.fullmatch(str(model.get("checkpoint_sha256"))):
        raise _refuse(url, "it names no checkpoint with its sha256")
    if expect is None:
        return
    if expect.version is not None and version != expect.version:
        raise _refuse(url, f"it was built for {_model(version, model['checkpoint'])}, not for "
                           f"version {expect.version} (build it with `composeae index "
                           f"--registry URL --alias {expect.version} --data URL`)")
    if expect.checkpoint is not None and model["checkpoint"] != expect.checkpoint:
        raise _refuse(url, f"it was built from {model['checkpoint']}, not from the version's "
                           f"checkpoint {expect.checkpoint}")
    if expect.data is not None and data["url"].rstrip("/") != expect.data.rstrip("/"):
        raise _refuse(url, f"its dataset URL {data['url']} is not the version's dataset "
                           f"{expect.data}")


def _model(version: Any, checkpoint: str) -> str:
    return f"version {version}" if version is not None else f"checkpoint {checkpoint} (no version)"


def check_dataset(url: str, manifest: dict[str, Any], dataset: dict[str, Any],
                  fingerprint_of: Callable[[dict, str], str]) -> dict[str, int]:
    """Step 2: {shard name: bytes} of the gallery shards the dataset lists for the index's
    split, once every block's shard is one of them and the fingerprints agree
    (`fingerprint_of(dataset, split)`: the gallery's fingerprint as the index build takes it)."""
    split = manifest["data"]["split"]
    entry = dataset.get("splits", {}).get(split, {}).get(schema.GALLERY)
    if not isinstance(entry, dict) or not entry.get("shards"):
        raise _refuse(url, f"the dataset {manifest['data']['url']} has no {split} gallery")
    sizes = {s["name"]: int(s["bytes"]) for s in entry["shards"]}
    if fingerprint_of(dataset, split) != manifest["data"]["fingerprint"]:
        raise _refuse(url, f"the gallery of {manifest['data']['url']} [{split}] is not the one it "
                           f"was built from (fingerprints differ)")
    for block in manifest["blocks"]:
        if block["shard"] not in sizes:
            raise _refuse(url, f"block {block['name']} points into {block['shard']}, which the "
                               f"dataset does not list as a {split} gallery shard")
    return sizes


def check_block(url: str, block: dict[str, Any], meta: Any, shard_bytes: int) -> None:
    """Step 3, before the block's rows are read: its JSON against the manifest's entry."""
    n = block["count"]
    if not isinstance(meta, dict) or meta.get("count") != n:
        raise _refuse(url, f"block {block['name']} does not hold the {n} rows the manifest states")
    ids, labels, pointers = meta.get("ids"), meta.get("labels"), meta.get("pointers")
    if not all(isinstance(x, list) and len(x) == n for x in (ids, labels, pointers)):
        raise _refuse(url, f"block {block['name']}'s ids, labels and pointers are not {n} each")
    if not all(isinstance(i, str) and i for i in ids):
        raise _refuse(url, f"block {block['name']} has an id that is not a non-empty string")
    for p in pointers:
        ok = (isinstance(p, list) and len(p) == 3 and _count(p[0]) and _count(p[1])
              and 0 < p[1] <= MAX_POINTER_BYTES and p[0] + p[1] <= shard_bytes
              and p[2] in schema.IMAGE_EXTS)
        if not ok:
            raise _refuse(url, f"block {block['name']} has a pointer {str(p)[:80]} outside its "
                               f"shard's {shard_bytes} bytes or with another file type")


def check_rows(url: str, block: dict[str, Any], rows: np.ndarray, dim: int, dtype: str
               ) -> np.ndarray:
    """Step 3, the rows: (count, dim) of the manifest's dtype."""
    if rows.shape != (block["count"], dim) or rows.dtype != np.dtype(dtype):
        raise _refuse(url, f"block {block['name']} holds {rows.dtype} rows of shape "
                           f"{tuple(rows.shape)}, not {dtype} ({block['count']}, {dim})")
    return rows
