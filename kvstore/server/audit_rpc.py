"""Audit of RPCs: wraps the servicers of the Admin, Shard and (with `--audit-writes`) KV services
so that every call that changes something leaves one line in the audit log
(`kvstore.security.audit.AuditLog`) with who called, from where, what, on what, and the outcome.

Audited (`AUDITED`): every Admin RPC but the reads Status, AlarmList and HashKV (membership, leadership transfer, snapshot, alarm disarm), every
Shard.ShardOp but INFO (add / remove group, rebalance), Shard.GroupPropose but read barriers (the
internal RPC a node forwards proposals, membership changes and transfers with: audited where they
take effect, with the calling node's identity), and with `writes`, KV Put / Delete / Cas / Txn,
LeaseGrant / LeaseRevoke / LeasePut and every put / delete / cas / txn carried by KV.Stream
(matched to its result by operation id). Reads are never audited, nor are a lease's keep-alive
renewals (a stream of them per lease, every few seconds: they would drown the log).

The outcome is "ok", the error code a reply carries (e.g. "NOT_LEADER", "TIMEOUT"), or the gRPC
status of a call that failed as a whole (e.g. "PERMISSION_DENIED"), or "cancelled". A line is
recorded after the call, so it carries the result; `AuditLog.record` only queues it (no I/O on
the event loop).

`caller_identity` is THE one place that says who the caller of an RPC is, for the audit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvstore.raft import ConfChange
from kvstore.security.audit import AuditLog
from kvstore.security.audit.chain import Value, clip
from kvstore.security.identity import PrincipalKind, identity_of_call
from kvstore.storage.shardcmd import SHARD_MAGIC, ShardOp
from kvstore.v1 import auth_pb2, kv_pb2, shard_pb2

ANONYMOUS = "anonymous"
def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """Who made this RPC, for the audit log: the principal the auth guard established for the
    call (`kvstore.security.identity.identity_of_call`: a user by token or certificate, or a
    node), else "anonymous". Every audited RPC runs behind the guard (`server/wire.py`), which
    reads the caller's certificate itself: no second parse of it here."""
    p = identity_of_call(context)
    if p.kind is PrincipalKind.USER:
        return p.name if p.via == "certificate" else f"{p.name} (by {p.via})"
    if p.kind is PrincipalKind.NODE:
        return p.name
    return ANONYMOUS


def caller_peer(context: grpc.aio.ServicerContext) -> str:
    """The caller's address as gRPC reports it (e.g. `ipv4:127.0.0.1:50312`)."""
    try:
        return str(context.peer())
    except Exception:
        return ""


MAX_KEY_SHOWN = 256


def key_fields(key: bytes, name: str = "key") -> dict[str, Value]:
    """A key as a line field: its UTF-8 text under `name`, or its hex under `<name>_hex`; a key
    longer than `MAX_KEY_SHOWN` bytes (which the server refuses anyway) is cut, with its length
    under `<name>_bytes`."""
    out: dict[str, Value] = {}
    if len(key) > MAX_KEY_SHOWN:
        out[f"{name}_bytes"] = len(key)
        key = key[:MAX_KEY_SHOWN]
    try:
        out[name] = key.decode("utf-8")
    except UnicodeDecodeError:
        out[f"{name}_hex"] = key.hex()
    return out


def _txn_fields(r: Any) -> dict[str, Value]:
    """A transaction: its top level's sizes and the first key it names there (the first
    operation of each branch; a scan's prefix or start only when neither names another key;
    bounded work: the request may be hostile; the server validates it after this)."""
    b = r.txn
    out: dict[str, Value] = {"compares": len(b.compares), "success_ops": len(b.success), "failure_ops": len(b.failure)}
    firsts = (*b.success[:1], *b.failure[:1])
    keys = [_op_key(op, op.WhichOneof("op")) for op in firsts]
    scans = [op.scan.prefix or op.scan.start for op in firsts if op.WhichOneof("op") == "scan"]
    key = next((k for k in keys if k is not None), None)
    if key is None:
        key = next((k for k in scans if k), None)
    if key is not None:
        out.update(key_fields(key))
    return out


def _op_key(op: Any, which: str | None) -> bytes | None:
    return op.put.key if which == "put" else op.delete if which == "delete" else op.get if which == "get" else None


