"""Approximate gallery indexes (FAISS): what `composeae index --kind ivf|hnsw` adds to an index.

An approximate index lives in the index folder beside the exact blocks it is made from:

    ann/<build>-<kind>-<params digest>.faiss    the FAISS index, written whole (one PUT, or a
                                                temporary name renamed locally)

and the manifest (still written last) names it under `"ann"` with its kind, its build
parameters and its default search settings. The stored float16 blocks stay: results are
re-ranked on them (`rerank`), and exact search remains one flag away. A rebuild with the same
model, gallery and parameters is a no-op; a build interrupted after its `.faiss` was written
reuses the file (its name carries the digest) instead of training again.

Kinds (both with inner product on the unit rows):
* `ivf`: k-means into `lists` lists (trained on a sample of 64 rows per list), rows stored as
  8-bit scalar-quantised codes (`codes: sq8`, D bytes a row) or as float32 (`flat`). Search
  knob `probe`: the lists visited per query (FAISS's nprobe).
* `hnsw`: a graph with `m` links per row, codes as above. Search knob `probe`: the candidate
  list kept while walking the graph (FAISS's efSearch).

Building: trained once, on a sample, in the building process; then filled. An IVF index is
filled by `workers` Ray tasks, each adding a contiguous run of blocks to a copy of the trained
index, merged in row order (the same lists as one process's fill, entry for entry). An HNSW
graph links each row to rows already in it, so it cannot be built in pieces and merged; it is
filled in one process by FAISS's own threads.

`rerank`: the `rerank * k` best candidates by the index's own (quantised) scores are scored
again exactly on the stored rows and the best k kept; 0 keeps the index's scores and order.

FAISS was chosen over hnswlib and usearch: it has both kinds (and exact `IndexFlatIP` to check
against) behind one API with per-call search parameters (`SearchParametersIVF/HNSW`, safe for
concurrent requests on one index), a CPU wheel pinned on the package index, and its IVF
trains on a sample, which catalogue builds need; hnswlib is HNSW-only and its last release is
from 2023; usearch is HNSW-only too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from composeae import storage
from composeae.errors import UserError
from composeae.serve.runs import split_blocks

log = logging.getLogger(__name__)

KINDS = ("exact", "ivf", "hnsw")
CODES = ("sq8", "flat")
ANN = "ann"
TRAIN_ROWS_PER_LIST = 64
"""k-means sample: FAISS warns below 39 rows per centroid; 64 keeps training to seconds."""
MAX_LISTS = 65536
MAX_PROBE = 4096
MAX_RERANK = 100
DEFAULT_PROBE = {"ivf": 32, "hnsw": 64}
DEFAULT_RERANK = 4
HNSW_EF_CONSTRUCTION = 80
SQ_TRAIN_ROWS = 65536
"""Rows the 8-bit quantiser of an HNSW index learns its ranges from."""


@dataclass(frozen=True)
class AnnSpec:
    """How an approximate index is built (what `--kind` and its flags ask for)."""
    kind: str
    lists: int | None = None
    """ivf: k-means lists; None: 4 x sqrt(rows), a power of two between 64 and 8192."""
    m: int = 32
    """hnsw: links per row."""
    codes: str = "sq8"

    def resolved(self, rows: int) -> "AnnSpec":
        """The spec with its defaults for a gallery of `rows` rows filled in."""
        if self.kind != "ivf" or self.lists is not None:
            return self
        lists = 2 ** round(np.log2(max(1.0, 4 * rows ** 0.5)))
        return AnnSpec(self.kind, int(min(8192, max(64, lists))), self.m, self.codes)

    def factory(self) -> str:
        codes = "SQ8" if self.codes == "sq8" else "Flat"
        return f"IVF{self.lists},{codes}" if self.kind == "ivf" else f"HNSW{self.m},{codes}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def check_spec(kind: str, lists: int | None = None, m: int | None = None,
               codes: str | None = None) -> AnnSpec | None:
    """The `AnnSpec` of `--kind` and its flags, None for exact; `UserError` naming a bad one."""
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    given = {"--lists": lists, "--hnsw-m": m, "--codes": codes}
    belongs = {"--lists": "ivf", "--hnsw-m": "hnsw", "--codes": "ivf or hnsw"}
    for flag, value in given.items():
        if value is not None and kind not in belongs[flag]:
            raise UserError(f"{flag} applies to --kind {belongs[flag]}, not {kind}")
    if kind == "exact":
        return None
    if lists is not None and not 1 <= lists <= MAX_LISTS:
        raise UserError(f"--lists must be from 1 to {MAX_LISTS}, got {lists}")
    if m is not None and not 4 <= m <= 128:
        raise UserError(f"--hnsw-m must be from 4 to 128, got {m}")
    if codes is not None and codes not in CODES:
        raise UserError(f"--codes must be one of {', '.join(CODES)}, got {codes!r}")
    return AnnSpec(kind, lists, m or 32, codes or "sq8")


def check_knobs(entry: dict | None, probe: Any = None, rerank: Any = None
                ) -> tuple[int, int] | None:
    """(probe, rerank) for searching the approximate index `entry` (the manifest's "ann"),
    its defaults where not given; None for an exact index. `UserError` for a bad value, or a
    knob given for an exact index."""
    if entry is None:
        if probe is not None or rerank is not None:
            raise UserError("--probe and --rerank apply to an approximate index (built with "
                            "composeae index --kind ivf|hnsw); this index is exact")
        return None
    limit = min(MAX_PROBE, entry["params"]["lists"]) if entry["kind"] == "ivf" else MAX_PROBE
    return (_whole(probe, "probe", 1, limit, entry["search"]["probe"]),
            _whole(rerank, "rerank", 0, MAX_RERANK, entry["search"]["rerank"]))


def _whole(value: Any, name: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        number = low - 1
    if not low <= number <= high or isinstance(value, (bool, float)):
        raise UserError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return number


# -- building -------------------------------------------------------------------------------------

def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("an approximate index needs FAISS: pip install -c constraints.txt "
                        "'.[ann]'") from None
    return faiss


def ann_file(build: str, spec: AnnSpec) -> str:
    return f"{ANN}/{build}-{spec.kind}-{spec.digest()}.faiss"


def build_ann(out_url: str, build: str, spec: AnnSpec, blocks: list[Callable], rows: int,
              dim: int, progress: Callable[[str], None] = log.info, *,
              counts: list[int] | None = None, workers: int = 1) -> dict:
    """Train `spec`'s index on a sample of the gallery's rows and fill it; write it under
    `out_url`'s ann/ folder unless there already; return the manifest's "ann" entry.
    `blocks`: callables returning each (n, D) block's stored rows, in row order (`counts`: their
    rows). `workers` > 1 with `counts` fills an IVF index in that many Ray tasks
    (`fill_parallel`); an HNSW graph is filled in this process by FAISS's threads (a graph
    cannot be merged)."""
    spec = spec.resolved(rows)
    name = ann_file(build, spec)
    entry = {"kind": spec.kind, "factory": spec.factory(), "params": asdict(spec), "file": name,
             "metric": "inner_product",
             "search": {"probe": min(DEFAULT_PROBE[spec.kind], spec.lists or MAX_PROBE),
                        "rerank": DEFAULT_RERANK}}
    target = storage.join(out_url, name)
    if storage.exists(target):
        progress(f"approximate index {spec.factory()} found from an earlier attempt: {name}")
        return entry
    faiss = _faiss()
    started = time.monotonic()
    index = faiss.index_factory(dim, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    wanted = (spec.lists * TRAIN_ROWS_PER_LIST if spec.kind == "ivf"
              else SQ_TRAIN_ROWS if spec.codes == "sq8" else 0)
    if wanted:
        sample = training_sample(blocks, rows, min(rows, wanted))
        progress(f"training {spec.factory()} on {len(sample):,} of {rows:,} rows")
        index.train(sample)
        entry["trained_on"] = len(sample)
        del sample
    # In parallel only with the blocks' row counts: each task's first row (its ids) is their sum.
    parts = min(workers, len(blocks)) if spec.kind == "ivf" and counts is not None else 1
    if parts > 1:
        index = fill_parallel(index, blocks, counts, parts, rows, progress)
        entry["filled_by"] = parts
    else:
        done = 0
        for number, block in enumerate(blocks, 1):
            part = np.ascontiguousarray(block(), dtype=np.float32)
            index.add(part)
            done += len(part)
            progress(rate_line("adding rows", number, len(blocks), done, rows, started))
    buffer = faiss.serialize_index(index)  # (bytes,) uint8
    if not storage.is_s3(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
    storage.write_bytes(target, buffer.tobytes())
    entry["bytes"] = int(buffer.nbytes)
    entry["build_s"] = round(time.monotonic() - started, 1)
    return entry


def fill_parallel(trained, blocks: list[Callable], counts: list[int], parts: int, rows: int,
                  progress: Callable[[str], None] = log.info):
    """The trained, empty IVF index `trained` filled with the rows of `blocks` by `parts` Ray
    tasks, one contiguous run of blocks each (`counts`: rows per block, to balance them): each
    task adds its rows with their global row numbers as ids to a copy of the trained index, and
    the copies' lists are merged in row order, so every list holds the same entries in the same
    order as one process's fill. On a cluster the tasks read their blocks where they run and
    spread the work of assigning rows to lists over the nodes; what comes back is the codes."""
    import ray

    faiss = _faiss()
    runs = split_blocks(counts, parts)
    starts = np.cumsum([0] + list(counts))
    trained_ref = ray.put(faiss.serialize_index(trained))
    task = ray.remote(num_cpus=1)(_fill_run)
    refs = [task.remote(trained_ref, blocks[a:b], int(starts[a])) for a, b in runs]
    started, waiting, done_blocks, done_rows = time.monotonic(), list(refs), 0, 0
    blocks_of = {ref: b - a for ref, (a, b) in zip(refs, runs)}
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        added = ray.get(ready[0])[1]
        done_blocks, done_rows = done_blocks + blocks_of[ready[0]], done_rows + added
        progress(rate_line(f"adding rows in {parts} tasks", done_blocks, len(blocks),
                           done_rows, rows, started))
    index = faiss.deserialize_index(ray.get(refs[0])[0])
    for ref in refs[1:]:
        # merge_from moves the other's list entries (ids kept: add_id 0) to the end of each list
        index.merge_from(faiss.deserialize_index(ray.get(ref)[0]), 0)
    return index


def _fill_run(trained: np.ndarray, blocks: list[Callable], first_row: int
              ) -> tuple[np.ndarray, int]:
    """Ray task: (the serialised index `trained` filled with `blocks`' rows, ids from
    `first_row`; the rows added)."""
    faiss = _faiss()
    index = faiss.deserialize_index(trained)
    row = first_row
    for block in blocks:
        part = np.ascontiguousarray(block(), dtype=np.float32)
        index.add_with_ids(part, np.arange(row, row + len(part), dtype=np.int64))
        row += len(part)
    return faiss.serialize_index(index), row - first_row


def training_sample(blocks: list[Callable], rows: int, wanted: int, seed: int = 0) -> np.ndarray:
    """(wanted, D) float32 rows drawn uniformly without replacement, reading block by block."""
    chosen = np.sort(np.random.default_rng(seed).choice(rows, size=wanted, replace=False))
    parts, begin = [], 0
    for block in blocks:
        part = block()
        picked = chosen[(chosen >= begin) & (chosen < begin + len(part))] - begin
        if len(picked):
            parts.append(np.asarray(part[picked], dtype=np.float32))
        begin += len(part)
    return np.ascontiguousarray(np.concatenate(parts))


def rate_line(what: str, done_blocks: int, blocks: int, done_rows: int, rows: int,
              started: float) -> str:
    """"<what>: 12/104 blocks, 36,000/312,000 rows, 2,900 rows/s, ETA 95 s"."""
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = done_rows / elapsed
    eta = (rows - done_rows) / rate if rate > 0 else float("inf")
    return (f"{what}: {done_blocks}/{blocks} blocks, {done_rows:,}/{rows:,} rows, "
            f"{rate:,.0f} rows/s, ETA {eta:,.0f} s")


# -- loading and searching ------------------------------------------------------------------------

def load_ann(url: str, entry: dict):
    """The FAISS index named by the manifest's "ann" entry of the index at `url`."""
    faiss = _faiss()
    data = storage.read_bytes(storage.join(url, entry["file"]))
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def ann_top_k(ann, kind: str, stored: torch.Tensor, queries: torch.Tensor, k: int, probe: int,
              rerank: int, exclude: list[int | None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, k) float32, rows (Q, k) int64) like `search.top_k`, from the approximate
    index: `rerank * k` candidates re-scored on the `stored` (N, D) rows, or the index's own
    `k` when `rerank` is 0. A query with fewer candidates than k (a tiny gallery, a narrow
    probe) has rows -1 and scores -inf at its end."""
    faiss = _faiss()
    params = (faiss.SearchParametersIVF(nprobe=probe) if kind == "ivf"
              else faiss.SearchParametersHNSW(efSearch=max(probe, k)))
    extra = 1 if exclude is not None and any(e is not None for e in exclude) else 0
    wanted = min(len(stored), max(k, rerank * k) + extra)
    q = np.ascontiguousarray(queries.float().numpy())
    scores, rows = ann.search(q, wanted, params=params)  # (Q, wanted) each; -1 for "none"
    rows_t = torch.from_numpy(rows.astype(np.int64))
    if exclude is not None:
        for i, row in enumerate(exclude):
            if row is not None:
                rows_t[i][rows_t[i] == row] = -1
    valid = rows_t >= 0
    if rerank:
        candidates = stored[rows_t.clamp(min=0)].float()  # (Q, wanted, D)
        scores_t = torch.einsum("qd,qcd->qc", queries.float(), candidates)
    else:
        scores_t = torch.from_numpy(scores.astype(np.float32))
    scores_t = scores_t.masked_fill(~valid, float("-inf"))
    # Ties go to the lower row, as exact search breaks them: sort by row, then stably by score.
    by_row = torch.where(valid, rows_t, torch.iinfo(torch.int64).max).argsort(dim=1)
    scores_t, rows_t = scores_t.gather(1, by_row), rows_t.gather(1, by_row)
    order = torch.sort(scores_t, dim=1, descending=True, stable=True).indices[:, :k]
    rows_t = rows_t.gather(1, order)
    scores_t = scores_t.gather(1, order)
    rows_t[scores_t == float("-inf")] = -1
    if rows_t.shape[1] < k:
        pad = k - rows_t.shape[1]
        rows_t = torch.cat([rows_t, torch.full((len(rows_t), pad), -1)], dim=1)
        scores_t = torch.cat([scores_t, torch.full((len(rows_t), pad), float("-inf"))], dim=1)
    return scores_t, rows_t
