"""The simulation engine (`python -m chaos.sim`, whole nodes in `chaos/sim/nodes.py`): a seed
replays exactly, quiescence runs on a fixed half of the seeds and is exercised, the command line
reports and replays, planting a bug restores the code, and the scenario tests that pin down
precise interleavings have teeth."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from chaos.sim import quiesce_by_default, run_node_seed
from chaos.sim.plant import BUGS, planted


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)  # refused forgeries, failed fsyncs: expected and loud
    yield
    logging.disable(logging.NOTSET)


def _ops(res: object) -> list[tuple[object, ...]]:
    return [(o.process, o.f, o.key, o.value, o.output, o.invoke, o.complete) for o in res.history]  # type: ignore[attr-defined]


def test_same_seed_same_run() -> None:
    a = run_node_seed(7, trace=True)
    b = run_node_seed(7, trace=True)
    assert a.ok and b.ok
    assert a.trace == b.trace
    assert _ops(a) == _ops(b)
    assert a.events == b.events


def test_quiescence_runs_on_half_the_seeds_and_is_exercised() -> None:
    on = [s for s in range(1000, 1200) if quiesce_by_default(s)]
    assert 70 <= len(on) <= 130
    results = [run_node_seed(seed, quiesce=True) for seed in range(200, 208)]
    assert [r.violation for r in results if not r.ok] == []
    assert all(r.quiesce_ticks > 0 for r in results)
    # Groups went quiet (also while the faults went on) and woke up again in every run, and every
    # run's quiesced-leader scenario struck and recovered within its bound.
    assert all(r.quiesce.leader_quiesces > 0 and r.quiesce.follower_quiesces > 0 for r in results)
    assert sum(1 for r in results if r.quiesce.leader_quiesces_under_faults > 0) >= len(results) // 2
    assert all(r.quiesce.wakes > 0 for r in results)
    assert {r.quiesce.scenario for r in results} == {"crash", "isolate"}
    assert all(r.quiesce.recovered_ms is not None for r in results)


def test_runs_without_quiescence_are_unchanged_by_it() -> None:
    seed = next(s for s in range(100) if not quiesce_by_default(s))
    a = run_node_seed(seed, trace=True)
    b = run_node_seed(seed, trace=True, quiesce=False)
    assert a.ok and b.ok
    assert a.quiesce_ticks == b.quiesce_ticks == 0
    assert a.trace == b.trace and a.events == b.events
    assert a.quiesce.leader_quiesces == a.quiesce.wakes == 0 and a.quiesce.scenario == ""
    assert not any("QUIESCED" in line or "SCENARIO" in line for line in a.trace)


def test_plant_restores_the_core() -> None:
    cls, attr, bug = BUGS["forget-vote"]
    original = cls.__dict__[attr]
    with planted("forget-vote"):
        assert cls.__dict__[attr] is bug
    assert cls.__dict__[attr] is original


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos.sim", *args], capture_output=True, text=True, timeout=300)


def test_cli_reports_seeds_and_violations() -> None:
    out = _cli("--seeds", "3", "--start", "100")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "seeds: 3, violations: 0"
    assert "seeds/s" in out.stderr
    on = _cli("--seeds", "2", "--start", "100", "--quiesce", "on")
    assert on.returncode == 0, on.stdout + on.stderr
    summary = next(ln for ln in on.stdout.strip().splitlines() if ln.startswith("quiescence:"))
    assert summary.startswith("quiescence: on in 2/2 seeds; leader quiesced in 2/2"), summary
    off = _cli("--seeds", "2", "--start", "100", "--quiesce", "off")
    assert "quiescence: off in all 2 seeds" in off.stdout.strip().splitlines()
    bad = _cli("--seeds", "5", "--start", "5", "--plant", "apply-before-commit")  # seeds 6 and 9 find it
    assert bad.returncode == 1
    last = bad.stdout.strip().splitlines()[-1]
    assert last.startswith("seeds: 5, violations: ") and not last.endswith(" 0")


def test_trace_replays_a_seed() -> None:
    out = _cli("--seed", "3", "--trace")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert " LEADER g" in out.stdout and "client p" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "seeds: 1, violations: 0"


def _raft_core_tests() -> ModuleType:
    """tests/unit/test_raft_core.py (imported by path: only the folders of collected test files
    are on sys.path)."""
    if "test_raft_core" in sys.modules:
        return sys.modules["test_raft_core"]
    spec = importlib.util.spec_from_file_location(
        "test_raft_core", Path(__file__).resolve().parents[1] / "unit" / "test_raft_core.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["test_raft_core"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("bug", "scenario"),
    [
        ("commit-previous-term", "test_figure8_commit_only_by_counting_current_term_entries"),
        ("forget-vote", "test_vote_survives_a_restart"),
    ],
)
def test_scenario_tests_catch_planted_bug(bug: str, scenario: str) -> None:
    """Bugs that need a precise interleaving are also pinned down by scenario tests; prove they bite."""
    fn = getattr(_raft_core_tests(), scenario)
    fn()  # passes on the real core
    with planted(bug), pytest.raises(AssertionError):
        fn()
