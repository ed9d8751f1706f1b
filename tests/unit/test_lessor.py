"""The home leader's lease clock (`kvstore/node/lessor.py`) on an injected clock: deadlines from
the applied records with the drift margin, conditional expiry and checkpoints, a new leader that
starts from the checkpointed remaining TTL (never earlier than the old deadline, never reset to
the full TTL), the fan-out of a revoked lease's deletion, and nothing at all on a non-leader."""

from __future__ import annotations

from kvstore.node.lessor import Lessor, LessorParams, Proposal
from kvstore.storage import leases
from kvstore.storage.leases import Kind, LeaseCmd, Record

G = 2
LID = leases.make_id(G, 7)
P = LessorParams(drift=0.05, scan_interval_ms=100, checkpoint_interval_ms=1_000, retry_ms=500)


def kinds(props: list[Proposal]) -> list[tuple[int, Kind]]:
    return [(p.group, p.cmd.kind) for p in props]


def test_nothing_unless_leading() -> None:
    lz = Lessor(G, P)
    assert lz.step(0, 0, lambda: [(LID, Record(1, 1000, 1))], lambda: [1, 2]) == []
    assert lz.leases == {}


def test_expiry_at_the_deadline_with_the_drift_margin_and_checkpoints() -> None:
    lz = Lessor(G, P)
    recs = {LID: Record(10, 10_000, 1)}
    step = lambda now: lz.step(now, 3, lambda: recs.items(), lambda: [1, G])  # noqa: E731
    assert step(0) == []
    # a checkpoint every interval, remaining = ceil((deadline - now) / (1 + rho))
    cp = step(1_000)
    assert cp == [Proposal(G, LeaseCmd(Kind.CHECKPOINT, LID, renews=1, remaining_ms=9_048))]
    assert lz.remaining_ms(LID, 1_000) == 9_047
    assert [p for p in (step(t) for t in range(1_100, 10_500, 100)) if any(x.cmd.kind == Kind.EXPIRE for x in p)] == []
    out = step(10_500)  # 10 s * 1.05
    assert out == [Proposal(G, LeaseCmd(Kind.EXPIRE, LID, renews=1))]
    assert step(10_600) == []  # sent once per retry interval
    # a renew committed in between: the next scan takes the new count and a new deadline
    recs[LID] = Record(10, 10_000, 2)
    assert step(10_700) == [] and lz.leases[LID].renews == 2 and lz.leases[LID].deadline == 10_700 + 10_500


def test_a_new_leader_starts_from_the_checkpoint_and_never_earlier() -> None:
    old, new = Lessor(G, P), Lessor(G, P)
    recs = {LID: Record(10, 10_000, 1)}
    old.step(0, 3, lambda: recs.items(), lambda: [G])
    (cp,) = old.step(4_000, 3, lambda: recs.items(), lambda: [G])
    assert cp.cmd.kind == Kind.CHECKPOINT
    recs[LID] = Record(10, cp.cmd.remaining_ms, 1)  # the checkpoint applied
    # the new leader's clock is 1 h ahead and runs at a different rate: only elapsed time counts
    offset = 3_600_000
    new.step(offset + 4_500, 4, lambda: recs.items(), lambda: [G])
    assert new.leases[LID].deadline - offset >= old.leases[LID].deadline  # not early
    assert new.leases[LID].deadline - offset < 4_500 + 10_000  # not reset to the full TTL


def test_revoked_lease_is_dropped_everywhere_then_forgotten() -> None:
    lz = Lessor(G, P)
    recs = {LID: Record(10, 0, 1, leases.REVOKED)}
    out = lz.step(0, 1, lambda: recs.items(), lambda: [0, 1, G, 3])
    assert kinds(out) == [(1, Kind.DROP), (3, Kind.DROP)]
    lz.on_outcome(out[0], True)
    lz.on_outcome(out[1], False)
    assert kinds(lz.step(100, 1, lambda: recs.items(), lambda: [1, G, 3])) == []
    assert kinds(lz.step(600, 1, lambda: recs.items(), lambda: [1, G, 3])) == [(3, Kind.DROP)]
    lz.on_outcome(Proposal(3, LeaseCmd(Kind.DROP, LID)), True)
    (forget,) = lz.step(700, 1, lambda: recs.items(), lambda: [1, G, 3])
    assert forget == Proposal(G, LeaseCmd(Kind.FORGET, LID))
    lz.on_outcome(forget, True)
    del recs[LID]
    assert lz.step(800, 1, lambda: recs.items(), lambda: [1, G, 3]) == [] and lz.revoked == {}


