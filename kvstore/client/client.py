"""`Client`: the synchronous kvstore client, an `AsyncClient` run on a private event loop in a
background daemon thread. Same methods, same arguments, same errors and results.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvstore.client.async_client import AsyncClient
from kvstore.client.leases import LeaseInfo
from kvstore.client.types import (
    AdminResult,
    Alarm,
    Compare,
    Consistency,
    GroupHash,
    KeyValue,
    NodeStatus,
    Op,
    ReadPreference,
    ReadResult,
    ShardOpResult,
    Status,
    TxnResponse,
)
from kvstore.client.watches import WatchBatch, WatchEvent
from kvstore.errors import ClientClosed, Unavailable
from kvstore.shard.shardmap import ShardMap

__all__ = ["Client"]

T = TypeVar("T")

DEFAULT_COALESCE = 0.001
"""Seconds a call may be held back so that other threads' calls leave with it (see `Client`)."""
MAX_COALESCE = 0.1
IDLE_RESET = 5
"""A call made after no call ran for `IDLE_RESET * coalesce` leaves at once (and `_peak` restarts
at 1): a client that sat idle holds nothing back for threads that may not be there."""
_SIGNAL_SLICE = 0.2
"""Seconds a calling thread waits for its call at a time, so that Ctrl-C interrupts it within this
even when the kernel hands the signal to another thread (`_run`)."""