def _groups(groups: Any) -> str:
    return ",".join(str(g) for g in groups) if groups else "all"


Describer = Callable[[Any], dict[str, Value] | None]
"""request -> the line's fields (None: not audited, e.g. a read-only variant)."""


def _shard_op(r: shard_pb2.ShardOpRequest) -> dict[str, Value] | None:
    if r.op == shard_pb2.ShardOpRequest.INFO:
        return None
    name = shard_pb2.ShardOpRequest.Op.Name(r.op) if r.op in shard_pb2.ShardOpRequest.Op.values() else str(r.op)
    out: dict[str, Value] = {"shard_op": name.lower()}
    if r.op == shard_pb2.ShardOpRequest.REMOVE_GROUP:
        out["group"] = r.group
    return out


def _group_propose(r: shard_pb2.GroupProposeRequest) -> dict[str, Value] | None:
    out: dict[str, Value] = {"group": r.group, "from_node": r.from_node}
    if r.transfer:
        out.update(what="transfer_leader", to=r.transfer_to)
    elif r.conf_change:
        try:
            cc = ConfChange.decode(r.conf_change)
            out.update(what="conf_change", change=cc.type.name.lower(), node_id=cc.node_id)
        except Exception:
            out.update(what="conf_change", change="undecodable")
    elif r.command:
        cmd = r.command
        if len(cmd) >= 2 and cmd[0] == SHARD_MAGIC and cmd[1] in ShardOp._value2member_map_:
            out.update(what="shard_command", command=ShardOp(cmd[1]).name.lower())
        else:
            out.update(what="command")
        out["bytes"] = len(cmd)
    else:
        return None  # a read barrier: changes nothing
    return out


def _auth_change(r: Any) -> dict[str, Value]:
    out: dict[str, Value] = {"auth_op": _AUTH_OPS.get(int(r.op), str(int(r.op)))}
    if r.user:
        out["user"] = clip(r.user, 128)
    if r.role:
        out["role"] = clip(r.role, 128)
    if r.HasField("permission"):
        out.update(key_fields(r.permission.key))
        if r.permission.range_end:
            out.update(key_fields(r.permission.range_end, "range_end"))
        out["permission"] = auth_pb2.PermissionKind.Name(r.permission.kind).lower() \
            if r.permission.kind in auth_pb2.PermissionKind.values() else str(r.permission.kind)
    return out


_AUTH_OPS = {v.number: v.name.lower() for v in auth_pb2.AuthChangeRequest.Op.DESCRIPTOR.values}


AUDITED: dict[str, dict[str, Describer]] = {
    "kvstore.v1.Admin": {
        "AddMember": lambda r: {"node_id": r.id, "address": clip(r.address, 128),
                                "as": "learner" if r.learner else "voter", "groups": _groups(r.groups)},
        "PromoteMember": lambda r: {"node_id": r.id, "groups": _groups(r.groups)},
        "RemoveMember": lambda r: {"node_id": r.id, "groups": _groups(r.groups)},
        "TransferLeader": lambda r: {"to": r.to, "groups": _groups(r.groups)},
        "Snapshot": lambda r: {},
        "AlarmDisarm": lambda r: {"node_id": r.node_id, "alarm": int(r.type)},
    },
    "kvstore.v1.Shard": {"ShardOp": _shard_op, "GroupPropose": _group_propose},
    "kvstore.v1.KV": {"Compact": lambda r: {"revision": r.revision}},
    # Auth events: who tried to log in as whom, and every change of users, roles and the
    # enabled flag (never a password, never a token).
    "kvstore.v1.Auth": {
        "Authenticate": lambda r: {"login_user": clip(r.user, 128)},
        "Change": _auth_change,
    },
}
KV_WRITES: dict[str, Describer] = {
    "Put": lambda r: {**key_fields(r.key), "value_bytes": len(r.value)},
    "Delete": lambda r: key_fields(r.key),
    "Cas": lambda r: {**key_fields(r.key), "value_bytes": len(r.value)},
    "Txn": lambda r: _txn_fields(r),
    "LeaseGrant": lambda r: {"lease": f"{r.id:016x}" if r.id > 0 else "", "ttl": r.ttl},
    "LeaseRevoke": lambda r: {"lease": f"{r.id:016x}" if r.id > 0 else str(r.id)},
    "LeasePut": lambda r: {**key_fields(r.key), "value_bytes": len(r.value),
                           "lease": f"{r.lease:016x}" if r.lease > 0 else str(r.lease)},
}
STREAM_WRITES = ("put", "delete", "cas", "txn")
NOT_AUDITED: dict[str, frozenset[str]] = {
    "kvstore.v1.Admin": frozenset({"Status", "AlarmList", "HashKV"}),
    "kvstore.v1.Auth": frozenset({"Status"}),
    "kvstore.v1.Shard": frozenset({"GetShardMap", "ExportRange"}),
    "kvstore.v1.KV": frozenset({"Get", "Scan", "Watch", "LeaseKeepAlive", "LeaseTimeToLive", "LeaseLeases"}),
}
"""The RPCs that change nothing (reads), and lease keep-alives (module docstring). Every RPC of these services is in exactly one of
`AUDITED`, `KV_WRITES` (+ `Stream`) and this table; a test checks it against the descriptors."""


