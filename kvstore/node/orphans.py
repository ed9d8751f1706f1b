"""The orphan-attachment sweep: a data group's leader finds keys attached in its group to leases
that are dead at their home, and deletes them. Synchronous and pure: the node's monotonic clock
(`now_ms`), the leader's term and a reader of the group's attachment index are handed in; what
to propose comes out (`Probe`s, then LEASE_ORPHAN commands), and the shell feeds back the
answers (`kvstore/server/orphan_sweep.py`, the simulator's `chaos/sim/leases.py`).

Why. A lease's deletion deletes its keys in the data groups its coordinator knows: a group added
(and filled by a range move carrying attachments) after that map was read is left out, and a
group created after the lease died holds no tombstone of it, so a LEASE_PUT checked less than
`leases.LEASE_PUT_MAX_AGE` before the death and delayed past it can attach a key there. Either
way a key stays attached to a dead lease, and no deletion of the lease would come again.

A cycle walks the group's whole attachment index, a page per pass, while this node leads the
group with a current view (in term `term`) and the cluster version is at least
`version.LEVEL_LEASES_2` (the level of LEASE_STATUS and LEASE_ORPHAN; below it the sweep does
nothing at all). A pass reads a page of at most `SweepParams.page` distinct lease ids from the
group's attachment index (`leases.attached_page`: its count rows, above the previous page's last
id). After a full page the next pass starts as soon as this one's answers are in (or timed out);
after a short page, the end of the cycle, the next cycle starts from the beginning
`SweepParams.period_ms` after this pass started. For each id homed in
another group ask its home for the lease's status: a LEASE_STATUS command through the home's
log (linearizable: the home's applied record or tombstone, the source of truth
LeaseTimeToLive reads). For a lease the home answers DEAD, and only then, propose
LEASE_ORPHAN(id, until) in this group: the one-group DROP (its deletion at one revision and its
tombstone), guarded at apply by `until` (`leases.orphan_drop` says why it never deletes a key
of a live lease, even one whose id was granted again). Everything else keeps the keys: ALIVE;
UNKNOWN (no record and no live tombstone at the home: never granted, so a forged id, or its
tombstone expired, so the id may be granted again at any time; or a REVOKED record whose
one-group deletion is under way: DEAD once its FORGET leaves the tombstone); no answer (the home
group is not in the map, unreachable, leaderless, or refuses). A LEASE_ORPHAN refused (a lock,
a move, a stale answer) is asked again at the next pass over that id.

Work per pass: at most `page` probes and `page` LEASE_ORPHANs, and no new pass starts while an
answer of the last one is awaited (up to `answer_timeout_ms`). Bound: a key attached to a dead
lease is deleted by the first pass over its id that starts after the death (after the
attachment, for a late one) and gets the home's answer, i.e. within one period plus one cycle
(its pages back to back, each as long as its probes' and LEASE_ORPHANs' commits take), while
the home keeps the lease's tombstone (`leases.TOMB_LIFE` x 2). Pages do not wait a period each:
with 64 ids a page and a 5 s period, a group with more than ~3,000 attached leases would not
reach an id before the home forgot its tombstone, and its key would then stay for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..storage import leases
from ..storage.leases import Kind, LeaseCmd, Status
from .version import LEVEL_LEASES_2

MAX_PAGE = 1024


@dataclass(frozen=True, slots=True)
class SweepParams:
    """`period_ms`: between the starts of two cycles (a cycle: the passes over every page, back
    to back); `page`: lease ids per pass (1..MAX_PAGE); `answer_timeout_ms`: how long a pass
    waits for its answers before the next may start."""

    period_ms: float = 5_000.0
    page: int = 64
    answer_timeout_ms: float = 10_000.0

    def __post_init__(self) -> None:
        if not self.period_ms > 0:
            raise ValueError(f"orphan sweep period {self.period_ms} ms must be positive")
        if type(self.page) is not int or not 1 <= self.page <= MAX_PAGE:
            raise ValueError(f"orphan sweep page {self.page!r} must be in 1..{MAX_PAGE}")
        if not self.answer_timeout_ms > 0:
            raise ValueError(f"orphan sweep answer timeout {self.answer_timeout_ms} ms must be positive")


@dataclass(frozen=True, slots=True)
class Probe:
    """Ask `home` (lease `lease_id`'s home group) for the lease's status, for `group`'s sweep."""

    group: int
    lease_id: int
    home: int

    def command(self) -> LeaseCmd:
        return LeaseCmd(Kind.STATUS, self.lease_id)


def status_of(found: bool, error: str | None, current: bytes | None) -> Status | None:
    """The home's answer from a LEASE_STATUS's apply result (None: no usable answer, which keeps
    the keys: refused, or a result that is not a well-formed status)."""
    if error or not found:
        return None
    try:
        return Status.decode(current)
    except ValueError:
        return None


Page = Callable[[int, int], list[int]]
"""(after, limit) -> at most `limit` lease ids attached in the group, ascending, above `after`."""


@dataclass(slots=True)
class OrphanSweep:
    """One data group's sweep on one node. Invariants: `pending` holds the ids of the current
    pass still awaiting an answer (a probe's or a LEASE_ORPHAN's), and a pass starts only when
    it is empty or `answer_timeout_ms` passed since the pass started; `next_at` is the start of
    the current pass after a full page (the next page is due at once), its start + `period_ms`
    after a short one (the next cycle)."""

    group: int
    params: SweepParams = field(default_factory=SweepParams)
    cursor: int = 0
    """The last lease id of the previous full page (0: the next pass starts from the beginning)."""
    term: int = 0
    started: float = 0.0
    next_at: float | None = None
    pending: set[int] = field(default_factory=set)
    dropped: int = 0
    """LEASE_ORPHANs applied (with a result that found the command applied)."""

    def step(self, now_ms: float, term: int, page: Page, cluster: int = LEVEL_LEASES_2) -> list[Probe]:
        """The probes of a pass due now (term: the term this node leads the group in with a
        current view, 0 when it does not lead it; `cluster`: the cluster version. With term 0 or
        a cluster version below `LEVEL_LEASES_2`, nothing, and what was pending is dropped)."""
        if term == 0 or cluster < LEVEL_LEASES_2:
            self.term, self.next_at = 0, None
            self.pending.clear()
            return []
        if term != self.term:
            self.term, self.next_at = term, now_ms
            self.pending.clear()
        assert self.next_at is not None
        if now_ms < self.next_at:
            return []
        if self.pending and now_ms - self.started < self.params.answer_timeout_ms:
            return []
        self.pending.clear()
        ids = page(self.cursor, self.params.page)
        full = len(ids) >= self.params.page
        self.cursor = ids[-1] if full else 0
        self.started, self.next_at = now_ms, now_ms if full else now_ms + self.params.period_ms
        probes = [Probe(self.group, lid, leases.home_group(lid)) for lid in ids
                  if leases.home_group(lid) != self.group]
        self.pending = {p.lease_id for p in probes}
        return probes

    def on_status(self, probe: Probe, status: Status | None) -> LeaseCmd | None:
        """The home's answer to `probe` (None: none). The LEASE_ORPHAN to propose in this group
        if the lease is DEAD (then still pending until `on_dropped`), else None."""
        if probe.lease_id not in self.pending:
            return None  # a pass of an older term, or timed out: asked again later
        if status is None or status.state != leases.DEAD:
            self.pending.discard(probe.lease_id)
            return None
        return LeaseCmd(Kind.ORPHAN, probe.lease_id, until=status.until)

    def on_dropped(self, lease_id: int, applied: bool) -> None:
        """A LEASE_ORPHAN's outcome (`applied`: it applied, not refused)."""
        if lease_id in self.pending:
            self.pending.discard(lease_id)
            if applied:
                self.dropped += 1
