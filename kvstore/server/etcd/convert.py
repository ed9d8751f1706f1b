"""etcd v3 messages to and from kvstore's (`kvstore.v1.kv_pb2`): pure functions, every field of a
request checked before anything is proposed (`EtcdRequestError`, definite, with etcd's message
where etcd has one). No I/O; fuzzed in tests/unit/test_etcd_convert.py.

What does not map (yet) is refused with `Unsupported` (FAILED_PRECONDITION, definite), naming the
field: README, "etcd compatibility", lists them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.etcdpb.mvccpb import kv_pb2 as mvcc_pb2
from kvstore.storage.txn import MAX_TXN_DEPTH, MAX_TXN_ITEMS
from kvstore.txnscan import both_branches
from kvstore.v1 import kv_pb2

MAX_INT64 = (1 << 63) - 1
MAX_TXN_OPS = MAX_TXN_ITEMS
"""kvstore's limit on the compares and operations of a transaction, all levels together, counted
as kvstore ops (a prev_kv adds a get; etcd's default --max-txn-ops is 128 per level)."""
MAX_DEPTH = MAX_TXN_DEPTH


class EtcdRequestError(Exception):
    """A request refused before it reached the core: nothing happened. `code` is the gRPC status
    name etcd uses for it (INVALID_ARGUMENT, OUT_OF_RANGE, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> EtcdRequestError:
    return EtcdRequestError("INVALID_ARGUMENT", message)


def unsupported(what: str) -> EtcdRequestError:
    return EtcdRequestError(
        "FAILED_PRECONDITION", f"kvstore: {what} is not supported by kvstore's etcd API yet (README, \"etcd compatibility\")"
    )


EMPTY_KEY = "etcdserver: key is not provided"
VALUE_PROVIDED = "etcdserver: value is provided"
LEASE_PROVIDED = "etcdserver: lease is provided"
TOO_MANY_OPS = "etcdserver: too many operations in txn request"
DUPLICATE_KEY = "etcdserver: duplicate key given in txn request"


def cluster_id_of(name: str) -> int:
    """The uint64 `cluster_id` of etcd's response headers for the kvstore cluster named `name`:
    the first 8 bytes of its SHA-256, big-endian, never 0 (0 reads as "unknown" in etcd tools)."""
    v = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return v or 1


def _int64(v: int, what: str, *, low: int = 0) -> int:
    if not low <= v <= MAX_INT64:
        raise invalid(f"etcdserver: {what} {v} is out of range ({low}..{MAX_INT64})")
    return v


# --- ranges --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeyRange:
    """A checked key or range: `end` None means the single key `start`; b"" means every key
    >= start (etcd's range_end "\\0"); else [start, end)."""

    start: bytes
    end: bytes | None

    @property
    def single(self) -> bool:
        return self.end is None

    def holds(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.start
        return self.start <= key and (not self.end or key < self.end)

    def overlaps(self, other: KeyRange) -> bool:
        """Whether a key is in both."""
        if self.end is None:
            return other.holds(self.start)
        if other.end is None:
            return self.holds(other.start)
        return (not self.end or other.start < self.end) and (not other.end or self.start < other.end)


def key_range(key: bytes, range_end: bytes) -> KeyRange:
    """etcd's (key, range_end): "\\0" as range_end = every key >= key; key "\\0" with range_end
    "\\0" = every key. An empty key is refused as etcd does; so is a range_end that is not above
    key (etcd answers such a range empty: here it is a definite error naming it)."""
    if not key:
        raise invalid(EMPTY_KEY)
    if not range_end:
        return KeyRange(key, None)
    if range_end == b"\x00":
        return KeyRange(key, b"")
    if range_end <= key:
        raise invalid(f"kvstore: range_end {range_end[:64]!r} is not above key {key[:64]!r}")
    return KeyRange(key, range_end)


@dataclass(frozen=True, slots=True)
class RangeQuery:
    """A checked RangeRequest."""

    keys: KeyRange
    limit: int
    revision: int
    sort_order: int
    sort_target: int
    serializable: bool
    keys_only: bool
    count_only: bool
    min_mod: int
    max_mod: int
    min_create: int
    max_create: int


_SORT_ORDERS = frozenset(rpc_pb2.RangeRequest.SortOrder.values())
_SORT_TARGETS = frozenset(rpc_pb2.RangeRequest.SortTarget.values())


def range_query(r: rpc_pb2.RangeRequest) -> RangeQuery:
    keys = key_range(r.key, r.range_end)
    if r.limit < 0:
        raise invalid(f"etcdserver: limit {r.limit} is negative")
    if r.sort_order not in _SORT_ORDERS:
        raise invalid(f"etcdserver: unknown sort order {r.sort_order}")
    if r.sort_target not in _SORT_TARGETS:
        raise invalid(f"etcdserver: unknown sort target {r.sort_target}")
    for name in ("min_mod_revision", "max_mod_revision", "min_create_revision", "max_create_revision"):
        _int64(getattr(r, name), name)
    return RangeQuery(
        keys, r.limit, max(r.revision, 0), r.sort_order, r.sort_target, r.serializable, r.keys_only, r.count_only,
        r.min_mod_revision, r.max_mod_revision, r.min_create_revision, r.max_create_revision,
    )


def to_mvcc(kv: kv_pb2.KeyValue, keys_only: bool = False, lease: int = 0) -> mvcc_pb2.KeyValue:
    """kvstore's KeyValue as etcd's, with the key's `lease` (0: none or not known)."""
    return mvcc_pb2.KeyValue(
        key=kv.key, value=b"" if keys_only else kv.value, create_revision=kv.create_revision,
        mod_revision=kv.mod_revision, version=kv.version, lease=lease,
    )


_SORT_FIELD: dict[int, Callable[[kv_pb2.KeyValue], Any]] = {
    rpc_pb2.RangeRequest.KEY: lambda kv: kv.key,
    rpc_pb2.RangeRequest.VERSION: lambda kv: kv.version,
    rpc_pb2.RangeRequest.CREATE: lambda kv: kv.create_revision,
    rpc_pb2.RangeRequest.MOD: lambda kv: kv.mod_revision,
    rpc_pb2.RangeRequest.VALUE: lambda kv: kv.value,
}


def range_reply(q: RangeQuery, items: Iterable[kv_pb2.KeyValue], into: rpc_pb2.RangeResponse,
                leases: Mapping[bytes, int] | None = None, count: int | None = None) -> None:
    """Fill `into` (kvs, count, more) from the range's `items` (in key order), as etcd's apply
    does: count is every key in the range, the revision filters then prune, a sort target other
    than KEY sorts ascending by default, the limit cuts and sets `more`; keys_only drops values;
    count_only returns no keys. `leases`: each key's lease, where known; `count`: how many keys
    the range holds, if `items` are only the first of them (else all are there)."""
    kvs = list(items)
    into.count = len(kvs) if count is None else count
    if q.count_only:
        return
    if q.max_mod:
        kvs = [kv for kv in kvs if kv.mod_revision <= q.max_mod]
    if q.min_mod:
        kvs = [kv for kv in kvs if kv.mod_revision >= q.min_mod]
    if q.max_create:
        kvs = [kv for kv in kvs if kv.create_revision <= q.max_create]
    if q.min_create:
        kvs = [kv for kv in kvs if kv.create_revision >= q.min_create]
    order = q.sort_order
    if q.sort_target != rpc_pb2.RangeRequest.KEY and order == rpc_pb2.RangeRequest.NONE:
        order = rpc_pb2.RangeRequest.ASCEND
    if order != rpc_pb2.RangeRequest.NONE:
        kvs.sort(key=_SORT_FIELD[q.sort_target], reverse=order == rpc_pb2.RangeRequest.DESCEND)
    if q.limit and len(kvs) > q.limit:
        kvs = kvs[: q.limit]
        into.more = True
    into.kvs.extend(to_mvcc(kv, q.keys_only, leases.get(kv.key, 0) if leases else 0) for kv in kvs)


# --- writes --------------------------------------------------------------------------------
def check_put(r: rpc_pb2.PutRequest) -> None:
    """etcd's checks of a PutRequest: a key; no value with ignore_value, no lease with
    ignore_lease (INVALID_ARGUMENT, definite); a lease id in int64 range."""
    if not r.key:
        raise invalid(EMPTY_KEY)
    if r.ignore_value and r.value:
        raise invalid(VALUE_PROVIDED)
    if r.ignore_lease and r.lease:
        raise invalid(LEASE_PROVIDED)
    _int64(r.lease, "lease")


# --- transactions --------------------------------------------------------------------------
_RESULT = {
    rpc_pb2.Compare.EQUAL: kv_pb2.EQUAL,
    rpc_pb2.Compare.GREATER: kv_pb2.GREATER,
    rpc_pb2.Compare.LESS: kv_pb2.LESS,
    rpc_pb2.Compare.NOT_EQUAL: kv_pb2.NOT_EQUAL,
}
_TARGET = {
    rpc_pb2.Compare.VERSION: (kv_pb2.COMPARE_VERSION, "version"),
    rpc_pb2.Compare.CREATE: (kv_pb2.COMPARE_CREATE, "create_revision"),
    rpc_pb2.Compare.MOD: (kv_pb2.COMPARE_MOD, "mod_revision"),
    rpc_pb2.Compare.VALUE: (kv_pb2.COMPARE_VALUE, "value"),
    rpc_pb2.Compare.LEASE: (kv_pb2.COMPARE_LEASE, "lease"),
}


@dataclass(slots=True)
class OpPlan:
    """How one etcd RequestOp became kvstore TxnOps: `kind` is range / put / delete /
    delete_range / txn;
    `with_prev`: a get of the key was put before the write (prev_kv); `query`: a range's checked
    request (its reply is built by `range_reply`: limit, sort, revision filters, keys_only,
    count_only apply as on a Range); `nested`: a nested plan. `external`: for a range over
    several keys or at a revision, its index in `TxnPlan.ranges` (it became no kvstore op: the
    caller reads it at the transaction's revision); -1 for every other op. `ignore_value`,
    `ignore_lease`: see below."""

    kind: str
    with_prev: bool = False
    query: RangeQuery | None = None
    nested: TxnPlan | None = None
    external: int = -1
    prev_range: int = -1
    """A range delete with prev_kv: the index in `TxnPlan.ranges` of the read of its range right
    before it (the keys it deletes, as they are at its place: its prev_kvs)."""
    ignore_value: bool = False
    ignore_lease: bool = False
    """A put's etcd flags: its value / lease are the key's own, for the caller to fill in
    (`ignored_puts`); the body holds the request's (empty value, lease 0) meanwhile."""


@dataclass(slots=True)
class TxnPlan:
    """The plans of a transaction's success and failure operations, to map the results back;
    `ranges`: the queries of its external ranges (`OpPlan.external`), nested transactions' too
    (kept on the top-level plan only)."""

    success: list[OpPlan]
    failure: list[OpPlan]
    ranges: list[RangeQuery] = field(default_factory=list)
    sequential: bool = False
    """(Top-level plan only.) On some path an external read comes before a write that meets it
    (a key in it, or a range delete's range overlapping it), or a range delete has prev_kv: read
    at the transaction's revision, after its writes, it would show that write, where etcd's range
    sees only the writes before it; the caller reads such ranges at their place (`with_scans`:
    kvstore's Txn with scans)."""


def _compare(c: rpc_pb2.Compare, into: kv_pb2.Compare) -> None:
    if not c.key:
        raise invalid(EMPTY_KEY)
    if c.range_end:
        raise unsupported("a Compare over a range (range_end)")
    if c.result not in _RESULT:
        raise invalid(f"etcdserver: unknown compare result {c.result}")
    if c.target not in _TARGET:
        raise invalid(f"etcdserver: unknown compare target {c.target}")
    target, field = _TARGET[c.target]
    which = c.WhichOneof("target_union")
    if which is not None and which != field:
        raise invalid(f"etcdserver: compare target {rpc_pb2.Compare.CompareTarget.Name(c.target)} with a {which} operand")
    into.key, into.target, into.result = c.key, target, _RESULT[c.result]
    if target == kv_pb2.COMPARE_VALUE:
        into.value = c.value
    else:
        into.number = _int64(getattr(c, field), field)


def _ops(ops: Iterable[rpc_pb2.RequestOp], into: list[kv_pb2.TxnOp], plans: list[OpPlan], depth: int,
         count: list[int], ranges: list[RangeQuery], outside: Callable[[bytes], bool] | None,
         read: list[KeyRange], seq: list[bool]) -> None:
    """`read`: the keys external reads read earlier on this path (grows as they come); `seq[0]`
    is set when a write meets one of them (`TxnPlan.sequential`)."""
    for op in ops:
        which = op.WhichOneof("request")
        if which == "request_range":
            r = op.request_range
            q = range_query(r)
            if q.keys.single and not q.revision and not (outside is not None and outside(r.key)):
                into.append(kv_pb2.TxnOp(get=r.key))
                plans.append(OpPlan("range", query=q))
            else:  # read by the caller at the transaction's revision (or the one it names)
                plans.append(OpPlan("range", query=q, external=len(ranges)))
                ranges.append(q)
                if not q.revision:
                    read.append(q.keys)
        elif which == "request_put":
            p = op.request_put
            check_put(p)
            seq[0] = seq[0] or any(r.holds(p.key) for r in read)
            if p.prev_kv:
                into.append(kv_pb2.TxnOp(get=p.key))
            # a lease's `checked` is the caller's to fill in (it asks the lease's home), and so
            # are the value and lease of a put with ignore_value / ignore_lease (`ignored_puts`)
            into.append(kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=p.key, value=p.value, lease=p.lease)))
            plans.append(OpPlan("put", with_prev=p.prev_kv, ignore_value=p.ignore_value,
                                ignore_lease=p.ignore_lease))
        elif which == "request_delete_range":
            d = op.request_delete_range
            k = key_range(d.key, d.range_end)
            if not k.single:  # kvstore's range delete in a transaction (across every group)
                seq[0] = seq[0] or d.prev_kv or any(r.overlaps(k) for r in read)
                assert k.end is not None
                into.append(kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(start=k.start, end=k.end)))
                plans.append(OpPlan("delete_range", prev_range=len(ranges) if d.prev_kv else -1))
                if d.prev_kv:  # its range read at its place, right before it (one more op)
                    ranges.append(RangeQuery(k, 0, 0, rpc_pb2.RangeRequest.NONE, rpc_pb2.RangeRequest.KEY, False,
                                             False, False, 0, 0, 0, 0))
                    count[0] += 1
                count[0] += 1
                if count[0] > MAX_TXN_OPS:
                    raise invalid(TOO_MANY_OPS)
                continue
            seq[0] = seq[0] or any(r.holds(d.key) for r in read)
            if d.prev_kv:
                into.append(kv_pb2.TxnOp(get=d.key))
            into.append(kv_pb2.TxnOp(delete=d.key))
            plans.append(OpPlan("delete", with_prev=d.prev_kv))
        elif which == "request_txn":
            body = kv_pb2.TxnBody()
            nested = _txn(op.request_txn, body, depth + 1, count, ranges, outside, read, seq)
            into.append(kv_pb2.TxnOp(txn=body))
            plans.append(OpPlan("txn", nested=nested))
        else:
            raise invalid("etcdserver: a transaction operation with no request")
        count[0] += 1 + plans[-1].with_prev  # the kvstore ops it became (prev_kv: a get too)
        if count[0] > MAX_TXN_OPS:
            raise invalid(TOO_MANY_OPS)


