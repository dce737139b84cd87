"""Gallery indexes: one model's embeddings of one gallery split, with ids and image pointers.

An index is a folder (a local directory or an `s3://` prefix):

    manifest.json                 written last: an index exists once its manifest does
    blocks/<build>-<shard>.npy    (n, D) embeddings of one gallery shard, L2-normalised rows,
                                  float16 by default (ranking needs no more: bench_search.py
                                  measures recall@10 of float16 against float32)
    blocks/<build>-<shard>.json   {"shard", "count", "dim", "ids", "groups", "labels",
                                   "pointers": [[offset, size, ext], ...]} in the same row order

`<build>` is a digest of what the index is made from: the checkpoint's bytes, the gallery
shards' sha256s (`gallery_fingerprint`), the split and the dtype. Blocks carry it in their names,
so a build for another model never overwrites the blocks a reader of the current manifest is
loading; the manifest names its blocks, and the older build's blocks are removed only after the
new manifest is in place. The same digest found in the manifest makes a rebuild a no-op; found
on blocks without a manifest (an interrupted build) it makes the rebuild resume: each block is
written whole, its `.json` after its `.npy`, and shards whose `.json` exists are not embedded
again.

An approximate index (`--kind ivf|hnsw`, `composeae.serve.ann`) is built from the blocks once
they are all there: `ann/<build>-<kind>-<digest>.faiss`, named in the manifest under "ann" with
its parameters; the blocks stay, for re-ranking and exact search.

A pointer is the byte range of the image member inside its shard, so `read_image` fetches one
image with one ranged read (a seek locally, a `Range` GET on S3) instead of scanning a tar.

Parallelism: Ray Data's `map_batches` with an actor pool over the list of gallery shards. Each
actor loads the model once and takes whole shards: it streams the shard, decodes and embeds its
images with the evaluation's own functions (`SampleDecoder`, `collate`, and
`evaluate.embed`, so index and evaluation embed alike), writes the shard's block itself and
returns only its count; embeddings never pass through the object store or the driver. The
evaluation job (a TorchTrainer gang) was the other candidate: it starts and ends all workers
together and gathers every embedding to every rank, which an index needs neither of, while Ray
Data retries a failed shard alone and scales the pool between its bounds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import torch

from composeae import storage

from composeae.config import config_from_dict
from composeae.data import schema, shardset
from composeae.data.tarstream import StreamErrors, group_samples, open_shard, tar_members
from composeae.errors import UserError
from composeae.registry.store import ModelRegistry
from composeae.serve.ann import ANN, AnnSpec, build_ann, load_ann, rate_line
from composeae.serve.columns import ColumnBuilder, RowLookup, StringColumn
from composeae.serve.confine import (Expected, check_block, check_dataset, check_manifest,
                                     check_rows)
from composeae.run.cluster import check_local_paths_on_nodes, init_ray
from composeae.storage import absolute_url

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
BLOCKS = "blocks"
DTYPES = ("float16", "float32")
INDEXES = "indexes"
"""Where a registry keeps its versions' indexes: `<registry>/indexes/<version>/`."""


class UnknownImage(UserError):
    """A gallery id that the index does not hold (HTTP 404 in the service)."""


# -- what an index is built from ------------------------------------------------------------------

def registry_index_url(registry_url: str, version: int) -> str:
    """The index of registry version `version` (what `composeae serve` loads for an alias)."""
    return storage.join(registry_url, INDEXES, f"{int(version):06d}")


def resolve_model(checkpoint: str | None, registry: str | None, alias: str | None
                  ) -> dict[str, Any]:
    """{"checkpoint", "registry", "version", "alias"} of `--checkpoint` or `--registry --alias`."""

    if (checkpoint is None) == (registry is None):
        raise UserError("give either --checkpoint URL or --registry URL --alias NAME")
    if checkpoint is not None:
        return {"checkpoint": absolute_url(checkpoint), "registry": None, "version": None,
                "alias": None}

    reg = ModelRegistry.open(absolute_url(registry))
    record = reg.resolve(alias or "champion")
    return {"checkpoint": record["checkpoint"], "registry": reg.url,
            "version": int(record["version"]), "alias": alias or "champion"}


def checkpoint_file(url: str) -> str:
    from composeae.checkpoint import MODEL_FILE

    return url if url.endswith(".pt") else storage.join(url, MODEL_FILE)


