"""Range moves in the whole-node simulator (`chaos/sim/moves.py`): the real move coordinator of
the metadata leader drives add-group / remove-group / rebalance moves over simulated RPCs while
clients run; seeds hold every invariant (and every move finishes after the heal), and bugs
planted into the node's move path are found within a stated number of seeds."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest

from chaos.sim.leases import leases_by_default
from chaos.sim.locks import locks_by_default
from chaos.sim.moves import CALL_MS, REQUEST_MS
from chaos.sim.nodes import NodeSimParams, NodeSimulation, run_node_seed
from chaos.sim.plant import MOVE_BUGS, NODE_BUGS, planted
from chaos.sim.scenarios import SCENARIOS, run_scenario
from chaos.sim.txn_model import txn_model_by_default
from chaos.sim.txn_pairs import txn_pairs_by_default

SEED_BUDGET = {
    # bug -> seeds (0, 1, ...) with moves on within which it must show. Measured on the
    # `simmoves` branch (first seed that finds it): serve-after-freeze 9, activate-before-install
    # 8, shared-install-token 5 (two coordinators racing inside one installation), flip-before-
    # activate 15 (an ACTIVATE lost with a leader that crashed or was cut off right after it was
    # proposed), cache-wrong-shard 0 (the ownership check; about half of all seeds find it).
    # Since the simulator answers writes early (as the real driver does), every seed's timing and
    # random stream differ: flip-before-activate is first found at seed 26; shared-install-token
    # (first at 35 then, and past 45 once the simulators were merged) is left to its scenario.
    # Revisions (format-3 commands, 8 bytes longer; writes proposed with each node's HLC) changed
    # every seed's timing again. Seed 86 then failed with and without the plant (a put waiting on
    # a range still moving at its deadline, now excused: `NodeSimulation._key_in_moving_range`), so
    # the budget test now also requires the finding seed to pass without the bug. Flip-before-
    # activate was then first really found at seed 107 (67-125 s of a CI run, and every timing
    # change moved that seed): it is left to its scenario `flip-before-activate`. The random
    # search stays a soak: `python -m chaos.sim --moves on --plant node-flip-before-activate
    # --start 100 --seeds 20` (prints one line per seed that finds it).
    "node-serve-after-freeze": 15,
    "node-activate-before-install": 15,
    "node-cache-wrong-shard": 5,
}
SCENARIO_ONLY = {
    "node-no-move-fence",
    "node-export-without-sessions",
    "node-shared-install-token",
    "node-flip-before-activate",
}
"""Move bugs that random seeds do not reach (or only rarely: two coordinators racing inside one
installation, `racing-install`; an ACTIVATE appended by the target's leader and lost with a
leader change before it commits, `flip-before-activate`): a stale request must meet a group
leader whose own map lags (`stale-freeze`, `stale-drop`); a retry must reach the target of a
move although its first attempt was applied at the source, which answers every retry from its
own session table, so only a source group that is gone sends it there (`lost-reply`). The
scripted scenarios catch them (`tests/simulation/test_node_sim_scenarios.py`;
`test_flip_before_activate_is_caught_by_its_scenario` below)."""


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize(("nodes", "seeds"), [(3, 8), (5, 3)])
def test_move_seeds_hold_every_invariant(nodes: int, seeds: int) -> None:
    bad = []
    planned = done = ops = 0
    for seed in range(seeds):
        res = run_node_seed(seed, nodes=nodes, moves=True)
        ops += res.ops
        planned += res.moves.get("moves", 0)
        done += res.moves.get("moves_done", 0)
        if not res.ok:
            bad.append((seed, res.violation))
    assert bad == []
    assert planned > seeds  # the admin planned moves, and ...
    assert done == planned  # ... every one finished (liveness checks it per seed too)
    assert ops > seeds * 100


def test_a_move_seed_replays_exactly() -> None:
    """The first seed (of 0..9, moves on) whose admin planned a range move, run twice: the same
    moves and the same history. Which seeds plan one is schedule-dependent (any change to message
    timing moves them; seed 3, named here before, planned none once commit announcements stopped
    being answered), so the test searches a range rather than naming one."""
    for seed in range(10):
        a = run_node_seed(seed, moves=True)
        assert a.ok, (seed, a.violation)
        if a.moves.get("moves", 0) > 0:
            break
    else:
        raise AssertionError("no seed of 0..9 planned a range move")
    b = run_node_seed(seed, moves=True)
    assert b.ok, (seed, b.violation)
    assert a.moves == b.moves
    assert [(o.process, o.f, o.key, o.value, o.output, o.invoke, o.complete) for o in a.history] == [
        (o.process, o.f, o.key, o.value, o.output, o.invoke, o.complete) for o in b.history
    ]


def test_every_move_bug_has_a_budget_or_a_scenario() -> None:
    assert set(SEED_BUDGET) | SCENARIO_ONLY == set(MOVE_BUGS)
    assert not set(SEED_BUDGET) & SCENARIO_ONLY
    assert {sc.catches for sc in SCENARIOS.values()} >= SCENARIO_ONLY


def test_membership_churn_and_moves_together() -> None:
    """Voters replaced by new nodes while ranges move (each member change recorded in the map,
    racing the coordinator's compare-and-swaps): every invariant holds, every move and every
    replacement finishes. (Not on random seeds yet: see `NodeSimParams.with_moves`.)"""
    changes = 0
    for seed in range(6):
        p = NodeSimParams.draw(random.Random(seed), 3, moves=True)
        p.membership = True
        res = run_node_seed(seed, params=p)
        assert res.ok, (seed, res.violation)
        changes += res.membership_changes
    assert changes >= 3


def test_late_requests_between_two_groups() -> None:
    """Coordinators' requests held up in the network (arriving long after their caller gave up,
    after a move and its reverse between two groups) change nothing."""
    for seed in range(6):
        p = NodeSimParams.draw(random.Random(seed), 3, moves=True)
        p.long_delay, p.groups, p.max_groups = 0.1, 2, 2
        res = run_node_seed(seed, params=p)
        assert res.ok, (seed, res.violation)
        assert res.moves.get("moves_done", 0) == res.moves.get("moves", -1) > 0


def test_plants_restore_the_code() -> None:
    for bug in MOVE_BUGS:
        owner, attr, fake = NODE_BUGS[bug]
        before = owner.__dict__[attr]
        with planted(bug):
            assert owner.__dict__[attr] is fake
        assert owner.__dict__[attr] is before


@pytest.mark.parametrize("bug", sorted(SEED_BUDGET))
def test_planted_move_bug_is_found(bug: str) -> None:
    for seed in range(SEED_BUDGET[bug]):
        with planted(bug):
            found = not run_node_seed(seed, moves=True).ok
        if found:
            # the bug, not the seed: the same seed passes without it
            clean = run_node_seed(seed, moves=True)
            assert clean.ok, f"seed {seed} fails without {bug!r} too: {clean.violation}"
            return
    pytest.fail(f"planted bug {bug!r} not found in {SEED_BUDGET[bug]} seeds")


def test_flip_before_activate_is_caught_by_its_scenario() -> None:
    """`node-flip-before-activate` (left to its scenario, see `SEED_BUDGET`): the target group's
    leader appends the move's ACTIVATE and is cut off before it commits, so the entry is lost
    with the leader change. The real coordinator retries it and flips the map only once a
    replica applied it (the run passes); the plant acknowledges the append, the map flips while
    nobody serves the ranges, and the run fails. Both runs reached every step of the script."""
    clean = run_scenario("flip-before-activate")
    with planted("node-flip-before-activate"):
        bad = run_scenario("flip-before-activate")
    for out in (clean, bad):
        notes = "\n".join(out.notes)
        assert out.gave_up is None, notes
        assert "activate_lost" in out.facts, notes  # the ACTIVATE was appended, then overwritten
        assert "flipped" in out.facts, notes
        assert out.notes[-1].endswith("script done"), notes
    assert clean.result.ok, clean.result.violation
    assert clean.facts["flipped"] == "served"
    assert clean.result.moves.get("moves_done", 0) == clean.result.moves.get("moves", -1) == 1
    assert not bad.result.ok and bad.result.violation
    assert bad.facts["flipped"] == "unserved"


def test_a_stale_step_of_a_finished_move_stops_at_once() -> None:
    """Seed 1222 (3 nodes, one ReadIndex round at a time): a coordinator deposed mid-step (a
    leadership transfer aimed at the step) kept retrying the DROP of a move its successor had
    finished, refused by every node ("no range move 1 in this node's shard map (version 5)"),
    until its 1.5 s deadline, well after the heal; the next move then missed the liveness bound.
    Refused by a map as new as the caller's, the step now fails at once
    (`grouprequests.refused_for_good`, as `GroupCaller.call` does) and every move finishes.

    The test runs 3-node seeds from 1200 (moves drawn), each of which must pass, up to the first
    whose coordinator had such a step refused (a failure "no range move N in this node's shard
    map") in a run of two moves or more, all finished. Which seeds do is schedule-dependent (any
    change to message timing moves them: 1222 planned a single move, none refused, once commit
    announcements stopped being answered; 1225 then was the first), so the test searches a range
    rather than naming one (about one seed in twenty does)."""
    for seed in range(1200, 1300):
        sim = NodeSimulation(seed, nodes=3)
        res = sim.run()
        assert res.ok, (seed, res.violation)
        if sim.moves is None:
            continue
        stale = [f for f in sim.moves.failures if "coordinator: no range move" in f]
        if stale and res.moves["moves"] == res.moves["moves_done"] >= 2:
            break
    else:
        raise AssertionError("no stale step of a finished move refused in seeds 1200..1299")


def test_a_step_on_the_slowest_group_is_awaited_as_long_as_groupcaller_awaits_it() -> None:
    """Seed 3108 as `python -m chaos.sim --nodes 5 --watches on --moves on` runs it: one entry per
    append, one append in flight, 2-20 ms hops and a slow disk, so a loaded group commits a few
    dozen entries a second and a command waits 300-800 ms for its commit. The simulator's
    coordinator gave each attempt 100 ms (the product's `GroupCaller` awaits one for the node's
    request timeout, a quarter of the call's deadline) and proposed the FREEZE again while the
    last one was still queued: every FREEZE was applied, none within its attempt, and both moves
    stayed PENDING 3 s after the heal. Each attempt now waits `REQUEST_MS`: every move finishes."""
    assert CALL_MS == 4 * REQUEST_MS  # as GroupCaller: the deadline is four request timeouts
    seed = 3108
    res = run_node_seed(seed, nodes=5, moves=True, watches=True, txn_pairs=txn_pairs_by_default(seed),
                        leases=leases_by_default(seed), txns=txn_model_by_default(seed),
                        locks=locks_by_default(seed))
    assert res.ok, res.violation
    assert res.moves and res.moves["moves"] == res.moves["moves_done"] >= 2