def _writes(ops: Iterable[rpc_pb2.RequestOp]) -> tuple[set[bytes], set[bytes]]:
    """The keys one branch puts and deletes, nested transactions' too, checked as etcd's
    `checkIntervals`: a key put twice, or put and deleted (by a delete of the key or one of a
    range that holds it), in one branch is refused (DUPLICATE_KEY; deleting a key twice is
    not); a nested transaction's success and failure may name the same keys (only one of them
    runs). A range delete's keys are not listed; ranges are checked as etcd orders it: a nested
    transaction's puts against the ranges this branch deletes itself and those of the nested
    transactions before it, then this branch's own puts against all of them (each nested
    transaction checked its own branches the same way, its then and else apart)."""
    ops = list(ops)
    dels = {op.request_delete_range.key for op in ops if op.WhichOneof("request") == "request_delete_range"
            and not op.request_delete_range.range_end}
    ranges = _range_dels(ops, nested=False)
    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, dels_then = _writes(op.request_txn.success)
        puts_else, dels_else = _writes(op.request_txn.failure)
        for k in puts_then:
            if k in puts or k in dels or _in_any(ranges, k):
                raise invalid(DUPLICATE_KEY)
            puts.add(k)
        for k in puts_else:
            if (k in puts and k not in puts_then) or k in dels or _in_any(ranges, k):
                raise invalid(DUPLICATE_KEY)
            puts.add(k)
        dels |= dels_then | dels_else
        ranges += _range_dels([*op.request_txn.success, *op.request_txn.failure], nested=True)
    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        k = op.request_put.key
        if k in puts or k in dels or _in_any(ranges, k):
            raise invalid(DUPLICATE_KEY)
        puts.add(k)
    return puts, dels


