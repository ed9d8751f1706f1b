"""Nemeses: faults injected into the running cluster on a seeded schedule.

Families (``--nemesis`` takes a comma-separated list of them, or ``all``):

* ``partition``: iptables DROP in both directions between groups of hosts. Topologies:
  ``one`` (isolate a random node), ``leader`` (isolate the current leader), ``halves`` (a random
  minority from the majority), ``bridge`` (two halves joined by one node that sees both),
  ``random`` (every link cut with probability 1/2), ``ring`` (each node sees only its
  neighbours on a shuffled ring: everyone sees a majority, no two the same one; for fewer than
  5 nodes this is ``bridge``).
  On the ``local`` backend there is no way to cut traffic without root: the side that would be
  cut off (the isolated node, the minority) is paused with SIGSTOP instead.
* ``kill``: kill -9 one node, the leader, or a majority; restarted (same command, same data)
  when the fault ends.
* ``pause``: SIGSTOP one node or the leader; SIGCONT when the fault ends.
* ``transfer``: ask the leader to hand leadership to a random voter.
* ``member``: remove a voter (Admin.RemoveMember), stop it, start a NEW node (fresh id, empty
  data dir, ``--join``) on its host, add it as a learner, wait for it to catch up, promote it.
* ``replicas`` (not part of ``all``; for runs with read replicas): cut every read replica
  (learner host) off from every other node, while the clients still reach it. On the ``local``
  backend the replicas are paused instead.

The schedule alternates one fault and a healthy interval, and always ends with every fault
healed (partitions removed, paused nodes continued, killed nodes restarted, membership
restored to N voters) followed by a quiet period.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvstore.v1 import admin_pb2

from .cluster import Cluster

__all__ = ["ALL_FAMILIES", "FaultWindow", "Nemesis", "NemesisOptions", "parse_families"]

ALL_FAMILIES = ("partition", "kill", "pause", "transfer", "member")
EXTRA_FAMILIES = ("replicas",)
TOPOLOGIES = ("one", "leader", "halves", "bridge", "random", "ring")


def parse_families(spec: str) -> list[str]:
    out: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "all":
            out += [f for f in ALL_FAMILIES if f not in out]
        elif part == "none":
            continue
        elif part in ALL_FAMILIES or part in EXTRA_FAMILIES:
            if part not in out:
                out.append(part)
        else:
            families = ", ".join(ALL_FAMILIES + EXTRA_FAMILIES)
            raise ValueError(f"unknown nemesis {part!r} (families: {families}, all, none)")
    return out


@dataclass
class FaultWindow:
    family: str
    kind: str
    detail: str
    start: float
    end: float | None = None
    hosts: list[int] = field(default_factory=list)
    ok: bool = True
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NemesisOptions:
    families: list[str]
    fault_min: float = 3.0
    fault_max: float = 6.0
    heal_min: float = 2.0
    heal_max: float = 4.0
    seed: int = 0


class Nemesis:
    def __init__(
        self,
        cluster: Cluster,
        opts: NemesisOptions,
        now: Callable[[], float],
        log: Callable[[str], None] = print,
    ) -> None:
        self.cluster = cluster
        self.opts = opts
        self.now = now
        self.log = log
        self.rng = random.Random(opts.seed ^ 0x5EED)
        self.windows: list[FaultWindow] = []
        self.current: FaultWindow | None = None
        # what must be undone
        self._cut = False
        self._paused: set[int] = set()
        self._killed: set[int] = set()
        self._pending_member: int | None = None  # host whose replacement is not yet a voter

    # ----- helpers -----

    @property
    def hosts(self) -> list[int]:
        return sorted(self.cluster.hosts)

    async def _leader(self) -> int | None:
        return await self.cluster.leader()

    async def _leader_or_random(self) -> tuple[int, str]:
        ld = await self._leader()
        if ld is not None:
            return ld, "leader"
        return self.rng.choice(self.hosts), "random (no leader known)"

    def _begin(self, family: str, kind: str, detail: str, hosts: list[int]) -> FaultWindow:
        w = FaultWindow(family, kind, detail, self.now(), hosts=hosts)
        self.windows.append(w)
        self.current = w
        self.log(f"nemesis: {family} {kind}: {detail}")
        return w

    def _end(self, w: FaultWindow) -> None:
        w.end = self.now()
        self.current = None

    # ----- the schedule -----

    async def run(self, until: float, stop: asyncio.Event) -> None:
        """Inject faults until the run clock reaches ``until`` (or ``stop`` is set), each one
        healed before the next; then heal everything."""
        if not self.opts.families:
            return
        try:
            deck: list[str] = []
            while not stop.is_set() and self.now() < until:
                if not deck:  # every family in turn, in a shuffled order
                    deck = list(self.opts.families)
                    self.rng.shuffle(deck)
                family = deck.pop()
                duration = self.rng.uniform(self.opts.fault_min, self.opts.fault_max)
                duration = min(duration, max(0.5, until - self.now()))
                await self._one(family, duration, stop)
                gap = self.rng.uniform(self.opts.heal_min, self.opts.heal_max)
                if self.now() + gap >= until:
                    break
                await _sleep(gap, stop)
        finally:
            await self.heal_all()

    async def _one(self, family: str, duration: float, stop: asyncio.Event) -> None:
        if family == "partition":
            await self._partition(duration, stop)
        elif family == "kill":
            await self._kill(duration, stop)
        elif family == "pause":
            await self._pause(duration, stop)
        elif family == "transfer":
            await self._transfer()
        elif family == "member":
            await self._member()
        elif family == "replicas":
            await self._replicas(duration, stop)
        else:  # pragma: no cover - parse_families validates
            raise ValueError(family)

    # ----- partitions -----

    def _topology(self, kind: str, leader: int | None) -> tuple[list[list[int]], set[tuple[int, int]], str]:
        """Groups, the links to cut, and a description."""
        hosts = list(self.hosts)
        n = len(hosts)
        rng = self.rng
        if kind in ("one", "leader"):
            lone = leader if kind == "leader" and leader is not None else rng.choice(hosts)
            rest = [h for h in hosts if h != lone]
            groups = [[lone], rest]
        elif kind == "halves":
            rng.shuffle(hosts)
            groups = [sorted(hosts[: n // 2]), sorted(hosts[n // 2 :])]
        elif kind == "bridge" or (kind == "ring" and n < 5):
            rng.shuffle(hosts)
            a, b, c = hosts[: (n - 1) // 2], hosts[(n - 1) // 2], hosts[(n - 1) // 2 + 1 :]
            cuts = {(x, y) for x in a for y in c}
            return [sorted(a), [b], sorted(c)], cuts, f"bridge {sorted(a)} <-> {b} <-> {sorted(c)}"
        elif kind == "ring":
            rng.shuffle(hosts)
            reach = n // 4
            cuts = set()
            for i, j in itertools.combinations(range(n), 2):
                d = min(abs(i - j), n - abs(i - j))
                if d > reach:
                    cuts.add((hosts[i], hosts[j]))
            return [hosts], cuts, f"ring {hosts} (each node sees its neighbours)"
        elif kind == "random":
            pairs = list(itertools.combinations(hosts, 2))
            cuts = set()
            while not cuts:
                cuts = {p for p in pairs if rng.random() < 0.5}
            return [hosts], cuts, "random cuts " + " ".join(f"{a}-x-{b}" for a, b in sorted(cuts))
        else:
            raise ValueError(kind)
        cuts = {(x, y) for x in groups[0] for y in groups[1]}
        return groups, cuts, " | ".join(str(g) for g in groups)

    async def _partition(self, duration: float, stop: asyncio.Event) -> None:
        kind = self.rng.choice(TOPOLOGIES)
        leader = await self._leader() if kind == "leader" else None
        groups, cuts, detail = self._topology(kind, leader)
        if self.cluster.backend.supports_partitions:
            w = self._begin("partition", kind, detail, sorted({h for c in cuts for h in c}))
            self._cut = True
            try:
                await asyncio.to_thread(self.cluster.backend.partition, cuts)
            except Exception as err:
                w.ok = False
                w.notes.append(f"partition failed: {err}")
                self.log(f"nemesis: partition failed: {err}")
            await _sleep(duration, stop)
            await asyncio.to_thread(self.cluster.backend.heal)
            self._cut = False
            self._end(w)
            self.log("nemesis: healed partition")
            return
        # local backend: pause the side that would be cut off
        if kind in ("one", "leader"):
            side = groups[0]
        elif kind in ("halves", "bridge") or (kind == "ring" and len(self.hosts) < 5):
            side = min((g for g in groups if len(g) > 0), key=len)
        else:
            side = sorted(self.rng.sample(self.hosts, len(self.hosts) // 2))
        w = self._begin("partition", kind, f"{detail} (emulated: pause {side})", side)
        for h in side:
            self.cluster.pause(h)
            self._paused.add(h)
        await _sleep(duration, stop)
        for h in side:
            self.cluster.resume(h)
            self._paused.discard(h)
        self._end(w)

    async def _replicas(self, duration: float, stop: asyncio.Event) -> None:
        learners = list(getattr(self.cluster, "learner_hosts", []))
        if not learners:
            self.log("nemesis: replicas skipped (the run has no read replicas)")
            return
        cuts = {(a, b) for a in learners for b in self.hosts if b != a}
        if self.cluster.backend.supports_partitions:
            w = self._begin("replicas", "isolate", f"read replicas {learners} cut off from every other node", learners)
            self._cut = True
            try:
                await asyncio.to_thread(self.cluster.backend.partition, cuts)
            except Exception as err:
                w.ok = False
                w.notes.append(f"partition failed: {err}")
                self.log(f"nemesis: partition failed: {err}")
            await _sleep(duration, stop)
            await asyncio.to_thread(self.cluster.backend.heal)
            self._cut = False
            self._end(w)
            self.log("nemesis: healed partition")
            return
        w = self._begin("replicas", "isolate", f"read replicas {learners} (emulated: pause them)", learners)
        for h in learners:
            self.cluster.pause(h)
            self._paused.add(h)
        await _sleep(duration, stop)
        for h in learners:
            self.cluster.resume(h)
            self._paused.discard(h)
        self._end(w)

    # ----- kill / pause -----

    async def _kill(self, duration: float, stop: asyncio.Event) -> None:
        kind = self.rng.choice(("one", "leader", "majority"))
        alive = [h for h in self.hosts if self.cluster.hosts[h].alive]
        if not alive:
            return
        if kind == "leader":
            h, how = await self._leader_or_random()
            victims, detail = [h], f"host {h} ({how})"
        elif kind == "majority":
            voters = self.cluster.voter_hosts
            victims = sorted(self.rng.sample(voters, len(voters) // 2 + 1))
            detail = f"hosts {victims}"
        else:
            victims = [self.rng.choice(alive)]
            detail = f"host {victims[0]}"
        ids = [self.cluster.hosts[h].node_id for h in victims]
        w = self._begin("kill", kind, f"{detail}, node ids {ids}", victims)
        for h in victims:
            self.cluster.kill(h)
            self._killed.add(h)
        await _sleep(duration, stop)
        for h in victims:
            self.cluster.start(h)
            self._killed.discard(h)
        self._end(w)
        self.log(f"nemesis: restarted {victims}")

    async def _pause(self, duration: float, stop: asyncio.Event) -> None:
        kind = self.rng.choice(("one", "leader"))
        if kind == "leader":
            h, how = await self._leader_or_random()
            detail = f"host {h} ({how})"
        else:
            h = self.rng.choice(self.hosts)
            detail = f"host {h}"
        w = self._begin("pause", kind, detail, [h])
        self.cluster.pause(h)
        self._paused.add(h)
        await _sleep(duration, stop)
        self.cluster.resume(h)
        self._paused.discard(h)
        self._end(w)

    # ----- leadership and membership -----

    async def _admin_at_leader(self, call: Callable[[Any], Any], timeout: float = 8.0) -> Any:
        """Run ``call(stub)`` at the current leader; retries NOT_LEADER-ish failures until
        ``timeout``. Returns the last response (or raises the last exception)."""
        import grpc

        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            ld = await self._leader()
            if ld is None:
                await asyncio.sleep(0.2)
                continue
            stub = self.cluster._admin(self.cluster.hosts[ld].address)
            try:
                last = await call(stub)
            except grpc.aio.AioRpcError as err:
                last = err
                await asyncio.sleep(0.2)
                continue
            if last.error.code in (1, 2, 9):  # NOT_LEADER, NO_LEADER, PROPOSAL_DROPPED
                await asyncio.sleep(0.2)
                continue
            return last
        if isinstance(last, Exception):
            raise last
        return last

    async def _transfer(self) -> None:
        st = await self.cluster.statuses()
        ld = await self._leader()
        if ld is None or ld not in st:
            self.log("nemesis: transfer skipped (no leader)")
            return
        voters = [v for v in st[ld].groups[0].voters if v != self.cluster.hosts[ld].node_id]
        if not voters:
            return
        to = self.rng.choice(sorted(voters))
        w = self._begin("transfer", "leader", f"node {self.cluster.hosts[ld].node_id} -> node {to}", [ld])
        try:
            resp = await self.cluster._admin(self.cluster.hosts[ld].address).TransferLeader(
                admin_pb2.TransferLeaderRequest(to=to), timeout=8
            )
            note = resp.error.message if resp.error.code else resp.message
        except Exception as err:
            note = f"{type(err).__name__}: {err}"
        w.notes.append(note)
        self.log(f"nemesis: transfer: {note}")
        self._end(w)

    async def _voters(self) -> list[int] | None:
        ld = await self._leader()
        if ld is None:
            return None
        st = await self.cluster.status(ld)
        if st is None or not st.groups:
            return None
        return sorted(st.groups[0].voters)

    async def _member(self) -> None:
        if self._pending_member is not None:
            w = self._begin("member", "re-add", f"finish adding the node on host {self._pending_member}",
                            [self._pending_member])
            await self._finish_member(w)
            self._end(w)
            return
        voters = await self._voters()
        if voters is None or len(voters) < len(self.cluster.voter_hosts):
            self.log("nemesis: member change skipped (no leader or not all voters present)")
            return
        victim_id = self.rng.choice(voters)
        host = self.cluster.host_of_id(victim_id)
        if host is None:
            return
        w = self._begin("member", "replace", f"remove node {victim_id} (host {host}), re-add as a new id", [host])
        try:
            resp = await self._admin_at_leader(
                lambda s: s.RemoveMember(admin_pb2.RemoveMemberRequest(id=victim_id), timeout=8)
            )
        except Exception as err:
            resp = None
            w.notes.append(f"remove failed: {type(err).__name__}: {err}")
        if resp is not None and resp.error.code:
            w.notes.append(f"remove: {resp.error.message}")
        voters_after = await self._voters_eventually(lambda v: victim_id not in v)
        if voters_after is None:
            w.ok = False
            w.notes.append(f"node {victim_id} still a voter; not replaced")
            self.log(f"nemesis: member: node {victim_id} was not removed")
            self._end(w)
            return
        self.cluster.hosts[host].member = False
        self.cluster.terminate(host)
        peers = {
            nh.node_id: nh.address for h, nh in self.cluster.hosts.items() if nh.node_id in voters_after
        }
        nh = self.cluster.replace(host, peers)
        self.cluster.start(host)
        self._pending_member = host
        self.log(f"nemesis: member: removed node {victim_id}; started node {nh.node_id} on host {host}")
        await self._finish_member(w)
        self._end(w)

    async def _voters_eventually(self, pred: Callable[[list[int]], bool], timeout: float = 8.0) -> list[int] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = await self._voters()
            if v is not None and pred(v):
                return v
            await asyncio.sleep(0.2)
        return None

    async def _finish_member(self, w: FaultWindow, timeout: float = 25.0) -> bool:
        """Add the pending host's node as a learner, wait for it to catch up, promote it."""
        host = self._pending_member
        if host is None:
            return True
        nh = self.cluster.hosts[host]
        if not nh.alive:
            self.cluster.start(host)
        deadline = time.monotonic() + timeout
        voters = await self._voters_eventually(lambda v: True, timeout=max(1.0, deadline - time.monotonic()))
        if voters is not None and nh.node_id in voters:
            self._pending_member = None
            nh.member = True
            return True
        # 1. learner
        ld = await self._leader()
        st = await self.cluster.status(ld) if ld is not None else None
        learners = list(st.groups[0].learners) if st is not None and st.groups else []
        if nh.node_id not in learners:
            try:
                resp = await self._admin_at_leader(
                    lambda s: s.AddMember(
                        admin_pb2.AddMemberRequest(id=nh.node_id, address=nh.address, learner=True), timeout=8
                    ),
                    timeout=max(1.0, deadline - time.monotonic()),
                )
                if resp is not None and resp.error.code:
                    w.notes.append(f"add learner: {resp.error.message}")
            except Exception as err:
                w.notes.append(f"add learner failed: {type(err).__name__}: {err}")
        # 2. catch up
        while time.monotonic() < deadline:
            ld = await self._leader()
            lst = await self.cluster.status(ld) if ld is not None else None
            mine = await self.cluster.status(host)
            if lst is not None and mine is not None and mine.groups and lst.groups:
                if nh.node_id in lst.groups[0].voters:
                    break
                if nh.node_id in lst.groups[0].learners and mine.groups[0].applied + 5 >= lst.groups[0].commit:
                    try:
                        resp = await self._admin_at_leader(
                            lambda s: s.PromoteMember(admin_pb2.PromoteMemberRequest(id=nh.node_id), timeout=8),
                            timeout=max(1.0, deadline - time.monotonic()),
                        )
                        if resp is not None and resp.error.code:
                            w.notes.append(f"promote: {resp.error.message}")
                    except Exception as err:
                        w.notes.append(f"promote failed: {type(err).__name__}: {err}")
            await asyncio.sleep(0.3)
        voters = await self._voters()
        if voters is not None and nh.node_id in voters:
            self._pending_member = None
            nh.member = True
            self.log(f"nemesis: member: node {nh.node_id} is a voter")
            return True
        w.ok = False
        w.notes.append(f"node {nh.node_id} not promoted in time")
        self.log(f"nemesis: member: node {nh.node_id} not a voter yet (will retry)")
        return False

    # ----- heal -----

    async def heal_all(self) -> None:
        """Undo every fault: remove partitions, continue paused nodes, restart killed ones, and
        bring the membership back to N voters."""
        if self.current is not None:
            self._end(self.current)
        w = FaultWindow("heal", "all", "heal everything", self.now())
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.cluster.backend.heal)
        self._cut = False
        for h in sorted(self.hosts):
            self.cluster.resume(h)
        self._paused.clear()
        for h in sorted(self._killed):
            self.cluster.start(h)
        self._killed.clear()
        for h in self.hosts:
            nh = self.cluster.hosts[h]
            if not nh.alive and h != self._pending_member:
                code = nh.proc.returncode if nh.proc is not None else None
                w.notes.append(f"node {nh.node_id} on host {h} was not running (exit code {code}); restarted")
                self.log(f"nemesis: node {nh.node_id} was not running (exit code {code})")
                self.cluster.start(h)
        if self._pending_member is not None:
            for _ in range(2):
                if await self._finish_member(w):
                    break
        w.end = self.now()
        if w.notes:
            self.windows.append(w)
        self.log("nemesis: healed everything")


async def _sleep(seconds: float, stop: asyncio.Event) -> None:
    if seconds <= 0:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
