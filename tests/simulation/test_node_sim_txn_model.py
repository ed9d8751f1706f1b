"""General transactions in the whole-node simulator (`chaos/sim/txn_model.py`), forced on: seeds
pass the model check (one-group and cross-group transactions, both branches, writers and
read-only ones, real-time pairs), and a planted TXN that evaluates its compares on a stale read
is found by the model on some seed of a small range, which passes without it."""

from __future__ import annotations

from chaos.sim.nodes import run_node_seed
from chaos.sim.plant import TXN_MODEL_BUGS, planted

SEED_BUDGET = 8


def test_general_transactions_are_serializable_on_seeds() -> None:
    writers = readers = crossed = failed = realtime = 0
    for seed in range(3000, 3006):
        res = run_node_seed(seed, txns=True)
        assert res.ok, res.violation
        assert res.txns is not None
        writers += res.txns.writers_checked
        readers += res.txns.readers_checked
        crossed += res.txns.cross_answered
        failed += res.txns.failed_branch
        realtime += res.txns.realtime_pairs
    assert writers > 0 and readers > 0 and crossed > 0 and failed > 0 and realtime > 0


def test_planted_stale_compare_is_found_by_the_model() -> None:
    for bug in TXN_MODEL_BUGS:
        for seed in range(SEED_BUDGET):
            with planted(bug):
                res = run_node_seed(seed, txns=True)
            if res.violation is not None and res.violation.startswith("TxnModelViolation"):
                clean = run_node_seed(seed, txns=True)
                assert clean.ok, f"seed {seed} fails without {bug!r} too: {clean.violation}"
                break
        else:
            raise AssertionError(f"planted bug {bug!r} not found by the model in {SEED_BUDGET} seeds")