def _new_loop() -> asyncio.AbstractEventLoop:
    """A private event loop: uvloop's when available (cheaper cross-thread wake-ups and tasks),
    else asyncio's. Sets no global policy."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass(slots=True, eq=False)
class _Call:
    """One synchronous call handed to the loop thread.

    Invariants: `done` is held from creation until the outcome (`result` or `error`) is set, by
    the loop thread exactly once; the calling thread reads the outcome only after acquiring
    `done`. `task` is set (on the loop thread) when the coroutine starts; `abandoned` is set by
    the calling thread when it stops waiting (an exception such as KeyboardInterrupt), after which
    the loop thread cancels the task or, if it never started, closes the coroutine unstarted.
    """

    coro: Coroutine[Any, Any, Any] | None
    done: threading.Lock
    write: bool
    """A mutation: cancelled by close() while running, it may have been applied."""
    result: Any = None
    error: BaseException | None = None
    task: asyncio.Task[Any] | None = None
    abandoned: bool = False

    def fail(self, error: BaseException) -> None:
        """Never started (the client closed first): close the coroutine and wake the caller."""
        if self.coro is not None:
            self.coro.close()
            self.coro = None
        self.error = error
        self.done.release()


class Client:
    """Synchronous kvstore client: the same methods as :class:`AsyncClient`, run on a private
    event loop (uvloop when available) in a background daemon thread. Safe to call from any
    thread (but not from a callback running on its own loop). ``scan`` returns a plain iterator.

    Accepts the same arguments as :class:`AsyncClient`.

    How calls reach the loop (the cost that matters with many threads): a calling thread puts
    its call in an inbox and blocks on a plain lock of its own; the loop thread is woken
    (`call_soon_threadsafe`) only when the inbox goes from empty to non-empty, and then starts
    every call waiting there in one go; a call's task records its outcome and releases its
    caller's lock when done. So a burst of calls from many threads costs one wake-up of the loop,
    not one each, and no `concurrent.futures.Future` (with its condition variable) per call.

    ``coalesce`` (seconds, default 1 ms, 0 turns it off): threads come back from their calls
    one by one, so left alone their next calls would leave in small batches that cost the
    servers several times more per operation than one full batch. So a call may wait up to
    ``coalesce`` for the other threads' calls: until as many calls are waiting or running (a
    long call, a watch waiting for events, counts: its thread is busy, not coming back) as the
    most seen at once, `_peak`; a wait that runs out lowers `_peak` to what is there. A call
    made after no call ran for `IDLE_RESET` times ``coalesce`` leaves at once.
    """

    def __init__(self, endpoints: Sequence[str] | str, *, coalesce: float = DEFAULT_COALESCE, **kwargs: Any) -> None:
        if not 0.0 <= coalesce <= MAX_COALESCE:
            raise ValueError(f"coalesce must be between 0 and {MAX_COALESCE} seconds")
        self._coalesce = coalesce
        self._async = AsyncClient(endpoints, **kwargs)
        self._loop = _new_loop()
        self._closed = False
        self._lock = threading.Lock()
        self._inbox: list[_Call] = []
        self._inbox_lock = threading.Lock()
        self._shut = False
        """No call is accepted any more (set, under `_inbox_lock`, when the loop stops)."""
        self._drain_scheduled = False
        """True from the `call_soon_threadsafe(_drain)` until `_drain` takes the inbox."""
        self._live: set[_Call] = set()
        """Calls started on the loop and not finished (changed on the loop thread, under
        `_inbox_lock`)."""
        self._idle_since = 0.0
        """Loop time when the last call running finished (loop thread)."""
        self._peak = 1
        """Calls seen waiting or running at once (under `_inbox_lock`): the threads in use."""
        self._holding = False
        """The loop holds the inbox back for more calls (under `_inbox_lock`); `_timer` ends it."""
        self._timer: asyncio.TimerHandle | None = None
        self._holds_expired = 0
        """Holds that waited the whole `coalesce` (loop thread): each one cost its calls that much."""
        self._thread = threading.Thread(target=self._run_loop, name="kvstore-client", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _drain(self) -> None:
        """On the loop thread, woken by the first call into an empty inbox or by the call that
        brings the calls waiting or running up to `_peak`: start the calls waiting, or hold them
        back (see `coalesce`)."""
        with self._inbox_lock:
            n, live = len(self._inbox), len(self._live)
            if n == 0:
                self._drain_scheduled = self._holding
                return
            if live == 0 and self._loop.time() - self._idle_since > IDLE_RESET * self._coalesce:
                self._peak = 1  # the client sat idle: what its threads do now is not known yet
            hold = self._coalesce > 0 and n + live < self._peak and self._timer is None
            self._peak = max(self._peak, n + live)
            if hold:
                self._holding = True
                self._timer = self._loop.call_later(self._coalesce, self._held_too_long)
                return
        self._start_inbox()

    def _held_too_long(self) -> None:
        """`coalesce` passed without every thread back: fewer threads than `_peak` are calling
        now; learn it, and start what waits."""
        self._timer = None
        self._holds_expired += 1
        with self._inbox_lock:
            self._peak = max(1, len(self._inbox) + len(self._live))
        self._start_inbox()

    def _start_inbox(self) -> None:
        """On the loop thread: start every call in the inbox."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._inbox_lock:
            calls, self._inbox = self._inbox, []
            self._drain_scheduled = False
            self._holding = False
        loop = self._loop
        for call in calls:
            coro = call.coro
            assert coro is not None
            if call.abandoned:
                call.coro = None
                coro.close()
                call.error = RuntimeError("call abandoned")
                call.done.release()
                continue
            with self._inbox_lock:
                self._live.add(call)
            call.task = loop.create_task(self._drive(call, coro))

    async def _drive(self, call: _Call, coro: Coroutine[Any, Any, Any]) -> None:
        """A call's task: run it, record its outcome and have its thread woken, in the task
        itself (no done callback to schedule, one loop iteration later, per call)."""
        call.coro = None
        try:
            call.result = await coro
        except asyncio.CancelledError:  # by close() (or by an abandoned caller, who reads nothing)
            call.error = Unavailable("the client was closed while the operation ran", indeterminate=call.write)
        except GeneratorExit:  # the task itself is being destroyed: close() answers its caller
            raise
        except BaseException as e:  # the caller's to see, whatever it is
            call.error = e
        call.task = None
        self._finished(call)

    def _finished(self, call: _Call) -> None:
        """On the loop thread, `call`'s outcome set: it no longer runs; wake its thread."""
        with self._inbox_lock:
            self._live.discard(call)
            if not self._live:
                self._idle_since = self._loop.time()
        call.done.release()

    def _abandon(self, call: _Call) -> None:
        """On the loop thread: the caller stopped waiting; cancel its task if it runs."""
        self._cancel(call)

    def _cancel(self, call: _Call) -> None:
        """On the loop thread: cancel `call`'s task. A task cancelled before its first step
        never runs `_drive`: then the call is finished here, as never started."""
        task = call.task
        if task is None:
            return
        task.add_done_callback(lambda _: self._finish_unstarted(call))
        task.cancel()

    def _finish_unstarted(self, call: _Call) -> None:
        with self._inbox_lock:
            unfinished = call in self._live
        if unfinished:  # `_drive` never ran: nothing was sent
            if call.coro is not None:
                call.coro.close()
                call.coro = None
            call.error = ClientClosed("client is closed")
            call.task = None
            self._finished(call)

    def _run(self, coro: Coroutine[Any, Any, T], write: bool = False) -> T:
        """Run `coro` on the loop thread and return its result or raise its exception (`write`:
        it is a mutation, for the error a close() during the call gives)."""
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise RuntimeError("the synchronous Client cannot be called from its own event loop")
        done = threading.Lock()
        done.acquire()
        call = _Call(coro, done, write)
        with self._inbox_lock:
            if self._closed or self._shut:
                coro.close()
                raise ClientClosed("client is closed")
            self._inbox.append(call)
            wake = not self._drain_scheduled
            self._drain_scheduled = True
            if self._holding and len(self._inbox) + len(self._live) >= self._peak:  # every thread is back: go
                self._holding = False
                wake = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: close() finished meanwhile
                with self._inbox_lock:
                    if call in self._inbox:
                        self._inbox.remove(call)
                        call.fail(ClientClosed("client is closed"))
        try:
            # In slices: a signal (Ctrl-C's SIGINT) the kernel delivers to another thread (the loop's,
            # grpc's) only sets a flag the main thread checks between bytecodes; an acquire without a
            # timeout would wait for the call to end before the KeyboardInterrupt could be raised.
            while not done.acquire(timeout=_SIGNAL_SLICE):
                pass
        except BaseException:
            call.abandoned = True
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._abandon, call)
            raise
        if call.error is not None:
            raise call.error
        return call.result

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
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            stopped = not self._thread.is_alive()
            if stopped:
                self._loop.close()
            # Only if _shutdown did not finish: nothing may be left waiting on a stopped loop.
            with self._inbox_lock:
                calls, self._inbox = self._inbox, []
                self._shut = True
            for call in calls:
                call.fail(ClientClosed("client is closed"))
            if stopped:
                with self._inbox_lock:
                    live, self._live = list(self._live), set()
                for call in live:
                    call.error = Unavailable("the client was closed while the operation ran",
                                             indeterminate=call.write)
                    call.done.release()

    async def _shutdown(self) -> None:
        """On the loop thread: accept nothing more, fail what never started, cancel what runs
        (its caller gets `Unavailable`, indeterminate for a write: it may have been sent), and
        only then close the `AsyncClient` (so no call of ours meets a half-closed client)."""
        with self._inbox_lock:
            calls, self._inbox = self._inbox, []
            self._shut = True
            self._holding = False
        for call in calls:
            call.fail(ClientClosed("client is closed"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        live = list(self._live)
        tasks = [c.task for c in live if c.task is not None]
        for c in live:
            self._cancel(c)
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await self._async.close()

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

    def put(self, key: bytes, value: bytes, *, lease: int = 0, timeout: float | None = None) -> int:
        """Set `key` to `value` (attached to lease `lease` if not 0); returns the revision."""
        if lease:
            return self._run(self._async.leases.put(key, value, lease, timeout=timeout), write=True)
        return self._run(self._async.put(key, value, timeout=timeout), write=True)

    # ----- leases (`client/leases.py`) -----
    def lease_grant(self, ttl: int, lease_id: int = 0, *, timeout: float | None = None) -> int:
        return self._run(self._async.leases.grant(ttl, lease_id, timeout=timeout), write=True)

    def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> int:
        return self._run(self._async.leases.revoke(lease_id, timeout=timeout), write=True)

    def lease_keep_alive_once(self, lease_id: int, *, timeout: float | None = None) -> int:
        return self._run(self._async.leases.keep_alive_once(lease_id, timeout=timeout), write=True)

    def lease_time_to_live(self, lease_id: int, keys: bool = False, *, timeout: float | None = None) -> LeaseInfo:
        return self._run(self._async.leases.time_to_live(lease_id, keys, timeout=timeout))

    def lease_list(self, *, timeout: float | None = None) -> list[int]:
        return self._run(self._async.leases.list(timeout=timeout))

    def compact(self, revision: int, *, timeout: float | None = None) -> int:
        return self._run(self._async.compact(revision, timeout=timeout), write=True)

    def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        return self._run(self._async.delete(key, timeout=timeout), write=True)

    def delete_prefix(self, prefix: bytes, *, timeout: float | None = None) -> int:
        return self._run(self._async.delete_prefix(prefix, timeout=timeout), write=True)

    def delete_range(self, start: bytes, end: bytes, *, timeout: float | None = None) -> int:
        return self._run(self._async.delete_range(start, end, timeout=timeout), write=True)

    def cas(self, key: bytes, expected: bytes | None, new: bytes, *, timeout: float | None = None) -> bool:
        return self._run(self._async.cas(key, expected, new, timeout=timeout), write=True)

    def txn(
        self,
        compares: Sequence[Compare] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResponse:
        """See :meth:`AsyncClient.txn`."""
        return self._run(self._async.txn(compares, success, failure, timeout=timeout), write=True)

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

    def watch(
        self,
        key: bytes = b"",
        *,
        prefix: bytes = b"",
        range_end: bytes = b"",
        start_revision: int = 0,
        prev_kv: bool = False,
    ) -> Iterator[WatchEvent]:
        """``for ev in kv.watch(prefix=b"app/", start_revision=r)``: the changes, in revision
        order, each once, resumed transparently (see :meth:`AsyncClient.watch`). Runs until the
        caller stops iterating (or the client is closed)."""
        for batch in self.watch_batches(
            key, prefix=prefix, range_end=range_end, start_revision=start_revision, prev_kv=prev_kv,
        ):
            yield from batch.events

    def watch_batches(
        self,
        key: bytes = b"",
        *,
        prefix: bytes = b"",
        range_end: bytes = b"",
        start_revision: int = 0,
        prev_kv: bool = False,
        progress: bool = False,
    ) -> Iterator[WatchBatch]:
        """Like :meth:`watch`, by response (see :meth:`AsyncClient.watch_batches`)."""
        agen = self._async.watch_batches(
            key, prefix=prefix, range_end=range_end, start_revision=start_revision, prev_kv=prev_kv,
            progress=progress,
        )

        async def next_batch() -> WatchBatch | None:
            try:
                return await anext(agen)
            except StopAsyncIteration:
                return None

        try:
            while (batch := self._run(next_batch())) is not None:
                yield batch
        finally:
            # A caller interrupted inside `next` (Ctrl-C) leaves the generator running on the
            # loop: close() cancels that call; nothing else to do here then.
            if not self._closed:
                with contextlib.suppress(RuntimeError):
                    self._run(agen.aclose())  # type: ignore[attr-defined]

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

    def hash_kv(
        self, endpoint: str, group: int, revision: int = 0, *, exact: bool = False, timeout: float | None = None
    ) -> GroupHash:
        return self._run(self._async.hash_kv(endpoint, group, revision, exact=exact, timeout=timeout))

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
