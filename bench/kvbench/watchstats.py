"""Tallying a watch-latency row: latencies, events received against expected, percentiles, and
the summary over rounds (medians, the kvstore/etcd ratio taken round by round).

Pure functions over plain data (no I/O), so they are unit-tested without a cluster.

Definitions (the invariants the report relies on):
- expected = acknowledged puts x watches: every watch must receive every acknowledged put;
- a delivered event counts once per (watch, revision); a repeat is a *duplicate*, a revision the
  writer never saw acknowledged and did not list in ``ignore`` is *unexpected*, and an
  acknowledged revision a watch never received is *missing*; received + missing = expected;
- latency = arrival - acknowledgement, in ms, one sample per received (watch, revision); it may
  be negative (a watcher can hear of a put before the writer hears its acknowledgement);
- latency from send = arrival - the moment the put was sent (with ``sends``): always covers the
  put's own round trip, so it stays positive and its ratio between systems is well defined even
  when the system notifies watchers as it acknowledges (etcd: ~0 ms after the acknowledgement).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ascending values; NaN if empty."""
    if not sorted_values:
        return math.nan
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q} not in (0, 1]")
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


@dataclass(slots=True)
class Tally:
    expected: int
    received: int
    missing: int
    duplicates: int
    unexpected: int
    latencies_ms: list[float]
    """From the acknowledgement; ascending."""
    from_send_ms: list[float]
    """From the put's send; ascending (empty without ``sends``)."""

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 0.99)

    @property
    def send_p50(self) -> float:
        return percentile(self.from_send_ms, 0.50)

    @property
    def send_p99(self) -> float:
        return percentile(self.from_send_ms, 0.99)


def tally(acks: Mapping[int, float], watches: Iterable[tuple[Sequence[int], Sequence[float]]],
          ignore: frozenset[int] = frozenset(), sends: Mapping[int, float] | None = None) -> Tally:
    """Match each watch's (revisions, arrival times) against the acknowledged puts (``sends``:
    the same revisions' send times, for the latency from send)."""
    if sends is not None and sends.keys() != acks.keys():
        raise ValueError("sends must hold exactly the acknowledged revisions")
    expected = received = duplicates = unexpected = 0
    lat: list[float] = []
    lat_send: list[float] = []
    for revs, times in watches:
        if len(revs) != len(times):
            raise ValueError("a watch's revisions and arrival times differ in length")
        expected += len(acks)
        seen: set[int] = set()
        for rev, t in zip(revs, times, strict=True):
            ack = acks.get(rev)
            if ack is None:
                unexpected += rev not in ignore
                continue
            if rev in seen:
                duplicates += 1
                continue
            seen.add(rev)
            lat.append((t - ack) * 1000.0)
            if sends is not None:
                lat_send.append((t - sends[rev]) * 1000.0)
        received += len(seen)
    lat.sort()
    lat_send.sort()
    return Tally(expected, received, expected - received, duplicates, unexpected, lat, lat_send)


RATIO_FLOOR_MS = 1.0
"""A kvstore/etcd ratio is taken only over an etcd figure of at least this: below it the figure is
the difference of two processes' clock readings within their scheduling noise (etcd's
ack->event p50 is often -0.2 to 0.2 ms), and a ratio over it means nothing."""


def _median(xs: Iterable[float]) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return statistics.median(v) if v else math.nan


def summarize(points: Sequence[Mapping[str, Any]], systems: Sequence[str]) -> list[dict[str, Any]]:
    """One summary per row (in first-seen order): per system the medians over rounds of p50,
    p99 (from the acknowledgement and from the send), achieved put rate and watcher / server
    cores, the sums of expected / received / missing; and the kvstore/etcd ratios of each
    percentile, each the median of the per-round ratios (same round, same row), so slow drift
    of the machine cancels. A round whose etcd figure is below ``RATIO_FLOOR_MS`` is left out of
    that ratio (NaN if none is left)."""
    rows: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for p in points:
        rows.setdefault(p["row"], {}).setdefault(p["system"], []).append(p)
    out = []
    for row, by_sys in rows.items():
        s: dict[str, Any] = {"kind": "summary", "row": row}
        for system in systems:
            pts = by_sys.get(system, [])
            s[system] = {
                "rounds": len(pts),
                "p50_ms": _median(p["p50_ms"] for p in pts),
                "p99_ms": _median(p["p99_ms"] for p in pts),
                "send_p50_ms": _median(p["send_p50_ms"] for p in pts),
                "send_p99_ms": _median(p["send_p99_ms"] for p in pts),
                "puts_per_s": _median(p["puts_per_s"] for p in pts),
                "watcher_cores_max": _median(p["watcher_cores_max"] for p in pts),
                "server_cores": _median(p["server_cores"] for p in pts),
                "expected": sum(p["expected"] for p in pts),
                "received": sum(p["received"] for p in pts),
                "missing": sum(p["missing"] for p in pts),
                "duplicates": sum(p["duplicates"] for p in pts),
                "unexpected": sum(p["unexpected"] for p in pts),
                "write_errors": sum(p["write_errors"] for p in pts),
            }
        if "kvstore" in by_sys and "etcd" in by_sys:
            etcd = {p["round"]: p for p in by_sys["etcd"]}
            pairs = [(k, etcd[k["round"]]) for k in by_sys["kvstore"] if k["round"] in etcd]
            for q in ("p50_ms", "p99_ms", "send_p50_ms", "send_p99_ms"):
                s[f"ratio_{q}"] = _median(k[q] / e[q] for k, e in pairs if e[q] >= RATIO_FLOOR_MS)
            s["ratio_pairs"] = len(pairs)
        out.append(s)
    return out


def _ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.1f}" if abs(x) < 100 else f"{x:,.0f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def markdown(summaries: Sequence[Mapping[str, Any]], systems: Sequence[str]) -> str:
    """The summary table: one line per (row, system); ratios on the kvstore line."""
    lines = [
        "| row | system | ack->event p50 / p99 ms | kvstore/etcd | send->event p50 / p99 ms | kvstore/etcd | "
        "puts/s | events received / expected | missing | watcher cores (busiest process) | server cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for system in systems:
            d = s[system]
            if not d["rounds"]:
                continue
            mine = system == "kvstore"
            ack = f"{_ratio(s.get('ratio_p50_ms'))} / {_ratio(s.get('ratio_p99_ms'))}" if mine else ""
            send = f"{_ratio(s.get('ratio_send_p50_ms'))} / {_ratio(s.get('ratio_send_p99_ms'))}" if mine else ""
            lines.append(
                f"| {s['row']} | {system} | {_ms(d['p50_ms'])} / {_ms(d['p99_ms'])} | {ack} | "
                f"{_ms(d['send_p50_ms'])} / {_ms(d['send_p99_ms'])} | {send} | "
                f"{d['puts_per_s']:.1f} | {d['received']:,} / {d['expected']:,} | {d['missing']:,} | "
                f"{d['watcher_cores_max']:.2f} | {d['server_cores']:.2f} |"
            )
    return "\n".join(lines)
