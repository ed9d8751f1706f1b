"""A scan at its position on a transaction's path (etcd's sequential semantics), the pure part:
what to read for it and how its answer is put together. No I/O; `server/txn_scans.py` reads.

A transaction that wrote did so at exactly one revision R (one group's TXN, or a two-phase
commit across groups), and revisions are unique across the cluster: so the state at R - 1, read
exactly in every group of the cut, is the state just before the transaction, and the state at
position p of the path taken is that state with the path's writes before p applied in order, by
`txn.evaluate`'s rules: a put gives the key its value at mod revision R, version one above the
key's at R - 1 and its create revision (absent at R - 1: version 1, create R; a key that a range
delete removed earlier on the path and a put then wrote keeps its history, as `txn.evaluate`
says); a delete or a range delete removes the keys present.

`read_plan` says, for the scan at p over range S:
- no write after p on the path meets S (a key written in it, or a range delete meeting it):
  the state at R restricted to S is the state at p; read S at R (`ScanRead.at_before` False);
- otherwise read at R - 1 the parts of S outside every range deleted before p (`ranges`), each
  with the scan's limit plus the number n of keys point-written before p in S (at most n of the
  keys read are removed by them, so the first `limit` keys stay exact), and each key put before
  p in S at R - 1 (`puts`: its version and create revision); `at_position` applies the writes
  before p (`writes`) to what was read.

Invariants: `at_position` answers a prefix of S's keys in key order at p, at most the limit of
them; `more` is True iff the state at p holds more keys of S than it answers, except that a read
cut by the byte budget (`more` on a part with fewer items than asked) also says `more`, the
answer then a prefix of S's keys at p up to the last key read. A key is point-written (put or
delete) at most once per path (`txn.check_txn`); range deletes may overlap anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvstore.storage import txn
from kvstore.txnscan import LIMIT_MAX, ScanPlan, ScanRange, outside, range_of
from kvstore.v1 import kv_pb2

__all__ = ["ScanRead", "Step", "at_position", "path_steps", "read_plan", "within_budget"]

PUT, DELETE, RANGE = "put", "delete", "range"


@dataclass(slots=True, frozen=True)
class Step:
    """One operation on the path taken that a scan cares about: a write (`kind` PUT of `key` to
    `value`, DELETE of `key`, RANGE delete of [`key`, `end`), end None: no upper bound) or a
    scan (`scan` >= 0: its index in `ScanPlan.scans`; `kind` empty)."""

    kind: str = ""
    key: bytes = b""
    end: bytes | None = None
    value: bytes = b""
    scan: int = -1

    def meets(self, r: ScanRange) -> bool:
        """Whether this write can change a key of `r`."""
        if self.kind == RANGE:
            return (self.end is None or r.start < self.end) and (r.end is None or self.key < r.end)
        return self.kind in (PUT, DELETE) and r.holds(self.key)

    def holds(self, key: bytes) -> bool:
        """Whether a RANGE step's range holds `key`."""
        return self.key <= key and (self.end is None or key < self.end)


def _range_step(d: kv_pb2.TxnRange) -> Step:
    start, end = range_of(d)
    return Step(RANGE, start, end)


def path_steps(plan: ScanPlan, body: kv_pb2.TxnBody, result: kv_pb2.TxnResult) -> list[Step]:
    """The writes and scans, in order, on the path that `result` (of `body`, the transaction
    without its scans: `txnscan.split`) took; gets are left out. Raises ValueError if `result`
    is not a result of `body` along `plan`."""
    out: list[Step] = []
    ops = body.success if result.succeeded else body.failure
    slots = plan.success if result.succeeded else plan.failure
    i = 0
    for s in slots:
        if s.scan >= 0:
            out.append(Step(scan=s.scan))
            continue
        if i >= len(ops) or i >= len(result.responses):
            raise ValueError("a transaction's result does not match its plan")
        op = ops[i]
        which = op.WhichOneof("op")
        if s.nested is not None:
            if which != "txn":
                raise ValueError("a transaction's result does not match its plan")
            out += path_steps(s.nested, op.txn, result.responses[i].txn)
        elif which == "put":
            out.append(Step(PUT, op.put.key, value=op.put.value))
        elif which == "delete":
            out.append(Step(DELETE, op.delete))
        elif which == "delete_range":
            out.append(_range_step(op.delete_range))
        i += 1
    return out


