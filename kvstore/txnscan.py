"""Scans inside kvstore's transactions (`TxnOp.scan`), the pure part shared by the client (which
refuses first what the server would) and the server (`server/txn_scans.py`, which runs them):

- `split`: a wire `TxnBody` (hostile input) as the transaction without its scans (what a group's
  TXN or a two-phase commit runs: scans are never in the log) and the `ScanPlan` that puts the
  scans' answers back in place (`merge`), every scan field checked;
- the path taken (`taken_scans`; `txnpath.path_steps`): each scan shows the state at its
  position on it (etcd's sequential semantics: the writes before it, not those after it;
  `kvstore/txnpath.py` says how it is read).

A transaction with scans may compare a key's lease (LEASE) as any transaction: when the branch
taken writes nothing, the whole body is evaluated read-only at a revision M
(`server/txn_reading.evaluate_at`), where each key a LEASE compare names is compared on its
lease at M (its current lease if its version is still the one at M, read with a Get
with_lease; else the evaluation starts again from a new cut; an absent key: 0), as etcd does.

Invariants: `split` raises only `errors.InvalidArgument` / `errors.KeyTooLarge` (definite);
the stripped body holds every non-scan operation in its order; `merge(plan, r, answers)` has
exactly one response per operation of the branch `r` took, scans included."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from kvstore import errors
from kvstore.keyspace import prefix_end
from kvstore.storage.txn import MAX_TXN_DEPTH, MAX_TXN_ITEMS
from kvstore.v1 import kv_pb2

__all__ = ["LIMIT_MAX", "MAX_TXN_SCAN_PARTS", "ScanPlan", "ScanRange", "Slot", "both_branches",
           "has_range_deletes", "has_scans", "merge", "outside", "split", "taken_scans"]

T = TypeVar("T")

LIMIT_MAX = (1 << 63) - 1
"""The largest limit a scan may ask for (0: none)."""
MAX_TXN_SCAN_PARTS = MAX_TXN_ITEMS
"""The most range reads all scans of one transaction may need (`split` refuses more). A scan
after range deletes on its path that meet its range may be read as its parts outside them
(`outside`; `kvstore/txnpath.py`), each a read across every data group: a scan counts
max(1, its parts outside the range deletes before it on its path that meet it), summed over
every scan of both branches. Equal to `MAX_TXN_ITEMS`, so a transaction whose range deletes
split no scan (any number of scans) is never refused, while 64 range deletes and 63 scans
(about 4,000 reads) are."""


@dataclass(slots=True, frozen=True)
class ScanRange:
    """The keys [start, end) of one scan (end None: no upper bound), at most `limit` of them
    (0: all)."""

    start: bytes
    end: bytes | None
    limit: int

    def holds(self, key: bytes) -> bool:
        return self.start <= key and (self.end is None or key < self.end)


@dataclass(slots=True)
class Slot:
    """One operation of a branch: a scan (`scan`: its index in `ScanPlan.scans`), or the body's
    next operation (`scan` -1; `nested`: a nested transaction's plan)."""

    scan: int = -1
    nested: ScanPlan | None = None


@dataclass(slots=True)
class ScanPlan:
    """The slots of a transaction's success and failure branches; `scans`: every scan's range,
    nested ones too (kept on the top-level plan only)."""

    success: list[Slot]
    failure: list[Slot]
    scans: list[ScanRange] = field(default_factory=list)


def has_scans(body: kv_pb2.TxnBody) -> bool:
    """Whether a scan is on any path of `body` (nested transactions too)."""
    for op in (*body.success, *body.failure):
        which = op.WhichOneof("op")
        if which == "scan" or (which == "txn" and has_scans(op.txn)):
            return True
    return False


def scan_range(s: kv_pb2.TxnScan, max_key: int) -> ScanRange:
    """A scan's checked range: bounds no longer than `max_key` (KeyTooLarge), a limit of at most
    `LIMIT_MAX`; prefix (if set) overrides start and end."""
    for name in ("prefix", "start", "end"):
        bound = getattr(s, name)
        if len(bound) > max_key:
            raise errors.KeyTooLarge(message=f"a transaction's scan {name} of {len(bound)} bytes is longer than the "
                                             f"longest key ({max_key})")
    if s.limit > LIMIT_MAX:
        raise errors.InvalidArgument(f"a transaction's scan limit {s.limit} is above {LIMIT_MAX}")
    if s.prefix:
        return ScanRange(s.prefix, prefix_end(s.prefix), s.limit)
    end = s.end or None
    if end is not None and end <= s.start:
        raise errors.InvalidArgument(f"a transaction's scan end {end[:64]!r} is not after its start {s.start[:64]!r}")
    return ScanRange(s.start, end, s.limit)


def outside(r: ScanRange, gone: Iterable[tuple[bytes, bytes | None]], limit: int) -> list[ScanRange]:
    """The parts of `r` outside every range [start, end) of `gone` (end None: no upper bound;
    an empty range, end <= start, is skipped), disjoint and in key order, each with `limit`."""
    out: list[ScanRange] = []
    lo: bytes | None = r.start  # None: past every key
    for start, end in sorted((d for d in gone if d[1] is None or d[0] < d[1]), key=lambda d: d[0]):
        if lo is None:
            break
        if end is not None and end <= lo:
            continue
        if start > lo:
            hi = start if r.end is None else min(start, r.end)
            if hi > lo:
                out.append(ScanRange(lo, hi, limit))
        lo = None if end is None else max(lo, end)
        if lo is not None and r.end is not None and lo >= r.end:
            lo = None
    if lo is not None and (r.end is None or lo < r.end):
        out.append(ScanRange(lo, r.end, limit))
    return out


def range_of(d: kv_pb2.TxnRange) -> tuple[bytes, bytes | None]:
    """A range delete's [start, end) (end None: no upper bound); prefix (if set) overrides."""
    if d.prefix:
        return d.prefix, prefix_end(d.prefix)
    return d.start, d.end or None


def both_branches(read: list[T], into: kv_pb2.TxnBody,
                  walk: Callable[[bool, list[kv_pb2.TxnOp], list[T]], None]) -> None:
    """Walk a transaction's two branches (`walk(is_success, ops_out, reads)`) from the reads
    `read` before it on its path: each walk gets its own copy of `read` to extend with the reads
    it meets and a list for the operations it keeps (then added to `into`'s branch); afterwards
    `read` also holds the reads of both (which branch runs is not known before it runs)."""
    then, other = list(read), list(read)
    succ: list[kv_pb2.TxnOp] = []
    fail: list[kv_pb2.TxnOp] = []
    walk(True, succ, then)
    walk(False, fail, other)
    read[len(read):] = then[len(read):] + other[len(read):]
    into.success.extend(succ)
    into.failure.extend(fail)


def _ops(ops: Iterable[kv_pb2.TxnOp], into: list[kv_pb2.TxnOp], slots: list[Slot], depth: int, count: list[int],
         scans: list[ScanRange], max_key: int, dels: list[tuple[bytes, bytes | None]], parts: list[int]) -> None:
    """`dels`: the range deletes before these ops on their path (grows as they come); `parts[0]`:
    the range reads counted so far (`MAX_TXN_SCAN_PARTS`)."""
    for op in ops:
        count[0] += 1
        if count[0] > MAX_TXN_ITEMS:
            raise errors.InvalidArgument(f"transaction has more than {MAX_TXN_ITEMS} compares and operations")
        which = op.WhichOneof("op")
        if which == "scan":
            r = scan_range(op.scan, max_key)
            parts[0] += max(1, len(outside(r, dels, 0)))
            if parts[0] > MAX_TXN_SCAN_PARTS:
                raise errors.InvalidArgument(
                    f"a transaction's scans would read more than {MAX_TXN_SCAN_PARTS} ranges: a scan after range "
                    "deletes that meet its range is read as its parts outside them, each across every data group "
                    "(fewer scans after the range deletes, or scans in a transaction of their own)")
            slots.append(Slot(scan=len(scans)))
            scans.append(r)
            continue
        if which == "txn":
            nested = kv_pb2.TxnBody()
            plan = _txn(op.txn, nested, depth + 1, count, scans, max_key, dels, parts)
            into.append(kv_pb2.TxnOp(txn=nested))
            slots.append(Slot(nested=plan))
            continue
        else:  # a write, a get, or an unset / unknown operation: the transaction's own checks judge it
            if which == "delete_range":
                dels.append(range_of(op.delete_range))
            into.append(op)
        slots.append(Slot())


def _txn(b: kv_pb2.TxnBody, into: kv_pb2.TxnBody, depth: int, count: list[int], scans: list[ScanRange],
         max_key: int, dels: list[tuple[bytes, bytes | None]], parts: list[int]) -> ScanPlan:
    """`dels`: the range deletes before it on its path; afterwards it also holds its own (of
    either branch: which one runs is not known here)."""
    if depth > MAX_TXN_DEPTH:
        raise errors.InvalidArgument(f"transaction nested deeper than {MAX_TXN_DEPTH}")
    count[0] += len(b.compares)
    into.compares.extend(b.compares)
    plan = ScanPlan([], [])
    both_branches(dels, into, lambda ok, out, rd: _ops(b.success if ok else b.failure, out,
                                                       plan.success if ok else plan.failure, depth, count, scans,
                                                       max_key, rd, parts))
    return plan


def split(body: kv_pb2.TxnBody, max_key: int) -> tuple[kv_pb2.TxnBody, ScanPlan]:
    """(`body` without its scans, the plan of its scans): see the module docstring. Raises a
    definite InvalidArgument (more than `MAX_TXN_ITEMS` compares and operations, scans included;
    nesting deeper than `MAX_TXN_DEPTH`; a limit or an end out of range; scans that would read
    more than `MAX_TXN_SCAN_PARTS` ranges) or KeyTooLarge (a bound longer than `max_key`)."""
    out = kv_pb2.TxnBody()
    scans: list[ScanRange] = []
    plan = _txn(body, out, 1, [0], scans, max_key, [], [0])
    plan.scans = scans
    return out, plan


def has_range_deletes(body: kv_pb2.TxnBody) -> bool:
    """Whether a range delete (`TxnOp.delete_range`) is on any path of `body` (a transaction
    with one runs as a two-phase commit over every data group)."""
    for op in (*body.success, *body.failure):
        which = op.WhichOneof("op")
        if which == "delete_range" or (which == "txn" and has_range_deletes(op.txn)):
            return True
    return False


def taken_scans(plan: ScanPlan, result: kv_pb2.TxnResult) -> list[int]:
    """The `ScanPlan.scans` indexes of the scans on the path `result` (of the stripped body)
    took, in order."""
    out: list[int] = []
    responses = result.responses
    i = 0
    for s in plan.success if result.succeeded else plan.failure:
        if s.scan >= 0:
            out.append(s.scan)
            continue
        if s.nested is not None:
            out += taken_scans(s.nested, responses[i].txn)
        i += 1
    return out


def merge(plan: ScanPlan, result: kv_pb2.TxnResult, answers: Mapping[int, kv_pb2.TxnScanResult]) -> kv_pb2.TxnResult:
    """The result of the whole transaction: `result` (of the stripped body) with the scans'
    `answers` (by index; every scan `taken_scans` names) in their places."""
    out = kv_pb2.TxnResult(succeeded=result.succeeded)
    responses = result.responses
    i = 0
    for s in plan.success if result.succeeded else plan.failure:
        r = out.responses.add()
        if s.scan >= 0:
            r.scan.CopyFrom(answers[s.scan])
            continue
        if s.nested is not None:
            r.txn.CopyFrom(merge(s.nested, responses[i].txn, answers))
        else:
            r.CopyFrom(responses[i])
        i += 1
    return out