def _range_dels(ops: Iterable[rpc_pb2.RequestOp], nested: bool) -> list[KeyRange]:
    """The ranges the range deletes of `ops` cover (with `nested`, those of nested transactions
    too, either branch)."""
    out: list[KeyRange] = []
    for op in ops:
        which = op.WhichOneof("request")
        if which == "request_delete_range" and op.request_delete_range.range_end:
            d = op.request_delete_range
            out.append(key_range(d.key, d.range_end))
        elif which == "request_txn" and nested:
            out += _range_dels([*op.request_txn.success, *op.request_txn.failure], nested=True)
    return out


def _in_any(ranges: list[KeyRange], key: bytes) -> bool:
    return any(r.holds(key) for r in ranges)


def _txn(r: rpc_pb2.TxnRequest, body: kv_pb2.TxnBody, depth: int, count: list[int],
         ranges: list[RangeQuery], outside: Callable[[bytes], bool] | None, read: list[KeyRange],
         seq: list[bool]) -> TxnPlan:
    """`read`: the external reads before it on its path; afterwards it also holds its own (of
    either branch: which one runs is not known here)."""
    if depth > MAX_DEPTH:
        raise invalid(f"kvstore: transactions nest at most {MAX_DEPTH} deep")
    for c in r.compare:
        count[0] += 1
        if count[0] > MAX_TXN_OPS:
            raise invalid(TOO_MANY_OPS)
        _compare(c, body.compares.add())
    plan = TxnPlan([], [])
    both_branches(read, body, lambda ok, out, rd: _ops(r.success if ok else r.failure, out,
                                                       plan.success if ok else plan.failure, depth, count, ranges,
                                                       outside, rd, seq))
    return plan


