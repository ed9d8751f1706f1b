"""The per-group-leader driver both lease-side loops run on: the lease clocks
(`lease_service.LeaseDriver`) and the orphan sweep (`orphan_sweep.OrphanDriver`).

What it owns: one state machine per data group that takes part in lease deletion
(`lessor.deletion_groups` of the shard map) and is hosted on this node, created on first sight
and dropped as soon as the group is no longer hosted here or no longer such a data group (a move
dropped it); the term each is stepped with (the group's term where this node leads it with a
current view, else 0: the state machine proposes nothing then); the tasks its steps start; and
the loop that steps it every `interval` seconds. A subclass says how to make a group's state
(`new_state`) and what one pass does (`step`, synchronous: it only reads and starts tasks).

Invariants: `states` is one dict for the driver's life (others may hold it: `LeaseRequests`
reads the lessors), its keys a subset of the hosted deletion groups after every `led` call; a
started task is referenced until it ends (asyncio keeps only weak references); a step that
raises is logged and the loop goes on (a bug must not stop the lease clocks)."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

from kvstore.node import lessor as lessor_logic

from .requests import KVRequests

log = logging.getLogger("kvstore.leases")

S = TypeVar("S")


class GroupDriver(abc.ABC, Generic[S]):
    """A state machine `S` per hosted deletion group, stepped every `interval` seconds by `run`;
    `what` names the driver in its logs."""

    def __init__(self, rq: KVRequests, interval: float, what: str) -> None:
        self.rq = rq
        self.interval = interval
        self.what = what
        self.states: dict[int, S] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @abc.abstractmethod
    def new_state(self, group: int) -> S:
        """The state machine of `group`, made when the group is first seen hosted here."""

    @abc.abstractmethod
    def step(self) -> None:
        """One pass: synchronous; it may start tasks (`spawn`), never wait on them."""

    def after_step(self) -> None:
        """Runs after each successful `step` of `run` (metrics); nothing by default."""

    def deletion_groups(self) -> list[int]:
        """The data groups of the current shard map that take part in lease deletion (none
        before this node has a map)."""
        smap = self.rq.tracker.map
        return lessor_logic.deletion_groups(smap.data_groups()) if smap is not None else []

    def led(self, groups: list[int]) -> list[tuple[int, S, int]]:
        """Drops the states of groups no longer hosted here or no longer in `groups`; returns
        (group, state, term) for each of `groups` hosted here, in `groups`' order, making the
        states it lacks; term: the group's term where this node leads it with a current view,
        else 0."""
        host = self.rq.host
        for g in [g for g in self.states if g not in host.groups or g not in groups]:
            del self.states[g]
        out: list[tuple[int, S, int]] = []
        for g in groups:
            if g not in host.groups:
                continue
            st = self.states.get(g)
            if st is None:
                st = self.states[g] = self.new_state(g)
            out.append((g, st, host.groups[g].core.term if host.leads_current(g) else 0))
        return out

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Starts `coro` on the running loop and keeps it referenced until it ends."""
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Steps forever, every `interval` seconds; a step that raises is logged (a bug)."""
        while True:
            try:
                self.step()
                self.after_step()
            except Exception as err:  # a bug: logged, the loop goes on
                log.error("%s step failed: %s: %s", self.what, type(err).__name__, err, exc_info=err)
            await asyncio.sleep(self.interval)
