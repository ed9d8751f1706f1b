"""The asyncio shell of the range-move coordinator (`kvstore.node.moves.MoveCoordinator`).

`MoveDriver` runs on every node: while the node leads the metadata group it asks the
coordinator for its next unit of work and runs the work's requests through the node's
`Cluster` (in a process: `kvstore.server.shards.NodeCluster`, which proposes to and exports from
any group's leader through `GroupCaller`, locally or over `Shard.GroupPropose` /
`Shard.ExportRange`). `update` is how the admin side (`ShardService.ShardOp`,
`AdminService`'s membership bookkeeping) changes the map: the coordinator's compare-and-swap
loop, run here, bounded by a timeout.

Everything the protocol decides is in the coordinator (its docstring says why moves stay
linearizable); this module only carries requests and outcomes and retries failed work later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from kvstore.node.moves import ExportChunk, MoveCoordinator, Propose, WaitMap, Work
from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import ShardMap, ShardMapError
from kvstore.storage.commands import ApplyResult

log = logging.getLogger("kvstore.moves")

WAIT_MAP_TIMEOUT = 5.0
"""How long a map change waits for this node to apply the new map (then it goes on anyway)."""


class Cluster(Protocol):
    """What the driver needs from its node."""

    def is_meta_leader(self) -> bool: ...

    def current_map(self) -> tuple[ShardMap | None, bytes]: ...

    def node_addresses(self) -> dict[int, str]: ...

    async def propose(self, group: int, data: bytes) -> ApplyResult: ...

    def export(self, group: int, ranges: IntervalSet) -> AsyncIterator[bytes]: ...

    async def wait_map(self, version: int, timeout: float) -> bool: ...


class MoveDriver:
    """Drives one node's `MoveCoordinator` on the event loop (see the module docstring)."""

    def __init__(
        self,
        cluster: Cluster,
        interval: float = 0.2,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.interval = interval
        self.clock = clock
        self.coordinator = MoveCoordinator(rng if rng is not None else random.SystemRandom(), clock)
        self.wakeup = asyncio.Event()

    async def run(self) -> None:
        """Forever: while this node leads the metadata group, do the coordinator's work."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self.interval)
            self.wakeup.clear()
            if not self.cluster.is_meta_leader():
                continue
            try:
                while await self.step():
                    if not self.cluster.is_meta_leader():
                        break
            except asyncio.CancelledError:
                raise
            except Exception as err:  # every step is retried on the next round
                log.warning("shard coordinator: %s", err)
                await asyncio.sleep(0.5)

    async def step(self) -> bool:
        """Do one unit of work; True if there was some (call again at once)."""
        m, raw = self.cluster.current_map()
        work = self.coordinator.next_work(m, raw, self.cluster.node_addresses())
        if work is None:
            return False
        await self.execute(work)
        return True

    async def update(self, change: Callable[[ShardMap], ShardMap], timeout: float = 20.0) -> ShardMap:
        """Apply `change` to the current map with compare-and-swap in the metadata group; the new
        map. Raises `ShardMapError` if the change is not allowed or did not complete in time."""
        end = self.clock() + timeout
        m, raw = self.cluster.current_map()
        while m is None:
            if self.clock() >= end:
                raise ShardMapError("this node has no shard map yet")
            await asyncio.sleep(0.05)
            m, raw = self.cluster.current_map()
        new: ShardMap = await self.execute(self.coordinator.update(m, raw, change), end)
        return new

    async def execute(self, work: Work, deadline: float | None = None) -> Any:
        """Run `work`'s requests until it returns (its value) or raises. Past `deadline` (on
        `clock`), the work is abandoned between two requests (`ShardMapError`)."""
        stream: AsyncIterator[bytes] | None = None
        try:
            req = next(work)
            while True:
                if deadline is not None and self.clock() >= deadline:
                    work.close()
                    raise ShardMapError("shard map update did not complete in time")
                try:
                    outcome: Any
                    if isinstance(req, Propose):
                        outcome = await self.cluster.propose(req.group, req.data)
                    elif isinstance(req, ExportChunk):
                        if req.first or stream is None:
                            stream = self.cluster.export(req.group, req.ranges)
                        outcome = await anext(stream, None)
                    elif isinstance(req, WaitMap):
                        outcome = await self.cluster.wait_map(req.version, WAIT_MAP_TIMEOUT)
                    else:
                        raise TypeError(f"unknown request {req!r}")
                except Exception as err:
                    req = work.throw(err)
                    continue
                req = work.send(outcome)
        except StopIteration as stop:
            return stop.value
        finally:
            work.close()
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()
