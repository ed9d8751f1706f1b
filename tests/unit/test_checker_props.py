"""Property tests for chaos.checker: the WGL search against a brute-force checker on small
random histories, counterexample soundness, and generated linearizable histories."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos.checker import KVModel, Operation, Status, Verdict, check, dump_jsonl, load_jsonl, minimize
from chaos.checker.wgl import return_time

VALUES = ["a", "b", "c"]


def brute_force(ops: Sequence[Operation], model: KVModel, initial: object = "init") -> bool:
    """Linearizable iff some subset of the INFO ops plus all OK ops has a legal order that
    respects real time (a before b when a returns strictly before b is invoked)."""
    ops = [o for o in ops if o.status is not Status.FAIL]
    must = [o for o in ops if o.status is Status.OK]
    maybe = [o for o in ops if o.status is Status.INFO]
    for r in range(len(maybe) + 1):
        for chosen in itertools.combinations(maybe, r):
            group = must + list(chosen)
            for perm in itertools.permutations(group):
                if not all(
                    not (return_time(perm[j]) < perm[i].invoke)
                    for i in range(len(perm))
                    for j in range(i + 1, len(perm))
                ):
                    continue
                state = model.init() if initial == "init" else initial
                for o in perm:
                    ok, state = model.step(state, o)
                    if not ok:
                        break
                else:
                    return True
    return False


@st.composite
def histories(draw: st.DrawFn) -> list[Operation]:
    n = draw(st.integers(min_value=1, max_value=6))
    ops = []
    for i in range(n):
        f = draw(st.sampled_from(["get", "put", "delete", "cas", "append"]))
        status = draw(st.sampled_from([Status.OK, Status.OK, Status.OK, Status.INFO, Status.FAIL]))
        invoke = float(draw(st.integers(min_value=0, max_value=8)))
        complete = invoke + draw(st.integers(min_value=0, max_value=6))
        value: object = None
        output: object = None
        if f in ("put", "append"):
            value = draw(st.sampled_from(VALUES))
        elif f == "cas":
            value = (draw(st.sampled_from([None, *VALUES])), draw(st.sampled_from(VALUES)))
            output = draw(st.sampled_from([True, False, None]))
        elif f == "get":
            output = draw(st.sampled_from([None, *VALUES, "ab", "aa"]))
        if status is Status.INFO:
            ops.append(Operation(i, f, "k", value, None, invoke, None, Status.INFO))
        else:
            ops.append(Operation(i, f, "k", value, output, invoke, complete, status))
    return ops


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.sampled_from([None, ""]))
def test_wgl_matches_brute_force(ops: list[Operation], missing: str | None) -> None:
    model = KVModel(missing=missing)
    result = check(ops, model, timeout=10)
    expected = brute_force(ops, model)
    assert result.verdict is (Verdict.LINEARIZABLE if expected else Verdict.NOT_LINEARIZABLE)
    if not expected:
        ce = result.counterexample
        assert ce and set(ce) <= set(ops)
        assert not brute_force(ce, model)
        if result.counterexample_any_start:
            # refuted whatever value the earlier ops left: any value written by an op invoked
            # before the counterexample's last one
            last = max(o.invoke for o in ce)
            done = [o for o in ops if o.status is not Status.FAIL and o.invoke <= last]
            written = {missing} | {o.value for o in done if o.f == "put"}
            written |= {o.value[1] for o in done if o.f == "cas" and o.output is not False}
            for initial in written:
                assert not brute_force(ce, model, initial), initial


def _linearizable_history(n: int, procs: int, keys: int, seed: int, info_p: float) -> list[Operation]:
    """Random history generated from a real sequential execution: each op takes effect at a
    random point inside its interval, so the history is linearizable by construction."""
    rng = random.Random(seed)
    clock = [0.0] * procs
    planned = []
    for i in range(n):
        p = rng.randrange(procs)
        invoke = clock[p] + rng.random()
        dur = rng.expovariate(1.0)
        clock[p] = invoke + dur
        planned.append((invoke + rng.random() * dur, p, invoke, invoke + dur, i))
    planned.sort()
    state: dict[str, str | None] = {}
    ops = []
    for _point, p, invoke, complete, i in planned:
        key = f"k{rng.randrange(keys)}"
        f = rng.choice(["get", "get", "put", "cas", "delete", "append"])
        cur = state.get(key)
        value: object = None
        output: object = None
        if f == "get":
            output = cur
        elif f == "put":
            value = state[key] = f"v{i}"
        elif f == "append":
            value = f"a{i}"
            state[key] = (cur or "") + f"a{i}"
        elif f == "delete":
            state[key] = None
        else:
            expected = cur if rng.random() < 0.5 else f"v{rng.randrange(n)}"
            value = (expected, f"c{i}")
            output = cur == expected
            if output:
                state[key] = f"c{i}"
        if rng.random() < info_p:
            ops.append(Operation(p, f, key, value, None, invoke, None, Status.INFO))
        else:
            ops.append(Operation(p, f, key, value, output, invoke, complete, Status.OK))
    return ops


def test_generated_linearizable_histories(tmp_path: Path) -> None:
    for seed in range(5):
        ops = _linearizable_history(1500, 6, 4, seed, info_p=0.02)
        result = check(ops, timeout=20)
        assert result.verdict is Verdict.LINEARIZABLE, (seed, result.key_results)
        path = tmp_path / f"h{seed}.jsonl"
        dump_jsonl(ops, path)
        assert check(load_jsonl(path), timeout=20).verdict is Verdict.LINEARIZABLE


def test_generated_history_with_a_stale_read() -> None:
    ops = _linearizable_history(600, 5, 1, 7, info_p=0.0)
    # after everything, an acknowledged put, then a read of the first put's value: stale
    last = max(o.complete or o.invoke for o in ops)
    first_put = next(o for o in sorted(ops, key=lambda o: o.invoke) if o.f == "put")
    ops.append(Operation(98, "put", first_put.key, "fresh", None, last + 1, last + 2))
    ops.append(Operation(99, "get", first_put.key, None, first_put.value, last + 3, last + 4))
    result = check(ops, timeout=20)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    ce = result.counterexample
    assert ce[-1].process == 99
    assert check(ce).verdict is Verdict.NOT_LINEARIZABLE
    assert minimize(ce) == ce or check(minimize(ce)).verdict is Verdict.NOT_LINEARIZABLE
