"""Continuous batching: concurrent calls of one function grouped into one call on a list.

The search service answers concurrent requests together (one forward pass, one matmul or index
call for the lot). A batch is formed when the previous one has ended: whatever arrived while it
ran, up to `max_size`, goes into the next. A lone request waits for nothing, and under load the
batches grow with the load.

Why not Ray Serve's `@serve.batch` (2.60): its loop forms the next batch as soon as its wait
ends, also while the previous batch still runs (its `max_concurrent_batches` caps the batches
running, not those formed), so the wait is the only thing that fills a batch. Measured in the
service on 2 cores, 8 clients: a 5 ms wait gave batches of 1.1 requests on average and nothing
gained; a 50 ms wait gave batches of about 8, and with every batch waiting its 50 ms out,
1.7-2.0x the requests/s of one by one. Forming a batch only when the worker is free needs no
wait at all. (Waiting besides for the requests a replica had accepted and was still checking
was tried too: at 8 clients the batches stayed at 4.0 requests, the clients alternating in two
halves, one half answered while the other is on its way, and nothing was gained.)
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable


class Batcher:
    """`await batcher(item)` -> `fn([..., item, ...])`'s answer for `item`.

    `fn(items) -> answers` (one per item, in order) runs in a thread, one batch at a time.
    `wait_s` > 0 holds a batch short of `max_size` that long for more items before it runs (a
    larger batch for more latency; 0, the default, never waits). An exception raised by `fn` is
    every item's of that batch. An item whose caller has gone (its request cancelled) before its
    batch runs is left out."""

    def __init__(self, fn: Callable[[list], list], max_size: int, wait_s: float = 0.0):
        if max_size < 1:
            raise ValueError(f"max_size must be 1 or more, got {max_size}")
        self.fn, self.max_size, self.wait_s = fn, max_size, wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.batches = self.items = self.largest = 0

    @property
    def mean(self) -> float:
        """Items per batch on average."""
        return self.items / max(1, self.batches)

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Runs batches while items are pending; ends when none is."""
        while self._pending:
            if self.wait_s > 0 and len(self._pending) < self.max_size:
                await asyncio.sleep(self.wait_s)
            batch = [(item, future) for item, future in self._pending[:self.max_size]
                     if not future.done()]
            del self._pending[:self.max_size]
            if not batch:
                continue
            self.batches, self.items = self.batches + 1, self.items + len(batch)
            self.largest = max(self.largest, len(batch))
            try:
                answers = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} got {len(answers)} answers")
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)