def gallery_shards(data_url: str, split: str) -> tuple[list[dict], str]:
    """([{"name", "url", "count"}] of the split's gallery shards, their fingerprint)."""

    manifest = shardset.read_manifest(data_url)
    if split not in manifest["splits"]:
        raise UserError(f"dataset {data_url} has no split {split!r} "
                        f"(splits: {', '.join(sorted(manifest['splits']))})")
    listed = shardset.shard_list(data_url, manifest, split, schema.GALLERY)
    entries = manifest["splits"][split][schema.GALLERY]["shards"]
    shards = [dict(s, name=e["name"]) for s, e in zip(listed, entries)]
    return shards, gallery_fingerprint(manifest, split)


def gallery_fingerprint(manifest: dict, split: str) -> str:
    """sha256 over the `name sha256` lines of one split's gallery shards: the index depends on
    the gallery only, so training shards appended every night do not invalidate it."""
    entry = manifest["splits"][split][schema.GALLERY]
    lines = sorted(f"{split}/{schema.GALLERY}/{s['name']} {s['sha256']}" for s in entry["shards"])
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def build_digest(checkpoint_sha256: str, fingerprint: str, split: str, dtype: str) -> str:
    text = f"{FORMAT} {checkpoint_sha256} {fingerprint} {split} {dtype}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_manifest(url: str) -> dict[str, Any] | None:
    """The index manifest at `url`, or None when there is no index there."""
    try:
        text = storage.read_text(storage.join(url, MANIFEST))
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{storage.join(url, MANIFEST)} is corrupt (not JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{storage.join(url, MANIFEST)} is not a composeae index manifest "
                        f"(format {FORMAT})")
    return manifest


# -- reading shards with byte offsets -------------------------------------------------------------



class _Position:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream):
        self.stream, self.position = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.position += len(data)
        return data


def samples_with_offsets(url: str) -> Iterator[tuple[dict, dict[str, tuple[int, int]]]]:
    """(raw sample, {ext: (byte offset, size)}) of every sample of a shard, in order."""

    with open_shard(url) as raw:
        stream = _Position(raw)

        def members():
            for name, data in tar_members(stream):
                # `tar_members` yields a member after reading its data and the padding to 512.
                end = stream.position - (-len(data) % 512)
                yield name, data, (end - len(data), len(data))

        yield from group_samples(members(), url)


def read_range(url: str, offset: int, size: int) -> bytes:
    """`size` bytes of the object at `url` from `offset` (one ranged request on S3)."""
    if storage.is_s3(url):
        bucket, key = storage.split_s3(url)
        response = storage.s3_client().get_object(Bucket=bucket, Key=key,
                                                  Range=f"bytes={offset}-{offset + size - 1}")
        return response["Body"].read()
    with open(url, "rb") as f:
        f.seek(offset)
        return f.read(size)


# -- building -------------------------------------------------------------------------------------

