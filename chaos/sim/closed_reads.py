"""Scans across groups at a revision, and linearizable scans across groups, in the whole-node
simulator, checked against the history of writes (docs/REVISIONS.md, "Reads at a revision").

Each scan reads every data group's part at a node hosting it (the leader or any replica): after
a linearizable read point, and for a read at revision R through the node's real
`kvstore.node.closes.NodeCloses` (`ensure_closed`: a group whose applied last is below R is
closed at R through its leader, the close forwarded over the simulated network from a
non-leader, then applied here), from the node's history at R. Two kinds, as the client library
does them (`kvstore/client/scans.py`):

- **at R**: R is a revision a client saw acknowledged, or one up to half the clock bound ahead
  of the serving node's clock (so idle groups must close to answer);
- **linearizable**: phase 1 reads every part at the current state and learns each group's
  served revision r_g; R = max r_g; phase 2 re-reads at R the parts with r_g < R.

Checked (by the simulator's view of every applied write, `RevisionChecker.state_at`: writes
whose outcome the client never learned count exactly as they were applied):

1. the merged parts are exactly the state after the writes with revision <= R (when the parts'
   served ranges cover the hash space once; a scan that raced a range move is dropped, as the
   client retries it);
2. a linearizable scan's R is at or above the revision of every write acknowledged before the
   scan was invoked (so it is linearizable as well as atomic);
3. at the end of the run, every answered scan is checked again against the final history: the
   answer at R can never change afterwards (a group that answered without closing would later
   write at or below R).

The scans use their own random stream and run on a fixed fifth of the seeds
(`closed_reads_by_default`), so the other seeds replay as before.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore import errors
from kvstore.node import xtxn as xlogic
from kvstore.node.closes import CloseCallback, NodeCloses
from kvstore.node.hlc import MAX_CLOCK_OFFSET_MS, HybridClock
from kvstore.node.reads import LINEARIZABLE, NodeReads, ReadPoint
from kvstore.node.store import NodeStore
from kvstore.shard.ranges import IntervalSet, covers_once
from kvstore.storage import mvcc
from kvstore.storage.xtxn import IntentProbe

from .revisions import RevisionChecker

RETRIES = 6
"""Attempts of a part beyond the first (each at a node drawn again)."""
MAX_RECORDED = 4000
"""Answered scans kept for the final re-check (bounded memory)."""


class ClosedReadViolation(AssertionError):
    """A scan at a revision (or a linearizable scan) was not the state after the writes <= R."""


def closed_reads_by_default(seed: int) -> bool:
    """Whether a seed runs the cross-group scans: a fixed fifth of the seeds, decided apart from
    the seed's own random stream."""
    return random.Random(f"closed:{seed}").random() < 0.2


class SimNode(Protocol):
    id: int
    epoch: int
    reads: NodeReads | None
    store: NodeStore | None
    logic: Any
    removed: bool


class NodeSimulation(Protocol):
    now: int
    seed: int
    p: Any
    nodes: dict[int, Any]
    blocked: set[tuple[int, int]]
    end: int | None
    quiet: Any
    revisions: RevisionChecker

    def at(self, delay: float, fn: Callable[..., None], *args: Any) -> None: ...

    def log(self, msg: str) -> None: ...

    def _kick(self, n: Any) -> None: ...

    def _clock(self, node: Any) -> HybridClock: ...

    def _node_now(self, n: Any) -> float: ...

    def _faults_on(self) -> bool: ...


@dataclass(slots=True)
class ClosedReadStats:
    scans: int = 0
    checked: int = 0
    at_revision: int = 0
    linearizable: int = 0
    second_phase: int = 0
    """Linearizable scans that re-read some group at R."""
    failed: int = 0
    raced_moves: int = 0
    closes_forwarded: int = 0


@dataclass(slots=True)
class _Part:
    group: int
    items: dict[bytes, bytes] | None = None
    served: int = 0
    owned: IntervalSet = field(default_factory=IntervalSet)


