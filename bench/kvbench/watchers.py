"""The watcher side of the watch-latency benchmark: one process holding many watches.

A watcher process opens ``plan.watches`` watches of one key or one prefix, each on its own gRPC
stream (kvstore: through its client library, ``AsyncClient.watch_batches``, which opens one
``KV.Watch`` stream per watch on a node that hosts every watched group; etcd: one v3
``Watch.Watch`` stream per watch with one create request, watch i at member i mod n), reports
"ready" once every watch is established, then stamps every event's arrival with
``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the host, so the writer's
acknowledgement times in another process are comparable). A watch is done when it has seen the
end marker (a put of ``plan.end_value``, the writer's last); the process stops when every watch
is done or at ``plan.deadline`` (monotonic), whichever comes first, and hands back what it
received. Nothing here retries forever: every wait is bounded by the deadline.

Invariants: events are recorded per watch in arrival order; a response's events share one
arrival time (they arrived together); the end marker is not recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from kvstore.etcdpb.etcdserverpb import rpc_pb2 as etcd_pb2
from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc as etcd_pb2_grpc

SYSTEMS = ("kvstore", "etcd")


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with ``prefix``": the prefix with its last
    byte below 0xff incremented (the bytes after it dropped); ``b"\\0"`` if there is none."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\x00"
    p[-1] += 1
    return bytes(p)


@dataclass(frozen=True, slots=True)
class WatchPlan:
    """What one watcher process does."""

    system: str
    endpoints: tuple[str, ...]
    key: bytes
    """The watched key, or the prefix when ``prefix`` is set."""
    prefix: bool
    watches: int
    first: int
    """The index of this process's first watch among all the row's watches (etcd: member choice)."""
    start_revision: int
    """Every watch starts here (the revision after the writer's last put before the row), so a
    put made before a watch is established is still delivered (late, not lost)."""
    end_value: bytes
    deadline: float
    """``time.monotonic()`` after which the process stops waiting."""


@dataclass(slots=True)
class WatcherResult:
    """What one watcher process received: per watch, the revisions and arrival times."""

    revisions: list[array[int]] = field(default_factory=list)
    arrivals: list[array[float]] = field(default_factory=list)
    ended: int = 0
    """Watches that saw the end marker."""
    cpu_s: float = 0.0
    """CPU (user + system) of this process from ready to done."""
    wall_s: float = 0.0
    resumes: int = 0
    """kvstore: how many times the client moved a watch to a new stream (0 for etcd)."""
    nodes: list[int] = field(default_factory=list)
    """Per watch, the node serving it (kvstore: the node id of its first response; etcd: member
    index + 1)."""
    error: str = ""


@dataclass(slots=True)
class _Watch:
    revisions: array[int] = field(default_factory=lambda: array("q"))
    arrivals: array[float] = field(default_factory=lambda: array("d"))
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    node: int = 0


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _kvstore_watch(client: Any, plan: WatchPlan, w: _Watch) -> None:
    kw: dict[str, Any] = {"prefix": plan.key} if plan.prefix else {}
    key = b"" if plan.prefix else plan.key
    batches: AsyncIterator[Any] = client.watch_batches(
        key, start_revision=plan.start_revision, progress=True, **kw)
    async for batch in batches:
        t = time.monotonic()
        if not w.ready.is_set():  # the first response (progress or events): the watch is established
            w.node = batch.node_id
            w.ready.set()
        for ev in batch.events:
            if ev.value == plan.end_value:
                w.ended = True
                return
            w.revisions.append(ev.mod_revision)
            w.arrivals.append(t)


async def _etcd_watch(stub: etcd_pb2_grpc.WatchStub, plan: WatchPlan, w: _Watch) -> None:
    create = etcd_pb2.WatchCreateRequest(
        key=plan.key, range_end=prefix_range_end(plan.key) if plan.prefix else b"",
        start_revision=plan.start_revision)
    done = asyncio.Event()

    async def requests() -> AsyncIterator[etcd_pb2.WatchRequest]:
        yield etcd_pb2.WatchRequest(create_request=create)
        await done.wait()

    call = stub.Watch(requests())
    try:
        async for resp in call:
            t = time.monotonic()
            if resp.created:
                w.ready.set()
            if resp.canceled:
                raise RuntimeError(f"etcd canceled the watch: {resp.cancel_reason or resp.compact_revision}")
            for ev in resp.events:
                if ev.kv.value == plan.end_value:
                    w.ended = True
                    return
                w.revisions.append(ev.kv.mod_revision)
                w.arrivals.append(t)
    finally:
        done.set()
        call.cancel()


async def run_watches(plan: WatchPlan, ready: Any) -> WatcherResult:
    """Open the plan's watches, call ``ready()`` once all are established, record until every
    watch ended or the deadline. A watch that fails is recorded in ``error`` (the others go on)."""
    watches = [_Watch() for _ in range(plan.watches)]
    closers: list[Any] = []
    client: Any = None
    if plan.system == "kvstore":
        from kvstore.client import AsyncClient

        client = AsyncClient(list(plan.endpoints), timeout=10)
        closers.append(client.close)
        coros = [_kvstore_watch(client, plan, w) for w in watches]
    elif plan.system == "etcd":
        channels = [grpc.aio.insecure_channel(ep) for ep in plan.endpoints]
        closers += [ch.close for ch in channels]
        stubs = [etcd_pb2_grpc.WatchStub(ch) for ch in channels]
        coros = [_etcd_watch(stubs[(plan.first + i) % len(stubs)], plan, w) for i, w in enumerate(watches)]
        for i, w in enumerate(watches):
            w.node = (plan.first + i) % len(stubs) + 1
    else:
        raise ValueError(f"unknown system {plan.system!r}")
    tasks = [asyncio.ensure_future(c) for c in coros]
    res = WatcherResult()
    try:
        left = plan.deadline - time.monotonic()
        all_ready: asyncio.Future[Any] = asyncio.gather(*(w.ready.wait() for w in watches))
        first_wait: list[asyncio.Future[Any]] = [all_ready, *tasks]
        waiting = await asyncio.wait(first_wait, timeout=max(0.0, left),
                                     return_when=asyncio.FIRST_COMPLETED)
        if all_ready not in waiting[0]:
            all_ready.cancel()
            failed = [t for t in tasks if t.done()]
            why = repr(failed[0].exception()) if failed and failed[0].exception() else "deadline"
            res.error = f"{sum(not w.ready.is_set() for w in watches)} watches never established ({why})"
            return res
        ready()
        c0, t0 = _cpu(), time.monotonic()
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, plan.deadline - time.monotonic()))
        res.cpu_s, res.wall_s = _cpu() - c0, time.monotonic() - t0
        errs = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if errs:
            res.error = f"{len(errs)} watches failed, first: {errs[0]!r}"
        elif pending:
            res.error = f"{len(pending)} watches did not see the end marker by the deadline"
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        for close in closers:
            with contextlib.suppress(Exception):
                await close()
    if client is not None:
        res.resumes = client.watch_resumes
    res.revisions = [w.revisions for w in watches]
    res.arrivals = [w.arrivals for w in watches]
    res.ended = sum(w.ended for w in watches)
    res.nodes = [w.node for w in watches]
    return res


def watcher_process(plan: WatchPlan, ready_q: Any, out_q: Any) -> None:
    """The entry point of a watcher process (multiprocessing, spawn): puts ("ready", first) on
    ``ready_q`` once established and its :class:`WatcherResult` on ``out_q`` at the end."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        runner = asyncio.run
    try:
        res = runner(run_watches(plan, lambda: ready_q.put(("ready", plan.first))))
    except BaseException as e:  # report, never hang the parent
        res = WatcherResult(error=f"watcher process failed: {e!r}")
        ready_q.put(("failed", plan.first))
    if res.error and not res.revisions:
        ready_q.put(("failed", plan.first))
    out_q.put((plan.first, res))
