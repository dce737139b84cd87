"""Synthetic gallery indexes for the search tests and benchmarks: unit rows (uniform, or
clustered like a trained model's embeddings) written block by block in the folder format
`composeae index` writes, so galleries larger than memory can be made in chunks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from composeae.data import schema
from composeae.serve import index as index_mod


def unit_rows(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray | None = None,
              spread: float = 0.0) -> np.ndarray:
    """(n, dim) float32 unit rows: uniform on the sphere, or `centres[c] + spread * noise`
    normalised, around centres drawn at random (noise of unit length per row)."""
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    if centres is not None:
        noise *= spread
        noise += centres[rng.integers(len(centres), size=n)]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return noise


def synthetic_blocks(n: int, dim: int, *, block_rows: int = 65536, clusters: int = 0,
                     spread: float = 1.0, seed: int = 0) -> Iterator[np.ndarray]:
    """Float32 (<= block_rows, dim) blocks of `n` unit rows (`clusters` > 0: clustered)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng, clusters, dim) if clusters else None
    for begin in range(0, n, block_rows):
        yield unit_rows(rng, min(block_rows, n - begin), dim, centres, spread)


def write_index(directory: str | Path, blocks, dim: int, dtype: str = "float16") -> str:
    """An index folder of `blocks` (an iterable of (n, dim) arrays), image pointers pointing
    nowhere and no model or dataset behind it: its rows are read with `read_block_rows` and
    shard actors, never `load_index` (which checks the dataset). Ids `img00000000`..., labels
    equal to the ids. Written block by block, the manifest last. Returns the folder."""
    directory = Path(directory)
    (directory / index_mod.BLOCKS).mkdir(parents=True, exist_ok=True)
    manifest_blocks, begin = [], 0
    for number, rows in enumerate(blocks):
        name = f"synthetic-{number:06d}"
        stem = directory / index_mod.BLOCKS / name
        np.save(stem.with_suffix(".npy"), np.asarray(rows, dtype=dtype), allow_pickle=False)
        ids = [f"img{begin + i:08d}" for i in range(len(rows))]
        stem.with_suffix(".json").write_text(json.dumps({
            "shard": "none.tar", "count": len(rows), "dim": dim, "ids": ids,
            "groups": [""] * len(rows), "labels": ids, "pointers": [[0, 0, "png"]] * len(rows)}))
        manifest_blocks.append({"name": name, "shard": "none.tar", "count": len(rows)})
        begin += len(rows)
    (directory / index_mod.MANIFEST).write_text(json.dumps({
        "format": index_mod.FORMAT, "build": "synthetic", "dtype": dtype, "dim": dim,
        "count": begin, "model": {"checkpoint": "none", "checkpoint_sha256": "0" * 64},
        "data": {"url": str(directory), "split": "test", "fingerprint": "none"},
        "blocks": manifest_blocks}))
    return str(directory)


def serveable_index(rows_folder: str | Path, out: str | Path, data_url: str, checkpoint: str,
                    version: int | None = None, split: str = "test") -> str:
    """An index folder at `out` that the search service loads, for galleries larger than any
    dataset at hand: its rows are the synthetic index `rows_folder`'s (the `.npy` blocks
    linked, not copied), its blocks point into `data_url`'s `split` gallery shards in turn and
    its rows at their real images, cycled (so `/image` and `--ref` read real pictures), and its
    manifest names `checkpoint` (a `model.pt`), `version` and the dataset, so the service's
    confinement checks pass. Ids stay the synthetic `img00000000`..., labels equal to them."""
    rows_folder, out = Path(rows_folder), Path(out)
    synthetic = json.loads((rows_folder / index_mod.MANIFEST).read_text())
    shards, fingerprint = index_mod.gallery_shards(data_url, split)
    images = []  # per shard: [[offset, size, ext], ...] of its gallery images
    for shard in shards:
        found = []
        for _, where in index_mod.samples_with_offsets(shard["url"]):
            ext = next(e for e in schema.IMAGE_EXTS if f"{schema.IMAGE}.{e}" in where)
            found.append([*where[f"{schema.IMAGE}.{ext}"], ext])
        images.append(found)
    (out / index_mod.BLOCKS).mkdir(parents=True, exist_ok=True)
    blocks = []
    for number, block in enumerate(synthetic["blocks"]):
        source = rows_folder / index_mod.BLOCKS / block["name"]
        meta = json.loads(source.with_suffix(".json").read_text())
        shard = number % len(shards)
        pointers = [images[shard][i % len(images[shard])] for i in range(block["count"])]
        target = out / index_mod.BLOCKS / block["name"]
        if not target.with_suffix(".npy").exists():
            target.with_suffix(".npy").symlink_to(source.with_suffix(".npy").resolve())
        target.with_suffix(".json").write_text(json.dumps(dict(
            meta, shard=shards[shard]["name"], pointers=pointers)))
        blocks.append(dict(block, shard=shards[shard]["name"]))
    with open(checkpoint, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    manifest = dict(synthetic, blocks=blocks,
                    model={"checkpoint": checkpoint, "checkpoint_sha256": sha,
                           "version": version},
                    data={"url": data_url, "split": split, "fingerprint": fingerprint})
    (out / index_mod.MANIFEST).write_text(json.dumps(manifest))
    return str(out)
