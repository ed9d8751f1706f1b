"""The whole-node simulator (`chaos/sim/nodes.py`): real node logic, host, state machine and
in-memory store on a simulated network. Seeds hold every invariant, replay exactly, and the bugs
planted into the node (not only the core) are found."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.sim.nodes import NodeSimParams, NodeSimulation, memory_store, run_node_seed
from chaos.sim.plant import BUGS, MOVE_BUGS, NODE_BUGS, planted
from kvstore.node.memstore import FaultRates, MemoryNodeStore

SEED_BUDGET = 60


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)  # refused forgeries, failed fsyncs: expected and loud
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize(("nodes", "seeds"), [(3, 25), (5, 10)])
def test_seeds_hold_every_invariant(nodes: int, seeds: int) -> None:
    bad = []
    ops = forged = changes = 0
    refused: set[str] = set()
    for seed in range(seeds):
        res = run_node_seed(seed, nodes=nodes)
        ops += res.ops
        forged += res.forged
        changes += res.membership_changes
        refused |= set(res.refused)
        if not res.ok:
            bad.append((seed, res.violation))
    assert bad == []
    assert ops > seeds * 100  # the runs did real work
    assert forged > 0  # and the outsider and the rogue member forged messages that admission refused:
    # the outsider at the node's door, the rogue member (under members' ids) by the group-level rules
    assert {"not_member", "timeout_now", "beyond_log", "term_jump"} <= refused
    assert changes > 0  # and voters were replaced by new nodes


def test_a_seed_replays_exactly() -> None:
    a, b = run_node_seed(7), run_node_seed(7)
    assert a.ok and b.ok
    assert [(o.process, o.f, o.key, o.value, o.output, o.invoke, o.complete) for o in a.history] == [
        (o.process, o.f, o.key, o.value, o.output, o.invoke, o.complete) for o in b.history
    ]
    assert a.events == b.events


def _churn_params(seed: int, nodes: int, torn: float = 0.0) -> NodeSimParams:
    """The seed's own draw, with membership churn on and range moves off."""
    p = NodeSimParams.draw(random.Random(seed), nodes, moves=False)
    p.membership = True
    if torn:
        p.torn_write = torn
    return p


def test_replaced_voters_are_placed_in_the_map_without_range_moves() -> None:
    """Found as seed 1194 (membership churn, no range moves) once writes were answered early:
    the churn driver recorded members in the map only when ranges moved, so the map never placed
    a group on its new nodes and the newest refused its leader (another new node) for good
    (`unknown_group`), until the group lost its quorum. The Admin service records every data
    group's change; so does the driver now (the unit side: tests/unit/test_admin_member_steps.py)."""
    changes = 0
    for seed in (1194, 3, 4, 5):
        res = run_node_seed(seed, nodes=3, params=_churn_params(seed, 3))
        assert res.ok, (seed, res.violation)
        changes += res.membership_changes
    assert changes >= 2


def test_a_node_started_after_the_heal_has_no_disk_faults() -> None:
    """Found as seed 77 (5 nodes, membership churn): a replacement started after the heal got
    the seed's torn-write rate for good and kept crashing, losing a read invoked after the
    cluster settled. Faults stop at the heal for every node, also those started later."""
    sim = NodeSimulation(77, 5, params=_churn_params(77, 5, torn=0.01))
    make = memory_store(sim)
    before = make(9, Path("n9"))
    assert isinstance(before, MemoryNodeStore) and before.rates.torn == 0.01
    sim.healed_at = 3000
    after = make(10, Path("n10"))
    assert isinstance(after, MemoryNodeStore) and after.rates == FaultRates()


def test_disk_faults_are_survived() -> None:
    """Failed fsyncs (the host retries the cycle), full disks (freed later) and torn writes (the
    machine crashes mid-sync; all or nothing of that transaction survives) lose nothing."""
    for seed in range(6):
        p = NodeSimParams.draw(random.Random(seed), 3)
        p.fsync_fail, p.torn_write = 0.05, 0.01
        res = run_node_seed(seed, params=p)
        assert res.ok, res.violation


@pytest.mark.parametrize("bug", sorted(set(NODE_BUGS) - set(MOVE_BUGS)))  # moves: test_node_sim_moves.py
def test_planted_node_bug_is_found(bug: str) -> None:
    for seed in range(SEED_BUDGET):
        with planted(bug):
            found = not run_node_seed(seed).ok
        if found:
            clean = run_node_seed(seed)  # the bug, not the seed: the same seed passes without it
            assert clean.ok, f"seed {seed} fails without {bug!r} too: {clean.violation}"
            return
    pytest.fail(f"planted bug {bug!r} not found in {SEED_BUDGET} seeds")


