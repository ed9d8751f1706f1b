"""Scans inside kvstore's transactions (`TxnOp.scan`), the pure part shared by the client (which
refuses first what the server would) and the server (`server/txn_scans.py`, which runs them):

- `split`: a wire `TxnBody` (hostile input) as the transaction without its scans (what a group's
  TXN or a two-phase commit runs: scans are never in the log) and the `ScanPlan` that puts the
  scans' answers back in place (`merge`), every scan field checked;
- the path taken (`taken_scans`; `txnpath.path_steps`): each scan shows the state at its
  position on it (etcd's sequential semantics: the writes before it, not those after it;
  `kvstore/txnpath.py` says how it is read).

A transaction with scans compares no key's lease (`split` refuses a LEASE compare anywhere in
it, `LEASE_COMPARE_REFUSED`): when the branch taken writes nothing, the whole body is evaluated
read-only on its keys read exactly at a revision (`server/txn_reading.evaluate_at`), and a key
read at a revision carries no lease (the attachment rows hold the current attachment only, and
kvstore's Get, local or at another node, answers none), so such a compare would see lease 0.
etcd's API refuses a lease compare with ranges likewise (`server/etcd/kv.py`).

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

__all__ = ["LEASE_COMPARE_REFUSED", "LIMIT_MAX", "ScanPlan", "ScanRange", "Slot", "both_branches", "has_range_deletes", "has_scans", "merge",
           "split", "taken_scans"]

T = TypeVar("T")

LIMIT_MAX = (1 << 63) - 1
"""The largest limit a scan may ask for (0: none)."""
LEASE_COMPARE_REFUSED = ("a transaction with scans cannot compare a key's lease (its read-only evaluation reads keys "
                         "at a revision, which carries no lease): compare the lease in a transaction without scans")
"""Why `split` refuses a LEASE compare (module docstring)."""


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
         scans: list[ScanRange], max_key: int) -> None:
    for op in ops:
        count[0] += 1
        if count[0] > MAX_TXN_ITEMS:
            raise errors.InvalidArgument(f"transaction has more than {MAX_TXN_ITEMS} compares and operations")
        which = op.WhichOneof("op")
        if which == "scan":
            r = scan_range(op.scan, max_key)
            slots.append(Slot(scan=len(scans)))
            scans.append(r)
            continue
        if which == "txn":
            nested = kv_pb2.TxnBody()
            plan = _txn(op.txn, nested, depth + 1, count, scans, max_key)
            into.append(kv_pb2.TxnOp(txn=nested))
            slots.append(Slot(nested=plan))
            continue
        else:  # a write, a get, or an unset / unknown operation: the transaction's own checks judge it
            into.append(op)
        slots.append(Slot())


def _txn(b: kv_pb2.TxnBody, into: kv_pb2.TxnBody, depth: int, count: list[int], scans: list[ScanRange],
         max_key: int) -> ScanPlan:
    if depth > MAX_TXN_DEPTH:
        raise errors.InvalidArgument(f"transaction nested deeper than {MAX_TXN_DEPTH}")
    count[0] += len(b.compares)
    if any(c.target == kv_pb2.COMPARE_LEASE for c in b.compares):
        raise errors.InvalidArgument(LEASE_COMPARE_REFUSED)
    into.compares.extend(b.compares)
    plan = ScanPlan([], [])
    succ: list[kv_pb2.TxnOp] = []
    fail: list[kv_pb2.TxnOp] = []
    _ops(b.success, succ, plan.success, depth, count, scans, max_key)
    _ops(b.failure, fail, plan.failure, depth, count, scans, max_key)
    into.success.extend(succ)
    into.failure.extend(fail)
    return plan


def split(body: kv_pb2.TxnBody, max_key: int) -> tuple[kv_pb2.TxnBody, ScanPlan]:
    """(`body` without its scans, the plan of its scans): see the module docstring. Raises a
    definite InvalidArgument (more than `MAX_TXN_ITEMS` compares and operations, scans included;
    nesting deeper than `MAX_TXN_DEPTH`; a limit or an end out of range; a LEASE compare at any
    depth, `LEASE_COMPARE_REFUSED`) or KeyTooLarge (a bound longer than `max_key`)."""
    out = kv_pb2.TxnBody()
    scans: list[ScanRange] = []
    plan = _txn(body, out, 1, [0], scans, max_key)
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