def txn_body(r: rpc_pb2.TxnRequest, reads_outside: Callable[[bytes], bool] | None = None
             ) -> tuple[kv_pb2.TxnBody, TxnPlan]:
    """etcd's TxnRequest as kvstore's TxnBody and the plan to map its result back. A read of one
    key becomes a get in the body (an external read instead where `reads_outside(key)`: a key
    of another group than the written one); a read over
    several keys or at a revision becomes no kvstore op (`OpPlan.external`, its query in `TxnPlan.ranges`: the caller reads it). A put's lease
    is carried (`TxnPut.lease`; its `checked` is left 0 for the caller), and so is a compare of
    a key's lease (COMPARE_LEASE). A put with ignore_value or ignore_lease is planned as such
    (`OpPlan.ignore_value`, `ignored_puts`: the caller fills in the key's value and lease).
    Compares over a range are refused (`unsupported`); a range delete becomes kvstore's
    (`TxnOp.delete_range`, run across every group), its prev_kv an external read of its range
    right before it (`OpPlan.prev_range`); a write after an external read that it meets, or a
    range delete's prev_kv, sets `TxnPlan.sequential`; prev_kv of one key becomes a get before
    the write. More than MAX_TXN_OPS kvstore ops
    (an external range counts as one), nesting deeper than MAX_DEPTH, or a key put twice (or
    put and deleted) in one branch are refused as etcd refuses them (INVALID_ARGUMENT)."""
    body = kv_pb2.TxnBody()
    ranges: list[RangeQuery] = []
    seq = [False]
    plan = _txn(r, body, 1, [0], ranges, reads_outside, [], seq)
    plan.ranges, plan.sequential = ranges, seq[0]
    _writes(r.success)
    _writes(r.failure)
    return body, plan