def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def normalise_rows(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32 (a zero row stays zero), as the recall's cosine."""
    emb = emb.astype(np.float32, copy=False)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


class ShardEmbedder:
    """Ray Data actor: embeds whole gallery shards and writes each shard's block."""

    def __init__(self, checkpoint_url: str, out_url: str, build: str, dtype: str):
        from composeae.checkpoint import load_checkpoint
        from composeae.run.build import model_from_checkpoint

        self.model, self.cfg = model_from_checkpoint(load_checkpoint(checkpoint_url))
        self.out_url, self.build, self.dtype = out_url, build, dtype
        self.device = torch.device("cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [self.embed_shard(str(name), str(url))
                  for name, url in zip(batch["name"], batch["url"])]
        return {"name": np.asarray([str(n) for n in batch["name"]]),
                "count": np.asarray(counts, dtype=np.int64)}

    def embed_shard(self, name: str, url: str) -> int:
        from composeae.data.decode import SampleDecoder, collate
        from composeae.evaluate import embed

        decoder = SampleDecoder(schema.GALLERY, self.cfg.data.image_size, False, StreamErrors())
        pointers: list[list] = []
        size = self.cfg.eval.batch_size

        def batches() -> Iterator[dict]:
            pending: list[dict] = []
            for sample, where in samples_with_offsets(url):
                decoded = decoder(sample)  # None (warned about) when the image is unreadable
                if decoded is None:
                    continue
                ext = next(e for e in schema.IMAGE_EXTS if f"{schema.IMAGE}.{e}" in where)
                pointers.append([*where[f"{schema.IMAGE}.{ext}"], ext])
                pending.append(decoded)
                if len(pending) == size:
                    yield collate(pending)  # uint8: `embed` normalises on the device
                    pending = []
            if pending:
                yield collate(pending)  # uint8: `embed` normalises on the device

        out = embed(self.model, batches(), "image", None, ("image_id", "group", "label"),
                     self.device, self.cfg.train.precision)
        emb = normalise_rows(out["emb"]).astype(self.dtype)  # (n, D)
        stem = storage.join(self.out_url, BLOCKS, block_name(self.build, name))
        storage.write_bytes(stem + ".npy", _npy_bytes(emb))
        meta = {"shard": name, "count": len(pointers), "dim": int(emb.shape[1]) if emb.size else 0,
                "ids": out["image_id"], "groups": out["group"], "labels": out["label"],
                "pointers": pointers}
        # The block's JSON is written after its embeddings: its presence means a whole block.
        storage.write_text(stem + ".json", json.dumps(meta))
        return len(pointers)


def block_name(build: str, shard_name: str) -> str:
    return f"{build}-{shard_name.removesuffix('.tar')}"


@dataclass(frozen=True)
class Built:
    """What `build_index` did."""
    url: str
    manifest: dict[str, Any]
    built: bool
    """False: the index was already there for this model and gallery (a no-op)."""
    resumed: int = 0
    """Blocks found from an interrupted build of the same digest and not embedded again."""


def _same_ann(entry: dict | None, spec: AnnSpec | None, rows: int) -> bool:
    if spec is None or entry is None:
        return spec is None and entry is None
    return entry["params"] == asdict(spec.resolved(rows))


def build_index(model: dict[str, Any], data_url: str, out_url: str, *, split: str = "test",
                dtype: str = "float16", workers: int | None = None,
                ann: AnnSpec | None = None) -> Built:
    """Embed the gallery of `data_url`'s `split` with `model` (`resolve_model`'s record) into an
    index at `out_url`, and build the approximate index `ann` from it when one is asked for; a
    no-op when the same model, gallery and approximate index are there already."""
    from composeae.checkpoint import load_checkpoint

    if dtype not in DTYPES:
        raise UserError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    data_url, out_url = absolute_url(data_url), absolute_url(out_url)
    shards, fingerprint = gallery_shards(data_url, split)
    ckpt_url = checkpoint_file(model["checkpoint"])
    if not storage.exists(ckpt_url):
        raise UserError(f"no checkpoint at {ckpt_url}")
    ckpt_sha = hashlib.sha256(storage.read_bytes(ckpt_url)).hexdigest()
    build = build_digest(ckpt_sha, fingerprint, split, dtype)
    existing = read_manifest(out_url)
    if (existing is not None and existing.get("build") == build
            and _same_ann(existing.get("ann"), ann, existing["count"])):
        return Built(out_url, existing, built=False)

    done = {n.removesuffix(".json") for n in storage.listdir(storage.join(out_url, BLOCKS))
            if n.startswith(build + "-") and n.endswith(".json")}
    todo = [s for s in shards if block_name(build, s["name"]) not in done]
    cfg = config_from_dict(load_checkpoint(ckpt_url)["config"])
    if todo:
        import ray

        init_ray(cfg)
        if not storage.is_s3(out_url):
            os.makedirs(storage.join(out_url, BLOCKS), exist_ok=True)
        check_local_paths_on_nodes({"--data": data_url, "--out": out_url,
                                    "--checkpoint": ckpt_url})
        pool = max(1, min(workers or cfg.ray.num_workers, len(todo)))
        log.info("embedding %d gallery shard(s) of %s [%s] with %d actor(s)%s", len(todo),
                 data_url, split, pool,
                 f"; {len(shards) - len(todo)} block(s) found from an earlier attempt"
                 if len(todo) < len(shards) else "")
        ray.data.DataContext.get_current().enable_progress_bars = False
        items = [{"name": s["name"], "url": s["url"]} for s in todo]
        embedded = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEmbedder, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
            fn_constructor_kwargs={"checkpoint_url": ckpt_url, "out_url": out_url,
                                   "build": build, "dtype": dtype})
        # Rows stream back as shards finish: one progress line per block (done/total, rate, ETA).
        started, total = time.monotonic(), sum(int(s.get("count") or 0) for s in todo)
        done = images = 0
        for row in embedded.iter_rows():
            done, images = done + 1, images + int(row["count"])
            log.info(rate_line("embedding the gallery", done, len(todo), images,
                               max(total, images), started))
        if done != len(todo):
            raise RuntimeError(f"{done} of {len(todo)} gallery shards were embedded")

    blocks, dim = [], 0
    for shard in shards:
        name = block_name(build, shard["name"])
        meta = json.loads(storage.read_text(storage.join(out_url, BLOCKS, name + ".json")))
        blocks.append({"name": name, "shard": shard["name"], "count": meta["count"]})
        dim = dim or meta["dim"]
    count = sum(b["count"] for b in blocks)
    ann_entry = None
    if ann is not None:
        fill = max(1, workers or cfg.ray.num_workers)
        if fill > 1 and ann.kind == "ivf":
            init_ray(cfg)
            check_local_paths_on_nodes({"--out": out_url})  # the fill's tasks read the blocks
        ann_entry = build_ann(out_url, build, ann, [
            (lambda name=b["name"]: read_block_rows(out_url, name)) for b in blocks],
            count, dim, log.info, counts=[b["count"] for b in blocks], workers=fill)
    manifest = {
        "format": FORMAT, "build": build, "dtype": dtype, "dim": dim,
        "count": count,
        "model": dict(model, checkpoint=ckpt_url, checkpoint_sha256=ckpt_sha,
                      model_name=cfg.model.name),
        "data": {"url": data_url, "split": split, "fingerprint": fingerprint},
        "blocks": blocks,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if ann_entry is not None:
        manifest["ann"] = ann_entry
    storage.write_text(storage.join(out_url, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    _remove_other_builds(out_url, build, ann_entry)
    return Built(out_url, manifest, built=True, resumed=len(shards) - len(todo))


def add_ann(url: str, spec: AnnSpec, workers: int = 1) -> Built:
    """Build the approximate index `spec` onto the built index at `url` (its blocks as they
    are) and write its manifest again, naming it; a no-op when it names that one already.
    `workers` > 1: an IVF index filled by that many tasks of the Ray this process has joined."""
    url = absolute_url(url)
    manifest = read_manifest(url)
    if manifest is None:
        raise UserError(f"no index at {url} ({MANIFEST} not found; `composeae index` builds one)")
    if _same_ann(manifest.get("ann"), spec, manifest["count"]):
        return Built(url, manifest, built=False)
    entry = build_ann(url, manifest["build"], spec, [
        (lambda name=b["name"]: read_block_rows(url, name)) for b in manifest["blocks"]],
        manifest["count"], manifest["dim"], log.info,
        counts=[b["count"] for b in manifest["blocks"]], workers=workers)
    manifest = dict(manifest, ann=entry)
    storage.write_text(storage.join(url, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    _remove_other_builds(url, manifest["build"], entry)
    return Built(url, manifest, built=True)


def build_version_index(registry_url: str, version: int, data_url: str, split: str, *,
                        workers: int | None = None) -> Built:
    """The gallery index of registry version `version` at `registry_index_url`: built, resumed
    after an interruption, or found built (a re-run night)."""
    model = resolve_model(None, registry_url, str(version))
    out = registry_index_url(registry_url, version)
    done = build_index(model, data_url, out, split=split, workers=workers)
    log.info("index of version %s: %s (%s)", version, out,
             f"{done.manifest['count']} images" if done.built else "already built")
    return done


def _remove_other_builds(out_url: str, build: str, ann_entry: dict | None = None) -> None:
    """Blocks and approximate indexes of earlier builds, unreachable once the new manifest is in
    place."""
    for name in storage.listdir(storage.join(out_url, BLOCKS)):
        if not name.startswith(build + "-"):
            storage.remove(storage.join(out_url, BLOCKS, name))
    keep = ann_entry["file"] if ann_entry else None
    for name in storage.listdir(storage.join(out_url, ANN)):
        if f"{ANN}/{name}" != keep:
            storage.remove(storage.join(out_url, ANN, name))


# -- loading --------------------------------------------------------------------------------------

@dataclass
class GalleryIndex:
    """An index in memory: (N, D) embeddings, one id per row and where its image lies."""
    url: str
    manifest: dict[str, Any]
    embeddings: torch.Tensor | None
    """(N, D) unit rows: the stored values (the manifest's dtype) held as `load_index`'s
    `memory_dtype`; None when loaded without them (a sharded gallery's front)."""
    ids: StringColumn
    labels: StringColumn
    shard_of: np.ndarray
    """(N,) int32 index into `shard_urls`."""
    offsets: np.ndarray
    sizes: np.ndarray
    exts: np.ndarray
    """(N,) uint8 index into `schema.IMAGE_EXTS`."""
    shard_urls: list[str]
    row_of: RowLookup
    ann: Any = None
    """The approximate index (a FAISS index) when the manifest names one and it was loaded."""

    @property
    def ann_entry(self) -> dict | None:
        return self.manifest.get("ann")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def version(self) -> int | None:
        return self.manifest["model"].get("version")

    def row(self, image_id: str) -> int:
        if image_id not in self.row_of:
            raise UnknownImage(f"no gallery image {image_id!r} in the index at {self.url}")
        return self.row_of[image_id]

    def image(self, row: int) -> tuple[bytes, str]:
        """(bytes, MIME type) of row `row`'s image, read from its shard."""
        data = read_range(self.shard_urls[self.shard_of[row]], int(self.offsets[row]),
                          int(self.sizes[row]))
        return data, "image/png" if schema.IMAGE_EXTS[self.exts[row]] == "png" else "image/jpeg"


def read_block_rows(url: str, name: str, mmap: bool = False) -> np.ndarray:
    """The stored (n, D) rows of block `name` of the index at `url`; `mmap`: mapped from the
    local file, not read (the page cache holds them, shared and reclaimable)."""
    path = storage.join(url, BLOCKS, name + ".npy")
    if mmap and not storage.is_s3(path):
        return np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, never written
    return np.load(io.BytesIO(storage.read_bytes(path)))


def load_index(url: str, memory_dtype: str = "float32", rows: bool = True,
               ann: bool = True, expect: Expected | None = None) -> GalleryIndex:
    """Read the index at `url` whole; `UserError` when there is none. `rows=False` leaves the
    embeddings out (ids, labels and pointers only); `ann=False` leaves an approximate index
    unloaded. What the manifest and blocks name is checked before it is read
    (`composeae.serve.confine`), against `expect` when the caller knows what the index is for.

    The rows are held as `memory_dtype`: float32 by default, upcast once here. On CPU a
    half-precision matmul is slow and upcasting a block per query costs as much as its matmul
    (much more when the cores are shared: the parallel copy waits on descheduled threads), so
    float32 rows search at the matmul floor; 1,000,000 x 512 of them are 2 GB. float16 halves
    that for galleries beyond the memory budget, and `search.top_k` upcasts block by block."""
    if memory_dtype not in DTYPES:
        raise ValueError(f"memory_dtype must be one of {DTYPES}, got {memory_dtype!r}")

    url = absolute_url(url)
    manifest = read_manifest(url)
    if manifest is None:
        raise UserError(f"no index at {url} ({MANIFEST} not found; `composeae index` builds one)")
    check_manifest(url, manifest, expect)
    shard_bytes = check_dataset(url, manifest, shardset.read_manifest(manifest["data"]["url"]),
                                gallery_fingerprint)
    count, dim = int(manifest["count"]), int(manifest["dim"])
    # One preallocated array: concatenating the blocks would hold the gallery twice at its peak.
    embeddings = np.empty((count, dim) if rows else (0, dim), dtype=memory_dtype)
    ids, labels, shard_urls = ColumnBuilder(), ColumnBuilder(), []
    shard_of = np.empty(count, np.int32)
    offsets = np.empty(count, np.int64)
    sizes = np.empty(count, np.int64)
    exts = np.empty(count, np.uint8)  # index into schema.IMAGE_EXTS
    row = 0
    data_url = manifest["data"]["url"]
    for i, block in enumerate(manifest["blocks"]):
        stem = storage.join(url, BLOCKS, block["name"])
        meta = json.loads(storage.read_text(stem + ".json"))
        check_block(url, block, meta, shard_bytes[block["shard"]])
        n = meta["count"]
        if n and rows:
            embeddings[row:row + n] = check_rows(url, block, read_block_rows(url, block["name"]),
                                                 dim, manifest["dtype"])
        ids.add(meta["ids"])
        labels.add(meta["labels"])
        pointers = meta["pointers"]
        offsets[row:row + n] = [p[0] for p in pointers]
        sizes[row:row + n] = [p[1] for p in pointers]
        exts[row:row + n] = [schema.IMAGE_EXTS.index(p[2]) for p in pointers]
        shard_of[row:row + n] = i
        shard_urls.append(storage.join(data_url, block["shard"]))
        row += n
    ids = ids.finish()
    entry = manifest.get("ann")
    return GalleryIndex(url, manifest, torch.from_numpy(embeddings) if rows else None, ids,
                        labels.finish(), shard_of, offsets, sizes, exts, shard_urls,
                        RowLookup(ids),
                        load_ann(url, entry) if ann and entry else None)
