"""Tests for chaos.checker: porcupine's vectors, the KV model, counterexamples, budgets, I/O, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.checker import (
    CheckResult,
    KVModel,
    Operation,
    Status,
    Verdict,
    check,
    dump_jsonl,
    load_history,
    load_jsonl,
    load_porcupine_etcd,
    load_porcupine_kv,
)
from chaos.checker.wgl import Search

REPO = Path(__file__).resolve().parents[2]


def _vectors_dir() -> Path:
    env = os.environ.get("KVSTORE_VECTORS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "vectors/porcupine"


VECTORS = _vectors_dir()
EXPECTED_TSV = VECTORS / "expected.tsv"
VERDICTS = {
    "linearizable": Verdict.LINEARIZABLE,
    "not_linearizable": Verdict.NOT_LINEARIZABLE,
    "none_empty_file": Verdict.LINEARIZABLE,  # etcd_095: empty history, trivially linearizable
}


def _expected() -> list[tuple[str, str]]:
    if not EXPECTED_TSV.is_file():
        # a parameter that fails in the test (a missing vectors folder must not skip silently)
        return [("<missing vectors>", "missing")]
    rows = []
    for line in EXPECTED_TSV.read_text().splitlines()[1:]:
        if line.strip():
            name, verdict, _model = line.split("\t")
            rows.append((name, verdict))
    return rows


_TIMINGS: dict[str, float] = {}  # per vector: time to the verdict (without minimizing)
_MINIMIZE: dict[str, float] = {}  # per vector: time spent minimizing the counterexample


@pytest.fixture(scope="module", autouse=True)
def _timing_report() -> Iterator[None]:
    yield
    if _TIMINGS:
        slowest = max(_TIMINGS, key=lambda k: _TIMINGS[k])
        worst_min = max(_MINIMIZE, key=lambda k: _MINIMIZE[k], default="-")
        print(
            f"\nporcupine vectors: {len(_TIMINGS)} files, verdicts in {sum(_TIMINGS.values()):.3f} s total"
            f" (slowest {slowest} {_TIMINGS[slowest]:.3f} s); counterexample minimization"
            f" {sum(_MINIMIZE.values()):.3f} s total (slowest {worst_min} {_MINIMIZE.get(worst_min, 0):.3f} s)"
        )


# --------------------------------------------------------------------------------------------
# (a) porcupine vectors


@pytest.mark.parametrize(("name", "expected"), _expected(), ids=[n for n, _ in _expected()])
def test_porcupine_vector(name: str, expected: str) -> None:
    assert EXPECTED_TSV.is_file(), f"porcupine vectors not found at {VECTORS} (set KVSTORE_VECTORS)"
    path = VECTORS / name
    assert path.is_file(), path
    ops, model = load_history(str(path), "porcupine")
    t0 = time.perf_counter()
    result = check(ops, model, timeout=60)
    elapsed = time.perf_counter() - t0
    _TIMINGS[name] = elapsed - result.minimize_elapsed
    _MINIMIZE[name] = result.minimize_elapsed
    print(
        f"{name}: {result.verdict.value} in {_TIMINGS[name]:.3f} s"
        f" (+{result.minimize_elapsed:.3f} s minimizing {len(result.counterexample)} ops)"
    )
    assert result.verdict is VERDICTS[expected], (name, result.key_results)
    if result.verdict is Verdict.NOT_LINEARIZABLE:
        _assert_good_counterexample(result, model)


def test_c50_bad_is_quick() -> None:
    ops, model = load_history(str(VECTORS / "kv/c50-bad.txt"))
    t0 = time.perf_counter()
    result = check(ops, model, timeout=10)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert time.perf_counter() - t0 < 3.0


def test_loaders_match_expected_md() -> None:
    ops = load_porcupine_etcd(VECTORS / "jepsen/etcd_000.log")
    assert len(ops) == 85
    assert sum(op.status is Status.INFO for op in ops) == 16
    assert sum(op.f == "cas" and op.output is False for op in ops) == 20
    assert {op.key for op in ops} == {"x"}
    # etcd_100 has 5 ":fail :read :timed-out" lines: dropped
    assert len(load_porcupine_etcd(VECTORS / "jepsen/etcd_100.log")) == 77 - 5
    assert load_porcupine_etcd(VECTORS / "jepsen/etcd_095.log") == []
    kv = load_porcupine_kv(VECTORS / "kv/c10-ok.txt")
    assert len(kv) == 337
    assert {op.f for op in kv} == {"get", "put", "append"}
    assert all(op.status is Status.OK and op.complete is not None for op in kv)


def test_c10_bad_key_results() -> None:
    """Per-key verdicts of c10-bad: 0,1,2,3,5,6,7,9 fail; 4 and 8 are fine (EXPECTED.md)."""
    ops, model = load_history(str(VECTORS / "kv/c10-bad.txt"))
    verdicts = {}
    for key in sorted({op.key for op in ops}):
        verdicts[key] = check([op for op in ops if op.key == key], model, timeout=10).verdict
    bad = {k for k, v in verdicts.items() if v is Verdict.NOT_LINEARIZABLE}
    assert bad == {"0", "1", "2", "3", "5", "6", "7", "9"}
    assert verdicts["4"] is verdicts["8"] is Verdict.LINEARIZABLE


# --------------------------------------------------------------------------------------------
# (b) hand-made KV histories


def op(
    process: int,
    f: str,
    key: str,
    value: object = None,
    output: object = None,
    invoke: float = 0.0,
    complete: float | None = None,
    status: Status = Status.OK,
) -> Operation:
    return Operation(process, f, key, value, output, invoke, complete, status)


def verdict(ops: list[Operation], model: KVModel | None = None) -> Verdict:
    return check(ops, model or KVModel(), timeout=10).verdict


def test_empty_history() -> None:
    result = check([])
    assert result.verdict is Verdict.LINEARIZABLE and result.key_results == {}


def test_stale_read_after_acknowledged_write() -> None:
    h = [
        op(0, "put", "a", "1", invoke=0, complete=1),
        op(1, "put", "a", "2", invoke=2, complete=3),
        op(2, "get", "a", output="1", invoke=4, complete=5),
    ]
    assert verdict(h) is Verdict.NOT_LINEARIZABLE
    # a read of the initial (absent) value after an acknowledged write
    h2 = [op(0, "put", "a", "1", invoke=0, complete=1), op(1, "get", "a", output=None, invoke=2, complete=3)]
    assert verdict(h2) is Verdict.NOT_LINEARIZABLE
    # ... but fine while the write is still in flight
    h3 = [op(0, "put", "a", "1", invoke=0, complete=5), op(1, "get", "a", output=None, invoke=2, complete=3)]
    assert verdict(h3) is Verdict.LINEARIZABLE


@pytest.mark.parametrize("seen", ["1", "2"])
def test_concurrent_writes_read_either(seen: str) -> None:
    h = [
        op(0, "put", "a", "1", invoke=0, complete=10),
        op(1, "put", "a", "2", invoke=1, complete=9),
        op(2, "get", "a", output=seen, invoke=11, complete=12),
        op(3, "get", "a", output=seen, invoke=13, complete=14),
    ]
    assert verdict(h) is Verdict.LINEARIZABLE


def test_reads_cannot_flip_flop_after_writes_complete() -> None:
    h = [
        op(0, "put", "a", "1", invoke=0, complete=10),
        op(1, "put", "a", "2", invoke=1, complete=9),
        op(2, "get", "a", output="1", invoke=11, complete=12),
        op(3, "get", "a", output="2", invoke=13, complete=14),
    ]
    assert verdict(h) is Verdict.NOT_LINEARIZABLE


def test_cas_semantics() -> None:
    put = op(0, "put", "a", "1", invoke=0, complete=1)
    ok_swap = op(1, "cas", "a", ("1", "2"), output=True, invoke=2, complete=3)
    read2 = op(2, "get", "a", output="2", invoke=4, complete=5)
    assert verdict([put, ok_swap, read2]) is Verdict.LINEARIZABLE
    # a successful cas whose expected value cannot be there
    bad_swap = op(1, "cas", "a", ("7", "2"), output=True, invoke=2, complete=3)
    assert verdict([put, bad_swap]) is Verdict.NOT_LINEARIZABLE
    # output None with status OK means "swapped"
    assert verdict([put, op(1, "cas", "a", ("1", "2"), invoke=2, complete=3), read2]) is Verdict.LINEARIZABLE
    # a cas that reports a failed compare must observe value != expected, and has no effect
    no_swap = op(1, "cas", "a", ("1", "2"), output=False, invoke=2, complete=3)
    assert verdict([put, no_swap]) is Verdict.NOT_LINEARIZABLE
    no_swap_ok = op(1, "cas", "a", ("9", "2"), output=False, invoke=2, complete=3)
    read1 = op(2, "get", "a", output="1", invoke=4, complete=5)
    assert verdict([put, no_swap_ok, read1]) is Verdict.LINEARIZABLE
    assert verdict([put, no_swap_ok, read2]) is Verdict.NOT_LINEARIZABLE
    # expected None means "key absent"
    create = op(0, "cas", "b", (None, "x"), output=True, invoke=0, complete=1)
    assert verdict([create, op(1, "get", "b", output="x", invoke=2, complete=3)]) is Verdict.LINEARIZABLE
    assert verdict([op(2, "put", "b", "y", invoke=-2, complete=-1), create]) is Verdict.NOT_LINEARIZABLE
    # an indeterminate cas may or may not swap
    info_cas = op(1, "cas", "a", ("1", "2"), invoke=2, status=Status.INFO)
    assert verdict([put, info_cas, read2]) is Verdict.LINEARIZABLE
    assert verdict([put, info_cas, read1]) is Verdict.LINEARIZABLE


def test_delete() -> None:
    put = op(0, "put", "a", "1", invoke=0, complete=1)
    delete = op(1, "delete", "a", invoke=2, complete=3)
    assert (
        verdict([put, delete, op(2, "get", "a", output=None, invoke=4, complete=5)]) is Verdict.LINEARIZABLE
    )
    assert (
        verdict([put, delete, op(2, "get", "a", output="1", invoke=4, complete=5)])
        is Verdict.NOT_LINEARIZABLE
    )
    # cas on a deleted key with expected None (absent)
    recreate = op(3, "cas", "a", (None, "3"), output=True, invoke=6, complete=7)
    assert verdict([put, delete, recreate]) is Verdict.LINEARIZABLE


def test_indeterminate_put() -> None:
    put = op(0, "put", "a", "1", invoke=0, complete=1)
    maybe = op(1, "put", "a", "2", invoke=2, status=Status.INFO)
    # observed much later: linearizable (it took effect after its invocation)
    seen = op(2, "get", "a", output="2", invoke=100, complete=101)
    assert verdict([put, maybe, seen]) is Verdict.LINEARIZABLE
    # never observed: linearizable (it never took effect)
    unseen = op(2, "get", "a", output="1", invoke=100, complete=101)
    assert verdict([put, maybe, unseen]) is Verdict.LINEARIZABLE
    # observed, then the old value again: it cannot be undone
    assert verdict([put, maybe, seen, op(3, "get", "a", output="1", invoke=102, complete=103)]) is (
        Verdict.NOT_LINEARIZABLE
    )
    # it cannot take effect before its invocation
    early = op(2, "get", "a", output="2", invoke=0.5, complete=1.5)
    assert verdict([put, maybe, early]) is Verdict.NOT_LINEARIZABLE


def test_failed_ops_are_dropped() -> None:
    put = op(0, "put", "a", "1", invoke=0, complete=1)
    failed = op(1, "put", "a", "2", invoke=2, complete=3, status=Status.FAIL)
    read1 = op(2, "get", "a", output="1", invoke=4, complete=5)
    read2 = op(2, "get", "a", output="2", invoke=4, complete=5)
    assert verdict([put, failed, read1]) is Verdict.LINEARIZABLE
    assert verdict([put, failed, read2]) is Verdict.NOT_LINEARIZABLE
    failed_cas = op(1, "cas", "a", ("1", "2"), invoke=2, complete=3, status=Status.FAIL)
    assert verdict([put, failed_cas, read1]) is Verdict.LINEARIZABLE
    # a key with only failed ops has nothing to check
    assert check([failed]).key_results == {}


def test_append_and_missing_model() -> None:
    h = [
        op(0, "append", "a", "x", invoke=0, complete=1),
        op(1, "append", "a", "y", invoke=2, complete=3),
        op(2, "get", "a", output="xy", invoke=4, complete=5),
    ]
    assert verdict(h) is Verdict.LINEARIZABLE
    assert verdict(h, KVModel(missing="")) is Verdict.LINEARIZABLE
    empty_read = [op(0, "get", "a", output="", invoke=0, complete=1)]
    assert verdict(empty_read, KVModel(missing="")) is Verdict.LINEARIZABLE
    assert verdict(empty_read) is Verdict.NOT_LINEARIZABLE  # absent is None, not ""


def test_keys_are_independent() -> None:
    h = [
        op(0, "put", "a", "1", invoke=0, complete=1),
        op(1, "put", "b", "2", invoke=0, complete=1),
        op(2, "get", "a", output="1", invoke=2, complete=3),
        op(3, "get", "b", output="1", invoke=2, complete=3),
    ]
    result = check(h)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert result.bad_key == "b"
    assert result.key_results["b"] is Verdict.NOT_LINEARIZABLE


# --------------------------------------------------------------------------------------------
# (c) counterexamples


def _assert_good_counterexample(result: CheckResult, model: KVModel) -> None:
    ce = result.counterexample
    assert ce, "empty counterexample"
    assert result.bad_key is not None
    assert {o.key for o in ce} == {result.bad_key}
    again = check(ce, model, timeout=30, minimize_budget=0)
    assert again.verdict is Verdict.NOT_LINEARIZABLE


def test_counterexample_small_and_refuted() -> None:
    filler = [op(9, "put", "z", str(i), invoke=10 * i, complete=10 * i + 1) for i in range(20)]
    reads = [op(8, "get", "a", output="1", invoke=10 * i + 2, complete=10 * i + 3) for i in range(1, 10)]
    h = [
        op(0, "put", "a", "1", invoke=0, complete=1),
        *reads,
        op(1, "put", "a", "2", invoke=100, complete=101),
        op(2, "get", "a", output="1", invoke=102, complete=103),  # stale
        op(3, "get", "a", output="2", invoke=104, complete=105),
        *filler,
    ]
    result = check(h)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert result.bad_key == "a"
    _assert_good_counterexample(result, KVModel())
    # the write the stale read missed, and the stale read: the history before the write is cut
    # away (no value of the key before it explains the read) and the other reads are dropped
    assert [(o.f, o.value, o.output) for o in result.counterexample] == [
        ("put", "2", None),
        ("get", None, "1"),
    ]
    assert result.counterexample_any_start


@pytest.mark.parametrize("name", ["jepsen/etcd_000.log", "kv/c50-bad.txt"])
def test_counterexample_from_vectors(name: str) -> None:
    ops, model = load_history(str(VECTORS / name))
    result = check(ops, model)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    _assert_good_counterexample(result, model)
    assert len(result.counterexample) < len([o for o in ops if o.key == result.bad_key])


# --------------------------------------------------------------------------------------------
# (d) budgets: never hang, never a wrong verdict


def _adversarial(n: int = 40) -> list[Operation]:
    """n mutually concurrent writes, then a read of a value nobody wrote: not linearizable,
    but refuting it means exploring ~2^n subsets of writes."""
    h = [op(i, "put", "k", f"v{i}", invoke=float(i), complete=float(n + i)) for i in range(n)]
    h.append(op(n, "get", "k", output="never", invoke=3.0 * n, complete=3.0 * n + 1))
    return h


def test_timeout_gives_unknown() -> None:
    t0 = time.perf_counter()
    result = check(_adversarial(), timeout=0.01)
    assert time.perf_counter() - t0 < 2.0
    assert result.verdict is Verdict.UNKNOWN
    assert result.key_results == {"k": Verdict.UNKNOWN}
    assert result.counterexample == []


def test_step_budget_gives_unknown() -> None:
    result = check(_adversarial(), max_steps=500)
    assert result.verdict is Verdict.UNKNOWN
    assert result.steps["k"] <= 500


def test_cache_budget_gives_unknown() -> None:
    result = check(_adversarial(), max_cache=10_000, timeout=10)
    assert result.verdict is Verdict.UNKNOWN


def test_refutation_elsewhere_wins_over_unknown() -> None:
    stale = [
        op(50, "put", "b", "1", invoke=0, complete=1),
        op(51, "get", "b", output=None, invoke=2, complete=3),
    ]
    result = check(_adversarial() + stale, timeout=5)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert result.bad_key == "b"
    assert result.key_results["k"] is Verdict.UNKNOWN


def test_search_is_resumable() -> None:
    ops, model = load_history(str(VECTORS / "jepsen/etcd_002.log"))
    search = Search(ops, model)
    rounds = 0
    while (outcome := search.run(1_000)) is None:
        rounds += 1
    assert outcome is Verdict.LINEARIZABLE and rounds > 10


# --------------------------------------------------------------------------------------------
# (e) JSON lines round trip


def test_jsonl_round_trip(tmp_path: Path) -> None:
    h = [
        op(0, "put", "k1", "a", invoke=0.0, complete=1.5),
        op(1, "get", "k1", output="a", invoke=2.0, complete=3.0),
        op(2, "cas", "k1", ("a", "b"), output=True, invoke=3.5, complete=4.0),
        op(3, "cas", "k1", ("zz", "c"), output=False, invoke=4.5, complete=5.0),
        op(0, "cas", "k1", ("b", "d"), invoke=6.0, complete=7.0, status=Status.FAIL),
        op(4, "put", "k1", "maybe", invoke=8.0, status=Status.INFO),
        op(1, "delete", "k2", invoke=1.0, complete=2.0),
        op(1, "get", "k2", output=None, invoke=3.0, complete=3.0),  # zero-length op
        op(1, "append", "k3", "x", invoke=3.0, complete=3.5),  # invoked when the previous returned
        op(2, "get", "k1", invoke=9.0, status=Status.INFO),
    ]
    path = tmp_path / "h.jsonl"
    dump_jsonl(h, path)
    back = load_jsonl(path)
    key = lambda o: (o.invoke, o.process)  # noqa: E731
    assert sorted(back, key=key) == sorted(h, key=key)
    assert check(back).verdict is check(h).verdict is Verdict.LINEARIZABLE


def test_jsonl_loader_semantics(tmp_path: Path) -> None:
    lines = [
        '{"process": 1, "type": "invoke", "f": "put", "key": "k", "value": "v1", "time": 1}',
        '{"process": 1, "type": "ok", "f": "put", "key": "k", "value": "v1", "time": 2}',
        '{"process": 2, "type": "invoke", "f": "cas", "key": "k", "value": ["v1", "v2"], "time": 3}',
        '{"process": 3, "type": "invoke", "f": "cas", "key": "k", "value": [null, "v3"], "time": 3.5}',
        '{"process": 2, "type": "ok", "f": "cas", "key": "k", "value": ["v1", "v2"], "time": 4}',
        '{"process": 3, "type": "ok", "f": "cas", "key": "k", "value": [null, "v3"], "output": false, "time": 4.5}',
        '{"process": 4, "type": "invoke", "f": "put", "key": "k", "value": "v9", "time": 5}',
        '{"process": 4, "type": "fail", "f": "put", "key": "k", "value": "v9", "time": 6}',
        '{"process": 5, "type": "invoke", "f": "put", "key": "k", "value": "v5", "time": 7}',
        '{"process": 5, "type": "info", "f": "put", "key": "k", "value": "v5", "time": 8}',
        '{"process": 6, "type": "invoke", "f": "get", "key": "k", "value": null, "time": 9}',
        '{"process": 6, "type": "ok", "f": "get", "key": "k", "value": "v2", "time": 10}',
        '{"process": 7, "type": "invoke", "f": "put", "key": "k", "value": "v7", "time": 11}',
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ops = load_jsonl(path)
    by_proc = {o.process: o for o in ops}
    assert by_proc[2].value == ("v1", "v2") and by_proc[2].output is True
    assert by_proc[3].value == (None, "v3") and by_proc[3].output is False
    assert by_proc[4].status is Status.FAIL
    assert by_proc[5].status is Status.INFO and by_proc[5].complete is None
    assert by_proc[6].output == "v2" and by_proc[6].complete == 10
    assert by_proc[7].status is Status.INFO  # no completion at EOF
    assert check(ops).verdict is Verdict.LINEARIZABLE


# --------------------------------------------------------------------------------------------
# (f) CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "chaos.checker", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_linearizable() -> None:
    proc = _cli(str(VECTORS / "jepsen/etcd_002.log"), "--format", "porcupine")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "linearizable"


def test_cli_not_linearizable() -> None:
    proc = _cli(str(VECTORS / "kv/c10-bad.txt"), "--timeout", "20")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "not linearizable"
    assert any("key '7'" in line for line in lines)
    assert any("append('7'" in line for line in lines)


def test_cli_unknown_and_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "adv.jsonl"
    dump_jsonl(_adversarial(), path)
    proc = _cli(str(path), "--format", "jsonl", "--timeout", "0.05")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "unknown"


def test_cli_bad_input(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 3