def txn_keys(body: kv_pb2.TxnBody, gets: bool = True) -> list[bytes]:
    """Every key a kvstore transaction names, on any path (nested ones too); without `gets`,
    those it compares or writes only."""
    out = [c.key for c in body.compares]
    for op in (*body.success, *body.failure):
        which = op.WhichOneof("op")
        if which == "put":
            out.append(op.put.key)
        elif which == "delete" or (which == "get" and gets):
            out.append(getattr(op, which))
        elif which == "txn":
            out += txn_keys(op.txn, gets)
    return out


def compares_lease(body: kv_pb2.TxnBody) -> bool:
    """Whether a compare of a key's lease is on any path of `body`."""
    return any(c.target == kv_pb2.COMPARE_LEASE for c in body.compares) or any(
        op.WhichOneof("op") == "txn" and compares_lease(op.txn) for op in (*body.success, *body.failure))


def leased_puts(body: kv_pb2.TxnBody) -> list[kv_pb2.TxnPut]:
    """Every put with a lease on any path of `body` (the messages themselves, to fill in)."""
    out: list[kv_pb2.TxnPut] = []
    for op in (*body.success, *body.failure):
        which = op.WhichOneof("op")
        if which == "put" and op.put.lease:
            out.append(op.put)
        elif which == "txn":
            out += leased_puts(op.txn)
    return out


