"""The watch-latency benchmark's pure parts (bench/watch_latency.py, bench/kvbench/watch*.py):
matching events against acknowledged puts, percentiles, the round-by-round ratio, the row
syntax, etcd's prefix range end, and the writer's bounds. No cluster."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.kvbench.watchers import prefix_range_end
from bench.kvbench.watchstats import markdown, percentile, summarize, tally
from bench.kvbench.watchwrite import paced_puts
from bench.watch_latency import Row, _split
from kvstore.errors import Unavailable


def test_tally_counts_missing_duplicate_and_unexpected_events() -> None:
    acks = {10: 1.000, 11: 2.000, 12: 3.000}
    sends = {10: 0.990, 11: 1.995, 12: 2.990}
    watches = [
        ([10, 11, 12], [1.002, 2.004, 3.001]),        # all three
        ([10, 10, 12, 99, 5], [1.5, 1.6, 3.2, 3.3, 3.4]),  # 10 twice, 11 missing, 99 unexpected, 5 a warm-up put
    ]
    t = tally(acks, watches, ignore=frozenset({5}), sends=sends)
    assert (t.expected, t.received, t.missing, t.duplicates, t.unexpected) == (6, 5, 1, 1, 1)
    assert [round(x, 3) for x in t.latencies_ms] == [1.0, 2.0, 4.0, 200.0, 500.0]
    assert [round(x, 3) for x in t.from_send_ms] == [9.0, 11.0, 12.0, 210.0, 510.0]
    assert round(t.p50, 3) == 4.0 and round(t.p99, 3) == 500.0


def test_tally_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        tally({1: 1.0}, [([1, 2], [1.0])])
    with pytest.raises(ValueError):
        tally({1: 1.0}, [], sends={2: 0.5})


@given(
    acked=st.sets(st.integers(1, 60), max_size=30),
    watches=st.lists(st.lists(st.integers(1, 80), max_size=60), max_size=6),
)
def test_tally_invariants(acked: set[int], watches: list[list[int]]) -> None:
    acks = {r: float(r) for r in acked}
    ignore = frozenset(range(70, 75))
    t = tally(acks, [(revs, [r + 0.5 for r in revs]) for revs in watches], ignore=ignore)
    assert t.expected == len(acks) * len(watches)
    assert t.received + t.missing == t.expected and t.missing >= 0
    assert t.received == sum(len(set(revs) & acked) for revs in watches)
    assert t.duplicates == sum(c - 1 for revs in watches for r, c in Counter(revs).items() if r in acked)
    assert t.unexpected == sum(1 for revs in watches for r in revs if r not in acked and r not in ignore)
    assert len(t.latencies_ms) == t.received and all(x == 500.0 for x in t.latencies_ms)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.floats(0.001, 1.0))
def test_percentile_is_a_member_at_the_nearest_rank(values: list[float], q: float) -> None:
    v = sorted(values)
    p = percentile(v, q)
    assert p in v
    assert sum(x <= p for x in v) >= q * len(v)  # at least a q share at or below it
    assert sum(x < p for x in v) < max(1, math.ceil(q * len(v)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 0.5))
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
    with pytest.raises(ValueError):
        percentile([1.0], 0.0)


def _point(system: str, rnd: int, p50: float, p99: float) -> dict[str, object]:
    return {"kind": "point", "system": system, "row": "prefix x1000 @5/s", "round": rnd, "p50_ms": p50,
            "p99_ms": p99, "send_p50_ms": p50 + 2, "send_p99_ms": p99 + 2, "puts_per_s": 5.0,
            "watcher_cores_max": 0.1, "server_cores": 0.5, "expected": 100, "received": 99, "missing": 1,
            "duplicates": 0, "unexpected": 0, "write_errors": 0}


def test_summary_ratios_are_taken_round_by_round() -> None:
    # Round 1 is slow for both systems: each round's ratio is 4 whatever the drift.
    pts = [_point("kvstore", 0, 40, 400), _point("etcd", 0, 10, 100),
           _point("kvstore", 1, 400, 4000), _point("etcd", 1, 100, 1000),
           _point("kvstore", 2, 44, 440), _point("etcd", 2, 11, 110)]
    (s,) = summarize(pts, ["kvstore", "etcd"])
    assert s["ratio_p50_ms"] == 4.0 and s["ratio_p99_ms"] == 4.0 and s["ratio_pairs"] == 3
    assert s["kvstore"]["p50_ms"] == 44 and s["etcd"]["p99_ms"] == 110
    assert s["kvstore"]["expected"] == 300 and s["kvstore"]["missing"] == 3
    table = markdown([s], ["kvstore", "etcd"])
    assert "| prefix x1000 @5/s | kvstore | 44.0 / 440 | 4.00 / 4.00 |" in table
    assert "| 297 / 300 | 3 |" in table


def test_a_ratio_over_an_etcd_figure_below_the_floor_is_left_out() -> None:
    pts = [_point("kvstore", 0, 5, 50), _point("etcd", 0, -0.1, 2),
           _point("kvstore", 1, 6, 60), _point("etcd", 1, 0.5, 3)]
    (s,) = summarize(pts, ["kvstore", "etcd"])
    assert math.isnan(s["ratio_p50_ms"]) and s["ratio_p99_ms"] == 22.5  # median of 25 and 20
    assert s["ratio_send_p50_ms"] == pytest.approx((7 / 1.9 + 8 / 2.5) / 2)  # both etcd figures >= 1 ms
    assert "| - / 22.50 |" in markdown([s], ["kvstore", "etcd"])


def test_row_syntax() -> None:
    assert Row.parse("prefix:1000@5") == Row("prefix", 1000, 5.0)
    assert Row.parse("key:1@20").name == "key x1 @20/s"
    for bad in ("prefix:0@5", "range:1@5", "key:1", "key:x@1", "key:1@0", "key:1@nan", "key:1@inf", ""):
        with pytest.raises(ValueError):
            Row.parse(bad)


@given(st.text(max_size=30))
def test_row_parse_is_total(spec: str) -> None:
    try:
        row = Row.parse(spec)
    except ValueError:
        return
    assert row.kind in ("key", "prefix") and 1 <= row.watchers <= 100_000 and 0 < row.rate <= 10_000


@given(st.integers(1, 100_000), st.integers(1, 1000), st.integers(1, 64))
def test_split_spreads_every_watch(total: int, per_proc: int, max_procs: int) -> None:
    parts = _split(total, per_proc, max_procs)
    assert sum(parts) == total and 1 <= len(parts) <= max_procs and max(parts) - min(parts) <= 1
    assert len(parts) == min(max_procs, math.ceil(total / per_proc))


@given(st.binary(max_size=8), st.binary(max_size=8))
def test_prefix_range_end_covers_exactly_the_prefix(prefix: bytes, key: bytes) -> None:
    end = prefix_range_end(prefix)
    inside = key >= prefix and (end == b"\x00" or key < end)
    assert inside == key.startswith(prefix)


class _FlakyWriter:
    """Every third put fails definitely (as an unavailable node would)."""

    def __init__(self) -> None:
        self.n = 0

    async def put(self, key: bytes, value: bytes) -> int:
        self.n += 1
        if self.n % 3 == 0:
            raise Unavailable("down")
        return 100 + self.n

    async def close(self) -> None:
        pass


def test_paced_puts_is_bounded_by_count_and_counts_errors() -> None:
    w = _FlakyWriter()
    res = asyncio.run(paced_puts(w, [b"a", b"b"], b"v", rate=10_000, count=30, max_seconds=60))
    assert w.n == 30 and res.attempted == 30 and res.errors == 10 and len(res.acks) == 20
    assert res.acks.keys() == res.sends.keys() and all(res.sends[r] <= res.acks[r] for r in res.acks)
    assert 0 < res.rate <= 10_000
    assert "Unavailable" in res.first_error


def test_paced_puts_is_bounded_by_time() -> None:
    w = _FlakyWriter()
    res = asyncio.run(paced_puts(w, [b"a"], b"v", rate=1000, count=10**9, max_seconds=0.2))
    assert 0 < res.attempted < 10**9 and res.attempted == w.n
    with pytest.raises(ValueError):
        asyncio.run(paced_puts(w, [], b"v", rate=1, count=1, max_seconds=1))
