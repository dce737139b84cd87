"""What every dataset converter shares: the registry, annotation-file errors, image reading,
and turning a converter's plan into shards.

A converter works in two steps. First it parses its dataset's annotation files into a *plan*:
lists of `PlannedTriplet` or `PlannedGroup` (training), `PlannedQuery` and `PlannedImage`, each
holding the schema metadata and the image paths it needs. Parsing reads no image, so a malformed
line fails within seconds with a `UserError` naming the file and line. Then `write_plan` streams
the plan through the shard writer, reading each image only when its sample is written.

Training samples are written in an order shuffled with the converter's seed: annotation order
(one category, noun or label file after another) would give every shard, and so every shuffle
buffer and batch, a narrow slice of the dataset.

Dataset-specific parsing and pairing rules live in the per-dataset modules, not here.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from PIL import Image
from tqdm import tqdm

from composeae.data import schema
from composeae.data.schema import GalleryMeta, GroupMeta, QueryMeta, TripletMeta
from composeae.data.writer import (gallery_sample, group_sample, query_sample, triplet_sample,
                                   write_dataset)
from composeae.errors import UserError

log = logging.getLogger("composeae.data.sources")

Converter = Callable[..., dict]
_CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Function decorator registering `convert(src, out_url, *, shard_size, ...)` under `name`."""
    def decorator(fn: Converter) -> Converter:
        if name in _CONVERTERS and _CONVERTERS[name] is not fn:
            raise ValueError(f"converter {name!r} is already registered by {_CONVERTERS[name].__module__}")
        _CONVERTERS[name] = fn
        return fn
    return decorator


def registered_converters() -> dict[str, Converter]:
    return dict(_CONVERTERS)


def check_options(name: str, fn: Converter, options: Mapping[str, Any]) -> None:
    """Reject options the converter does not take with one line that lists the ones it does."""
    accepted = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"converter {name!r} has no option {', '.join(unknown)}; "
                        f"its options: {', '.join(accepted)}")


# ---------------------------------------------------------------------------------------------
# Annotation files


def file_error(path: Path, line: int | None, message: str) -> UserError:
    """A UserError that points at `path:line` (line is 1-based; None for whole-file problems)."""
    where = f"{path}:{line}" if line is not None else str(path)
    return UserError(f"{where}: {message}")


def require_positive(option: str, value: int) -> int:
    if value < 1:
        raise UserError(f"option {option} must be at least 1, got {value}")
    return value


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"missing {what}: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"missing {what}: {path}")
    return path


def text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for every non-blank line of a text file."""
    require_file(path, what)
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except UnicodeDecodeError as e:
        raise file_error(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: Path, what: str) -> Any:
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise file_error(path, e.lineno, f"invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise file_error(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def json_list(path: Path, what: str) -> list:
    data = read_json(path, what)
    if not isinstance(data, list):
        raise file_error(path, None, f"expected a JSON list, found {type(data).__name__}")
    return data


def entry_field(path: Path, index: int, entry: Any, field: str, kind: type | tuple[type, ...]) -> Any:
    """`entry[field]` of the `index`-th element of a JSON list, checked for presence and type.

    JSON files carry no useful line numbers once parsed, so errors name the entry index instead.
    """
    if not isinstance(entry, dict):
        raise file_error(path, None, f"entry {index}: expected an object, found {type(entry).__name__}")
    if field not in entry:
        raise file_error(path, None, f"entry {index}: missing field {field!r}")
    value = entry[field]
    if not isinstance(value, kind):
        raise file_error(path, None, f"entry {index}: field {field!r} has the wrong type "
                                     f"({type(value).__name__})")
    return value


# ---------------------------------------------------------------------------------------------
# Images

# Formats whose bytes go into the shards unchanged, under the extension the schema allows.
# MPO is what PIL calls a JPEG with extra embedded frames; every JPEG decoder reads its first frame.
_PASS_THROUGH = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}


class ImageReader:
    """Reads image files as (bytes, ext) with ext in schema.IMAGE_EXTS.

    Each file is fully decoded the first time it is read, so a truncated or corrupt image stops the
    conversion with its path instead of failing a training run later. Images used by many samples
    (a MIT-States reference in every query of its noun) are decoded once; afterwards only their
    bytes are read. Formats other than JPEG and PNG are re-encoded: PNG when the image has an alpha
    channel, JPEG (quality 95) otherwise.
    """

    def __init__(self) -> None:
        self._checked: dict[Path, str] = {}

    def read(self, path: Path) -> tuple[bytes, str]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"missing image: {path}") from None
        except OSError as e:
            raise UserError(f"cannot read image {path}: {e.strerror}") from None
        ext = self._checked.get(path)
        if ext is not None:
            return data, ext
        data, ext = _decoded(path, data)
        if data is not None:
            self._checked[path] = ext
            return data, ext
        return _reencoded(path), ext


def _decoded(path: Path, data: bytes) -> tuple[bytes | None, str]:
    """(data, ext) when the bytes can be stored as they are, else (None, ext to re-encode to)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format in _PASS_THROUGH:
                return data, _PASS_THROUGH[img.format]
            return None, "png" if _has_alpha(img) else "jpg"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"unreadable image {path}: {e}") from None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _reencoded(path: Path) -> bytes:
    with Image.open(path) as img:
        buf = io.BytesIO()
        if _has_alpha(img):
            img.convert("RGBA").save(buf, format="PNG")
        else:
            img.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()


