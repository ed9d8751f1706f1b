"""The node's hybrid logical clock: the revisions a leader proposes (docs/REVISIONS.md).

Pure: the wall clock is injected (`now_ms`, Unix milliseconds); the asyncio shell passes
`time.time`-based milliseconds, a test a fake. Invariants:
- `propose(floor)` is strictly greater than every earlier reading and every revision observed
  (`observe`, and `floor` itself), and at least the wall clock now (in revision units, slot 0:
  the apply rule `mvcc.next_revision` moves it into the group's slot);
- `check_floor` refuses a client's revision more than 2 x `max_offset_ms` ahead of this node's
  WALL clock alone (`floor_bound`), so neither one forged far-future revision nor a stream of
  floors each at the bound (each accepted one raises `last`) can drag the clock (and every later
  revision of the cluster) more than 2 x `max_offset_ms` into the future; `check_close` refuses
  a revision to close at (or read at) more than `max_offset_ms` ahead of the wall clock alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvstore import errors
from kvstore.storage import mvcc

MAX_CLOCK_OFFSET_MS = 500
"""The clock-uncertainty bound: how far apart two nodes' clocks may be (and how far ahead of
this node's clock a client's revision may be)."""


@dataclass(slots=True)
class HybridClock:
    """HLC readings as revisions in slot 0: (ms since mvcc.EPOCH_MS, logical) << SLOT_BITS."""

    now_ms: Callable[[], int]
    max_offset_ms: int = MAX_CLOCK_OFFSET_MS
    last: int = 0
    """The highest HLC reading (units: revision >> SLOT_BITS) proposed or observed."""

    def _physical(self) -> int:
        return max(0, self.now_ms() - mvcc.EPOCH_MS) << mvcc.LOGICAL_BITS

    def observe(self, revision: int) -> None:
        """Remember a revision seen (an applied write, a client's floor): later proposals exceed it."""
        units = revision >> mvcc.SLOT_BITS
        if units > self.last:
            self.last = units

    def floor_bound(self, physical: int) -> int:
        """The highest HLC reading (units: revision >> SLOT_BITS) a client's floor may carry when
        this node's wall clock reads `physical`: physical + 2 x `max_offset_ms`, the wall clock
        ALONE (not `last`: a bound that followed the revisions accepted would let each floor at
        the bound raise the next bound, 500 ms a request).

        Why it admits every legitimate floor: a floor is a revision some node proposed. A node's
        HLC reading is max(its wall clock, the floors it accepted, the revisions it observed)
        plus a logical step, so by induction over the proposals a revision made while no floor
        beyond the wall clocks was accepted (what honest clients send: revisions they read) is
        at most the highest wall clock among the nodes (plus logical steps), which is at most
        this node's wall clock + `max_offset_ms` (the uncertainty bound): under the bound with
        `max_offset_ms` to spare. With hostile floors every revision stays below the highest
        wall clock + 2 x `max_offset_ms` (each floor is bounded by the wall clock of the node
        accepting it, never by what it observed), which the lease tombstones' skew allowance
        (`leases.TOMB_MARGIN`, 120 s) covers; an honest floor that read such a revision may be
        refused here while it is beyond this bound (definite FutureRevision, for at most
        `max_offset_ms` of this clock: retried)."""
        return physical + ((2 * self.max_offset_ms) << mvcc.LOGICAL_BITS)

    def check_floor(self, revision: int) -> None:
        """Refuse (definite FutureRevision or InvalidArgument) a client's observed revision that
        is negative, absurd, or above `floor_bound` (the wall clock + 2 x the uncertainty
        bound)."""
        self._check_floor(revision, self._physical())

    def _check_floor(self, revision: int, physical: int) -> None:
        if revision < 0:
            raise errors.InvalidArgument(f"revision {revision} is out of range")
        if revision > mvcc.PROPOSAL_MAX:
            raise errors.FutureRevision(f"revision {revision} is out of range")
        if not revision:
            return  # no floor (a client that has seen nothing yet): always acceptable
        if revision >> mvcc.SLOT_BITS > self.floor_bound(physical):
            raise errors.FutureRevision(
                f"revision {revision} is more than {2 * self.max_offset_ms} ms ahead of node's clock: refused"
            )

    def check_close(self, revision: int) -> None:
        """Refuse (definite InvalidArgument) a revision to close a group at (or read at) that is
        negative, absurd, or more than `max_offset_ms` ahead of this node's WALL clock. Like
        `check_floor`'s, the bound ignores the revisions observed: a close is observed, so a bound
        that followed them would let repeated closes ratchet every later revision forward."""
        if revision < 0:
            raise errors.InvalidArgument(f"revision {revision} is out of range")
        if revision > mvcc.PROPOSAL_MAX:
            raise errors.FutureRevision(f"revision {revision} is out of range")
        if revision >> mvcc.SLOT_BITS > self._physical() + (self.max_offset_ms << mvcc.LOGICAL_BITS):
            raise errors.FutureRevision(
                f"revision {revision} is more than {self.max_offset_ms} ms ahead of node's clock: refused"
            )

    def propose(self, floor: int = 0) -> int:
        """A revision to propose for a write whose client has seen `floor` (checked first). One
        reading of the wall clock serves both the check and the proposal (the write path)."""
        physical = self._physical()
        self._check_floor(floor, physical)
        units = floor >> mvcc.SLOT_BITS
        if units > self.last:
            self.last = units
        units = self.last + 1
        if physical > units:
            units = physical
        self.last = units
        return units << mvcc.SLOT_BITS
