"""Writing a dataset: samples -> WebDataset shards + corpus + manifest, complete or absent.

Writers (the CSS-synth generator, the dataset converters) build samples with `triplet_sample`,
`group_sample`, `query_sample` and `gallery_sample` and hand iterables of them to `write_dataset`,
which owns the on-disk layout described in `composeae.data.schema`:

- shards are written one at a time with `webdataset.TarWriter` into a local temp directory, with
  fixed tar headers (integer mtime 0, so no PAX record; fixed owner and mode) so equal samples
  give byte-identical shards;
- each finished shard is hashed (sha256) and moved (local) or uploaded (S3), then deleted, so
  the local disk holds one shard at a time whatever the dataset's size;
- `corpus.txt` collects every training text, and `manifest.json` is written last with one atomic
  write: a dataset whose manifest exists is complete. A failed write removes what it uploaded.

The matching reader, `read_manifest`, is on the reading side: `composeae.data.shardset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Iterable, Mapping

import webdataset as wds

from composeae import storage
from composeae.data import schema
from composeae.data.shardset import read_manifest
from composeae.data.schema import GalleryMeta, GroupMeta, QueryMeta, TripletMeta
from composeae.errors import UserError

log = logging.getLogger(__name__)

# Kinds each split may hold: one of these sets (training triplets or groups; an evaluation
# query set with its gallery).
_SPLIT_KINDS = {schema.TRAIN_SPLIT: tuple((kind,) for kind in schema.TRAIN_KINDS),
                **{split: (schema.EVAL_KINDS,) for split in schema.EVAL_SPLITS}}
# A WebDataset key may not contain '.', which starts the extension, nor path separators.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")

def encode_meta(meta: TripletMeta | GroupMeta | QueryMeta | GalleryMeta) -> bytes:
    """Metadata as canonical JSON bytes (sorted keys: identical metadata, identical bytes)."""
    return json.dumps(meta.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8")


def _check_key(key: str) -> None:
    if not _KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} may hold only letters, digits, '_' and '-' "
                         f"(WebDataset reads everything after a '.' as the extension)")


def _check_ext(ext: str) -> str:
    if ext not in schema.IMAGE_EXTS:
        raise ValueError(f"image extension {ext!r} is not one of {schema.IMAGE_EXTS}")
    return ext


def triplet_sample(key: str, reference: bytes, reference_ext: str, target: bytes, target_ext: str,
                   meta: TripletMeta) -> dict:
    """One training sample: reference image, target image, metadata with the modifier."""
    _check_key(key)
    return {
        "__key__": key,
        f"{schema.REFERENCE}.{_check_ext(reference_ext)}": bytes(reference),
        f"{schema.TARGET}.{_check_ext(target_ext)}": bytes(target),
        schema.META: encode_meta(meta),
    }


def group_sample(key: str, images: list[tuple[bytes, str]], meta: GroupMeta) -> dict:
    """One training group: its members' images as (bytes, ext) in member order, and metadata."""
    _check_key(key)
    if len(images) != len(meta.image_ids) or not images:
        raise ValueError(f"group {key!r} has {len(images)} images for {len(meta.image_ids)} "
                         f"members; a group needs at least one")
    sample = {"__key__": key, schema.META: encode_meta(meta)}
    for j, (data, ext) in enumerate(images):
        sample[f"{schema.group_image_key(j)}.{_check_ext(ext)}"] = bytes(data)
    return sample


def query_sample(key: str, reference: bytes, reference_ext: str, meta: QueryMeta) -> dict:
    """One evaluation query: reference image, metadata with the modifier and the target label."""
    _check_key(key)
    return {
        "__key__": key,
        f"{schema.REFERENCE}.{_check_ext(reference_ext)}": bytes(reference),
        schema.META: encode_meta(meta),
    }


def gallery_sample(key: str, image: bytes, image_ext: str, meta: GalleryMeta) -> dict:
    """One gallery image with its id and label."""
    _check_key(key)
    return {
        "__key__": key,
        f"{schema.IMAGE}.{_check_ext(image_ext)}": bytes(image),
        schema.META: encode_meta(meta),
    }