def test_the_data_groups_are_read_once_per_step_for_every_revoked_lease() -> None:
    """Many revoked leases whose DROPs all applied: one read of the data groups per step (not one
    per lease), and each still gets its FORGET, or the DROP of a group added meanwhile."""
    lz = Lessor(G, P)
    ids = [leases.make_id(G, 100 + i) for i in range(5)]
    recs = {lid: Record(10, 0, 1, leases.REVOKED) for lid in ids}
    groups = [1, G]
    reads = 0

    def data_groups() -> list[int]:
        nonlocal reads
        reads += 1
        return groups

    for p in lz.step(0, 1, lambda: recs.items(), data_groups):
        lz.on_outcome(p, True)  # every DROP applied
    reads = 0
    out = lz.step(50, 1, lambda: recs.items(), data_groups)  # no scan: only the FORGETs' read
    assert reads == 1 and sorted(p.cmd.lease_id for p in out) == sorted(ids)
    assert all(p == Proposal(G, LeaseCmd(Kind.FORGET, p.cmd.lease_id)) for p in out)
    groups = [1, G, 3]  # a group added (a move's target) before the FORGETs applied
    reads = 0
    out = lz.step(600, 1, lambda: recs.items(), data_groups)
    assert reads == 1 and kinds(out) == [(3, Kind.DROP)] * len(ids)


def test_losing_the_lead_forgets_everything() -> None:
    lz = Lessor(G, P)
    recs = {LID: Record(10, 10_000, 1)}
    lz.step(0, 1, lambda: recs.items(), lambda: [G])
    assert lz.leases
    assert lz.step(50, 0, lambda: recs.items(), lambda: [G]) == [] and not lz.leases
    lz.step(60, 2, lambda: recs.items(), lambda: [G])
    assert lz.leases[LID].deadline == 60 + 10_500  # timed afresh from the records in the new term


class _CountingLeases(dict):  # type: ignore[type-arg]
    """The lessor's lease table, counting the leases a step looks at."""

    looked = 0

    def get(self, *a: object) -> object:
        _CountingLeases.looked += 1
        return super().get(*a)

    def items(self) -> object:  # a walk of the whole table
        _CountingLeases.looked += len(self)
        return super().items()


def test_a_step_looks_only_at_what_is_due_in_deadline_order() -> None:
    p = LessorParams(drift=0.0, scan_interval_ms=10**9, checkpoint_interval_ms=10**9, retry_ms=500, max_proposals=3)
    lz = Lessor(G, p)
    ids = [leases.make_id(G, i) for i in range(1, 501)]
    recs = {lid: Record(10, 10 * (n + 1), 1) for n, lid in enumerate(reversed(ids))}  # deadlines 10 .. 5000 ms
    step = lambda now: lz.step(now, 3, lambda: recs.items(), lambda: [G])  # noqa: E731
    assert step(0) == []
    lz.leases = _CountingLeases(lz.leases)
    assert step(5) == [] and _CountingLeases.looked == 0  # 500 leases, none due: none looked at
    out = step(25)
    assert [x.cmd.lease_id for x in out] == [ids[-1], ids[-2]] and _CountingLeases.looked == 2
    out = step(1_000)  # at most max_proposals, earliest deadline first; the rest at the next step
    assert [x.cmd.lease_id for x in out] == [ids[-3], ids[-4], ids[-5]]
    assert [x.cmd.lease_id for x in step(1_000)] == [ids[-6], ids[-7], ids[-8]]
    assert all(x.cmd.kind == Kind.EXPIRE for x in out)
    del recs[ids[-9]]  # forgotten meanwhile: its heap entry is stale
    lz._scan(1_000, recs.items(), lambda: [G])
    assert ids[-9] not in [x.cmd.lease_id for x in step(1_001)]
    assert len(lz._heap) <= 4 * len(lz.leases) + 64
