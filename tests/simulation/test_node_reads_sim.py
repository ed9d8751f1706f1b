"""Reads in the whole-node simulator: linearizable reads at followers (ReadIndex through
`kvstore.node.reads`), bounded and stale reads checked against their stated bound by the true
clock, and the two planted read bugs found. Plus the sans-I/O read logic's own rules."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest

from chaos.sim.nodes import NodeSimulation, run_node_seed
from chaos.sim.plant import planted
from chaos.sim.replica_reads import StalenessChecker, StaleReadViolation
from kvstore import errors
from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.reads import BOUNDED, STALE, NodeReads, ReadPoint, ReadSettings
from kvstore.raft import ConfState

UNAPPLIED_BUDGET = 30
"""node-replica-read-unapplied is first found at seed 8 (3 nodes)."""
STALE_BOUND_BUDGET = 10
"""node-stale-bound-lies is first found at seed 0 (13 of the first 30 seeds find it)."""


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def test_follower_reads_hold_every_invariant_and_do_real_work() -> None:
    served_at_followers = bounded_checked = replica_bounded = 0
    for seed in range(12):  # (leader cuts, one-entry appends and quiescence pauses: fewer follower reads a seed)
        sim = NodeSimulation(seed, 3)
        res = sim.run()
        assert res.ok, (seed, res.violation)
        served_at_followers += sim.stale_check.linearizable_at_followers
        bounded_checked += sim.stale_check.checked
        replica_bounded += sim.stale_check.replica_served
    assert served_at_followers > 50  # followers served linearizable reads (in the checked history)
    assert bounded_checked > 50 and replica_bounded > 20  # bounded / stale reads were checked


def test_five_nodes_with_follower_reads() -> None:
    for seed in range(3):
        res = run_node_seed(seed, nodes=5)
        assert res.ok, (seed, res.violation)


def test_replica_serving_an_unapplied_read_index_is_found() -> None:
    with planted("node-replica-read-unapplied"):
        for seed in range(UNAPPLIED_BUDGET):
            res = run_node_seed(seed)
            if not res.ok:
                assert res.violation is not None
                assert "linearizab" in res.violation or "StaleReadViolation" in res.violation
                return
    pytest.fail(f"a replica serving an unapplied read index was not found in {UNAPPLIED_BUDGET} seeds")


def test_staleness_evidence_from_the_response_time_is_found() -> None:
    with planted("node-stale-bound-lies"):
        for seed in range(STALE_BOUND_BUDGET):
            res = run_node_seed(seed)
            if not res.ok:
                assert res.violation is not None and "StaleReadViolation" in res.violation, res.violation
                return
    pytest.fail(f"lying staleness evidence was not found in {STALE_BOUND_BUDGET} seeds")


def test_staleness_checker_holds_reads_to_their_stated_bound() -> None:
    c = StalenessChecker()
    c.acked(1, 10, at=100)
    c.acked(1, 12, at=150)
    c.acked(2, 99, at=150)  # another group: irrelevant to group 1
    # Served at 200 with a 60 ms bound: must include everything acknowledged before 140 (index 10).
    c.check(1, 1, ReadPoint(10, 0.060, STALE), 0, 200, "ok")
    with pytest.raises(StaleReadViolation, match="older than its bound"):
        c.check(1, 1, ReadPoint(9, 0.060, STALE), 0, 200, "too old")
    # A 40 ms bound at 200 covers the write acknowledged at 150 too.
    with pytest.raises(StaleReadViolation):
        c.check(1, 1, ReadPoint(11, 0.040, STALE), 0, 200, "too old")
    # A write acknowledged exactly at the bound's edge may be missing (it may have raced the probe).
    c.check(1, 1, ReadPoint(10, 0.050, STALE), 0, 200, "edge")
    # A bounded read must state a bound within its max staleness.
    with pytest.raises(StaleReadViolation, match="max staleness"):
        c.check(1, 1, ReadPoint(12, 0.030, BOUNDED), 20, 200, "over")
    with pytest.raises(StaleReadViolation, match="max staleness"):
        c.check(1, 1, ReadPoint(12, None, BOUNDED), 20, 200, "unknown")
    assert c.checked == 4


def test_read_logic_is_deterministic_given_its_rng() -> None:
    """The same seed gives the same run, read contexts (nonces from the injected rng) included."""
    a, b = NodeSimulation(3, 3), NodeSimulation(3, 3)
    ra, rb = a.run(), b.run()
    assert ra.ok and rb.ok and ra.events == rb.events
    assert a.stale_check.checked == b.stale_check.checked and a.stale_check.worst_ms == b.stale_check.worst_ms


def _one_node(seed: int, now: list[float]) -> tuple[Host, NodeReads]:
    host = Host(1, MemoryNodeStore(), lambda ms: None, RaftSettings(), random.Random(0))
    host.open_group(1, ConfState((1,)))
    host.groups[1].core.campaign()
    while host.has_work():
        host.run_cycle()
    return host, NodeReads(host, ReadSettings(probe_ticks=1, demand_ticks=0), clock=lambda: now[0],
                           rng=random.Random(seed))


def test_node_reads_are_synchronous_with_clock_and_nonce_handed_in() -> None:
    now = [50.0]
    host, reads = _one_node(7, now)
    _, same = _one_node(7, now)
    _, other = _one_node(8, now)
    assert reads._next_ctx() == same._next_ctx() != other._next_ctx()  # the nonce is the rng's
    got: list[tuple[ReadPoint | None, object]] = []
    reads.read(1, STALE, 0, lambda p, e: got.append((p, e)))
    assert got == [(ReadPoint(host.store.applied_index(1), None, STALE), None)]  # at once, bound unknown
    # A probe sent at 50.0 and confirmed at 50.3 is evidence as of 50.0, its send time.
    reads.tick()
    now[0] = 50.3
    while host.has_work():
        host.run_cycle()
    now[0] = 51.0
    assert reads.staleness(1) == pytest.approx(1.0)
    # Not within 500 ms: the leader falls back to a ReadIndex round, whose bound is its own age;
    # a round slower than the bound is refused, a quick one is served with its age.
    def run(took: float) -> tuple[ReadPoint | None, object]:
        got.clear()
        reads.read(1, BOUNDED, 500, lambda p, e: got.append((p, e)))
        assert got == []  # waits for the round
        now[0] += took
        while host.has_work():
            host.run_cycle()
        assert len(got) == 1
        return got[0]

    point, err = run(0.6)
    assert point is None and isinstance(err, errors.StaleReplica)
    now[0] += 0.5  # the failed round's evidence is 1.1 s old now
    point, err = run(0.1)
    assert err is None and point is not None and point.staleness == pytest.approx(0.1)
