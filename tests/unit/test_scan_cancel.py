"""A client scan's stream read canceled just as its chunk arrives ends canceled (Python 3.11's
`asyncio.wait_for` would return the chunk and lose the cancel: the scan went on as if never
canceled; the same idiom hung the merged watch, `test_watch_client.py`)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

from cancelcheck import spin

from kvstore.client.checks import RequestChecks
from kvstore.client.retry import RetryPolicy
from kvstore.client.scans import Scans, _ScanPart
from kvstore.v1 import kv_pb2


class _Stream:
    """A scripted `KV.Scan` call: `read` returns what is put in `q`."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[kv_pb2.ScanResponse] = asyncio.Queue()
        self.canceled = False

    async def read(self) -> kv_pb2.ScanResponse:
        return await self.q.get()

    def cancel(self) -> None:
        self.canceled = True


def test_a_scan_read_canceled_as_its_chunk_arrives_ends_canceled() -> None:
    async def trial(turns: int) -> tuple[bool, bool, bool]:
        view = SimpleNamespace(router=None, replicas=None)
        scans = Scans(RequestChecks(timeout=5.0), None, view, None, RetryPolicy(), random.Random(1))  # type: ignore[arg-type]
        part = _ScanPart(1, b"a", b"b", kv_pb2.LINEARIZABLE, 0, "leader")
        stream = _Stream()
        part.stream, part.target = stream, "n1"
        filling = asyncio.ensure_future(scans._scan_fill(part, 0, kv_pb2.LINEARIZABLE, 5.0, True))
        await spin(3)
        stream.q.put_nowait(kv_pb2.ScanResponse(items=[kv_pb2.KeyValue(key=b"a1", value=b"v")], more=True))
        await spin(turns)
        accepted = filling.cancel()
        await spin(10)
        return filling.done(), accepted, filling.cancelled()

    for turns in range(6):
        done, accepted, cancelled = asyncio.run(trial(turns))
        assert done and cancelled == accepted, f"a cancel {turns} turns after the chunk arrived was lost"
