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
* ``rebalance`` (not part of ``all``; meant for clusters started with ``--groups N``): change
  the shard layout through the Shard service (``ShardOp`` ADD_GROUP, REMOVE_GROUP of a random
  data group but never the last one, or REBALANCE, with ``wait=False``) on any reachable node
  (the metadata leader first), record how many range moves it planned, and overlap those moves
  with a partition, a kill (or a pause, if that family is enabled) injected exactly as those
  nemeses do, their "leader" variants aimed at the metadata group's leader (which runs the
  move coordinator). Faults otherwise come one at a time, so the overlap is built in, in one
  of two seeded orders: *plan, then fault* (the fault hits 0-0.3 s after the plan, while its
  moves run) or *fault, then plan* (the change is planned 1-2 s into the fault, so its moves
  start under it). The change's window ends when that fault is healed; a change refused
  because earlier moves are still running is noted, and the fault is injected anyway.
* ``replicas`` (not part of ``all``; for runs with read replicas): cut every read replica
  (learner host) off from every other node, while the clients still reach it. On the ``local``
  backend the replicas are paused instead.

* ``forge`` (alias ``garbage``; part of ``all``): forged inter-node traffic as non-member
  node 99 and malformed traffic under member ids (:mod:`chaos.forge`) to every live node for the
  window; the nodes' ``kvstore_inbound_refused_total`` is scraped before and after, and every
  node must still be alive and answering afterwards (``info``: what was sent, the status codes
  seen, the refusals by reason, the health check). On a TLS run the forger also holds
  certificates (none, a client's, a node's claiming another node, another CA's) and every
  forged call must be refused at the handshake or with PERMISSION_DENIED.

The schedule alternates one fault and a healthy interval, and always ends with every fault
healed (partitions removed, paused nodes continued, killed nodes restarted, membership
restored to N voters) followed by a quiet period. :meth:`Nemesis.wait_moves_settled` then
checks (bounded) that every planned range move finished: a liveness check, judged apart from
linearizability.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import grpc.aio

from kvstore.client import group_status
from kvstore.security.net import host_of
from kvstore.v1 import admin_pb2, shard_pb2, shard_pb2_grpc

from . import forge as forgery
from .cluster import Cluster
from .pki import FORGER_USER


def _g(st: admin_pb2.StatusResponse) -> admin_pb2.GroupStatus:
    """The data group's status (empty if the node does not have it yet)."""
    return group_status(st) or admin_pb2.GroupStatus()

__all__ = ["ALL_FAMILIES", "EXTRA_FAMILIES", "FAMILIES", "FaultWindow", "Nemesis", "NemesisOptions",
           "parse_families"]

ALL_FAMILIES = ("partition", "kill", "pause", "transfer", "member", "forge")
#: Families that ``all`` does not include (they change what a run does beyond faults).
EXTRA_FAMILIES = ("rebalance", "replicas")
#: Other names of families.
ALIASES = {"garbage": "forge"}
FAMILIES = (*ALL_FAMILIES, *EXTRA_FAMILIES)
TOPOLOGIES = ("one", "leader", "halves", "bridge", "random", "ring")
#: Faults the rebalance nemesis injects while its range moves run (those enabled, else the first two).
REBALANCE_COMPANIONS = ("partition", "kill", "pause")
META_GROUP = 0


def parse_families(spec: str) -> list[str]:
    out: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part = ALIASES.get(part, part)
        if part == "all":
            out += [f for f in ALL_FAMILIES if f not in out]
        elif part == "none":
            continue
        elif part in FAMILIES:
            if part not in out:
                out.append(part)
        else:
            raise ValueError(f"unknown nemesis {part!r} (families: {', '.join(FAMILIES)}, all, none; "
                             f"aliases: {', '.join(f'{a}={f}' for a, f in ALIASES.items())})")
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
    info: dict[str, Any] = field(default_factory=dict)  # structured details (rebalance: the plan)

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
    max_groups: int = 6  # rebalance: add data groups only while there are fewer
    companion_delay: float = 0.3  # rebalance: at most this long between the plan and the fault


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
        self._meta_leader_first = False  # "leader" faults aim at the metadata group's leader
        self._ring_uneven = False  # a group was removed since the last rebalance

    # ----- helpers -----

    @property
    def hosts(self) -> list[int]:
        return sorted(self.cluster.hosts)

    async def _leader(self) -> int | None:
        if self._meta_leader_first:
            ld = await self._group_leader(META_GROUP)
            if ld is not None:
                return ld
        ld = await self.cluster.leader()
        if ld is None and "rebalance" in self.opts.families:
            # the cluster's leader is group 1's, which the rebalance nemesis may have removed
            ld = await self._group_leader(META_GROUP)
        return ld

    async def _group_leader(self, group: int) -> int | None:
        """The host of the node that claims leadership of ``group`` in the highest term."""
        best: tuple[int, int] | None = None
        for h, st in (await self.cluster.statuses()).items():
            g = group_status(st, group)
            if g is not None and g.role == "leader" and (best is None or g.term > best[0]):
                best = (g.term, h)
        return best[1] if best is not None else None

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
        elif family == "rebalance":
            await self._rebalance(duration, stop)
        elif family == "replicas":
            await self._replicas(duration, stop)
        elif family == "forge":
            await self._forge(duration, stop)
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

    # ----- forged and malformed inter-node traffic -----

    async def _forge(self, duration: float, stop: asyncio.Event) -> None:
        """Send forged traffic as a non-member and malformed traffic under member ids
        (:mod:`chaos.forge`) to every live node for ``duration``; then check that every node is
        alive and answers. ``info`` gets what was sent, the status codes seen, the nodes'
        refusal counters (their increase over the window, by reason) and the health check."""
        live = self._reachable()
        sts = await self.cluster.statuses()
        targets = [
            forgery.Target(h, self.cluster.hosts[h].node_id, self.cluster.hosts[h].address,
                           tuple(forgery.GroupView(g.group, g.term, g.last_index, g.commit) for g in sts[h].groups))
            for h in live if h in sts
        ]
        if not targets:
            self.log("nemesis: forge skipped (no node answers)")
            return
        members = sorted(nh.node_id for nh in self.cluster.hosts.values() if nh.member)
        w = self._begin("forge", "outsider+malformed",
                        f"forged traffic as node {forgery.OUTSIDER} and malformed traffic under member ids "
                        f"{members} to hosts {[t.host for t in targets]}", [t.host for t in targets])
        before = {t.host: await self.cluster.refused(t.host) for t in targets}
        terms_before = {t.host: {g.group: g.term for g in t.groups} for t in targets}
        stats = forgery.ForgeStats()
        job = asyncio.ensure_future(forgery.forge(
            targets, members, self.cluster.cluster_id, duration=duration, keys=self.forge_keys(),
            seed=self.rng.randrange(1 << 30), stats=stats, tls=self._forge_tls()))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([job, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not job.done():
                job.cancel()
            with contextlib.suppress(BaseException):
                await job
        w.info.update(stats.to_info())
        # the nodes: every one alive, answering, and counting what it refused
        refused: dict[str, float] = {}
        scraped = 0
        for t in targets:
            after = await self.cluster.refused(t.host)
            if after is None:
                continue
            scraped += 1
            prev = before.get(t.host) or {}
            for reason, v in after.items():
                d = v - prev.get(reason, 0.0) if v >= prev.get(reason, 0.0) else v  # restarted: count anew
                if d:
                    refused[reason] = refused.get(reason, 0) + int(d)
        w.info.update(refused=dict(sorted(refused.items())), refused_total=sum(refused.values()),
                      nodes_scraped=scraped)
        dead, silent = await self._check_nodes([t.host for t in targets])
        sts_after = await self.cluster.statuses()
        w.info.update(nodes_dead=dead, nodes_unresponsive=silent, terms_before=terms_before,
                      terms_after={h: {g.group: g.term for g in st.groups} for h, st in sts_after.items()})
        if stats.not_refused:
            w.ok = False
            w.notes.append(f"{stats.not_refused} forged call(s) over TLS were not refused: "
                           f"{stats.not_refused_detail[:3]}")
        if stats.accepted_from_outsider:
            w.ok = False
            w.notes.append(f"{stats.accepted_from_outsider} call(s) from non-member node {forgery.OUTSIDER} were "
                           f"not refused: {stats.accepted_detail[:3]}")
        if dead or silent:
            w.ok = False
            w.notes.append(f"after forged traffic: nodes dead on hosts {dead}, not answering on hosts {silent}")
        w.notes.append(f"{w.info['forged_messages']} forged message(s) in {stats.rpcs} RPC(s); non-member "
                       f"codes {w.info['outsider_codes']}, member-id codes {w.info['member_codes']}; "
                       + (f"TLS refusals {w.info['tls_refused']} ({w.info['handshakes_failed']} failed "
                          f"handshakes); " if stats.tls else "")
                       + f"refused on the nodes: {w.info['refused']}")
        self._end(w)
        self.log(f"nemesis: forge: {w.notes[-1]}")

    def _forge_tls(self) -> forgery.ForgeTls | None:
        """What the forger holds on a TLS run: the run's CA certificate, a client certificate
        of its own, every node certificate the run made (and node 99's), and another CA's."""
        pki = self.cluster.tls
        if pki is None:
            return None

        def host(node_id: int) -> str:
            h = self.cluster.host_of_id(node_id)
            return host_of(self.cluster.hosts[h].address) if h is not None else "127.0.0.1"

        return forgery.ForgeTls(
            ca_only=pki.ca_only(), client=pki.client(FORGER_USER), other_client=pki.other_client(),
            node=lambda nid: pki.node(nid, host(nid)), other_node=lambda nid: pki.other_node(nid, host(nid)),
        )

    def forge_keys(self) -> list[bytes]:
        """Keys whose forged PUTs a read would show (the workload's key space, roughly)."""
        return [f"r/{i}".encode() for i in range(200)] + [b"b/0"] + [f"s/{i}".encode() for i in range(4)]

    async def _check_nodes(self, hosts: list[int], timeout: float = 8.0) -> tuple[list[int], list[int]]:
        """Hosts whose node process died, and hosts whose node does not answer Status within
        ``timeout`` (wedged)."""
        dead = [h for h in hosts if not self.cluster.hosts[h].alive]
        pending = [h for h in hosts if h not in dead]
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            answers = await asyncio.gather(*(self.cluster.status(h, timeout=1.0) for h in pending))
            pending = [h for h, a in zip(pending, answers, strict=True) if a is None]
            if pending:
                await asyncio.sleep(0.3)
        dead += [h for h in pending if not self.cluster.hosts[h].alive]
        return sorted(dead), sorted(h for h in pending if h not in dead)

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
        voters = [v for v in _g(st[ld]).voters if v != self.cluster.hosts[ld].node_id]
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
        return sorted(_g(st).voters)

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
        learners = list(_g(st).learners) if st is not None else []
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
                if nh.node_id in _g(lst).voters:
                    break
                if nh.node_id in _g(lst).learners and _g(mine).applied + 5 >= _g(lst).commit:
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


    # ----- shard layout (range moves) -----

    def _reachable(self) -> list[int]:
        return [h for h in self.hosts if self.cluster.hosts[h].alive and not self.cluster.hosts[h].paused]

    def _shard_stub(self, host: int) -> shard_pb2_grpc.ShardStub:
        """A Shard stub on the cluster's (admin) channel to ``host``: closed with the cluster."""
        return shard_pb2_grpc.ShardStub(self.cluster.channel(self.cluster.hosts[host].address))

    async def _shard_info_at(self, host: int, timeout: float = 4.0) -> shard_pb2.ShardOpResponse | None:
        try:
            resp: shard_pb2.ShardOpResponse = await self._shard_stub(host).ShardOp(
                shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.INFO), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return None
        return None if resp.error.code else resp

    async def shard_infos(self, timeout: float = 4.0) -> dict[int, shard_pb2.ShardOpResponse]:
        """ShardOp INFO from every reachable node that answers (each node's view of the map)."""
        hosts = self._reachable()
        answers = await asyncio.gather(*(self._shard_info_at(h, timeout) for h in hosts))
        return {h: a for h, a in zip(hosts, answers, strict=True) if a is not None}

    async def _shard_op(
        self, request: shard_pb2.ShardOpRequest, timeout: float = 10.0
    ) -> tuple[int | None, shard_pb2.ShardOpResponse | None, str]:
        """Send a layout change to the first reachable node that takes it. Another node is tried
        only when the change certainly did not happen there (connection refused / no map yet).
        Returns (host, response or None, note)."""
        hosts = self._reachable()
        self.rng.shuffle(hosts)
        meta = await self._group_leader(META_GROUP)
        if meta in hosts:  # the metadata leader first: a node cut off from it would time out
            hosts.remove(meta)
            hosts.insert(0, meta)
        note = "no node reachable"
        for h in hosts:
            try:
                resp: shard_pb2.ShardOpResponse = await self._shard_stub(h).ShardOp(request, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                note = f"host {h}: {err.code().name}: {err.details()}"
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    continue
                return h, None, note + " (indeterminate: the change may have happened)"
            if resp.error.code == 2 and "no shard map" in resp.error.message:  # NO_LEADER, definite
                note = f"host {h}: {resp.error.message}"
                continue
            return h, resp, resp.error.message if resp.error.code else resp.message
        return None, None, note

    def _choose_change(self, groups: list[int]) -> tuple[str, int]:
        """add / remove (a random data group, never the last) / rebalance; the group to remove."""
        options = (["add"] if len(groups) < self.opts.max_groups else []) + (["remove"] if len(groups) > 1 else [])
        if self._ring_uneven:  # a removal spread its ring points unevenly: rebalancing moves ranges
            options.append("rebalance")
        if options and self.rng.random() < 0.9:  # otherwise a rebalance may well have nothing to move
            kind = self.rng.choice(options)
            return kind, self.rng.choice(groups) if kind == "remove" else 0
        return "rebalance", 0

    async def _rebalance(self, duration: float, stop: asyncio.Event) -> None:
        """A layout change (range moves, not awaited) overlapping a partition / kill / pause, in
        one of two orders (seeded): *plan, then fault* (the fault comes 0..companion_delay s after
        the plan, while its moves run) or *fault, then plan* (the change is planned, through the
        metadata leader if one is known, 1-2 s into the fault so that a cut-off leader has been
        replaced, so its moves start under it). The change's window ends when the fault is
        healed."""
        infos = await self.shard_infos()
        view = max(infos.values(), key=lambda r: r.version) if infos else None
        groups = sorted(g.id for g in view.groups) if view is not None else []
        kind, victim = self._choose_change(groups) if view is not None else ("rebalance", 0)
        Op = shard_pb2.ShardOpRequest
        if kind == "add":
            req, detail = Op(op=Op.ADD_GROUP, wait=False), f"add a data group to {groups}"
        elif kind == "remove":
            req, detail = Op(op=Op.REMOVE_GROUP, group=victim, wait=False), f"remove group {victim} of {groups}"
        else:
            req, detail = Op(op=Op.REBALANCE, wait=False), f"rebalance groups {groups}"
        companions = [f for f in REBALANCE_COMPANIONS if f in self.opts.families] or ["partition", "kill"]
        companion = self.rng.choice(companions)
        order = self.rng.choice(("plan-then-fault", "fault-then-plan"))
        w = self._begin("rebalance", kind, f"{detail}; {companion} ({order.replace('-', ' ')})", [])
        w.info.update(groups_before=groups, version_before=view.version if view is not None else None,
                      pending_before=view.moves_pending if view is not None else None,
                      companion=companion, order=order)
        fault: asyncio.Future[None] | None = None
        self._meta_leader_first = True  # "leader" faults hit the node that drives the moves
        try:
            if order == "fault-then-plan":
                n0 = len(self.windows)
                fault = asyncio.ensure_future(self._one(companion, duration, stop))
                t_end = time.monotonic() + 5.0
                while not fault.done() and len(self.windows) == n0 and time.monotonic() < t_end:
                    await asyncio.sleep(0.05)
                # the fault is in effect, and a cut-off metadata leader has been replaced
                await _sleep(self.rng.uniform(1.0, 2.0), stop)
                if stop.is_set():
                    return
                planned = await self._plan(w, req)
                if planned is not None and not fault.done():
                    w.info["moves_during_fault"] = planned
                await fault
            else:
                planned = await self._plan(w, req)
                await _sleep(self.rng.uniform(0.0, self.opts.companion_delay), stop)
                if stop.is_set():
                    return
                if w.hosts and planned:  # how many of the moves are still to run as the fault hits
                    at = await self._shard_info_at(w.hosts[0], timeout=1.0)
                    if at is not None:
                        w.info["pending_at_fault"] = w.info["moves_during_fault"] = at.moves_pending
                await self._one(companion, duration, stop)
            after = await self.shard_infos()
            if after:
                latest = max(after.values(), key=lambda r: r.version)
                w.info.update(pending_at_heal=latest.moves_pending, version_at_heal=latest.version)
                w.notes.append(f"{companion} {order.replace('-', ' ')}: {w.info.get('moves_during_fault', 0)} move(s) "
                               f"in flight under the fault; {latest.moves_pending} pending when it healed "
                               f"(map version {latest.version})")
            else:
                w.notes.append(f"{companion} {order.replace('-', ' ')}; no node answered INFO after it")
        finally:
            self._meta_leader_first = False
            if fault is not None and not fault.done():
                fault.cancel()  # heal_all undoes what it did
                with contextlib.suppress(BaseException):
                    await fault
            w.end = self.now()
            if self.current is w:
                self.current = None

    async def _plan(self, w: FaultWindow, req: shard_pb2.ShardOpRequest) -> int | None:
        """Send the layout change; record the outcome in ``w``; the number of planned moves."""
        host, resp, note = await self._shard_op(req)
        if host is not None:
            w.hosts = [host]
        if resp is not None and not resp.error.code:
            m = re.search(r"(\d+) range moves planned", resp.message)
            planned = int(m.group(1)) if m else resp.moves_pending
            w.info.update(planned_moves=planned, version=resp.version)
            w.notes.append(f"{note} (via host {host})")
            if req.op in (req.REMOVE_GROUP, req.REBALANCE):
                self._ring_uneven = req.op == req.REMOVE_GROUP
            self.log(f"nemesis: rebalance: {note}")
            return planned
        w.ok = False
        w.info.update(planned_moves=None, error=note)
        w.notes.append(f"not planned: {note}")
        self.log(f"nemesis: rebalance: not planned: {note}")
        return None

    async def wait_moves_settled(self, timeout: float) -> dict[str, Any]:
        """After the heal: poll ShardOp INFO on every reachable node until the newest map any of
        them has shows no range move pending and no group waiting to be dropped, or until
        ``timeout``. Recorded as a "heal moves" window; returns the outcome."""
        t0 = self.now()
        deadline = time.monotonic() + timeout
        latest: shard_pb2.ShardOpResponse | None = None
        answered = 0
        settled = False
        polls = 0
        while True:
            polls += 1
            infos = await self.shard_infos(timeout=min(4.0, max(0.5, deadline - time.monotonic())))
            if infos:
                answered = len(infos)
                latest = max(infos.values(), key=lambda r: r.version)
                if latest.moves_pending == 0 and all(g.share > 0 for g in latest.groups):
                    settled = True
                    break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        waited = self.now() - t0
        out: dict[str, Any] = {
            "settled": settled, "waited": round(waited, 2), "timeout": timeout, "polls": polls,
            "nodes_answering": answered,
            "moves_pending": latest.moves_pending if latest is not None else None,
            "version": latest.version if latest is not None else None,
            "groups": [{"id": g.id, "share": round(g.share, 4), "leader": g.leader_id, "keys": g.keys,
                        "voters": list(g.voters)} for g in latest.groups] if latest is not None else [],
            "awaiting_drop": [g.id for g in latest.groups if g.share <= 0] if latest is not None else [],
            "message": latest.message if latest is not None else "no node answered ShardOp INFO",
        }
        w = FaultWindow("heal", "moves", "wait for every range move to finish", t0, hosts=[], info=dict(out))
        if settled:
            w.notes.append(f"no range move pending after {waited:.1f}s (map version {out['version']}, "
                           f"groups {[g['id'] for g in out['groups']]})")
        else:
            w.ok = False
            w.notes.append(f"range moves did not finish within {timeout:g}s: {out['moves_pending']} pending, "
                           f"groups awaiting drop {out['awaiting_drop']} ({out['message']})")
        w.end = self.now()
        self.windows.append(w)
        self.log(f"nemesis: moves: {w.notes[-1]}")
        return out

    # ----- heal -----

    async def heal_all(self) -> None:
        """Undo every fault: remove partitions, continue paused nodes, restart killed ones, and
        bring the membership back to N voters."""
        if self.current is not None:
            self._end(self.current)
        for open_w in self.windows:  # e.g. a rebalance window whose fault was cancelled
            if open_w.end is None:
                open_w.end = self.now()
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
                code = nh.exit_code
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
