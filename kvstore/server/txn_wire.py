"""Transactions on the wire: `kv_pb2.TxnBody` (hostile input) to `storage.txn.Txn`, and results
back. Every field is validated here, before anything reaches a group: an unknown enum, an unset
operation, a key or value over the node's limits, a negative number, more than
`txn.MAX_TXN_ITEMS` compares and operations or nesting deeper than `txn.MAX_TXN_DEPTH`, a put's
lease that is not a valid lease id (`leases.check_id`) are a
definite INVALID_ARGUMENT (or KEY_TOO_LARGE / VALUE_TOO_LARGE), with a message saying which."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvstore import errors
from kvstore.node.watchspec import prefix_end
from kvstore.storage import leases, txn
from kvstore.v1 import kv_pb2

_TARGETS = {
    kv_pb2.COMPARE_VALUE: txn.Target.VALUE, kv_pb2.COMPARE_VERSION: txn.Target.VERSION,
    kv_pb2.COMPARE_CREATE: txn.Target.CREATE, kv_pb2.COMPARE_MOD: txn.Target.MOD,
    kv_pb2.COMPARE_LEASE: txn.Target.LEASE,
}
_RESULTS = {
    kv_pb2.EQUAL: txn.CmpResult.EQUAL, kv_pb2.NOT_EQUAL: txn.CmpResult.NOT_EQUAL,
    kv_pb2.GREATER: txn.CmpResult.GREATER, kv_pb2.LESS: txn.CmpResult.LESS,
}


def txn_from_proto(
    body: kv_pb2.TxnBody, check_key: Callable[[bytes], None], check_value: Callable[[bytes], None]
) -> txn.Txn:
    """The transaction `body` describes, every field checked (`check_key` / `check_value`: the
    node's limits, raising definite KVErrors); the structural rules (`txn.check_txn`) too."""
    items = [0]

    def conv(b: kv_pb2.TxnBody, depth: int) -> txn.Txn:
        if depth > txn.MAX_TXN_DEPTH:
            raise errors.InvalidArgument(f"transaction nested deeper than {txn.MAX_TXN_DEPTH}")
        items[0] += len(b.compares) + len(b.success) + len(b.failure)
        if items[0] > txn.MAX_TXN_ITEMS:
            raise errors.InvalidArgument(f"transaction has more than {txn.MAX_TXN_ITEMS} compares and operations")
        cmps = []
        for c in b.compares:
            check_key(c.key)
            target, result = _TARGETS.get(c.target), _RESULTS.get(c.result)
            if target is None:
                raise errors.InvalidArgument(f"compare on key {c.key[:64]!r} has no valid target ({c.target})")
            if result is None:
                raise errors.InvalidArgument(f"compare on key {c.key[:64]!r} has no valid result ({c.result})")
            if target == txn.Target.VALUE:
                if c.number:
                    raise errors.InvalidArgument("a value compare carries no number")
                check_value(c.value)
                cmps.append(txn.Compare(c.key, target, result, c.value))
            else:
                if c.value:
                    raise errors.InvalidArgument(f"a {target.name.lower()} compare carries no value")
                if c.number < 0:
                    raise errors.InvalidArgument(f"a {target.name.lower()} compare needs a number >= 0, not {c.number}")
                cmps.append(txn.Compare(c.key, target, result, b"", c.number))
        return txn.Txn(tuple(cmps), conv_ops(b.success, depth), conv_ops(b.failure, depth))

    def conv_ops(ops: Iterable[kv_pb2.TxnOp], depth: int) -> tuple[txn.TxnOp, ...]:
        out = []
        for op in ops:
            which = op.WhichOneof("op")
            if which == "put":
                check_key(op.put.key)
                check_value(op.put.value)
                lease, checked = op.put.lease, op.put.checked
                if lease:
                    try:
                        leases.check_id(lease)
                    except ValueError as err:
                        raise errors.InvalidArgument(str(err)) from None
                if not 0 <= checked <= leases.MAX_CHECKED:
                    raise errors.InvalidArgument(f"a put's checked revision {checked} is out of range")
                if checked and not lease:
                    raise errors.InvalidArgument("a put without a lease carries no checked revision")
                out.append(txn.TxnOp(txn.OpKind.PUT, op.put.key, op.put.value, lease=lease, checked=checked))
            elif which == "delete":
                check_key(op.delete)
                out.append(txn.TxnOp(txn.OpKind.DELETE, op.delete))
            elif which == "get":
                check_key(op.get)
                out.append(txn.TxnOp(txn.OpKind.GET, op.get))
            elif which == "txn":
                out.append(txn.TxnOp(txn.OpKind.TXN, txn=conv(op.txn, depth + 1)))
            elif which == "delete_range":
                lo, hi = range_of(op.delete_range.start, op.delete_range.end, op.delete_range.prefix, check_key)
                out.append(txn.TxnOp(txn.OpKind.DELETE_RANGE, lo, end=hi))
            else:
                raise errors.InvalidArgument(
                    "a transaction operation sets none of put, delete, get, txn and delete_range")
        return tuple(out)

    t = conv(body, 1)
    try:
        txn.check_txn(t)
    except ValueError as err:
        raise errors.InvalidArgument(f"invalid transaction: {err}") from None
    return t


def range_of(start: bytes, end: bytes, prefix: bytes, check_key: Callable[[bytes], None]) -> tuple[bytes, bytes]:
    """A `TxnRange`'s [start, end) (end b"": no end), checked: `prefix` overrides start and end
    (every key starting with it); each bound within the node's key size (`check_key`, given a
    non-empty stand-in of the bound's length); not both empty; a non-empty end above the start.
    Definite InvalidArgument / KeyTooLarge otherwise."""
    if prefix:
        if start or end:
            raise errors.InvalidArgument("a range delete with a prefix carries no start or end")
        check_key(prefix)
        return prefix, prefix_end(prefix) or b""
    for bound in (start, end):
        if bound:
            check_key(bound)
    try:
        txn.check_range(start, end)
    except ValueError as err:
        raise errors.InvalidArgument(str(err)) from None
    return start, end


def result_into(msg: kv_pb2.TxnResult, t: txn.Txn, r: txn.TxnResult) -> None:
    """Fill `msg` from `r`, the applied result of `t` (a GET's KeyValue carries the key only when
    the key was found: an absent key reads as an empty KeyValue)."""
    msg.succeeded = r.succeeded
    ops = t.success if r.succeeded else t.failure
    if len(ops) != len(r.responses) or any(
        (op.kind != o.kind) for op, o in zip(ops, r.responses, strict=True)
    ):
        raise errors.InvalidArgument(
            "the session's result for this sequence number belongs to a different request (a reused seq)"
        )
    for op, o in zip(ops, r.responses, strict=True):
        out = msg.responses.add()
        if o.kind == txn.OpKind.PUT:
            out.put = r.revision
        elif o.kind == txn.OpKind.DELETE:
            out.delete = o.found
        elif o.kind == txn.OpKind.DELETE_RANGE:
            out.delete_range = o.deleted
        elif o.kind == txn.OpKind.GET:
            kv = out.get
            kv.SetInParent()
            if o.found:
                kv.key, kv.value = op.key, o.value
                kv.create_revision, kv.mod_revision, kv.version = o.create_revision, o.mod_revision, o.version
        else:
            assert o.txn is not None and op.txn is not None
            out.txn.SetInParent()
            result_into(out.txn, op.txn, o.txn)
