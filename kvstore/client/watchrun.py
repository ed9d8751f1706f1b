"""Running one merged watch over streams: the I/O loop around `watchmerge.Merge`, shared by
kvstore's client (`watches.Watches`: sub-watches at other nodes over the client's channels) and
the etcd API (`server/etcd/watchmerged.py`: sub-watches at the node's own servicer and at other
nodes over its peer channels, with the caller's token).

How a sub-stream is opened, what a sub's cancel or failure means and how a broken contract is
reported are the caller's (`SubStreams`); the loop is the same for both: one task per sub
(`SubStreams.stream` with the sub's create, `groups` set, and a queue of further requests), a
ticker (`CATCH_UP`) for bookmarks while quiet, the progress requests at a revision the merge
asks for, a sub read no more while `Merge.paused` says it is far ahead of the others (events or
bytes), and each sub's reader waits until its response was taken off the inbox (so the inbox
holds at most one response per sub: memory is bounded by `Merge`'s byte bound, not by counts).

Invariants: the batches yielded are `Merge.take`'s (revision order, every revision whole, each
event once; the first one is the merged created point, no events); any end of a sub ends the
run with the exception `SubStreams` makes of it (nothing is retried here: the caller restarts
from its last delivered revision + 1 with a fresh cover); when the run ends (an exception, or
the caller closing the generator) every task it started is cancelled and awaited, each
sub-stream's request queue gets None and each stream generator is closed (`aclose`: its own
`finally` ends the call). The end never depends on a cancel arriving: a reader whose stream
returns a read instead of raising its cancel (Python 3.11's `asyncio.wait_for` does when the
read completed as the cancel came) stops at its next step (`over`), and nothing it waits on
stays unset; so a run always ends and its caller resumes (CI once saw a merged watch hang for
good after a node's kill: a reader waited forever for its last response to be taken). The
caller's own cancel during the end is not swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Protocol, TypeVar

from kvstore import errors
from kvstore.client.watchmerge import MAX_QUEUED_BYTES, Batch, Merge
from kvstore.v1 import kv_pb2

__all__ = ["CATCH_UP", "RESUMABLE", "SubStreams", "merged_watch"]

CATCH_UP = 1.0
"""How often the subs of a merged watch below the most advanced one are asked to get to its
revision (bookmarks while quiet; at most one request in flight per sub)."""

RESUMABLE = (errors.WrongShard, errors.NoLeader, errors.ResourceExhausted, errors.Unavailable,
             errors.ShuttingDown, errors.Timeout, errors.StaleReplica, errors.InternalError)
"""The errors of a server's cancel that a new watch from the same revision overcomes."""

class _HasRevision(Protocol):
    @property
    def revision(self) -> int: ...


K = TypeVar("K")
E = TypeVar("E", bound=_HasRevision)
K_contra = TypeVar("K_contra", contravariant=True)

Requests = asyncio.Queue[kv_pb2.WatchRequest | None]


class SubStreams(Protocol[K_contra]):
    """How the caller's sub-watches are run (`K`: what names a sub's node)."""

    ends: tuple[type[BaseException], ...]
    """Exceptions `stream` raises that end the merged watch as they are."""

    def stream(self, key: K_contra, create: kv_pb2.WatchCreateRequest, extra: Requests
               ) -> AsyncGenerator[kv_pb2.WatchResponse, None]:
        """One `KV.Watch` stream at `key` with `create` first, then the requests put in `extra`
        (None: close); raises one of `ends` when it ends."""
        ...

    def canceled(self, resp: kv_pb2.WatchResponse, key: K_contra) -> BaseException:
        """What a sub's cancel response ends the merged watch with."""
        ...

    def failed(self, key: K_contra, message: str, breach: bool) -> BaseException:
        """What a sub's unexpected failure (a bug: `breach` False) or a broken watch contract
        (`breach` True: events out of order, a revision going back) ends it with."""
        ...