def ignored_puts(plan: TxnPlan, body: kv_pb2.TxnBody, taken: Any = None
                 ) -> Iterator[tuple[kv_pb2.TxnPut, OpPlan, bool]]:
    """Every put of `body` (planned by `plan`, without external ranges) with ignore_value or
    ignore_lease: (the message itself, to fill in; its plan; whether it is on the path `taken`
    took). `taken`: a result of `body` (`storage.txn.TxnResult`, whose responses align with the
    operations of the branch taken), None for no path."""
    for branch, plans, ops in ((True, plan.success, body.success), (False, plan.failure, body.failure)):
        on = taken is not None and taken.succeeded == branch
        i = 0
        for p in plans:
            if p.external >= 0:
                continue
            i += p.with_prev
            op = ops[i]
            if p.kind == "put" and (p.ignore_value or p.ignore_lease):
                yield op.put, p, on
            elif p.kind == "txn":
                assert p.nested is not None
                yield from ignored_puts(p.nested, op.txn, taken.responses[i].txn if on else None)
            i += 1


def taken_ranges(plan: TxnPlan, result: kv_pb2.TxnResult) -> list[int]:
    """The `TxnPlan.ranges` indexes of the external ranges on the path `result` took."""
    out: list[int] = []
    responses = list(result.responses)
    i = 0
    for p in plan.success if result.succeeded else plan.failure:
        if p.external >= 0:
            out.append(p.external)
            continue
        if p.prev_range >= 0:
            out.append(p.prev_range)
        i += p.with_prev
        if p.kind == "txn":
            assert p.nested is not None
            out += taken_ranges(p.nested, responses[i].txn)
        i += 1
    return out


def with_scans(plan: TxnPlan, body: kv_pb2.TxnBody) -> kv_pb2.TxnBody:
    """`body` with each external range of `plan` (none at a revision) in its place as a
    kvstore scan of its keys (`TxnOp.scan`, no limit: the reply's count is every key, and
    `range_reply` applies the limit, sort and filters as on a Range), and each range delete's
    prev_kv range as a scan right before it, which kvstore's Txn reads at its place on the path
    taken (etcd's sequential semantics: `kvstore/txnpath.py`). `plan` is the top-level plan
    (`txn_body`'s): a nested plan's range deletes index its `ranges`."""
    return _with_scans(plan, body, plan.ranges)


