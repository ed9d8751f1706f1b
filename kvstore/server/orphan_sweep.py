"""The node's orphan-attachment sweep driver (`kvstore/node/orphans.py` has the rules): every
`period` seconds (`--lease-orphan-sweep`) it steps an `OrphanSweep` per data group hosted here
with this node's monotonic clock and the term it leads the group in with a current view, sends
each probe's LEASE_STATUS to the lease's home (here when this node leads it, else through
`caller` at its leader) and proposes the LEASE_ORPHAN the sweep asks for in the group. A thin
shell: an answer that fails or does not decode is no answer (the keys are kept). While the
cluster version is below `version.LEVEL_LEASES_2` (the level of LEASE_STATUS and LEASE_ORPHAN) it
proposes nothing and logs that once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kvstore import errors
from kvstore.node.orphans import OrphanSweep, Probe, SweepParams, status_of
from kvstore.node.version import LEVEL_LEASES_2
from kvstore.storage import commands, leases
from kvstore.storage.commands import ApplyResult
from kvstore.storage.leases import LeaseCmd

from . import waiters
from .group_driver import GroupDriver
from .requests import KVRequests

log = logging.getLogger("kvstore.leases")

STEP_S = 0.5
"""How often (at most) the driver looks whether a pass is due (a pass itself runs every `period`)."""


class OrphanDriver(GroupDriver[OrphanSweep]):
    """The sweeps of the data groups this node leads (`states`: an `OrphanSweep` per hosted
    deletion group, `group_driver.GroupDriver`)."""

    def __init__(self, rq: KVRequests, caller: Any, period: float = 5.0,
                 cluster_version: Callable[[], int] | None = None) -> None:
        super().__init__(rq, min(STEP_S, period), "orphan sweep")
        self.caller = caller
        self.cluster_version = cluster_version
        """Reads the applied cluster version (the node sets it; None: this binary's level is
        assumed, and the host's `CommandGate` remains the line that refuses a proposal)."""
        self.waiting_logged = False
        self.params = SweepParams(period_ms=period * 1000, answer_timeout_ms=max(2 * period, 10.0) * 1000)

    @property
    def sweeps(self) -> dict[int, OrphanSweep]:
        """The sweep of each hosted deletion group."""
        return self.states

    def new_state(self, group: int) -> OrphanSweep:
        return OrphanSweep(group, self.params)

    def step(self) -> None:
        groups = self.deletion_groups()
        led = self.led(groups)
        cluster = LEVEL_LEASES_2 if self.cluster_version is None else self.cluster_version()
        if cluster < LEVEL_LEASES_2:
            if not self.waiting_logged:
                log.info("orphan sweep: waits for cluster version %d (it is %d)", LEVEL_LEASES_2, cluster)
                self.waiting_logged = True
        else:
            self.waiting_logged = False
        now = time.monotonic() * 1000
        for g, sw, term in led:
            for p in sw.step(now, term, self._page(g), cluster):
                self.spawn(self._probe(sw, p))

    def _page(self, g: int) -> Any:
        store = self.rq.store

        def read(after: int, limit: int) -> list[int]:
            out: list[int] = store.revisions.read_rows(g, lambda rows: leases.attached_page(rows, after, limit))
            return out
        return read

    async def _propose(self, group: int, c: LeaseCmd, revision: int = 0) -> ApplyResult | None:
        rq = self.rq
        data = commands.encode_command(commands.Command.lease_command(c, revision=revision))
        try:
            if group in rq.host.groups and rq.host.leads_current(group):
                return await waiters.propose(rq.host, rq.wake, group, data, rq.cfg.request_timeout)
            if self.caller is not None:
                res: ApplyResult = await self.caller.propose(group, data)
                return res
        except errors.KVError as err:
            log.debug("orphan sweep: %s to group %d failed: %s", c.kind.name, group, err)
        return None

    async def _probe(self, sw: OrphanSweep, p: Probe) -> None:
        res = await self._propose(p.home, p.command())
        status = None if res is None else status_of(res.found, res.error, res.current)
        cmd = sw.on_status(p, status)
        if cmd is None:
            return
        if not self.rq.host.leads_current(sw.group):
            sw.on_dropped(p.lease_id, False)
            return
        res = await self._propose(sw.group, cmd, self.rq.clock.propose(0))
        ok = res is not None and not res.error
        if res is not None and res.error and self.rq.cross is not None:
            self.rq.cross.locked_error(sw.group, res)  # an attached key holds an old intent: resolve it
        if ok:
            log.info("orphan sweep: group %d deleted %d keys of dead lease %x", sw.group,
                     int.from_bytes(res.current or b"", "big") if res is not None else 0, p.lease_id)
        sw.on_dropped(p.lease_id, ok)