@dataclass(slots=True)
class ScanRead:
    """What to read for one scan (see the module docstring): `at_before` False: the scan's
    range at R as is; True: `ranges` at R - 1 (disjoint, in key order, inside the scan's range)
    and `puts` at R - 1, then `writes` (the writes before the scan that meet its range, in
    order) applied by `at_position`."""

    at_before: bool
    ranges: list[ScanRange] = field(default_factory=list)
    puts: list[bytes] = field(default_factory=list)
    writes: list[Step] = field(default_factory=list)


def _minus(r: ScanRange, gone: Sequence[Step], limit: int) -> list[ScanRange]:
    """The parts of `r` outside every RANGE of `gone`, in key order, each with `limit`."""
    return outside(r, [(d.key, d.end) for d in gone], limit)


def read_plan(steps: Sequence[Step], at: int, r: ScanRange) -> ScanRead:
    """The reads for the scan of range `r` at position `at` of `steps` (`path_steps`)."""
    if not any(s.meets(r) for s in steps[at + 1:]):
        return ScanRead(False)
    writes = [s for s in steps[:at] if s.meets(r)]
    points = [s for s in writes if s.kind != RANGE]
    limit = min(r.limit + len(points), LIMIT_MAX) if r.limit else 0
    return ScanRead(True, _minus(r, [s for s in writes if s.kind == RANGE], limit),
                    [s.key for s in points if s.kind == PUT], writes)


def at_position(read: ScanRead, r: ScanRange, revision: int, parts: Sequence[tuple[Sequence[kv_pb2.KeyValue], bool]],
                prev: Mapping[bytes, txn.Current | None]) -> tuple[list[kv_pb2.KeyValue], bool]:
    """The scan's (items, more) at its position, for a `read` with `at_before`: `parts` are
    `read.ranges` read at `revision` - 1 (items in key order, at most the range's limit, and
    whether the range holds more; one cut by the byte budget says more too); a part that says
    more ends what is known, so later parts are not looked at (they may be absent); `prev` holds
    every key of `read.puts` at `revision` - 1 (None: absent). Writes are stamped `revision`."""
    state: dict[bytes, kv_pb2.KeyValue] = {}
    cut = False
    upto: bytes | None = None  # cut: every key < upto, or <= upto if `inclusive`, is known
    inclusive = False
    for sub, (items, more) in zip(read.ranges, parts, strict=False):
        for kv in items:
            state[kv.key] = kv
        if more:
            cut = True
            upto, inclusive = (items[-1].key, True) if items else (sub.start, False)
            break
    for w in read.writes:
        if w.kind == PUT:
            p = prev[w.key]
            state[w.key] = kv_pb2.KeyValue(
                key=w.key, value=w.value, mod_revision=revision,
                create_revision=p.create_revision if p is not None else revision,
                version=p.version + 1 if p is not None else 1)
        elif w.kind == DELETE:
            state.pop(w.key, None)
        else:
            for k in [k for k in state if w.holds(k)]:
                del state[k]
    keys = sorted(k for k in state if r.holds(k) and (
        not cut or upto is None or k < upto or (inclusive and k == upto)))
    more = cut or bool(r.limit and len(keys) > r.limit)
    if r.limit:
        keys = keys[: r.limit]
    return [state[k] for k in keys], more


def within_budget(items: Sequence[kv_pb2.KeyValue], more: bool, revision: int,
                  budget: int) -> tuple[list[kv_pb2.KeyValue], bool, int]:
    """`at_position`'s answer (`items` in key order, `more`) kept within the `budget` bytes left:
    (its longest prefix whose items stamped `revision` (the transaction's own puts, never read,
    so never charged yet) fit together in `budget`, in key order; `more`, or True if cut; the
    bytes those items take). The items read at `revision` - 1 were charged by their read and
    pass. As `scan_parts.combine`: the answer is a prefix of the range at the scan's position,
    cut at the first item that does not fit, and then says `more`."""
    used = 0
    for i, kv in enumerate(items):
        if kv.mod_revision != revision:
            continue
        n = kv.ByteSize()
        if used + n > budget:
            return list(items[:i]), True, used
        used += n
    return list(items), more, used