def _with_scans(plan: TxnPlan, body: kv_pb2.TxnBody, ranges: list[RangeQuery]) -> kv_pb2.TxnBody:
    """`with_scans` of `plan` (top-level or nested), `ranges` the top-level plan's."""
    out = kv_pb2.TxnBody()
    out.compares.extend(body.compares)
    for plans, ops, into in ((plan.success, body.success, out.success), (plan.failure, body.failure, out.failure)):
        i = 0
        for p in plans:
            if p.external >= 0:
                q = p.query
                assert q is not None and not q.revision
                end = q.keys.start + b"\x00" if q.keys.end is None else q.keys.end  # one key: [key, key\0)
                into.add().scan.CopyFrom(kv_pb2.TxnScan(start=q.keys.start, end=end))
                continue
            for _ in range(p.with_prev):
                into.append(ops[i])
                i += 1
            if p.prev_range >= 0:
                k = ranges[p.prev_range].keys
                assert k.end is not None
                into.add().scan.CopyFrom(kv_pb2.TxnScan(start=k.start, end=k.end))
            if p.kind == "txn":
                assert p.nested is not None
                into.add().txn.CopyFrom(_with_scans(p.nested, ops[i].txn, ranges))
            else:
                into.append(ops[i])
            i += 1
    return out


def scan_answers(plan: TxnPlan, result: kv_pb2.TxnResult
                 ) -> tuple[kv_pb2.TxnResult, dict[int, kv_pb2.TxnScanResult]]:
    """The result of kvstore's Txn of `with_scans(plan, body)` as (the result of `body`, the
    scans' answers by `OpPlan.external`). Raises ValueError if `result` does not fit `plan`."""
    out = kv_pb2.TxnResult(succeeded=result.succeeded)
    answers: dict[int, kv_pb2.TxnScanResult] = {}
    responses = list(result.responses)
    i = 0
    for p in plan.success if result.succeeded else plan.failure:
        n = 1 if p.external >= 0 else 1 + p.with_prev + (p.prev_range >= 0)
        if i + n > len(responses):
            raise ValueError("a transaction's result does not fit its plan")
        if p.prev_range >= 0:
            if responses[i].WhichOneof("op") != "scan":
                raise ValueError("a transaction's result does not fit its plan")
            answers[p.prev_range] = responses[i].scan
            out.responses.append(responses[i + 1])
        elif p.external >= 0:
            if responses[i].WhichOneof("op") != "scan":
                raise ValueError("a transaction's result does not fit its plan")
            answers[p.external] = responses[i].scan
        elif p.kind == "txn":
            assert p.nested is not None
            sub, more = scan_answers(p.nested, responses[i].txn)
            out.responses.add().txn.CopyFrom(sub)
            answers.update(more)
        else:
            out.responses.extend(responses[i:i + n])
        i += n
    if i != len(responses):
        raise ValueError("a transaction's result does not fit its plan")
    return out, answers


def _kv_found(kv: kv_pb2.KeyValue) -> bool:
    return bool(kv.key)


RangeAnswer = tuple[list[kv_pb2.KeyValue], int, Mapping[bytes, int]]
"""An external range's answer: the keys kept, in key order, how many the range holds, and each
key's lease where known."""


def txn_gets(result: kv_pb2.TxnResult) -> list[kv_pb2.KeyValue]:
    """The keys found by the gets of `result` (nested results' too)."""
    out: list[kv_pb2.KeyValue] = []
    for r in result.responses:
        which = r.WhichOneof("op")
        if which == "get" and _kv_found(r.get):
            out.append(r.get)
        elif which == "txn":
            out += txn_gets(r.txn)
    return out


