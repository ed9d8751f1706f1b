"""Locks with fencing tokens in the whole-node simulator (`chaos/sim/locks.py`), forced on: seeds
pass (acquisitions real at their scan's revision, the resource never accepts holders out of
order), locks are acquired and a paused holder's stale token is refused somewhere, and each
planted lock bug (holder = the newest key; token = the lease id) is found on some seed of a small
range that passes without it."""

from __future__ import annotations

from chaos.sim.nodes import run_node_seed
from chaos.sim.plant import LOCK_BUGS, planted

SEED_BUDGET = 6
LOCK_SEEDS = 30
"""Seeds 0.. searched for a stale token refused (seeds 9, 23 and 25 of 0..29 refuse one)."""


def test_locks_hold_and_make_progress_on_seeds() -> None:
    # Every seed from 0 passes, until the seeds so far have acquired a lock, had a holder's write
    # accepted and refused a paused holder's stale token. Few seeds refuse one, and which do is
    # schedule-dependent (any change to message timing moves them: seed 1 did until retries joined
    # their pending entries at the leader, 13 until commit announcements stopped being answered,
    # 9 does now), so the test searches a range rather than naming seeds.
    acquired = accepted = refused = 0
    for seed in range(LOCK_SEEDS):
        res = run_node_seed(seed, locks=True, quiesce=False)
        assert res.ok, f"seed {seed}: {res.violation}"
        assert res.locks is not None
        acquired += res.locks.acquired
        accepted += res.locks.accepted
        refused += res.locks.refused
        if acquired > 0 and accepted > 0 and refused > 0:
            break
    else:
        seen = f"{acquired} acquired, {accepted} accepted, {refused} refused"
        raise AssertionError(f"no stale token refused (or no lock used) in seeds 0..{LOCK_SEEDS - 1}: {seen}")


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
