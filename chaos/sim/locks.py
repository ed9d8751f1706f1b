"""Locks with fencing tokens in the whole-node simulator: `kvstore/client/concurrency.py`'s
`Mutex` protocol run by simulated clients against the real nodes, and a simulated resource that
checks the tokens.

A client session grants a lease (`TTL_S`) in a random home group and keeps it alive (a RENEW every
`KEEP_MS`; the client counts the lock lost once no renewal was acknowledged for a whole TTL since
its send, as `Session` does); the lease clock is the real `Lessor` on every node with drifting
clocks (`leases.py`'s shell: its lessor loop runs whether or not the lease clients do). To lock,
the client puts `lock/<lease id hex>` attached to its lease (a LEASE_PUT, as `Mutex.acquire`), then
reads the queue with a linearizable scan across groups (`LockScans`: phase 1 reads every data group
at its current state, phase 2 re-reads at R = max(served revisions, the key's put revision) the
groups behind, each closed at R by the real `NodeCloses`, so the parts are one snapshot at R; the
parts must cover the hash space once). The holder is the key with the lowest create revision
(`holder_of`); the fencing token is that create revision (`fence_of`). A waiter scans again a
little later (the recipe watches the key ahead of it; polling is the simulator's shortcut, the
decision is the same). A holder sends a few operations to the resource, checking its session
before each, then revokes its lease (releasing the lock). Holders misbehave as real ones do:
one may PAUSE after its check (a GC pause: its renewals stop too, its lease expires, and its
operation reaches the resource after the pause, carrying the old token), or CRASH (its key stays
until the lease expires). The resource accepts an operation iff its token is at least the
highest token it has seen. Failed scans back off exponentially and a client whose session was
lost waits longer before the next (seed 1326's slow cluster, one entry per append and slow disks,
otherwise kept a group too busy to serve the other clients after the heal).

Checked at the end against the applied history of the `lock/` keys (the revision checker's,
`revisions.py`; `LockViolation`):
- each acquisition was real: at the revision R of the scan it decided on, its key was present
  and had the lowest create revision of the present `lock/` keys;
- the resource never accepted two holders out of order: once an operation of the holder whose
  key was created at c reached it (accepted or refused), no operation of a holder created
  before c is accepted (with tokens = create revisions that follows from the resource's rule:
  a paused old holder is refused once a newer holder was heard); and it refuses only holders
  older than one it heard from (tokens ordered like the acquisitions);
- progress is counted (`LockStats.acquired`, `accepted`), and asserted by the tests over a few seeds.
Planted: `lock-holder-latest` (the holder is the key with the highest create revision) and
`lock-fence-lease-id` (the token is the lease id). `python -m chaos.sim --locks on|off|auto` (a fixed
share of the seeds by default: `locks_by_default`; the library's default is off).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore.shard.ranges import covers_once
from kvstore.storage import commands, leases
from kvstore.storage.commands import ApplyResult
from kvstore.storage.leases import Kind, LeaseCmd

from .closed_reads import ClosedReads, _Part
from .leases import STEP_MS, SimLeases

PREFIX = b"lock/"
TTL_S = 1
KEEP_MS = 300
LOCKERS = 4
"""Clients at once (each starts a new session after its last one ended)."""
OPS = (1, 4)
"""Operations a holder sends (at least, at most)."""
PAUSE = 0.25
CRASH = 0.1
FRACTION = 0.15
_U64 = struct.Struct(">Q")


class LockViolation(AssertionError):
    """Two holders at once, or a resource that accepted holders out of order."""


def locks_by_default(seed: int) -> bool:
    return random.Random(f"locks:{seed}").random() < FRACTION


def lockers(p: Any) -> int:
    """How many lock clients a run has: `LOCKERS`, or one when the seed throttles replication to
    one entry per round trip (`max_size_per_msg` and `max_inflight_msgs` both 1). There a group
    commits a few dozen entries a second, and four lock sessions (renewals every `KEEP_MS`, queue
    scans, a cross-group deletion of each session's lease) on top of the other workloads offer more
    than that: the clients of the liveness check then time out for want of capacity, not because of
    a fault (seed 1326: one data group left after a group removal, six clients, pair transactions)."""
    return 1 if p.max_size_per_msg == 1 and p.max_inflight_msgs == 1 else LOCKERS


def holder_of(queue: dict[bytes, int]) -> bytes:
    """The holder: the key with the lowest create revision (`Mutex.acquire`)."""
    return min(queue, key=lambda k: queue[k])


def fence_of(queue: dict[bytes, int], key: bytes, lease_id: int) -> int:
    """The fencing token of holder `key`: its create revision."""
    return queue[key]


@dataclass(slots=True)
class LockStats:
    sessions: int = 0
    acquired: int = 0
    accepted: int = 0
    refused: int = 0
    """Operations the resource refused (a stale token: a paused or slow old holder)."""
    paused: int = 0
    crashed: int = 0
    lost: int = 0
    """Sessions that found their lease or key gone."""
    scans: int = 0
    scans_failed: int = 0


@dataclass(slots=True)
class _Client:
    n: int
    lid: int = 0
    key: bytes = b""
    put_rev: int = 0
    held_until: int = 0
    """Send time of the last acknowledged grant or renewal + TTL (the client's view)."""
    paused_until: int = 0
    ended: bool = False
    crashed: bool = False
    fails: int = 0
    """Scans failed in a row."""


@dataclass(slots=True)
class _Acquired:
    client: int
    key: bytes
    at: int
    """The revision of the scan that decided it."""
    token: int


class LockScans(ClosedReads):
    """The lock queue: a linearizable scan across groups (the cross-group scans' two phases)
    whose parts carry each key's create revision (8 bytes) instead of its value."""

    def __init__(self, sim: Any) -> None:
        super().__init__(sim)
        self.rng = random.Random(f"lock-scans:{sim.seed}")

    def _items(self, stream: Any) -> dict[bytes, bytes]:
        return {k: _U64.pack(v.meta.create_revision) for chunk in stream for k, v in chunk
                if v.value is not None and k.startswith(PREFIX)}

    def queue(self, floor: int, then: Callable[[dict[bytes, int] | None, int], None]) -> None:
        """`then(key -> create revision, R)` of the `lock/` keys at one revision R >= `floor`
        that is at or after the scan's start (None: failed)."""
        sim = self.sim
        alive = self._alive()
        m = alive[0].logic.shard_tracker.map if alive else None
        if m is None:
            sim.at(1, then, None, 0)
            return
        groups = sorted(m.data_groups())
        finished = [False]

        def finish(q: dict[bytes, int] | None, at: int) -> None:
            if not finished[0]:
                finished[0] = True
                then(q, at)

        def second(parts: list[_Part]) -> None:
            if any(p.items is None for p in parts):
                finish(None, 0)
                return
            at = max(floor, *(p.served for p in parts))
            behind = [p.group for p in parts if p.served < at]
            self._phase(behind, at, lambda ps: done(ps, at), parts)

        def done(parts: list[_Part], at: int) -> None:
            if any(p.items is None for p in parts) or not covers_once([p.owned for p in parts]):
                finish(None, 0)
                return
            q: dict[bytes, int] = {}
            for p in parts:
                assert p.items is not None
                q.update({k: _U64.unpack(v)[0] for k, v in p.items.items()})
            finish(q, at)

        sim.at(sim.p.client_timeout_ms, finish, None, 0)
        self._phase(groups, 0, second)


class SimLocks:
    """The lock clients, the resource and the check (module docstring)."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.rng = random.Random(f"locks-run:{sim.seed}")
        self.shell: SimLeases = sim.leases if sim.leases is not None else SimLeases(sim)
        self.scans = LockScans(sim)
        self.stats = LockStats()
        self.clients: list[_Client] = []
        self.acquired: list[_Acquired] = []
        self.max_token = 0
        self.delivered: list[tuple[int, bool]] = []
        """(index in `acquired`, accepted) of every operation that reached the resource, in order."""

    def start(self) -> None:
        if self.sim.leases is None:  # the lessor loop of every node (else the lease clients run it)
            self.sim.at(STEP_MS, self.shell._step_all)
        for _ in range(lockers(self.sim.p)):
            self.sim.at(self.rng.randrange(150, 400), self._session)

    def _late(self) -> bool:
        sim = self.sim
        return sim.end is not None and sim.now >= sim.end - sim.p.client_timeout_ms

    def _propose(self, group: int, cmd: commands.Command, done: Callable[[ApplyResult | None], None]) -> None:
        self.shell._propose(group, cmd, done)

    # --- a session ---------------------------------------------------------------------------
    def _session(self) -> None:
        smap = self.shell._smap()
        if self._late():
            return
        if smap is None:
            self.sim.at(50, self._session)
            return
        c = _Client(len(self.clients))
        self.clients.append(c)
        self.stats.sessions += 1
        c.lid = leases.make_id(self.rng.choice(smap.data_groups()), self.rng.getrandbits(62))
        c.key = PREFIX + b"%016x" % c.lid
        self._grant(c, 0)

    def _end(self, c: _Client, lost: bool = False) -> None:
        if c.ended:
            return
        c.ended = True
        if lost:  # backs off longer: on a slow cluster, new sessions only add load
            self.stats.lost += 1
        self.sim.at(self.rng.randrange(300, 1000) if lost else self.rng.randrange(50, 300), self._session)

    def _grant(self, c: _Client, n: int) -> None:
        sent = self.sim.now

        def done(res: ApplyResult | None) -> None:
            if res is not None and res.found:
                c.held_until = sent + TTL_S * 1000
                self.sim.at(KEEP_MS, self._keep, c)
                self._put(c, 0)
            elif res is None and n < 10 and not self._late():
                self.sim.at(self.rng.randrange(20, 80), self._grant, c, n + 1)
            else:  # refused ("already exists": an earlier attempt applied unanswered) or given up
                self._end(c)

        self._propose(leases.home_group(c.lid), commands.Command.lease_command(LeaseCmd(Kind.GRANT, c.lid, ttl_s=TTL_S)),
                      done)

    def _keep(self, c: _Client) -> None:
        sim = self.sim
        if c.ended or c.crashed or self._late():
            return
        if sim.now < c.paused_until:  # a paused process sends nothing
            sim.at(c.paused_until - sim.now, self._keep, c)
            return
        sent = sim.now

        def done(res: ApplyResult | None) -> None:
            if res is not None and res.found:
                c.held_until = max(c.held_until, sent + TTL_S * 1000)
            elif res is not None and not res.error:  # the lease is gone
                c.held_until = min(c.held_until, sim.now)

        self._propose(leases.home_group(c.lid), commands.Command.lease_command(LeaseCmd(Kind.RENEW, c.lid)), done)
        sim.at(KEEP_MS, self._keep, c)

    def _valid(self, c: _Client) -> bool:
        return not c.ended and not c.crashed and self.sim.now < c.held_until and not self._late()

    def _put(self, c: _Client, n: int) -> None:
        smap = self.shell._smap()
        if not self._valid(c) or smap is None:
            self._end(c, lost=True)
            return
        cmd = commands.Command.lease_command(LeaseCmd(Kind.PUT, c.lid), c.key, b"")

        def done(res: ApplyResult | None) -> None:
            if res is not None and not res.error and not res.wrong_shard:
                c.put_rev = res.revision
                self._scan(c)
            elif (res is None or res.wrong_shard) and n < 10:
                self.sim.at(self.rng.randrange(20, 80), self._put, c, n + 1)
            else:
                self._end(c, lost=True)

        self._propose(smap.group_for_key(c.key), cmd, done)

    def _scan(self, c: _Client) -> None:
        if not self._valid(c):
            self._end(c, lost=True)
            return
        self.stats.scans += 1

        def got(q: dict[bytes, int] | None, at: int) -> None:
            if not self._valid(c):
                self._end(c, lost=True)
                return
            if q is None:  # backs off (a slow cluster fails scans: each retry adds reads and closes)
                self.stats.scans_failed += 1
                c.fails += 1
                self.sim.at(self.rng.randrange(100, 300) << min(c.fails, 4), self._scan, c)
                return
            c.fails = 0
            if c.key not in q:  # the lease expired (its key was deleted)
                self._end(c, lost=True)
                return
            if holder_of(q) != c.key:
                self.sim.at(self.rng.randrange(100, 300), self._scan, c)
                return
            self.stats.acquired += 1
            self.acquired.append(_Acquired(c.n, c.key, at, fence_of(q, c.key, c.lid)))
            self._hold(c, len(self.acquired) - 1, self.rng.randint(*OPS))

        self.scans.queue(c.put_rev, got)

    def _hold(self, c: _Client, acq: int, left: int) -> None:
        sim = self.sim
        if not self._valid(c):
            self._end(c, lost=True)
            return
        if left == 0:
            self._propose(leases.home_group(c.lid), commands.Command.lease_command(LeaseCmd(Kind.REVOKE, c.lid)),
                          lambda _res: None)
            self._end(c)
            return
        r = self.rng.random()
        token = self.acquired[acq].token
        if r < CRASH:
            self.stats.crashed += 1
            c.crashed = True
            self._end(c)
            return
        if r < CRASH + PAUSE:  # checked, then paused: the operation arrives after the pause
            self.stats.paused += 1
            pause = self.rng.randrange(TTL_S * 2000, TTL_S * 4000)
            c.paused_until = sim.now + pause
            sim.at(pause, self._deliver, acq, token)
            sim.at(pause + 1, self._hold, c, acq, left - 1)
            return
        sim.at(self.rng.randrange(1, 20), self._deliver, acq, token)
        sim.at(self.rng.randrange(30, 120), self._hold, c, acq, left - 1)

    def _deliver(self, acq: int, token: int) -> None:
        """The resource: accepts a token at least the highest it has seen."""
        ok = token >= self.max_token
        if ok:
            self.max_token = token
            self.stats.accepted += 1
        else:
            self.stats.refused += 1
        self.delivered.append((acq, ok))

    # --- the check ------------------------------------------------------------------------------
    def check_end(self) -> None:
        hist = {k: vs for k, vs in self.sim.revisions.versions.items() if k.startswith(PREFIX)}

        def state_at(rev: int) -> dict[bytes, int]:
            """key -> create revision of the `lock/` keys present after the writes <= rev."""
            out: dict[bytes, int] = {}
            for k, vs in hist.items():
                create = 0
                for r, v in vs:
                    if r > rev:
                        break
                    create = 0 if v is None else (create or r)
                if create:
                    out[k] = create
            return out

        created: list[int] = []
        for a in self.acquired:
            st = state_at(a.at)
            if a.key not in st:
                raise LockViolation(f"client {a.client} took the lock at revision {a.at}, where its key {a.key!r} "
                                    "is absent in the history")
            ahead = {k: r for k, r in st.items() if r < st[a.key]}
            if ahead:
                raise LockViolation(
                    f"client {a.client} took the lock at revision {a.at} with {a.key!r} (created at {st[a.key]}), but "
                    f"{sorted(ahead.items(), key=lambda kv: kv[1])[:3]} created before it were present: two holders"
                )
            created.append(st[a.key])
        latest = 0
        for acq, ok in self.delivered:
            c = created[acq]
            if ok and c < latest:
                raise LockViolation(
                    f"the resource accepted an operation of the holder whose key was created at {c} after one of the "
                    f"holder created at {latest} reached it: two holders' operations accepted out of order"
                )
            if not ok and c >= latest:
                raise LockViolation(
                    f"the resource refused the token {self.acquired[acq].token} of the newest holder it heard from (key "
                    f"created at {c}): the tokens are not ordered like the acquisitions"
                )
            latest = max(latest, c)
