"""Continuous batching (`composeae.serve.batching.Batcher`) on a real event loop and threads:
a lone call waits for nothing, calls arriving while a batch runs form the next one."""

import asyncio
import threading
import time

import pytest

from composeae.serve.batching import Batcher


class Recorder:
    """fn for a Batcher: records each batch, takes `seconds`, answers item * 10."""

    def __init__(self, seconds: float = 0.0, fail: bool = False):
        self.seconds, self.fail, self.batches = seconds, fail, []
        self.running = threading.Event()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.running.set()
        time.sleep(self.seconds)
        if self.fail:
            raise ValueError("the model is broken")
        return [item * 10 for item in items]


def test_a_lone_call_runs_at_once_as_a_batch_of_one():
    fn = Recorder()
    batcher = Batcher(fn, 16, wait_s=0.0)

    async def main():
        start = time.perf_counter()
        answer = await batcher(3)
        return answer, time.perf_counter() - start

    answer, took = asyncio.run(main())
    assert answer == 30 and fn.batches == [[3]]
    assert took < 0.5  # no batch wait: nothing else was coming


def test_calls_arriving_while_a_batch_runs_form_the_next_batch_in_order():
    fn = Recorder(seconds=0.3)
    batcher = Batcher(fn, 4)

    async def main():
        first = asyncio.ensure_future(batcher(0))
        await asyncio.to_thread(fn.running.wait, 5)  # batch [0] is running
        rest = [asyncio.ensure_future(batcher(i)) for i in range(1, 7)]
        return await asyncio.gather(first, *rest)

    answers = asyncio.run(main())
    assert answers == [i * 10 for i in range(7)]
    # The six that queued behind [0]: the next batch holds at most max_size of them, in order.
    assert fn.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert (batcher.batches, batcher.items, batcher.largest) == (3, 7, 4)


def test_a_wait_holds_a_short_batch_for_more():
    fn = Recorder()
    batcher = Batcher(fn, 8, wait_s=0.2)

    async def main():
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.05)  # within the wait
        return await asyncio.gather(first, batcher(2))

    assert asyncio.run(main()) == [10, 20]
    assert fn.batches == [[1, 2]]


def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_still_runs():
    fn = Recorder(seconds=0.2, fail=True)
    batcher = Batcher(fn, 8)

    async def main():
        calls = [asyncio.ensure_future(batcher(i)) for i in range(3)]
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(main())
    assert all(isinstance(a, ValueError) for a in answers)
    fn.fail = False
    assert asyncio.run(main()) == [0, 10, 20]


def test_a_cancelled_caller_is_left_out_of_its_batch():
    fn = Recorder(seconds=0.3)
    batcher = Batcher(fn, 8)

    async def main():
        first = asyncio.ensure_future(batcher(0))
        await asyncio.to_thread(fn.running.wait, 5)
        gone, kept = asyncio.ensure_future(batcher(1)), asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0)
        gone.cancel()  # its client went away while [0] ran
        return await asyncio.gather(first, kept)

    assert asyncio.run(main()) == [0, 20]
    assert fn.batches == [[0], [2]]


def test_max_size_must_be_positive():
    with pytest.raises(ValueError, match="max_size"):
        Batcher(lambda items: items, 0)
