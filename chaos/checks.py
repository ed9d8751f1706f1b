"""Judging a run's history: linearizability per key, the set and bank checks, lost writes.

The verdict is ``valid`` only if every check passed, ``invalid`` if any check found a
violation, and ``unknown`` otherwise (the checker ran out of time, or the final reads after
healing could not be made, so acknowledged writes could not be verified).

Reads below linearizable (``stale`` / ``bounded`` through replicas) are held to what their reply
claimed: a read that reported a staleness bound ``S`` says its state includes every write
acknowledged more than ``S`` before it was served, so it must be linearizable within
``[invoke - S, complete]``. The *staleness* check runs the linearizability checker on the history
with each such read widened that way (an unknown bound widens it to the start of the run). The
plain linearizability verdict still applies to them: stale reads are expected to fail it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos.checker import Operation, Status, Verdict, check, format_op

from .txnworkloads import check_bank, check_lock
from .workload import OpRecord, parse_bank, to_operations

__all__ = ["Analysis", "analyze_records"]


@dataclass
class Analysis:
    verdict: str  # valid / invalid / unknown
    reasons: list[str] = field(default_factory=list)
    linearizability: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] | None = None
    bank: dict[str, Any] | None = None
    lock: dict[str, Any] | None = None
    staleness: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    bad_key: str | None = None
    counterexample: list[Operation] = field(default_factory=list)
    bad_key_ops: list[Operation] = field(default_factory=list)
    operations: list[Operation] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "linearizability": self.linearizability,
            "set": self.set,
            "bank": self.bank,
            "lock": self.lock,
            "staleness": self.staleness,
            "counts": self.counts,
            "bad_key": self.bad_key,
            "counterexample": [format_op(o) for o in self.counterexample],
        }


def _set_check(records: Sequence[OpRecord]) -> dict[str, Any]:
    adds = [r for r in records if r.f == "put" and r.key.startswith("s/")]
    ok = {r.value for r in adds if r.status == "ok"}
    maybe = {r.value for r in adds if r.status in ("info", "invoke")}
    failed = {r.value for r in adds if r.status == "fail"}
    scans = [r for r in records if r.f == "scan" and r.final and r.status == "ok"]
    out: dict[str, Any] = {
        "attempted": len(adds), "acknowledged": len(ok), "indeterminate": len(maybe), "failed": len(failed),
    }
    if not scans:
        out["valid"] = None
        out["error"] = "no final read succeeded after heal"
        return out
    final = set(scans[-1].output.values()) if isinstance(scans[-1].output, dict) else set()
    lost = sorted(ok - final)
    unexpected = sorted(final - ok - maybe)
    out.update(
        read=len(final),
        lost=lost[:50], lost_count=len(lost),
        unexpected=unexpected[:50], unexpected_count=len(unexpected),
        recovered_indeterminate=len(final & maybe),
        valid=not lost and not unexpected,
    )
    return out


def _bank_check(records: Sequence[OpRecord], total: int | None, accounts: int | None) -> dict[str, Any]:
    reads = [r for r in records if r.f == "get" and r.status == "ok" and r.key.startswith("b/")]
    bad: list[dict[str, Any]] = []
    totals: dict[int, int] = {}
    for r in reads:
        if r.output is None:
            continue
        bal = parse_bank(r.output)
        if bal is None or (accounts is not None and len(bal) != accounts):
            bad.append({"op": f"get {r.key} at {r.invoke:.3f}", "value": r.output, "why": "malformed"})
            continue
        s = sum(bal)
        totals[s] = totals.get(s, 0) + 1
        if (total is not None and s != total) or min(bal) < 0:
            bad.append({"op": f"get {r.key} at {r.invoke:.3f}", "value": r.output,
                        "why": f"total {s} != {total}" if s != total else "negative balance"})
    banks = sorted({r.key for r in records if r.key.startswith("b/")})
    finals = {r.key for r in records if r.final and r.status == "ok" and r.f == "get"}
    transfers = [r for r in records if r.f == "cas" and r.key.startswith("b/")]
    return {
        "reads": len(reads), "totals": {str(k): v for k, v in sorted(totals.items())},
        "bad_reads": bad[:50], "bad_count": len(bad),
        "transfers_ok": sum(1 for r in transfers if r.status == "ok" and r.output),
        "transfers_info": sum(1 for r in transfers if r.status == "info"),
        "banks": len(banks), "banks_read_at_end": len(finals & set(banks)),
        "valid": not bad,
    }


def _staleness_check(records: Sequence[OpRecord], check_timeout: float) -> dict[str, Any]:
    """Linearizability with every stale / bounded read widened by the staleness it reported."""
    relaxed = [r for r in records if r.f == "get" and r.consistency in ("stale", "bounded") and r.status == "ok"]
    widened: list[OpRecord] = []
    pid = 30_000_000
    reported = [r.staleness for r in relaxed if r.staleness is not None]
    relaxed_ids = {id(r) for r in relaxed}
    for r in records:
        if id(r) in relaxed_ids:
            pid += 1  # its own process: the widened interval may overlap the process's previous op
            start = 0.0 if r.staleness is None else r.invoke - r.staleness
            widened.append(dataclasses.replace(r, process=pid, invoke=min(r.invoke, start)))
        else:
            widened.append(r)
    res = check(to_operations(widened), timeout=check_timeout)
    return {
        "reads": len(relaxed),
        "unknown_bound": len(relaxed) - len(reported),
        "max_bound": round(max(reported), 3) if reported else None,
        "verdict": res.verdict.value,
        "bad_key": res.bad_key,
        "counterexample": [format_op(o) for o in res.counterexample][:20],
        "valid": {Verdict.LINEARIZABLE: True, Verdict.NOT_LINEARIZABLE: False}.get(res.verdict),
    }


def analyze_records(
    records: Sequence[OpRecord],
    *,
    workload: str,
    check_timeout: float = 60.0,
    bank_total: int | None = None,
    bank_accounts: int | None = None,
    account_groups: dict[str, int] | None = None,
    expected_final_keys: Sequence[str] = (),
) -> Analysis:
    counts = {"ok": 0, "fail": 0, "info": 0}
    for r in records:
        if r.status in counts:
            counts[r.status] += 1
    counts["total"] = len(records)
    ops = to_operations(list(records))
    res = check(ops, timeout=check_timeout)
    lin: dict[str, Any] = {
        "verdict": res.verdict.value,
        "keys": len(res.key_results),
        "unknown_keys": sorted(k for k, v in res.key_results.items() if v is Verdict.UNKNOWN)[:20],
        "elapsed": round(res.elapsed, 3),
        "bad_key": res.bad_key,
        "counterexample_any_start": res.counterexample_any_start,
    }
    a = Analysis("valid", linearizability=lin, counts=counts, operations=ops)
    if res.verdict is Verdict.NOT_LINEARIZABLE:
        a.bad_key = res.bad_key
        a.counterexample = list(res.counterexample)
        a.bad_key_ops = [o for o in ops if o.key == res.bad_key and o.status is not Status.FAIL]
        a.reasons.append(f"key {res.bad_key!r} is not linearizable ({len(a.counterexample)} operations cannot be ordered)")
    elif res.verdict is Verdict.UNKNOWN:
        a.reasons.append(f"linearizability unknown for {len(lin['unknown_keys'])} key(s) (checker budget)")
    if workload == "set":
        a.set = _set_check(records)
        if a.set["valid"] is False:
            a.reasons.append(
                f"set: {a.set['lost_count']} acknowledged add(s) lost, {a.set['unexpected_count']} unexpected"
            )
        elif a.set["valid"] is None:
            a.reasons.append("set: " + a.set["error"])
    if workload == "bank1":
        a.bank = _bank_check(records, bank_total, bank_accounts)
        if not a.bank["valid"]:
            a.reasons.append(f"bank: {a.bank['bad_count']} read(s) break the conservation of the total")
    if workload == "bank":
        a.bank = check_bank(records, bank_total, bank_accounts)
        if account_groups:
            a.bank["account_groups"] = account_groups
            a.bank["groups_spanned"] = len(set(account_groups.values()))
        if a.bank["valid"] is False:
            a.reasons.append(f"bank: {a.bank['bad_count']} read(s) break the conservation of the total")
        elif a.bank["valid"] is None:
            a.reasons.append("bank: no final balances read succeeded after heal")
    if workload == "lock":
        a.lock = check_lock(records)
        if a.lock["valid"] is False:
            a.reasons.append(f"lock: {a.lock['violation_count']} fencing violation(s): {a.lock['violations'][0]}")
        elif a.lock["valid"] is None:
            a.reasons.append("lock: the resource could not be read after heal")
    if any(r.consistency in ("stale", "bounded") for r in records):
        a.staleness = _staleness_check(records, check_timeout)
        if a.staleness["valid"] is False:
            a.reasons.append(
                f"staleness: a read through a replica was staler than the bound it reported (key {a.staleness['bad_key']!r})"
            )
        elif a.staleness["valid"] is None:
            a.reasons.append("staleness check unknown (checker budget)")
    # lost-write check for the keyed workloads: every key must have been read after heal
    finals = {r.key for r in records if r.final and r.status == "ok"}
    missing = [k for k in expected_final_keys if k not in finals]
    if missing:
        a.reasons.append(f"{len(missing)} key(s) could not be read after heal: acknowledged writes unverified")
    if not counts["ok"]:
        a.reasons.append("no operation succeeded")
    invalid = (
        res.verdict is Verdict.NOT_LINEARIZABLE
        or (a.set is not None and a.set["valid"] is False)
        or (a.bank is not None and a.bank["valid"] is False)
        or (a.lock is not None and a.lock["valid"] is False)
        or (a.staleness is not None and a.staleness["valid"] is False)
    )
    if invalid:
        a.verdict = "invalid"
    elif (
        res.verdict is Verdict.UNKNOWN or missing or not counts["ok"] or (a.set is not None and a.set["valid"] is None)
        or (a.bank is not None and a.bank["valid"] is None) or (a.lock is not None and a.lock["valid"] is None)
    ):
        a.verdict = "unknown"
    return a


def latency_series(records: Sequence[OpRecord]) -> list[tuple[float, float, str, str]]:
    """(invoke time, latency seconds or inf, f, status) per completed operation."""
    out = []
    for r in records:
        lat = (r.complete - r.invoke) if r.complete is not None else math.inf
        out.append((r.invoke, lat, r.f, r.status))
    return out