def _check_sample(sample: dict, split: str, kind: str) -> None:
    """Catch a sample of the wrong kind before it lands in a shard."""
    images = schema.KIND_IMAGES.get(kind, (schema.group_image_key(0),))
    for image in images:
        if not any(f"{image}.{ext}" in sample for ext in schema.IMAGE_EXTS):
            raise ValueError(f"{split}/{kind} sample {sample.get('__key__')!r} has no {image}.* "
                             f"image; build it with {kind.rstrip('s')}_sample")
    if schema.META not in sample:
        raise ValueError(f"{split}/{kind} sample {sample.get('__key__')!r} has no metadata")


def _corpus_lines(sample: dict) -> list[str]:
    """The training texts of a triplet (modifier and complete) or a group, one line each."""
    meta = json.loads(sample[schema.META])
    texts = meta["texts"] if "texts" in meta else (meta["modifier"], meta["complete"])
    return [" ".join(t.split()) for t in texts if t and t.strip()]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Publisher:
    """Moves finished files from the local temp dir to the dataset URL; undoes it on failure."""

    def __init__(self, out_url: str, tmp_dir: str):
        self.out_url = out_url
        self.tmp_dir = tmp_dir
        self.published: list[str] = []

    def publish(self, name: str) -> None:
        local = os.path.join(self.tmp_dir, name)
        url = storage.join(self.out_url, name)
        if storage.is_s3(url):
            storage.upload_file(local, url)
            os.remove(local)
        else:
            os.replace(local, url)
        self.published.append(url)

    def undo(self) -> None:
        for url in self.published:
            try:
                storage.remove(url)
            except Exception as exc:  # cleanup is best effort; the original error matters more
                log.warning("could not remove %s after a failed write: %s", url, exc)


def _write_shards(publisher: _Publisher, split: str, kind: str, samples: Iterable[dict],
                  shard_size: int, corpus: list[str]) -> dict:
    """Write one split/kind as numbered shards; returns its manifest entry."""
    shards: list[dict] = []
    writer, name, count = None, "", 0

    def finish() -> None:
        writer.close()
        path = os.path.join(publisher.tmp_dir, name)
        shards.append({"name": name, "count": count, "sha256": _sha256(path),
                       "bytes": os.path.getsize(path)})
        publisher.publish(name)

    for sample in samples:
        _check_sample(sample, split, kind)
        if writer is None:
            name, count = schema.shard_name(split, kind, len(shards)), 0
            # Fixed header fields make the tar bytes a pure function of the samples.
            writer = wds.TarWriter(os.path.join(publisher.tmp_dir, name), encoder=False,
                                   mtime=0, user="composeae", group="composeae", mode=0o444)
        writer.write(sample)
        count += 1
        if kind in schema.TRAIN_KINDS:
            corpus.extend(_corpus_lines(sample))
        if count == shard_size:
            finish()
            writer = None
    if writer is not None:
        finish()
    if not shards:
        raise UserError(f"dataset split {split!r} kind {kind!r} has no samples")
    return {"count": sum(s["count"] for s in shards), "shards": shards}


def _check_splits(splits: Mapping[str, Mapping[str, Iterable[dict]]]) -> None:
    if not splits:
        raise UserError("a dataset needs at least one split")
    for split, kinds in splits.items():
        if split not in _SPLIT_KINDS:
            raise ValueError(f"unknown split {split!r}; splits are {list(_SPLIT_KINDS)}")
        if not any(set(kinds) == set(allowed) for allowed in _SPLIT_KINDS[split]):
            choices = " or ".join(str(allowed) for allowed in _SPLIT_KINDS[split])
            raise ValueError(f"split {split!r} must hold exactly {choices}, got {sorted(kinds)}")