def txn_reply(plan: TxnPlan, result: kv_pb2.TxnResult, header: rpc_pb2.ResponseHeader,
              into: rpc_pb2.TxnResponse, ranges: Mapping[int, RangeAnswer] | None = None,
              leases: Mapping[bytes, int] | None = None, prev_leases: Mapping[bytes, int] | None = None) -> None:
    """Fill etcd's TxnResponse from kvstore's result of the transaction planned by `plan`, and
    the answers of its external ranges on the path taken (`ranges`, by `OpPlan.external`);
    `leases`: the leases of keys its one-key ranges found, where known; `prev_leases`: the
    leases keys held before the transaction, where known (a prev_kv's; else 0)."""
    into.header.CopyFrom(header)
    into.succeeded = result.succeeded
    plans = plan.success if result.succeeded else plan.failure
    responses = list(result.responses)
    i = 0
    for p in plans:
        out = into.responses.add()
        if p.external >= 0:
            assert p.query is not None and ranges is not None
            ext_items, ext_count, ext_leases = ranges[p.external]
            out.response_range.header.CopyFrom(header)
            range_reply(p.query, ext_items, out.response_range, ext_leases, ext_count)
            continue
        prev: kv_pb2.KeyValue | None = None
        if p.with_prev:
            prev = responses[i].get
            i += 1
        r = responses[i]
        i += 1
        if p.kind == "range":
            assert p.query is not None
            rr = out.response_range
            rr.header.CopyFrom(header)
            range_reply(p.query, [r.get] if _kv_found(r.get) else [], rr, leases)
        elif p.kind == "put":
            pr = out.response_put
            pr.header.CopyFrom(header)
            if prev is not None and _kv_found(prev):
                pr.prev_kv.CopyFrom(to_mvcc(prev, lease=(prev_leases or {}).get(prev.key, 0)))
        elif p.kind == "delete_range":
            dr = out.response_delete_range
            dr.header.CopyFrom(header)
            dr.deleted = r.delete_range
            if p.prev_range >= 0:
                assert ranges is not None
                dr.prev_kvs.extend(to_mvcc(kv) for kv in ranges[p.prev_range][0])
        elif p.kind == "delete":
            dr = out.response_delete_range
            dr.header.CopyFrom(header)
            dr.deleted = 1 if r.delete else 0
            if prev is not None and _kv_found(prev):
                dr.prev_kvs.append(to_mvcc(prev, lease=(prev_leases or {}).get(prev.key, 0)))
        else:
            assert p.nested is not None
            txn_reply(p.nested, r.txn, header, out.response_txn, ranges, leases, prev_leases)


# --- watch ---------------------------------------------------------------------------------
def watch_create(r: rpc_pb2.WatchCreateRequest, watch_id: int) -> kv_pb2.WatchCreateRequest:
    """etcd's WatchCreateRequest as kvstore's, with the stream-unique id `watch_id` (> 0) the
    servicer chose (kvstore's ids are > 0; etcd's start at 0: `watch.py` maps them)."""
    keys = key_range(r.key, r.range_end)
    if r.start_revision < 0:
        raise invalid(f"etcdserver: start_revision {r.start_revision} is negative")
    filters = []
    for f in r.filters:
        if f not in rpc_pb2.WatchCreateRequest.FilterType.values():
            raise invalid(f"etcdserver: unknown watch filter {f}")
        filters.append(kv_pb2.WatchCreateRequest.NOPUT if f == rpc_pb2.WatchCreateRequest.NOPUT
                       else kv_pb2.WatchCreateRequest.NODELETE)
    end = b"" if keys.end is None else (b"\x00" if keys.end == b"" else keys.end)
    return kv_pb2.WatchCreateRequest(
        key=keys.start, range_end=end, start_revision=r.start_revision, progress_notify=r.progress_notify,
        filters=filters, prev_kv=r.prev_kv, watch_id=watch_id,
    )


def watch_event(e: kv_pb2.Event) -> mvcc_pb2.Event:
    out = mvcc_pb2.Event(type=mvcc_pb2.Event.DELETE if e.type == kv_pb2.Event.DELETE else mvcc_pb2.Event.PUT)
    out.kv.CopyFrom(to_mvcc(e.kv))
    if e.HasField("prev_kv"):
        out.prev_kv.CopyFrom(to_mvcc(e.prev_kv))
    return out
