"""`Client`: the synchronous kvstore client, an `AsyncClient` run on a private event loop in a
background daemon thread. Same methods, same arguments, same errors and results.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from kvstore.client.async_client import AsyncClient
from kvstore.client.types import (
    AdminResult,
    Alarm,
    Consistency,
    KeyValue,
    NodeStatus,
    ReadPreference,
    ReadResult,
    ShardOpResult,
    Status,
)
from kvstore.shard.shardmap import ShardMap

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """Synchronous kvstore client: the same methods as :class:`AsyncClient`, run on a private
    event loop in a background daemon thread. Safe to call from any thread (but not from a
    callback running on its own loop). ``scan`` returns a plain iterator.

    Accepts the same arguments as :class:`AsyncClient`.
    """

    def __init__(self, endpoints: Sequence[str] | str, **kwargs: Any) -> None:
        self._async = AsyncClient(endpoints, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run_loop, name="kvstore-client", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the synchronous Client cannot be called from its own event loop")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def auth_call(self, method: str, request: Any) -> Any:
        """See `AsyncClient.auth_call`."""
        return self._run(self._async.auth_call(method, request))

    @property
    def async_client(self) -> AsyncClient:
        return self._async

    @property
    def client_id(self) -> int:
        return self._async.client_id

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._async.endpoints

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and stop the background thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            if threading.current_thread() is self._thread:
                raise RuntimeError("the synchronous Client cannot be closed from its own event loop")
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._async.close(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def get(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> bytes | None:
        return self._run(
            self._async.get(
                key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
                read_preference=read_preference, revision=revision,
            )
        )

    def read(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> ReadResult:
        return self._run(
            self._async.read(
                key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
                read_preference=read_preference, revision=revision,
            )
        )

    @property
    def revision(self) -> int:
        """The highest revision this client has observed (see AsyncClient.revision)."""
        return self._async.revision

    def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> int:
        return self._run(self._async.put(key, value, timeout=timeout))

    def compact(self, revision: int, *, timeout: float | None = None) -> int:
        return self._run(self._async.compact(revision, timeout=timeout))

    def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        return self._run(self._async.delete(key, timeout=timeout))

    def cas(self, key: bytes, expected: bytes | None, new: bytes, *, timeout: float | None = None) -> bool:
        return self._run(self._async.cas(key, expected, new, timeout=timeout))

    def scan(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Iterate ``(key, value)`` pairs; fetched chunk by chunk as the iteration proceeds."""
        for kv in self.scan_kvs(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference, revision=revision,
        ):
            yield kv.key, kv.value

    def scan_kvs(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> Iterator[KeyValue]:
        """Iterate :class:`KeyValue` items (with metadata), at ``revision`` (0: now)."""
        agen = self._async.scan_kvs(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference, revision=revision,
        )

        async def next_chunk() -> list[KeyValue] | None:
            try:
                return await anext(agen)
            except StopAsyncIteration:
                return None

        try:
            while (chunk := self._run(next_chunk())) is not None:
                yield from chunk
        finally:
            if not self._closed:
                self._run(agen.aclose())

    def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> Status:
        return self._run(self._async.status(endpoint, timeout=timeout))

    def cluster_status(self, *, timeout: float | None = None) -> list[NodeStatus]:
        return self._run(self._async.cluster_status(timeout=timeout))

    def add_member(
        self, id: int, address: str, learner: bool = True, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        return self._run(self._async.add_member(id, address, learner, groups=groups, timeout=timeout))

    def promote_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        return self._run(self._async.promote_member(id, groups=groups, timeout=timeout))

    def remove_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        return self._run(self._async.remove_member(id, groups=groups, timeout=timeout))

    def transfer_leader(
        self, to: int = 0, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        return self._run(self._async.transfer_leader(to, groups=groups, timeout=timeout))

    def alarms(self, *, timeout: float | None = None) -> list[Alarm]:
        return self._run(self._async.alarms(timeout=timeout))

    def disarm_alarms(self, node_id: int = 0, type: str | None = None, *, timeout: float | None = None) -> list[Alarm]:
        return self._run(self._async.disarm_alarms(node_id, type, timeout=timeout))

    def snapshot(self, endpoint: str | None = None, *, timeout: float | None = None) -> AdminResult:
        return self._run(self._async.snapshot(endpoint, timeout=timeout))

    def shard_map(self, *, refresh: bool = False, timeout: float | None = None) -> ShardMap | None:
        return self._run(self._async.shard_map(refresh=refresh, timeout=timeout))

    def shards(self, *, timeout: float | None = None) -> ShardOpResult:
        return self._run(self._async.shards(timeout=timeout))

    def add_group(self, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        return self._run(self._async.add_group(wait=wait, timeout=timeout))

    def remove_group(self, group: int, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        return self._run(self._async.remove_group(group, wait=wait, timeout=timeout))

    def rebalance(self, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        return self._run(self._async.rebalance(wait=wait, timeout=timeout))
