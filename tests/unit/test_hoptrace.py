"""The hop tracer (kvstore/hoptrace.py) and bench/hops.py's analysis of its marks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.hops import GET_CHAIN, PUT_CHAIN, Timeline, op_windows, walk
from kvstore import hoptrace

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = "import kvstore.hoptrace as h\nprint(h.ON)\nh.mark('a') if h.ON else None\nh.mark('b') if h.ON else None\n"


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != hoptrace.ENV}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def test_off_without_the_environment_variable(tmp_path: Path) -> None:
    assert _run({}) == "False"
    assert list(tmp_path.iterdir()) == []


def test_on_records_and_dumps_at_exit(tmp_path: Path) -> None:
    assert _run({hoptrace.ENV: str(tmp_path)}) == "True"
    dumps = list(tmp_path.glob("*.hops"))
    assert len(dumps) == 1
    marks = hoptrace.read_dump(dumps[0])
    assert [name for _, name in marks] == ["a", "b"]
    assert marks[0][0] <= marks[1][0]


def _put_events(start: int, follower_delay: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]],
                                                           list[tuple[int, str]]]:
    """One put's marks, 10 µs apart per hop, the follower answering `follower_delay` later."""
    c, lead, f = [], [], []
    t = start
    shift = 0
    for _label, proc, name in PUT_CHAIN:
        if proc == "F" and name == "t.out":
            shift = follower_delay
        t += 10_000
        dest = {"C": c, "L": lead, "F": f}[proc]
        dest.append((t + shift, name))
    return c, lead, f


def test_walk_measures_each_hop_and_takes_the_first_follower_to_answer() -> None:
    c, lead, fast = _put_events(0, 0)
    _, _, slow = _put_events(0, 500_000)
    start, end = op_windows(c)[0]
    hops = walk(PUT_CHAIN, start, end, Timeline.of(c), Timeline.of(lead), [Timeline.of(slow), Timeline.of(fast)])
    assert hops == [10_000] * (len(PUT_CHAIN) - 1)


def test_walk_gives_up_when_a_mark_is_missing() -> None:
    c, lead, f = _put_events(0, 0)
    lead = [(t, n) for t, n in lead if n != "n.applied"]
    start, end = op_windows(c)[0]
    assert walk(PUT_CHAIN, start, end, Timeline.of(c), Timeline.of(lead), [Timeline.of(f)]) is None


def test_op_windows_pair_calls_with_completions() -> None:
    ev = [(1, "c.call"), (2, "c.write"), (5, "c.done"), (7, "c.call"), (9, "c.done"), (11, "c.call")]
    assert op_windows(ev) == [(1, 5), (7, 9)]


def test_chains_start_at_the_client_call_and_end_at_its_completion() -> None:
    for chain in (PUT_CHAIN, GET_CHAIN):
        assert chain[0][1:] == ("C", "c.call")
        assert chain[-1][1:] == ("C", "c.done")


@given(st.text(max_size=300))
def test_read_dump_is_total(text: str) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.hops"
        p.write_text(text)
        for t, name in hoptrace.read_dump(p):
            assert t >= 0 and name


def test_node_switch_interval_and_its_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvstore.server.main import SWITCH_INTERVAL_US, set_switch_interval
    before = sys.getswitchinterval()
    try:
        for raw, want in (("", SWITCH_INTERVAL_US), ("5000", 5000), ("abc", SWITCH_INTERVAL_US),
                          ("0", SWITCH_INTERVAL_US), ("²", SWITCH_INTERVAL_US), ("99999999", SWITCH_INTERVAL_US)):
            monkeypatch.setenv("KVSTORE_GIL_SWITCH_US", raw)
            assert set_switch_interval() == want / 1e6
            assert abs(sys.getswitchinterval() - want / 1e6) < 1e-9
    finally:
        sys.setswitchinterval(before)


def test_waves_splits_cycles_by_what_they_do_and_pairs_marks_with_their_counts() -> None:
    from bench.waves import cycles, gaps, pairs
    leader = [
        (100, "s.batch"), (101, "s.ops:64"), (900, "s.proposed"),
        (1000, "n.begin"), (1001, "n.size:64:0"), (1100, "n.persist0"), (1700, "n.persist1"), (1800, "n.end"),
        (2500, "n.begin"), (2501, "n.size:0:64"), (2600, "n.persist0"), (4600, "n.persist1"), (5000, "n.end"),
        (5100, "n.begin"), (5101, "n.size:0:0"), (5110, "n.end"),
        (6000, "n.begin"), (6001, "n.size:3:5"), (6500, "n.end"),
        (7000, "n.begin"), (7001, "n.size:x:"),  # malformed counts, a cycle that never ended
    ]
    got = cycles(leader)
    assert got == {"append": [(800, 600, 64)], "apply": [(2500, 2000, 64)], "other": [(10, 0, 0)],
                   "append+apply": [(500, 0, 8)]}
    assert gaps(leader) == [700, 100, 890, 500]
    assert pairs(leader, "s.batch", "s.proposed", "s.ops") == [(800, 64)]
    client = [(0, "c.read"), (1, "c.results:64"), (2000, "c.write"), (2001, "c.ops:64"), (9000, "c.read"),
              (9001, "c.results:bad"), (9500, "c.write")]
    assert pairs(client, "c.read", "c.write", "c.results") == [(2000, 64), (500, 0)]
    assert pairs(client, "c.write", "c.read", "c.ops") == [(7000, 64)]


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(
    ["n.begin", "n.end", "n.persist0", "n.persist1", "n.size:1:2", "n.size::", "s.batch", "s.ops:7", "s.proposed",
     "s.ops:", "c.read", "c.write", "c.ops:99999999999"])), max_size=60))
def test_waves_parsers_are_total(marks: list[tuple[int, str]]) -> None:
    from bench.waves import cycles, gaps, pairs
    marks.sort()
    for kind, cs in cycles(marks).items():
        assert kind in ("append", "apply", "append+apply", "other")
        assert all(d >= 0 and p >= 0 and n >= 0 for d, p, n in cs)
    assert all(g >= 0 for g in gaps(marks))
    assert all(d >= 0 and n >= 0 for d, n in pairs(marks, "s.batch", "s.proposed", "s.ops"))