def test_planted_wal_bug_is_found() -> None:
    """`wal-skip-fdatasync`: the WAL acknowledges a cycle without its fdatasync. The simulated
    nodes keep their Raft logs in that WAL on `SimFileSystem`, whose crashes lose what no
    fdatasync covered, so a restarted node finds its log behind what it acknowledged and
    applied (a kill -9 would keep the page cache and hide it: `chaos/nodekill.py` cannot)."""
    for seed in range(10):  # found at seed 0
        with planted("wal-skip-fdatasync"):
            res = run_node_seed(seed)
        if not res.ok:
            assert res.violation
            clean = run_node_seed(seed)
            assert clean.ok, f"seed {seed} fails without the bug too: {clean.violation}"
            return
    pytest.fail("planted bug 'wal-skip-fdatasync' not found in 10 seeds")


LMDB_BUG_BUDGET = {
    "lmdb-compact-past-checkpoint": 12,  # first found at seed 5 (a restarted core's applied index beyond its log)
    "lmdb-skip-meta-restore": 8,  # seed 4 (replicas disagree on a revision: entries the node believed applied)
}
"""The LMDB checkpointer's planted bugs (`plant.STORAGE_BUGS`), in the simulator's default checkpoint
mode (`MemoryNodeStore(state_sync="checkpoint")`: a crash loses every apply since the last
checkpoint, and the restarted cores replay the WAL)."""


@pytest.mark.parametrize("bug", sorted(LMDB_BUG_BUDGET))
def test_planted_checkpointer_bug_is_found(bug: str) -> None:
    for seed in range(LMDB_BUG_BUDGET[bug]):
        with planted(bug):
            res = run_node_seed(seed)
        if not res.ok:
            assert res.violation
            clean = run_node_seed(seed)
            assert clean.ok, f"seed {seed} fails without {bug!r} too: {clean.violation}"
            return
    pytest.fail(f"planted bug {bug!r} not found in {LMDB_BUG_BUDGET[bug]} seeds")


CORE_BUG_BUDGET = {
    "commit-previous-term": 150,  # first found at seed 20 (Figure 8: `churn.py` with one-entry appends)
    "lease-across-quiescence": 100,  # seed 17 (quiescence, lease reads and an isolated leader)
    "forget-vote": 100,  # seed 17
    "read-without-confirmation": 30,  # seed 7
    "wake-does-nothing": 30,  # seed 2
    "skip-log-consistency-check": 30,  # seed 2
    "apply-before-commit": 30,  # seed 6 (1 before followers were told commits at once)
    "vote-without-log-check": 30,  # seed 1
    "no-admission": 30,  # seed 0 (the rogue member's acknowledgement beyond the log)
}
"""Every bug planted into the Raft core (`plant.BUGS`) is found within this many seeds (3
nodes, seeds 0..N-1, the default fault mix; the search stops at the first failing seed)."""


NOT_YET_BY_SEEDS = {"apply-before-persist"}
"""Core bugs random seeds have not been shown to find yet (merged from `readyloop` at the end of
this branch's work): the transcript `leader_persistence.txt` catches it
(`tests/unit/test_raft_transcripts.py`)."""


def test_every_core_bug_has_a_budget() -> None:
    assert sorted(set(CORE_BUG_BUDGET) | NOT_YET_BY_SEEDS) == sorted(BUGS)
    assert max(CORE_BUG_BUDGET.values()) <= 1000


@pytest.mark.parametrize("bug", sorted(CORE_BUG_BUDGET))
def test_planted_core_bug_is_found_through_whole_nodes(bug: str) -> None:
    budget = CORE_BUG_BUDGET[bug]
    for seed in range(budget):
        with planted(bug):
            res = run_node_seed(seed)
        if not res.ok:
            assert res.violation
            clean = run_node_seed(seed)  # the bug, not the seed: the same seed passes without it
            assert clean.ok, f"seed {seed} fails without {bug!r} too: {clean.violation}"
            return
    pytest.fail(f"planted bug {bug!r} not found in {budget} seeds")


def test_figure8_is_found_by_competing_suffixes_with_one_entry_appends() -> None:
    """The fault mix that provokes Figure 8 (`churn.py` with appends of one entry) finds a core
    that commits an earlier term's entry by counting replicas within a few seeds, as a safety
    violation; the real core passes the same seeds."""
    def params(seed: int) -> NodeSimParams:
        p = NodeSimParams.draw(random.Random(seed), 3)
        p.churn, p.max_size_per_msg = True, 1
        return p

    with planted("commit-previous-term"):
        found = next((s for s in range(20) if not run_node_seed(s, params=params(s)).ok), None)
    assert found is not None, "not found in 20 seeds"
    res = run_node_seed(found, params=params(found))
    assert res.ok, res.violation