def find_image(stem: Path, exts: Sequence[str]) -> Path | None:
    """The first existing `stem.<ext>` (e.g. a FashionIQ asin stored as .jpg or .png), else None."""
    for ext in exts:
        candidate = stem.with_name(f"{stem.name}.{ext}")
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Plans and shards


@dataclass(frozen=True)
class PlannedTriplet:
    reference: Path
    target: Path
    meta: TripletMeta


@dataclass(frozen=True)
class PlannedGroup:
    images: tuple[Path, ...]
    """Member j's image file, in the order of `meta.image_ids`."""
    meta: GroupMeta


@dataclass(frozen=True)
class PlannedQuery:
    reference: Path
    meta: QueryMeta


@dataclass(frozen=True)
class PlannedImage:
    image: Path
    meta: GalleryMeta


SplitPlan = Mapping[str, Sequence[Any]]
"""kind (`schema.SHARD_KINDS`) -> planned samples of that kind."""

# WebDataset splits a member name at its first dot to find the key, and the writer accepts only
# these characters in a key.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(index: int, name: str) -> str:
    """A WebDataset key: the running index (unique within a split and kind) plus a readable,
    dot-free tail of the id. Ids such as `women/.../123_0.jpeg` stay unchanged in the json."""
    slug = _KEY_UNSAFE.sub("_", name[-64:]).strip("_-")
    return f"{index:08d}-{slug}" if slug else f"{index:08d}"


def progress(items: Iterable, total: int, desc: str) -> Iterable:
    """A tqdm bar on stderr when it is a terminal; the plain iterable otherwise (logs, CI)."""
    if not sys.stderr.isatty():
        return items
    return tqdm(items, total=total, desc=desc, unit="sample", dynamic_ncols=True)


def _triplet_samples(plan: Sequence[PlannedTriplet], reader: ImageReader) -> Iterator[dict]:
    for i, t in enumerate(plan):
        ref, ref_ext = reader.read(t.reference)
        tgt, tgt_ext = reader.read(t.target)
        key = sample_key(i, f"{t.meta.reference_id}_{t.meta.target_id}")
        yield triplet_sample(key, ref, ref_ext, tgt, tgt_ext, t.meta)


def _group_samples(plan: Sequence[PlannedGroup], reader: ImageReader) -> Iterator[dict]:
    for i, g in enumerate(plan):
        yield group_sample(sample_key(i, g.meta.key), [reader.read(p) for p in g.images], g.meta)


def _query_samples(plan: Sequence[PlannedQuery], reader: ImageReader) -> Iterator[dict]:
    for i, q in enumerate(plan):
        ref, ref_ext = reader.read(q.reference)
        yield query_sample(sample_key(i, q.meta.query_id), ref, ref_ext, q.meta)


def _gallery_samples(plan: Sequence[PlannedImage], reader: ImageReader) -> Iterator[dict]:
    for i, g in enumerate(plan):
        img, ext = reader.read(g.image)
        yield gallery_sample(sample_key(i, f"{g.meta.group}_{g.meta.image_id}"), img, ext, g.meta)


_STREAMS = {schema.TRIPLETS: _triplet_samples, schema.GROUPS: _group_samples,
            schema.QUERIES: _query_samples, schema.GALLERY: _gallery_samples}


def write_plan(out_url: str, name: str, plan: Mapping[str, SplitPlan], params: dict,
               *, shard_size: int, seed: int) -> dict:
    """Write every split of `plan` as shards plus manifest; returns the manifest.

    Training samples are written in an order shuffled with `seed` (see the module docstring);
    evaluation samples in plan order. `params` should say how the data was converted (hit level,
    pairing rule, skipped items, the seed) so the manifest documents it.
    """
    require_positive("shard_size", shard_size)
    plan = {split: {kind: _shuffled(items, seed) if split == schema.TRAIN_SPLIT else items
                    for kind, items in kinds.items()}
            for split, kinds in plan.items()}
    reader = ImageReader()
    splits = {
        split: {kind: progress(_STREAMS[kind](items, reader), len(items), f"{name} {split} {kind}")
                for kind, items in kinds.items()}
        for split, kinds in plan.items()
    }
    return write_dataset(out_url, name, splits, params, shard_size=shard_size)


def _shuffled(items: Sequence[Any], seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def plan_counts(plan: Mapping[str, SplitPlan]) -> dict[str, dict[str, int]]:
    return {split: {kind: len(items) for kind, items in kinds.items()} for split, kinds in plan.items()}


def warn_skipped(dataset: str, skipped: Mapping[str, int], why: str) -> None:
    """One summary line for items skipped because the published data is known to be incomplete."""
    total = sum(skipped.values())
    if total:
        detail = ", ".join(f"{k}: {v}" for k, v in skipped.items() if v)
        log.warning("%s: skipped %d items (%s): %s", dataset, total, detail, why)
