"""A gallery held by shard actors on Ray: the index's blocks split over N actors, a batch of
queries fanned out to all of them and their top-k merged.

Each `GalleryShard` holds only its contiguous run of the index's blocks (about 1/N of the rows)
and searches it with `search.top_k` (exact, blockwise); the front (`ShardedGallery`, inside the
service's replica) holds ids, labels and pointers but no rows. Rows are held as float16 by
default (the index's stored values, upcast block by block at search time: half of float32's
memory), or float32, or, for a local index, mapped from the block files (`mmap`: the page
cache holds them, shared and reclaimable). The merge takes each shard's (Q, k) scores and
global rows, concatenated in shard order, and one `topk`: ties go to the earlier shard, that is
the lower row, as in one process.

Lifetime: the actors belong to the `ShardedGallery` that created them. A swap builds a new
gallery (new actors loading beside the old ones) and switches one reference; the old actors
end when the last request holding the old gallery lets go of it (Ray ends an actor whose
handles are all gone), so requests in flight finish on the shards they started with.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from composeae.errors import UserError
from composeae.serve.confine import check_manifest
from composeae.serve.index import read_block_rows, read_manifest
from composeae.serve.runs import split_blocks
from composeae.serve.search import top_k, use_assigned_cpus

MEMORY = ("float16", "float32", "mmap")


class GalleryShard:
    """Ray actor: a run of an index's blocks in memory, searched exactly."""

    def __init__(self, url: str, blocks: list[dict], first_row: int, memory: str = "float16"):
        use_assigned_cpus()
        parts = [read_block_rows(url, b["name"], mmap=memory == "mmap")
                 for b in blocks if b["count"]]
        if memory == "mmap":
            self.parts = [torch.from_numpy(p) for p in parts]  # mapped copy-on-write, never written
        else:
            rows = np.empty((sum(len(p) for p in parts), parts[0].shape[1] if parts else 0),
                            dtype=memory)
            begin = 0
            for p in parts:
                rows[begin:begin + len(p)] = p
                begin += len(p)
            self.parts = [torch.from_numpy(rows)]
        self.first_row = first_row
        self.rows = sum(len(p) for p in self.parts)

    def top_k(self, queries: np.ndarray, k: int, exclude: list[int | None] | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k'), global rows (Q, k')) of this shard's best k' = min(k, rows)."""
        q = torch.from_numpy(np.array(queries))  # a writable copy of the object store's (Q, D)
        best_s, best_r, begin = None, None, self.first_row
        for part in self.parts:
            local = None if exclude is None else [
                e - begin if e is not None and begin <= e < begin + len(part) else None
                for e in exclude]
            s, r = top_k(q, part, k, exclude=local)
            r = r + begin
            if best_s is None:
                best_s, best_r = s, r
            else:
                best_s, best_r = merge_top_k([best_s, s], [best_r, r], k)
            begin += len(part)
        return best_s.numpy(), best_r.numpy()

    def memory(self) -> dict[str, float]:
        """This process's resident and peak resident memory in GB (from /proc)."""
        out = {"rows": self.rows, "pid": os.getpid()}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 2**20
        return out


def merge_top_k(scores: list[torch.Tensor], rows: list[torch.Tensor], k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of several (Q, k_i) top-k lists given in row order; ties go to the earlier."""
    all_scores, all_rows = torch.cat(scores, dim=1), torch.cat(rows, dim=1)
    order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :k]
    return all_scores.gather(1, order), all_rows.gather(1, order)


class ShardedGallery:
    """N `GalleryShard` actors over one index: `top_k` fans a batch out and merges."""

    def __init__(self, url: str, shards: int, memory: str = "float16", num_cpus: float = 1.0):
        import ray

        if memory not in MEMORY:
            raise UserError(f"shard memory must be one of {', '.join(MEMORY)}, got {memory!r}")
        manifest = read_manifest(url)
        if manifest is None:
            raise UserError(f"no index at {url}")
        check_manifest(url, manifest, None)  # block names are plain names inside the index
        blocks = manifest["blocks"]
        self.url, self.shards, self.rows = url, shards, int(manifest["count"])
        bounds = split_blocks([b["count"] for b in blocks], shards)
        starts = np.cumsum([0] + [b["count"] for b in blocks])
        actor = ray.remote(num_cpus=num_cpus)(GalleryShard)
        self.actors = [actor.remote(url, blocks[a:b], int(starts[a]), memory) for a, b in bounds]
        self.row_ranges = [(int(starts[a]), int(starts[b])) for a, b in bounds]
        ray.get([a.memory.remote() for a in self.actors])  # loaded: a swap waits for this

    def top_k(self, queries: torch.Tensor, k: int, exclude: list[int | None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (Q, k), rows (Q, k)) over all shards, as `search.top_k` over all rows."""
        import ray

        q = np.ascontiguousarray(queries.float().numpy())
        parts = ray.get([a.top_k.remote(q, k, exclude) for a in self.actors])
        return merge_top_k([torch.from_numpy(np.array(s)) for s, _ in parts],
                           [torch.from_numpy(np.array(r)) for _, r in parts], min(k, self.rows))

    def memory(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.memory.remote() for a in self.actors])
