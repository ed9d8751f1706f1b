"""Transactions on the client: `types.Compare` / `types.Op` checked and turned into the wire's
`TxnBody`. Everything the server would refuse for its shape is refused here first (definite
InvalidArgument / KeyTooLarge / ValueTooLarge, nothing sent): unknown targets or operators, a
number operand that is not a non-negative int (or a value operand that is not bytes), more than
`MAX_TXN_ITEMS` compares and operations, nesting deeper than `MAX_TXN_DEPTH`, a scan's bounds
too long, a limit out of range (`kvstore.txnscan`). Whether the keys
share one group (one proposal) or not (a two-phase commit) is the server's call (its shard map
is the authority)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from kvstore.client.checks import RequestChecks, check_bytes
from kvstore.client.types import Compare, Op
from kvstore.errors import InvalidArgument
from kvstore.storage import leases
from kvstore.storage.txn import MAX_TXN_DEPTH, MAX_TXN_ITEMS, NUMBER_MAX, check_range
from kvstore.txnscan import LIMIT_MAX, has_scans, split
from kvstore.v1 import kv_pb2

__all__ = ["first_key", "leased_ids", "txn_body"]

_TARGETS = {
    "value": kv_pb2.COMPARE_VALUE, "version": kv_pb2.COMPARE_VERSION,
    "create": kv_pb2.COMPARE_CREATE, "mod": kv_pb2.COMPARE_MOD, "lease": kv_pb2.COMPARE_LEASE,
}
_OPS = {"=": kv_pb2.EQUAL, "!=": kv_pb2.NOT_EQUAL, ">": kv_pb2.GREATER, "<": kv_pb2.LESS}


def leased_ids(ops: Sequence[Op]) -> Iterator[int]:
    """The lease of every put with one in `ops` and their nested transactions (as given: checked
    by `txn_body`)."""
    for o in ops:
        if isinstance(o, Op):
            if o.kind == "put" and o.lease:
                yield o.lease
            elif o.kind == "txn":
                yield from leased_ids((*o.success, *o.failure))


def txn_body(
    checks: RequestChecks, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op],
    checked: Mapping[int, int] | None = None,
) -> kv_pb2.TxnBody:
    """The checked wire form of a transaction; a put with a lease carries `checked[lease]` (the
    lease's home's reading when it answered the lease live, `Leases.time_to_live`; 0 if absent:
    then only the lease's home group accepts the put)."""
    items = [0]

    def body(compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op], depth: int) -> kv_pb2.TxnBody:
        if depth > MAX_TXN_DEPTH:
            raise InvalidArgument(f"transaction nested deeper than {MAX_TXN_DEPTH}")
        items[0] += len(compares) + len(success) + len(failure)
        if items[0] > MAX_TXN_ITEMS:
            raise InvalidArgument(f"transaction has more than {MAX_TXN_ITEMS} compares and operations")
        b = kv_pb2.TxnBody()
        for c in compares:
            if not isinstance(c, Compare):
                raise InvalidArgument(f"a compare must be a Compare, not {type(c).__name__}")
            target, op = _TARGETS.get(c.target), _OPS.get(c.op)
            if target is None or op is None:
                raise InvalidArgument(f"compare {c.target!r} {c.op!r}: target must be one of {', '.join(_TARGETS)}, "
                                      f"operator one of {', '.join(_OPS)}")
            m = b.compares.add(key=checks.key(c.key), target=target, result=op)
            if c.target == "value":
                m.value = checks.value(c.operand)
            elif isinstance(c.operand, bool) or not isinstance(c.operand, int) or not 0 <= c.operand <= NUMBER_MAX:
                raise InvalidArgument(f"a {c.target} compare needs an integer in 0..{NUMBER_MAX}, not {c.operand!r}")
            else:
                m.number = c.operand
        for ops, out in ((success, b.success), (failure, b.failure)):
            for o in ops:
                if not isinstance(o, Op):
                    raise InvalidArgument(f"an operation must be an Op, not {type(o).__name__}")
                if o.kind == "put":
                    put = kv_pb2.TxnPut(key=checks.key(o.key), value=checks.value(o.value))
                    if o.lease:
                        try:
                            put.lease = leases.check_id(o.lease)
                        except ValueError as err:
                            raise InvalidArgument(f"a put's lease: {err}") from None
                        put.checked = (checked or {}).get(o.lease, 0)
                    out.add().put.CopyFrom(put)
                elif o.kind == "delete":
                    out.add(delete=checks.key(o.key))
                elif o.kind == "get":
                    out.add(get=checks.key(o.key))
                elif o.kind == "txn":
                    out.add().txn.CopyFrom(body(o.compares, o.success, o.failure, depth + 1))
                elif o.kind == "scan":
                    if isinstance(o.limit, bool) or not isinstance(o.limit, int) or not 0 <= o.limit <= LIMIT_MAX:
                        raise InvalidArgument(f"a scan's limit must be an integer in 0..{LIMIT_MAX}, not {o.limit!r}")
                    out.add().scan.CopyFrom(kv_pb2.TxnScan(
                        start=check_bytes("start", o.key), end=check_bytes("end", o.end),
                        prefix=check_bytes("prefix", o.prefix), limit=o.limit))
                elif o.kind == "delete_range":
                    out.add().delete_range.CopyFrom(_range(checks, o))
                else:
                    raise InvalidArgument(f"unknown operation kind {o.kind!r}")
        return b

    b = body(compares, success, failure, 1)
    if has_scans(b):
        split(b, checks.max_key_size)  # the server's checks of the scans (bounds, limits)
    return b


def _range(checks: RequestChecks, o: Op) -> kv_pb2.TxnRange:
    """A range delete's wire form, checked as the server checks it (`server/txn_wire.range_of`)."""
    start, end, prefix = (check_bytes(name, v) for name, v in (("start", o.key), ("end", o.end), ("prefix", o.prefix)))
    for bound in (start, end, prefix):
        if bound:
            checks.key(bound)
    if prefix:
        if start or end:
            raise InvalidArgument("a range delete with a prefix carries no start or end")
        return kv_pb2.TxnRange(prefix=prefix)
    try:
        check_range(start, end)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    return kv_pb2.TxnRange(start=start, end=end)


def first_key(b: kv_pb2.TxnBody) -> bytes | None:
    """The first key the transaction names (routes it: to the leader of that key's group, which
    proposes it, or coordinates it if its keys are in several groups); for one that names no
    key but scans, the first scan's first key (any node serves it: it reads every group)."""
    key = _first_named(b)
    if key is None and has_scans(b):
        return _first_scan_key(b)
    return key


def _first_scan_key(b: kv_pb2.TxnBody) -> bytes | None:
    for o in (*b.success, *b.failure):
        which = o.WhichOneof("op")
        if which == "scan":
            return o.scan.prefix or o.scan.start or b"\x00"
        if which == "txn":
            k = _first_scan_key(o.txn)
            if k is not None:
                return k
    return None


def _first_named(b: kv_pb2.TxnBody) -> bytes | None:
    for c in b.compares:
        return c.key
    for o in (*b.success, *b.failure):
        which = o.WhichOneof("op")
        if which == "put":
            return o.put.key
        if which in ("delete", "get"):
            return o.delete if which == "delete" else o.get
        if which == "txn":
            k = _first_named(o.txn)
            if k is not None:
                return k
        if which == "delete_range":  # names no key: any node coordinates it, routed by a bound
            r = o.delete_range
            return r.prefix or r.start or r.end
    return None