def write_dataset(out_url: str, name: str, splits: Mapping[str, Mapping[str, Iterable[dict]]],
                  params: dict, *, shard_size: int = 1000) -> dict:
    """Write every split as shards under `out_url`, then `corpus.txt`, then `manifest.json`.

    `splits` maps split -> kind -> samples, e.g. `{"train": {"triplets": it}, "val":
    {"queries": it, "gallery": it}}`; the train split may hold "groups" instead. `params`
    (JSON-serialisable) records how the data was made. Refuses to overwrite an existing dataset.
    Returns the manifest.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    _check_splits(splits)
    manifest_url = storage.join(out_url, schema.MANIFEST)
    if storage.exists(manifest_url):
        raise UserError(f"a dataset already exists at {out_url} (it has {schema.MANIFEST}); "
                        f"write to another URL or delete it first")
    if not storage.is_s3(out_url):
        os.makedirs(out_url, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".composeae-write-",
                               dir=None if storage.is_s3(out_url) else out_url)
    publisher = _Publisher(out_url, tmp_dir)
    try:
        corpus: list[str] = []
        split_entries = {
            split: {kind: _write_shards(publisher, split, kind, samples, shard_size, corpus)
                    for kind, samples in kinds.items()}
            for split, kinds in splits.items()
        }
        with open(os.path.join(tmp_dir, schema.CORPUS), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in corpus)
        publisher.publish(schema.CORPUS)
        manifest = {
            "version": schema.MANIFEST_VERSION,
            "name": name,
            "params": params,
            "corpus": schema.CORPUS,
            "splits": split_entries,
        }
        storage.write_text(manifest_url, json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        publisher.undo()
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("wrote dataset %s to %s", name, out_url)
    return manifest


class _TaggedPublisher(_Publisher):
    """Publishes `{split}-{kind}-{index}.tar` as `{split}-{kind}-{tag}-{index}.tar`."""

    def __init__(self, out_url: str, tmp_dir: str, tag: str):
        super().__init__(out_url, tmp_dir)
        self.tag = tag

    def tagged(self, name: str) -> str:
        return re.sub(r"-(\d+)\.tar$", rf"-{self.tag}-\1.tar", name)

    def publish(self, name: str) -> None:
        os.replace(os.path.join(self.tmp_dir, name), os.path.join(self.tmp_dir, self.tagged(name)))
        super().publish(self.tagged(name))


def append_shards(url: str, split: str, kind: str, samples: Iterable[dict], *, tag: str,
                  params: dict, shard_size: int = 1000) -> tuple[dict, int]:
    """Append samples to one split/kind of the dataset at `url` as new shards named with `tag`
    (e.g. `train-triplets-day20261129-000000.tar`); returns (manifest, samples added).

    Complete or absent like `write_dataset`: the shards and a new corpus file (the old lines
    plus the new texts, under a tagged name) are published first, then `manifest.json` is
    replaced in one write. `params` is merged into the manifest's params (the record of what
    was appended). A tag already in the manifest appends nothing: (manifest, 0).
    """
    if not re.fullmatch(r"[A-Za-z0-9]+", tag):
        raise ValueError(f"shard tag must be letters and digits, got {tag!r}")
    manifest = read_manifest(url)
    entry = manifest["splits"].get(split, {}).get(kind)
    if entry is None:
        raise UserError(f"dataset at {url} has no {split} {kind} to append to")
    if any(f"-{tag}-" in s["name"] for s in entry["shards"]):
        return manifest, 0
    tmp_dir = tempfile.mkdtemp(prefix=".composeae-append-",
                               dir=None if storage.is_s3(url) else url)
    publisher = _TaggedPublisher(url, tmp_dir, tag)
    try:
        corpus = storage.read_text(storage.join(url, manifest["corpus"])).splitlines()
        added = _write_shards(publisher, split, kind, samples, shard_size, corpus)
        corpus_name = f"{os.path.splitext(schema.CORPUS)[0]}-{tag}.txt"
        with open(os.path.join(tmp_dir, corpus_name), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in corpus)
        # The tagged publisher renames only shard names; the corpus goes out under its own.
        _Publisher.publish(publisher, corpus_name)
        entry["shards"] += [dict(shard, name=publisher.tagged(shard["name"]))
                            for shard in added["shards"]]
        entry["count"] += added["count"]
        manifest["corpus"] = corpus_name
        manifest["params"] = {**manifest.get("params", {}), **params}
        storage.write_text(storage.join(url, schema.MANIFEST), json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        publisher.undo()
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("appended %d %s %s samples to %s", added["count"], split, kind, url)
    return manifest, added["count"]