class ClosedReads:
    """The simulator's cross-group scans (module docstring)."""

    def __init__(self, sim: NodeSimulation) -> None:
        self.sim = sim
        self.rng = random.Random(f"closed-scans:{sim.seed}")
        self.stats = ClosedReadStats()
        self.answered: list[tuple[int, dict[bytes, bytes], str]] = []
        self.acked: list[tuple[int, int]] = []
        """(true time, revision) of every write whose reply reached its client, in time order."""
        self._closes: dict[int, tuple[int, NodeCloses]] = {}

    # --- wiring ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.sim.at(self.rng.randrange(150, 400), self._next)

    def ack(self, revision: int) -> None:
        if revision:
            self.acked.append((self.sim.now, revision))

    def closes(self, n: SimNode) -> NodeCloses:
        """Node `n`'s `NodeCloses` (one per life of the node, with its HLC)."""
        have = self._closes.get(n.id)
        if have is not None and have[0] == n.epoch:
            return have[1]
        nc = NodeCloses(n.logic.host, self.sim._clock(n), wake=lambda: self.sim._kick(n))
        self._closes[n.id] = (n.epoch, nc)
        return nc

    # --- the workload ---------------------------------------------------------------------------
    def _next(self) -> None:
        sim = self.sim
        if sim.end is not None and sim.now >= sim.end - sim.p.client_timeout_ms:
            return
        if sim.quiet is not None and (wait := sim.quiet.clients_wait()):
            sim.at(min(wait, 100) + self.rng.randrange(0, 30), self._next)
            return
        self._scan(linearizable=self.rng.random() < 0.5)

    def _alive(self) -> list[Any]:
        return [n for _, n in sorted(self.sim.nodes.items()) if n.logic is not None and not n.removed]

    def _scan(self, linearizable: bool) -> None:
        sim = self.sim
        alive = self._alive()
        if not alive:
            sim.at(50, self._next)
            return
        via = self.rng.choice(alive)
        m = via.logic.shard_tracker.map
        if m is None:
            sim.at(50, self._next)
            return
        groups = sorted(m.data_groups())
        self.stats.scans += 1
        invoked = sim.now
        what = f"{'linearizable' if linearizable else 'at-revision'} scan #{self.stats.scans}"
        finished = False

        def finish(outcome: str) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            sim.log(f"closed-reads {what} -> {outcome}")
            sim.at(self.rng.randrange(30, 150), self._next)

        sim.at(sim.p.client_timeout_ms, finish, "timeout")
        if linearizable:
            self.stats.linearizable += 1
            self._phase(groups, 0, lambda parts: self._second(parts, invoked, what, finish, lambda: finished))
        else:
            self.stats.at_revision += 1
            at = self._pick_revision(via)
            self._phase(groups, at, lambda parts: self._done(parts, at, invoked, what, False, finish, lambda: finished))

    def _pick_revision(self, via: SimNode) -> int:
        if self.acked and self.rng.random() < 0.5:
            return self.rng.choice(self.acked[-50:])[1]
        ahead = self.rng.randrange(0, MAX_CLOCK_OFFSET_MS // 2)
        ms = mvcc.EPOCH_MS + int(self.sim._node_now(via) * 1000) + ahead
        return mvcc.make_revision(ms, self.rng.randrange(0, 1 << mvcc.LOGICAL_BITS), 0)

    def _phase(self, groups: list[int], at: int, then: Callable[[list[_Part]], None],
               parts: list[_Part] | None = None) -> None:
        """Read every part of `groups` (at revision `at`, 0: now); `then(parts)` once all answered
        (a part whose read failed has items None)."""
        out = parts if parts is not None else [_Part(g) for g in groups]
        todo = [p for p in out if p.group in groups]
        left = [len(todo)]

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                then(out)

        if not todo:
            then(out)
            return
        for p in todo:
            self._read_part(p, at, one_done)

    def _read_part(self, part: _Part, at: int, done: Callable[[], None], tries: int = 0) -> None:
        """Read `part` at a node hosting its group; a failed attempt is retried at another
        node (as the client does) a few times, then the part fails."""
        sim = self.sim
        hosts = [n for n in self._alive() if part.group in n.logic.host.groups]
        if not hosts:
            part.items = None
            sim.at(1, done)
            return
        n = self.rng.choice(hosts)
        epoch = n.epoch
        assert n.reads is not None and n.store is not None
        store = n.store
        answered = [False]

        def answer(items: dict[bytes, bytes] | None, served: int, owned: IntervalSet) -> None:
            if answered[0]:
                return
            answered[0] = True
            part.items, part.served, part.owned = items, served, owned
            done()

        def serve() -> None:
            if n.epoch != epoch or n.logic is None:
                return  # crashed: the scan times out
            if part.group not in n.logic.host.groups:
                failed(errors.WrongShard(f"g{part.group} left n{n.id}"))
                return
            st = store.shard_state(part.group)
            owned = st.active if st is not None else IntervalSet.full()
            probe = IntentProbe(xlogic.READ_INTENTS_MAX)
            try:
                rst, stream = store.revisions.scan_versions(part.group, b"", None, 0, at, 1 << 20, 1 << 30, owned, probe)
            except mvcc.Compacted:
                answer(None, 0, owned)
                return
            items = self._items(stream)
            served = at or rst.last
            # The intents of the scan's own view, as the server does: an intent at or below
            # `served` may still commit there.
            if xlogic.blocking_intent(probe.rows, served) is not None:
                failed(errors.ProposalDropped(f"g{part.group} holds an intent at or below {served}; retry"))
                return
            answer(items, served, owned)

        def failed(err: BaseException | None) -> None:
            sim.log(f"closed-reads g{part.group} at n{n.id} (revision {at}) failed: {err!r}")
            if answered[0]:
                return
            if tries < RETRIES and not isinstance(err, errors.InvalidArgument):
                answered[0] = True
                sim.at(self.rng.randrange(5, 40), self._read_part, part, at, done, tries + 1)
                return
            answer(None, 0, IntervalSet())

        def closed(err: errors.KVError | None) -> None:
            if err is not None:
                failed(err)
            else:
                serve()

        def at_point(point: ReadPoint | None, err: errors.KVError | None) -> None:
            if err is not None or point is None or n.epoch != epoch:
                failed(err)
                return
            if not at:
                serve()
                return
            try:
                self.closes(n).ensure_closed(part.group, at, n.reads, self._forward(n), closed)
            except errors.KVError as e:
                failed(e)

        try:
            n.reads.read(part.group, LINEARIZABLE, 0, at_point)
        except errors.KVError as e:
            sim.at(1, failed, e)
            return
        sim._kick(n)

    def _items(self, stream: Any) -> dict[bytes, bytes]:
        """A part's answer from its stream of (key, version) chunks: every present key's value."""
        return {k: v.value for chunk in stream for k, v in chunk if v.value is not None}

    def _forward(self, n: SimNode) -> Callable[[int, int, CloseCallback], None]:
        """`Shard.GroupPropose` of a CLOSE from `n` to the group's leader, over the simulated
        network (lost, delayed or cut like any message; no retry: the scan fails or times out)."""
        sim = self.sim
        epoch = n.epoch

        def forward(group: int, revision: int, cb: CloseCallback) -> None:
            lead, _ = n.logic.host.leader_of(group)
            if not lead or lead == n.id:
                sim.at(1, cb, 0, errors.NoLeader(f"n{n.id} knows no other leader of g{group}"))
                return
            self.stats.closes_forwarded += 1

            def back(last: int, err: errors.KVError | None) -> None:
                self._carry(lead, n.id, lambda: cb(last, err) if n.epoch == epoch else None)

            def arrive() -> None:
                dst = sim.nodes.get(lead)
                if dst is None or dst.logic is None:
                    return
                try:
                    self.closes(dst).close(group, revision, back)
                except errors.KVError as err:
                    back(0, err)
                sim._kick(dst)

            self._carry(n.id, lead, arrive)

        return forward

    def _carry(self, frm: int, to: int, fn: Callable[[], None]) -> None:
        sim = self.sim
        if (frm, to) in sim.blocked or (sim._faults_on() and self.rng.random() < sim.p.loss):
            return
        sim.at(self.rng.randint(*sim.p.delay_ms), fn)

    # --- the two phases and the checks ----------------------------------------------------------
    def _second(self, parts: list[_Part], invoked: int, what: str, finish: Callable[[str], None],
                gone: Callable[[], bool]) -> None:
        if gone():
            return
        if any(p.items is None for p in parts):
            self.stats.failed += 1
            finish("a part failed")
            return
        at = max(p.served for p in parts)
        behind = [p.group for p in parts if p.served < at]
        if not at or not behind:
            self._done(parts, at, invoked, what, True, finish, gone)
            return
        self.stats.second_phase += 1
        self._phase(behind, at, lambda ps: self._done(ps, at, invoked, what, True, finish, gone), parts)

    def _done(self, parts: list[_Part], at: int, invoked: int, what: str, linearizable: bool,
              finish: Callable[[str], None], gone: Callable[[], bool]) -> None:
        if gone():
            return
        if any(p.items is None for p in parts):
            self.stats.failed += 1
            finish("a part failed")
            return
        if not covers_once([p.owned for p in parts]):
            self.stats.raced_moves += 1
            finish("a range moved between the parts' read points (the client retries)")
            return
        got: dict[bytes, bytes] = {}
        for p in parts:
            assert p.items is not None
            got.update(p.items)
        self._check(at, got, f"{what} at {at}")
        if linearizable:
            newest = max((r for t, r in self.acked if t < invoked), default=0)
            if newest > at:
                raise ClosedReadViolation(
                    f"{what} invoked at {invoked} ms was served at revision {at}, below the revision {newest} "
                    "of a write acknowledged before it"
                )
        if len(self.answered) < MAX_RECORDED:
            self.answered.append((at, got, what))
        self.stats.checked += 1
        finish(f"{len(got)} keys at {at}")

    def _check(self, at: int, got: dict[bytes, bytes], what: str) -> None:
        want = self.sim.revisions.state_at(at)
        if got != want:
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:6]
            shown = {k: (got.get(k), want.get(k)) for k in diff}
            raise ClosedReadViolation(
                f"{what}: not the state after exactly the writes <= {at}; key: (scan, history) {shown}"
            )

    def recheck(self) -> None:
        """At the end of the run: every answered scan against the final history (a read at R
        must never change afterwards)."""
        for at, got, what in self.answered:
            self._check(at, got, f"{what} (checked again at the end of the run)")

    def summary(self) -> str:
        s = self.stats
        return (
            f"closed reads: {s.scans} scans ({s.at_revision} at a revision, {s.linearizable} linearizable, "
            f"{s.second_phase} with a second phase), {s.checked} checked, {s.failed} failed, "
            f"{s.raced_moves} raced moves, {s.closes_forwarded} closes forwarded"
        )