async def merged_watch(plan: Sequence[tuple[K, tuple[int, ...]]], create: kv_pb2.WatchCreateRequest,
                       subs: SubStreams[K], event: Callable[[kv_pb2.Event], E], max_queued: int,
                       catch_up: float = CATCH_UP, max_bytes: int = MAX_QUEUED_BYTES
                       ) -> AsyncGenerator[tuple[Batch[E], int], None]:
    """One watch merged from sub-watches of the groups in `plan` ((key, its groups), one stream
    each); yields (batch, the node id of the last response taken). `event` converts each event
    (its result needs a `revision`). See the module docstring."""
    merge: Merge[E] = Merge(len(plan), create.start_revision, max_queued, max_bytes)
    extra: list[Requests] = [asyncio.Queue() for _ in plan]
    inbox: asyncio.Queue[tuple[int, kv_pb2.WatchResponse | BaseException | None]] = asyncio.Queue()
    gates = [asyncio.Event() for _ in plan]
    taken = [asyncio.Event() for _ in plan]
    """Set once the sub's last response was taken off the inbox (one in the inbox per sub)."""
    for g in gates:
        g.set()
    over = asyncio.Event()
    """Set when the run ends: a pump stops at its next step even if its cancel was lost (a
    stream's `asyncio.wait_for` in Python 3.11 returns a read that completed as the cancel came
    instead of raising it)."""

    async def pump(i: int, key: K, groups: tuple[int, ...]) -> None:
        c = kv_pb2.WatchCreateRequest()
        c.CopyFrom(create)
        c.groups.extend(groups)
        try:
            async with contextlib.aclosing(subs.stream(key, c, extra[i])) as responses:
                async for resp in responses:
                    if over.is_set():  # the run ended (a cancel its stream swallowed): stop here
                        return
                    taken[i].clear()
                    inbox.put_nowait((i, resp))
                    await taken[i].wait()
                    await gates[i].wait()  # far ahead of the others: read no more for now
                    if over.is_set():
                        return
        except subs.ends as err:
            await inbox.put((i, err))
        except Exception as err:  # (a bug): the merged watch starts again, not stuck
            await inbox.put((i, subs.failed(key, f"the sub-watch at {key} failed: {type(err).__name__}: {err}",
                                            False)))

    async def ticker() -> None:  # bookmarks while quiet: `Merge.catch_up` once a second
        while True:
            await asyncio.sleep(catch_up)
            if inbox.qsize() <= len(plan):  # at most one tick waiting
                inbox.put_nowait((-1, None))

    def ask() -> None:
        for j, rev in merge.asks():
            extra[j].put_nowait(kv_pb2.WatchRequest(progress_request=kv_pb2.WatchProgressRequest(revision=rev)))

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(i, key, gs)) for i, (key, gs) in enumerate(plan)]
    tasks.append(loop.create_task(ticker()))
    node = 0
    try:
        while True:
            i, item = await inbox.get()
            if item is None:  # the ticker: let the merged revision follow the most advanced sub
                merge.catch_up()
                ask()
                continue
            if isinstance(item, BaseException):
                raise item
            key = plan[i][0]
            taken[i].set()
            try:
                if item.created:
                    merge.created(i, item.revision)
                elif item.canceled:
                    raise subs.canceled(item, key)
                elif item.HasField("error"):  # our progress request was refused (its clock)
                    merge.refused(i)
                else:
                    node = item.node_id
                    merge.response(i, item.revision, [event(e) for e in item.events],
                                   [e.ByteSize() for e in item.events])
            except ValueError as err:  # a sub broke the watch contract
                raise subs.failed(key, f"{key}: {err}", True) from None
            ask()
            for j, gate in enumerate(gates):
                if merge.paused(j):
                    gate.clear()
                else:
                    gate.set()
            for b in merge.take():
                yield b, node
    finally:
        over.set()
        for q in extra:
            q.put_nowait(None)
        for e in (*taken, *gates):  # no pump waits on the loop that no longer runs
            e.set()
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)  # (the caller's own cancel still propagates)
