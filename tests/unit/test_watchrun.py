"""The merge loop's end (`kvstore/client/watchrun.py`, `merged_watch`): however a run ends, every
task it started ends with it and every sub-stream is closed, even one whose stream does not
raise the cancel it is sent (as Python 3.11's `asyncio.wait_for` returns a read that completed
as the cancel came); and the caller's own cancel of a run that is ending is not lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from kvstore.client.watchmerge import Batch
from kvstore.client.watchrun import Requests, merged_watch
from kvstore.v1 import kv_pb2


class _End(Exception):
    """A sub-stream's end (its node died)."""


class _Subs:
    """Sub 1 ends with `_End` once `fail` is set; sub 2 answers a cancel with one more response
    (a lost cancel), then waits for the next; `closed` names the streams whose generator was
    closed, `slow_close`: sub 2's close waits for `closing` to be set."""

    ends: tuple[type[BaseException], ...] = (_End,)

    def __init__(self, slow_close: bool = False) -> None:
        self.fail = asyncio.Event()
        self.closing = asyncio.Event()
        self.slow_close = slow_close
        self.closed: list[int] = []
        self.lost = 0

    async def stream(self, key: int, create: kv_pb2.WatchCreateRequest, extra: Requests
                     ) -> AsyncGenerator[kv_pb2.WatchResponse, None]:
        try:
            yield kv_pb2.WatchResponse(watch_id=1, created=True, revision=9)
            if key == 1:
                await self.fail.wait()
                raise _End("sub 1's node died")
            rev = 10
            while True:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    if self.slow_close:
                        raise
                    self.lost += 1  # the read completed as the cancel came: it is returned
                rev += 1
                yield kv_pb2.WatchResponse(watch_id=1, revision=rev)
        finally:
            if key == 2 and self.slow_close:
                await self.closing.wait()
            self.closed.append(key)

    def canceled(self, resp: kv_pb2.WatchResponse, key: int) -> BaseException:
        return _End(f"sub {key} canceled")

    def failed(self, key: int, message: str, breach: bool) -> BaseException:
        return _End(message)


def _event(e: kv_pb2.Event) -> kv_pb2.Event:
    return e


async def _until_still(task: asyncio.Future[object]) -> None:
    for _ in range(1000):  # no I/O, no timer (the ticker's is a minute): bounded
        if task.done():
            return
        await asyncio.sleep(0)


def test_a_run_ends_even_when_a_sub_stream_loses_its_cancel() -> None:
    async def main() -> None:
        subs = _Subs()
        run = merged_watch([(1, (1,)), (2, (2,))], kv_pb2.WatchCreateRequest(prefix=b"p", start_revision=10),
                           subs, _event, 10_000, 60.0)
        got: list[Batch[kv_pb2.Event]] = []

        async def consume() -> None:
            async for b, _ in run:
                got.append(b)

        consumer = asyncio.ensure_future(consume())
        await _until_still(consumer)
        assert got == [Batch(9, ())] and not consumer.done()
        subs.fail.set()
        await _until_still(consumer)
        assert consumer.done(), "the run hung after sub 1 ended"
        with pytest.raises(_End, match="sub 1's node died"):
            consumer.result()
        assert subs.lost == 1 and sorted(subs.closed) == [1, 2]

    asyncio.run(main())


def test_the_callers_cancel_of_an_ending_run_is_not_lost() -> None:
    """The caller cancels while the run waits for a sub-stream that is closing: the caller's
    task ends canceled (not with the sub's end, nor running on)."""
    async def main() -> None:
        subs = _Subs(slow_close=True)
        run = merged_watch([(1, (1,)), (2, (2,))], kv_pb2.WatchCreateRequest(prefix=b"p", start_revision=10),
                           subs, _event, 10_000, 60.0)

        async def consume() -> None:
            async for _ in run:
                pass

        consumer = asyncio.ensure_future(consume())
        await _until_still(consumer)
        subs.fail.set()
        await _until_still(consumer)
        assert not consumer.done() and subs.closed == [1]  # sub 2's close is under way
        consumer.cancel()
        await _until_still(consumer)
        assert consumer.cancelled()
        subs.closing.set()  # the sub's task, canceled, goes on closing its stream by itself
        for _ in range(1000):
            if len(subs.closed) == 2:
                break
            await asyncio.sleep(0)
        assert sorted(subs.closed) == [1, 2]

    asyncio.run(main())