def _reply_result(resp: Any) -> str:
    err = getattr(resp, "error", None)
    if err is None or not resp.HasField("error") or err.code == kv_pb2.OK:
        return "ok"
    return kv_pb2.ErrorCode.Name(err.code) if err.code in kv_pb2.ErrorCode.values() else str(err.code)


def _failed_result(context: grpc.aio.ServicerContext, err: BaseException) -> str:
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "INTERNAL"


class _Audited:
    """A servicer's stand-in: its methods, the audited ones wrapped."""

    def __init__(self, servicer: object, methods: dict[str, Callable[..., Any]]) -> None:
        self._servicer = servicer
        for name, fn in methods.items():
            setattr(self, name, fn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._servicer, name)


def _unary(audit: AuditLog, op: str, fn: Callable[..., Any], describe: Describer) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        fields = describe(request)
        if fields is None:
            return await fn(request, context)
        try:
            resp = await fn(request, context)
        except BaseException as err:
            audit.record(op, caller_identity(context), caller_peer(context), _failed_result(context, err), **fields)
            raise
        audit.record(op, caller_identity(context), caller_peer(context), _reply_result(resp), **fields)
        return resp

    return call


def _stream(audit: AuditLog, fn: Callable[..., Any]) -> Callable[..., Any]:
    """KV.Stream: each write operation read from the stream is remembered by id until its result
    goes out; operations never answered (the stream ended first) are recorded as "unanswered"."""

    async def stream(requests: AsyncIterator[kv_pb2.OpBatch], context: grpc.aio.ServicerContext) -> Any:
        who, peer = caller_identity(context), caller_peer(context)
        waiting: dict[int, tuple[str, dict[str, Value]]] = {}

        async def tap() -> AsyncIterator[kv_pb2.OpBatch]:
            async for batch in requests:
                for o in batch.ops:
                    kind = o.WhichOneof("op")
                    if kind in STREAM_WRITES:
                        req = getattr(o, kind)
                        waiting[o.id] = (kind, KV_WRITES[kind.capitalize()](req) or {})
                yield batch

        try:
            async for out in fn(tap(), context):
                for r in out.results:
                    item = waiting.pop(r.id, None)
                    if item is not None:
                        kind, fields = item
                        audit.record(f"KV.Stream.{kind}", who, peer, _reply_result(getattr(r, kind)), **fields)
                yield out
        finally:
            for kind, fields in waiting.values():
                audit.record(f"KV.Stream.{kind}", who, peer, "unanswered", **fields)

    return stream


def audited(servicer: object, service_name: str, audit: AuditLog, writes: bool = False) -> object:
    """`servicer` with the RPCs `AUDITED` lists for `service_name` (and, for the KV service with
    `writes`, its writes) recorded in `audit`. Other methods are the servicer's own."""
    methods: dict[str, Callable[..., Any]] = {}
    for name, describe in AUDITED.get(service_name, {}).items():
        methods[name] = _unary(audit, f"{service_name.rsplit('.', 1)[-1]}.{name}", getattr(servicer, name), describe)
    if service_name == "kvstore.v1.KV" and writes:
        for name, describe in KV_WRITES.items():
            methods[name] = _unary(audit, f"KV.{name}", getattr(servicer, name), describe)
        methods["Stream"] = _stream(audit, servicer.Stream)  # type: ignore[attr-defined]
    return _Audited(servicer, methods) if methods else servicer
