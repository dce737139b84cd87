"""Contiguous runs of an index's blocks with about equal rows each: what a shard actor holds
(`sharded`) and what a task fills an approximate index with (`ann.fill_parallel`)."""

from __future__ import annotations

import numpy as np

from composeae.errors import UserError


def split_blocks(counts: list[int], shards: int) -> list[tuple[int, int]]:
    """[(first block, end block)] of `shards` contiguous runs of blocks with about equal rows
    each (`counts`: rows per block); `UserError` when there are fewer blocks than shards."""
    if not 1 <= shards <= len(counts):
        raise UserError(f"shards must be from 1 to the index's {len(counts)} blocks, got {shards}")
    bounds, total, begin = [], sum(counts), 0
    cumulative = np.cumsum(counts)
    for s in range(1, shards):
        # The block boundary nearest s/N of the rows, leaving a block for each shard left.
        target = total * s / shards
        end = int(np.searchsorted(cumulative, target))  # cumulative[end] >= target
        if end == 0 or cumulative[end] - target < target - cumulative[end - 1]:
            end += 1
        end = min(max(end, begin + 1), len(counts) - (shards - s))
        bounds.append((begin, end))
        begin = end
    bounds.append((begin, len(counts)))
    return bounds
