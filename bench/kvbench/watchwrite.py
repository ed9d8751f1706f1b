"""The writer side of the watch-latency benchmark: puts one at a time at a fixed rate, each
acknowledgement stamped with ``time.monotonic()`` and keyed by the put's revision.

- kvstore: ``AsyncClient.put`` (it returns the write's revision; retries are exactly-once).
- etcd: a v3 ``KV.Put`` at the leader over grpc.aio; the revision is the response header's.

The loop is bounded by a count and by a time limit; the i-th put is due at ``start + i / rate``
and a late put goes at once (no catch-up burst beyond one-at-a-time), so the achieved rate is at
most the target and is reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio

from kvstore.client import AsyncClient
from kvstore.errors import KVError
from kvstore.etcdpb.etcdserverpb import rpc_pb2 as etcd_pb2
from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc as etcd_pb2_grpc


class RevisionWriter(Protocol):
    async def put(self, key: bytes, value: bytes) -> int: ...

    async def close(self) -> None: ...


class KvstoreWriter:
    """Puts through kvstore's client library (leader discovery, sessions, retries)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 10.0) -> None:
        self.client = AsyncClient(list(endpoints), timeout=timeout)

    async def put(self, key: bytes, value: bytes) -> int:
        return await self.client.put(key, value)

    async def close(self) -> None:
        await self.client.close()


class EtcdWriter:
    """Puts at one etcd member (the leader: a follower would forward, one more hop)."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._ch = grpc.aio.insecure_channel(endpoint)
        self._kv = etcd_pb2_grpc.KVStub(self._ch)

    async def put(self, key: bytes, value: bytes) -> int:
        resp: etcd_pb2.PutResponse = await self._kv.Put(etcd_pb2.PutRequest(key=key, value=value),
                                                        timeout=self.timeout)
        return int(resp.header.revision)

    async def close(self) -> None:
        await self._ch.close()


@dataclass(slots=True)
class WriteResult:
    """Acknowledged puts: revision -> ``time.monotonic()`` of the acknowledgement (``acks``) and
    of the moment the put was sent (``sends``); both hold exactly the acknowledged revisions."""

    target_rate: float
    acks: dict[int, float] = field(default_factory=dict)
    sends: dict[int, float] = field(default_factory=dict)
    attempted: int = 0
    errors: int = 0
    first_error: str = ""
    started: float = 0.0
    ended: float = 0.0

    @property
    def rate(self) -> float:
        """Acknowledged puts per second over the writing window: from the first put's send to the
        end of the last one's slot in the schedule (``attempted / target_rate`` after the start)
        or to its acknowledgement, whichever is later; at most ``target_rate``."""
        span = max(self.ended - self.started, self.attempted / self.target_rate)
        return len(self.acks) / span if span > 0 else 0.0


async def paced_puts(writer: RevisionWriter, keys: Sequence[bytes], value: bytes, *, rate: float, count: int,
                     max_seconds: float) -> WriteResult:
    """``count`` puts (keys in turn) at ``rate`` per second, one at a time, stopping early at
    ``max_seconds``. A failed put is counted in ``errors`` (not retried here: kvstore's client
    has already retried it within its timeout) and the loop goes on."""
    if rate <= 0 or count < 0 or not keys:
        raise ValueError("rate > 0, count >= 0 and at least one key")
    res = WriteResult(rate, started=time.monotonic())
    stop = res.started + max_seconds
    for i in range(count):
        now = time.monotonic()
        if now >= stop:
            break
        due = res.started + i / rate
        if due > now:
            await asyncio.sleep(due - now)
        res.attempted += 1
        sent = time.monotonic()
        try:
            rev = await writer.put(keys[i % len(keys)], value)
        except (KVError, grpc.aio.AioRpcError) as e:
            res.errors += 1
            res.first_error = res.first_error or repr(e)
            continue
        res.acks[rev] = time.monotonic()
        res.sends[rev] = sent
    res.ended = time.monotonic()
    return res
