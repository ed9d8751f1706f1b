"""Locks with fencing tokens in the whole-node simulator (`chaos/sim/locks.py`), forced on: seeds
pass (acquisitions real at their scan's revision, the resource never accepts holders out of
order), locks are acquired and a paused holder's stale token is refused somewhere, and each
planted lock bug (holder = the newest key; token = the lease id) is found on some seed of a small
range that passes without it."""

from __future__ import annotations

from chaos.sim.nodes import run_node_seed
from chaos.sim.plant import LOCK_BUGS, planted

SEED_BUDGET = 6


def test_locks_hold_and_make_progress_on_seeds() -> None:
    acquired = accepted = refused = 0
    # seed 13: a paused holder's stale token refused (seed 1 was, until retries joined their
    # pending entries at the leader changed its schedule)
    for seed in (0, 1, 2, 13):
        res = run_node_seed(seed, locks=True, quiesce=False)
        assert res.ok, res.violation
        assert res.locks is not None
        acquired += res.locks.acquired
        accepted += res.locks.accepted
        refused += res.locks.refused
    assert acquired > 0 and accepted > 0 and refused > 0


def test_planted_lock_bugs_are_found() -> None:
    for bug in LOCK_BUGS:
        for seed in range(SEED_BUDGET):
            with planted(bug):
                res = run_node_seed(seed, locks=True, quiesce=False)
            if res.violation is not None and res.violation.startswith("LockViolation"):
                clean = run_node_seed(seed, locks=True, quiesce=False)
                assert clean.ok, f"seed {seed} fails without {bug!r} too: {clean.violation}"
                break
        else:
            raise AssertionError(f"planted bug {bug!r} not found by the lock check in {SEED_BUDGET} seeds")
