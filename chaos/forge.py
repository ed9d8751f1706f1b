"""Forged and malformed inter-node traffic: what the ``forge`` nemesis (alias ``garbage``) sends.

The harness's client side plays an attacker that has nothing but the published protos and
grpcio, and reaches the nodes' gRPC port like any client (in the netns backend it runs in the
client namespace, so it only ever talks to the run's own hosts; in the local backend to
127.0.0.1). Every loop is bounded by a deadline and a round count; every RPC by a timeout.

What it sends, to every live node ``T`` (its current node id):

* as a NON-member (node :data:`OUTSIDER` = 99, the cluster's right cluster id):
  ``Raft.Send`` batches with a VOTE carrying the transfer context (``b"transfer"``), HEARTBEATs at
  the group's term + 1 and at 2^64-1, TIMEOUT_NOW, an APP carrying a forged PUT of the workload's
  keys to ``b"FORGED"`` (and one of ``forged/key``), an APP carrying a CONF_CHANGE entry of one
  byte, and (every tenth round) one batch of :data:`PHANTOM_GROUPS` heartbeats for group ids that
  do not exist; ``Raft.SendSnapshot`` with a SNAP head and garbage chunks; ``Shard.GroupPropose``
  FREEZE and DROP of the whole hash range into each data group and a garbage shard-map CAS into
  group 0, both with the cluster id and ``from_node=99`` and with neither.
  The cluster must refuse all of it at the door: every call ends with PERMISSION_DENIED, and
  none of it changes a leader, a term, or any data (availability must not even dent).
* UNDER MEMBER IDS (claiming to be another node ``M`` of the cluster): malformed messages only.
  APPs whose entries do not decode (a one-byte CONF_CHANGE, an unknown entry type), whose entries
  have the wrong index or a term above the message's; HEARTBEATs at terms 2^63 and 2^64-1;
  an unknown message type; an oversized context; a message whose sender is not its batch's;
  heartbeats for nonexistent groups; a garbage snapshot stream; and garbage bytes as the whole
  request body of ``Raft.Send``, ``Raft.SendSnapshot`` and ``Shard.GroupPropose`` (a raw channel
  with identity serializers): random bytes and a member's batch cut short.
  The nodes must drop every one of these (counted by ``kvstore_inbound_refused_total{reason}``)
  and never crash or wedge. Without TLS, forged but well-formed messages under member ids are out
  of scope: refusing them needs mutual TLS, below.

On a TLS run (:class:`ForgeTls`: what the forger holds), the non-member traffic goes over a
channel presenting a genuine node certificate of node 99 (signed by the cluster's CA: a node
that was never added, or was removed: still refused, ``not_member``), and the malformed traffic
under member id ``M`` over a channel presenting ``M``'s own node certificate (a compromised or
buggy member: its messages pass the identity check and must be dropped by the decode and the
admission checks). And the forger plays four more outsiders (:data:`TLS_CASES`), each sending
well-formed forged traffic that claims a member ``Y`` (a VOTE at a higher term with the transfer
context, HEARTBEATs, TIMEOUT_NOW, an APP of forged PUTs: ``Raft.Send``; a garbage
``Raft.SendSnapshot``; ``Shard.GroupPropose`` FREEZE of the whole range and a garbage shard-map
CAS; ``Shard.ExportRange`` of the whole range) and, without a valid client certificate, client
RPCs (``KV.Put`` of ``FORGED``, ``KV.Get``, ``Admin.Status``):

* ``no_cert`` (a): plaintext, and TLS presenting no certificate, on a fresh connection each
  round: the handshake must fail (or, should the cluster accept certificate-less connections
  for token authentication, client RPCs end UNAUTHENTICATED and internal ones
  PERMISSION_DENIED / UNAUTHENTICATED);
* ``client_cert`` (b): a genuine client certificate of the cluster's CA, to the internal RPCs
  only: PERMISSION_DENIED;
* ``wrong_node`` (c): the genuine node certificate of member ``X`` claiming ``from`` = ``Y``:
  PERMISSION_DENIED;
* ``other_ca`` (d): a client certificate and a node certificate naming ``Y``, both of another
  CA, on a fresh connection each round: the handshake must fail (or as in (a)).

A failed handshake shows as UNAVAILABLE with a closed socket or a TLS error
(:data:`HANDSHAKE_FAILED` in the counts). Every call of these cases ends *refused*, *unreached*
(UNAVAILABLE otherwise, DEADLINE_EXCEEDED, CANCELLED: it never got an answer) or *not refused*
(anything else, OK included: ``not_refused``, which must stay 0).

:class:`ForgeStats` records how many forged messages and RPCs were sent, by kind, and the gRPC
status codes the calls ended with, as non-member and as member; :meth:`ForgeStats.to_info` is
what goes into the fault window's ``info``. ``accepted_from_outsider`` counts non-member calls
the node answered (status OK) instead of refusing them: it must be 0. Other ends of non-member
calls (e.g. a stream reset while the forger was still writing) are listed in
``unexpected_detail``. On a TLS run, ``tls`` holds each case's status codes and
``tls_refused`` its refusals.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from kvstore.raft import EntryType, MessageType
from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import SHARD_MAP_KEY
from kvstore.storage import commands
from kvstore.storage.shardcmd import ShardOp, encode_shard_command
from kvstore.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    kv_pb2,
    kv_pb2_grpc,
    raft_pb2,
    raft_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)

__all__ = ["FORGED_VALUE", "HANDSHAKE_FAILED", "OUTSIDER", "TLS_CASES", "ForgeStats", "ForgeTls", "GroupView",
           "Target", "forge", "outcome"]

OUTSIDER = 99
"""The non-member node id the forger claims (the harness never gives a node this id)."""
FORGED_VALUE = b"FORGED"
"""The value of every forged PUT: no read may ever return it."""
PHANTOM_GROUPS = 2000
"""Heartbeats for this many nonexistent group ids in one batch."""
PHANTOM_BASE = 100_000
RPC_TIMEOUT = 2.0
HUGE = (1 << 64) - 1
HANDSHAKE_FAILED = "HANDSHAKE_FAILED"
"""The status the counts give a call whose connection's TLS handshake the node refused."""
# connection failures: the call did not reach a node (it was not refused, nor accepted)
_UNREACHED = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "CALL_BROKEN")
CALL_BROKEN = "CALL_BROKEN"
"""gRPC's own "INTERNAL: Internal error from Core": the client's library ended a client-streaming
call it was still writing when the server finished it (its refusal included) - the client never
received the server's answer. Counted as unreached: neither a refusal nor an acceptance."""
# what gRPC says when the server ends the handshake (a plaintext or certificate-less client, a
# certificate of another CA): the socket closed under it, or a TLS error
_HANDSHAKE_MARKERS = ("socket closed", "handshake", "ssl", "tls", "certificate", "connection reset")

TLS_CASES = ("no_cert", "client_cert", "wrong_node", "other_ca")
"""The TLS outsiders, (a) to (d) (see the module doc)."""
_NO_VALID_CERT = ("no_cert", "other_ca")
_REFUSED_CLIENT_RPC = frozenset({HANDSHAKE_FAILED, "UNAUTHENTICATED"})
_REFUSED_INTERNAL_RPC = {
    "no_cert": frozenset({HANDSHAKE_FAILED, "UNAUTHENTICATED", "PERMISSION_DENIED"}),
    "other_ca": frozenset({HANDSHAKE_FAILED, "UNAUTHENTICATED", "PERMISSION_DENIED"}),
    "client_cert": frozenset({"PERMISSION_DENIED"}),
    "wrong_node": frozenset({"PERMISSION_DENIED"}),
}


def outcome(case: str, code: str, *, internal: bool) -> str:
    """``refused``, ``unreached`` or ``not_refused``: how a call of TLS case ``case`` ended
    (``code``: its status code name, :data:`HANDSHAKE_FAILED` for a refused handshake).
    Raises ValueError for an unknown case, and for a client RPC of a case that holds a valid
    certificate (those send internal RPCs only)."""
    if case not in _REFUSED_INTERNAL_RPC:
        raise ValueError(f"unknown TLS case {case!r}")
    if not internal and case not in _NO_VALID_CERT:
        raise ValueError(f"case {case!r} sends internal RPCs only")
    refused = _REFUSED_INTERNAL_RPC[case] if internal else _REFUSED_CLIENT_RPC
    if code in refused:
        return "refused"
    if code in _UNREACHED or code == HANDSHAKE_FAILED:
        return "unreached"
    return "not_refused"


@dataclass(frozen=True)
class GroupView:
    """What a node reported about one of its groups (forged messages are aimed just past it)."""

    group: int
    term: int
    last_index: int
    commit: int


@dataclass(frozen=True)
class Target:
    host: int
    node_id: int
    address: str
    groups: tuple[GroupView, ...]


@dataclass
class ForgeStats:
    messages: Counter[str] = field(default_factory=Counter)  # forged Raft messages / requests, by kind
    rpcs: int = 0
    outsider_codes: Counter[str] = field(default_factory=Counter)  # status codes of non-member calls
    member_codes: Counter[str] = field(default_factory=Counter)  # ... of calls under member ids
    accepted_from_outsider: int = 0
    accepted_detail: list[str] = field(default_factory=list)
    unexpected_detail: list[str] = field(default_factory=list)  # non-member calls ending neither way
    rounds: int = 0
    tls: dict[str, Counter[str]] = field(default_factory=dict)  # TLS case -> status codes of its calls
    tls_refused: Counter[str] = field(default_factory=Counter)  # TLS case -> calls refused
    not_refused: int = 0  # TLS-case calls that were neither refused nor unreached: must stay 0
    not_refused_detail: list[str] = field(default_factory=list)

    def to_info(self) -> dict[str, Any]:
        return {
            "forged_messages": sum(self.messages.values()), "forged_rpcs": self.rpcs, "rounds": self.rounds,
            "by_kind": dict(sorted(self.messages.items())),
            "outsider_codes": dict(sorted(self.outsider_codes.items())),
            "member_codes": dict(sorted(self.member_codes.items())),
            "accepted_from_outsider": self.accepted_from_outsider,
            "accepted_detail": self.accepted_detail[:10],
            "unexpected_detail": self.unexpected_detail[:10],
            **({"tls": {c: dict(sorted(v.items())) for c, v in sorted(self.tls.items())},
                "tls_refused": dict(sorted(self.tls_refused.items())),
                "handshakes_failed": sum(v.get(HANDSHAKE_FAILED, 0) for v in self.tls.values()),
                "not_refused": self.not_refused, "not_refused_detail": self.not_refused_detail[:10]}
               if self.tls else {}),
        }

    def record_tls(self, case: str, code: str, what: str, *, internal: bool) -> None:
        """Count one call of TLS case ``case`` that ended with ``code``."""
        self.rpcs += 1
        self.tls.setdefault(case, Counter())[code] += 1
        o = outcome(case, code, internal=internal)
        if o == "refused":
            self.tls_refused[case] += 1
        elif o == "not_refused":
            self.not_refused += 1
            self.not_refused_detail.append(f"{case}: {what}: {code}: {_last_detail[0]}")


@dataclass(frozen=True)
class ForgeTls:
    """What the forger holds on a TLS run (see the module doc): credentials for each outsider.
    ``node(id)`` presents the genuine node certificate of ``id`` (a member's, or node 99's);
    ``other_node(id)`` a node certificate naming ``id`` from another CA."""

    ca_only: grpc.ChannelCredentials
    client: grpc.ChannelCredentials
    other_client: grpc.ChannelCredentials
    node: Callable[[int], grpc.ChannelCredentials]
    other_node: Callable[[int], grpc.ChannelCredentials]


def _msg(mtype: int, group: int, frm: int, to: int, **kw: Any) -> raft_pb2.RaftMessage:
    entries = kw.pop("entries", [])
    pm = raft_pb2.RaftMessage(group=group, type=int(mtype), to=to, **kw)
    setattr(pm, "from", frm)
    pm.entries.extend(entries)
    return pm


def _batch(cluster_id: str, frm: int, to: int, msgs: Iterable[raft_pb2.RaftMessage]) -> raft_pb2.RaftBatch:
    b = raft_pb2.RaftBatch(cluster_id=cluster_id, to=to, messages=list(msgs))
    setattr(b, "from", frm)
    return b


_last_detail: list[str] = [""]


def _code(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        _last_detail[0] = str(err.details())[:200]
        name = str(err.code().name)
        if name == "UNAVAILABLE" and any(m in _last_detail[0].lower() for m in _HANDSHAKE_MARKERS):
            return HANDSHAKE_FAILED
        if name == "INTERNAL" and _last_detail[0] == "Internal error from Core":
            return CALL_BROKEN
        return name
    _last_detail[0] = str(err)[:200]
    return type(err).__name__


class _Forger:
    """Sends one round of each kind of forged traffic to one node; every call is counted under
    ``who``: ``outsider`` (node 99), ``member`` (malformed under member ids) or a TLS case."""

    def __init__(self, cluster_id: str, keys: Sequence[bytes], stats: ForgeStats, rng: random.Random) -> None:
        self.cluster_id = cluster_id
        self.keys = list(keys)[:64] or [b"forged/key"]
        self.stats = stats
        self.rng = rng

    def _record(self, who: str, code: str, what: str, *, internal: bool = True) -> None:
        if who in TLS_CASES:
            self.stats.record_tls(who, code, what, internal=internal)
            return
        self.stats.rpcs += 1
        if who == "outsider":
            self.stats.outsider_codes[code] += 1
            if code.startswith("OK"):  # the node answered instead of refusing at the door
                self.stats.accepted_from_outsider += 1
                self.stats.accepted_detail.append(f"{what}: {code}")
            elif code != "PERMISSION_DENIED" and code not in _UNREACHED and code != HANDSHAKE_FAILED:
                self.stats.unexpected_detail.append(f"{what}: {code}: {_last_detail[0]}")
        else:
            self.stats.member_codes[code] += 1

    async def _send(self, ch: grpc.aio.Channel, batch: raft_pb2.RaftBatch, who: str, kind: str) -> None:
        self.stats.messages[kind] += len(batch.messages)
        try:
            await raft_pb2_grpc.RaftStub(ch).Send(iter([batch]), timeout=RPC_TIMEOUT)
            code = "OK"
        except Exception as err:
            code = _code(err)
        self._record(who, code, f"Raft.Send {kind}")

    async def _snapshot(self, ch: grpc.aio.Channel, t: Target, frm: int, who: str) -> None:
        g = t.groups[0] if t.groups else GroupView(1, 1, 1, 1)
        head = _msg(MessageType.SNAP, g.group, frm, t.node_id, term=g.term)
        head.snapshot.index, head.snapshot.term = g.last_index + 10, max(1, g.term)
        head.snapshot.conf_state.voters.extend([frm, t.node_id])
        chunks = []
        for i in range(3):
            c = raft_pb2.SnapshotChunk(cluster_id=self.cluster_id, to=t.node_id,
                                       data=self.rng.randbytes(512), last=i == 2)
            setattr(c, "from", frm)
            if i == 0:
                c.message.CopyFrom(head)
            chunks.append(c)
        self.stats.messages["snapshot_garbage" + {"outsider": "", "member": "_member"}.get(who, f"_{who}")] += 1
        try:
            done = await raft_pb2_grpc.RaftStub(ch).SendSnapshot(iter(chunks), timeout=RPC_TIMEOUT)
            code = "OK" if not done.installed else "OK_INSTALLED"
        except Exception as err:
            code = _code(err)
        self._record(who, code, "Raft.SendSnapshot garbage")

    async def _propose(self, ch: grpc.aio.Channel, req: shard_pb2.GroupProposeRequest, kind: str,
                       who: str = "outsider") -> None:
        self.stats.messages[kind] += 1
        try:
            resp = await shard_pb2_grpc.ShardStub(ch).GroupPropose(req, timeout=RPC_TIMEOUT)
            code = "OK" if not resp.error.code else f"OK_ERROR_{resp.error.code}"
        except Exception as err:
            code = _code(err)
        self._record(who, code, f"Shard.GroupPropose {kind}")

    async def _export(self, ch: grpc.aio.Channel, t: Target, frm: int, who: str) -> None:
        """``Shard.ExportRange`` of the whole hash range of a data group, claiming ``frm``: it
        would hand the group's data to whoever asked."""
        group = next((g.group for g in t.groups if g.group != 0), 1)
        full = IntervalSet.full()
        req = shard_pb2.ExportRangeRequest(group=group, lo=[a for a, _ in full], hi=[b for _, b in full],
                                           chunk_bytes=4096, cluster_id=self.cluster_id, from_node=frm)
        self.stats.messages[f"{who}_export"] += 1
        call = shard_pb2_grpc.ShardStub(ch).ExportRange(req, timeout=RPC_TIMEOUT)
        try:
            async for chunk in call:
                code = "OK" if not chunk.error.code else f"OK_ERROR_{chunk.error.code}"
                break
            else:
                code = "OK"
        except Exception as err:
            code = _code(err)
        finally:
            call.cancel()
        self._record(who, code, "Shard.ExportRange")

    def _forged_raft(self, t: Target, frm: int) -> list[list[raft_pb2.RaftMessage]]:
        """Well-formed forged messages from ``frm`` to ``t``, one list per group: a VOTE at a
        higher term with the transfer context, HEARTBEATs at term + 1 and at 2^64-1, TIMEOUT_NOW,
        an APP of forged PUTs and an APP of a one-byte CONF_CHANGE."""
        to = t.node_id
        out = []
        for g in t.groups:
            nt = g.term + 1
            put = self.rng.choice(self.keys)
            out.append([
                _msg(MessageType.VOTE, g.group, frm, to, term=nt, index=1 << 40, log_term=nt, context=b"transfer"),
                _msg(MessageType.HEARTBEAT, g.group, frm, to, term=nt, commit=g.commit),
                _msg(MessageType.HEARTBEAT, g.group, frm, to, term=HUGE),
                _msg(MessageType.TIMEOUT_NOW, g.group, frm, to, term=g.term),
                _msg(MessageType.APP, g.group, frm, to, term=nt, index=g.last_index, log_term=g.term,
                     commit=g.last_index + 2, entries=[
                         raft_pb2.Entry(term=nt, index=g.last_index + 1, type=int(EntryType.NORMAL),
                                        data=commands.encode_put(put, FORGED_VALUE)),
                         raft_pb2.Entry(term=nt, index=g.last_index + 2, type=int(EntryType.NORMAL),
                                        data=commands.encode_put(b"forged/key", FORGED_VALUE))]),
                _msg(MessageType.APP, g.group, frm, to, term=nt, index=g.last_index, log_term=g.term,
                     commit=g.last_index + 1, entries=[
                         raft_pb2.Entry(term=nt, index=g.last_index + 1, type=int(EntryType.CONF_CHANGE),
                                        data=b"\x01")]),
            ])
        return out

    # ----- one round against one node -----

    async def outsider_round(self, ch: grpc.aio.Channel, t: Target, phantoms: bool) -> None:
        o, to, cid = OUTSIDER, t.node_id, self.cluster_id
        for forged in self._forged_raft(t, o):
            await self._send(ch, _batch(cid, o, to, forged), "outsider", "outsider_raft")
        if phantoms:
            hb = (_msg(MessageType.HEARTBEAT, PHANTOM_BASE + i, o, to, term=3) for i in range(PHANTOM_GROUPS))
            await self._send(ch, _batch(cid, o, to, hb), "outsider", "outsider_phantom_heartbeats")
        await self._snapshot(ch, t, o, "outsider")
        full = IntervalSet.full()
        move = 1 << 40
        garbage_map = commands.encode_cas(SHARD_MAP_KEY, False, b"\x08\x01", b"\x08\x63garbage")
        cmds = [(g.group, encode_shard_command(op, full, move=move), f"outsider_{op.name.lower()}")
                for g in t.groups if g.group != 0 for op in (ShardOp.FREEZE, ShardOp.DROP)]
        cmds.append((0, garbage_map, "outsider_garbage_map"))
        for group, cmd, kind in cmds:
            for cluster_id, frm in ((cid, o), ("", 0)):
                req = shard_pb2.GroupProposeRequest(group=group, command=cmd, cluster_id=cluster_id, from_node=frm)
                await self._propose(ch, req, kind)

    async def member_round(self, ch: grpc.aio.Channel, t: Target, member: int, phantoms: bool) -> None:
        m, to, cid = member, t.node_id, self.cluster_id
        for g in t.groups:
            i, tm = g.last_index, max(1, g.term)
            bad = [
                _msg(MessageType.APP, g.group, m, to, term=tm, index=i, log_term=tm, commit=i + 1, entries=[
                    raft_pb2.Entry(term=tm, index=i + 1, type=int(EntryType.CONF_CHANGE), data=b"\x01")]),
                _msg(MessageType.APP, g.group, m, to, term=tm, index=i, log_term=tm, entries=[
                    raft_pb2.Entry(term=tm, index=i + 1, type=77, data=b"\xff" * 8)]),
                _msg(MessageType.APP, g.group, m, to, term=tm, index=i, log_term=tm, entries=[  # index gap
                    raft_pb2.Entry(term=tm, index=i + 5, type=int(EntryType.NORMAL), data=b"x")]),
                _msg(MessageType.APP, g.group, m, to, term=tm, index=i, log_term=tm, entries=[  # term > message's
                    raft_pb2.Entry(term=tm + 7, index=i + 1, type=int(EntryType.NORMAL), data=b"x")]),
                _msg(MessageType.APP, g.group, m, to, term=tm, index=i, log_term=tm, entries=[  # terms decrease
                    raft_pb2.Entry(term=tm, index=i + 1, type=int(EntryType.NORMAL), data=b"x"),
                    raft_pb2.Entry(term=max(0, tm - 1), index=i + 2, type=int(EntryType.NORMAL), data=b"x")]),
                _msg(MessageType.HEARTBEAT, g.group, m, to, term=1 << 63),
                _msg(MessageType.HEARTBEAT, g.group, m, to, term=HUGE),
                _msg(MessageType.APP, g.group, m, to, term=tm, index=HUGE, log_term=tm),
                _msg(999, g.group, m, to, term=tm),
                _msg(MessageType.HEARTBEAT, g.group, m, to, term=tm, context=b"\x00" * 4096),
                _msg(MessageType.HEARTBEAT, g.group, OUTSIDER, to, term=tm),  # not its batch's sender
            ]
            await self._send(ch, _batch(cid, m, to, bad), "member", "member_malformed")
        if phantoms:
            hb = (_msg(MessageType.HEARTBEAT, PHANTOM_BASE + i, m, to, term=3) for i in range(PHANTOM_GROUPS))
            await self._send(ch, _batch(cid, m, to, hb), "member", "member_phantom_heartbeats")
        await self._snapshot(ch, t, m, "member")
        # garbage as whole request bodies: random bytes, and a member's real batch cut short
        real = _batch(cid, m, to, [_msg(MessageType.HEARTBEAT, 1, m, to, term=1)]).SerializeToString()
        for method, stream in (("/kvstore.v1.Raft/Send", True), ("/kvstore.v1.Raft/SendSnapshot", True),
                               ("/kvstore.v1.Shard/GroupPropose", False)):
            await self._raw(ch, method, self.rng.randbytes(self.rng.randint(1, 300)), stream, "raw_garbage")
        await self._raw(ch, "/kvstore.v1.Raft/Send", real[: max(1, len(real) - 3)], True, "raw_truncated")

    async def _raw(self, ch: grpc.aio.Channel, method: str, body: bytes, stream: bool, kind: str) -> None:
        self.stats.messages[kind] += 1
        try:
            if stream:
                await ch.stream_unary(method)(iter([body]), timeout=RPC_TIMEOUT)
            else:
                await ch.unary_unary(method)(body, timeout=RPC_TIMEOUT)
            code = "OK"
        except Exception as err:
            code = _code(err)
        self._record("member", code, f"raw {method}")

    async def impostor_round(self, ch: grpc.aio.Channel, t: Target, claimed: int, who: str) -> None:
        """TLS case ``who``: well-formed forged internal RPCs claiming member ``claimed`` (all
        must be refused: the caller's certificate is not ``claimed``'s node certificate)."""
        cid, to = self.cluster_id, t.node_id
        for forged in self._forged_raft(t, claimed):
            await self._send(ch, _batch(cid, claimed, to, forged), who, f"{who}_raft")
        await self._snapshot(ch, t, claimed, who)
        full = IntervalSet.full()
        data = [g.group for g in t.groups if g.group != 0]
        if data:
            cmd = encode_shard_command(ShardOp.FREEZE, full, move=1 << 40)
            await self._propose(ch, shard_pb2.GroupProposeRequest(
                group=self.rng.choice(data), command=cmd, cluster_id=cid, from_node=claimed), f"{who}_freeze", who)
        garbage_map = commands.encode_cas(SHARD_MAP_KEY, False, b"\x08\x01", b"\x08\x63garbage")
        await self._propose(ch, shard_pb2.GroupProposeRequest(
            group=0, command=garbage_map, cluster_id=cid, from_node=claimed), f"{who}_garbage_map", who)
        await self._export(ch, t, claimed, who)

    async def client_rpcs(self, ch: grpc.aio.Channel, who: str) -> None:
        """TLS cases without a valid certificate: client RPCs (a forged write, a read, a status)."""
        key = self.rng.choice(self.keys)
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("KV.Put", lambda: kv_pb2_grpc.KVStub(ch).Put(kv_pb2.PutRequest(key=key, value=FORGED_VALUE),
                                                          timeout=RPC_TIMEOUT)),
            ("KV.Get", lambda: kv_pb2_grpc.KVStub(ch).Get(kv_pb2.GetRequest(key=key), timeout=RPC_TIMEOUT)),
            ("Admin.Status", lambda: admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(),
                                                                         timeout=RPC_TIMEOUT)),
        ]
        for what, call in calls:
            self.stats.messages[f"{who}_client"] += 1
            try:
                await call()
                code = "OK"
            except Exception as err:
                code = _code(err)
            self._record(who, code, what, internal=False)


def _options(fresh: bool) -> list[tuple[str, Any]]:
    # never through a proxy: the forger talks to the run's own hosts only; a fresh connection
    # (its own subchannel pool) makes every round do its handshake anew
    opts: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
    if fresh:
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return opts


class _Channels:
    """The forger's channels: one per (address, credentials key), kept across rounds, closed by
    :meth:`close`; ``fresh`` ones are closed at the end of their round."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], grpc.aio.Channel] = {}

    def get(self, address: str, key: str, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        ch = self.kept.get((address, key))
        if ch is None:
            ch = self.kept[(address, key)] = _open(address, creds, fresh=False)
        return ch

    async def close(self) -> None:
        chans = list(self.kept.values())
        self.kept.clear()
        for ch in chans:
            await ch.close()


def _open(address: str, creds: grpc.ChannelCredentials | None, *, fresh: bool) -> grpc.aio.Channel:
    if creds is None:
        return grpc.aio.insecure_channel(address, options=_options(fresh))
    return grpc.aio.secure_channel(address, creds, options=_options(fresh))


async def _tls_round(f: _Forger, chans: _Channels, tls: ForgeTls, t: Target, members: Sequence[int],
                     rng: random.Random) -> None:
    """The four TLS outsiders (module doc) against ``t``, each claiming a random member."""
    others = [m for m in members if m != t.node_id] or list(members) or [t.node_id]
    claimed = rng.choice(others)
    # (a) no certificate: plaintext, and TLS presenting none; (d) certificates of another CA
    for who, key, creds in (("no_cert", "plain", None), ("no_cert", "ca_only", tls.ca_only),
                            ("other_ca", "other_client", tls.other_client),
                            ("other_ca", "other_node", tls.other_node(claimed))):
        ch = _open(t.address, creds, fresh=True)
        try:
            f.stats.messages[f"{who}_{key}_connections"] += 1
            await f.client_rpcs(ch, who)
            await f.impostor_round(ch, t, claimed, who)
        finally:
            await ch.close()
    # (b) a genuine client certificate, to internal RPCs
    await f.impostor_round(chans.get(t.address, "client", tls.client), t, claimed, "client_cert")
    # (c) the genuine node certificate of member X, claiming Y != X
    holder = rng.choice(members) if members else t.node_id
    liars = [m for m in members if m not in (holder, t.node_id)] or [m for m in members if m != holder]
    if liars:
        ch = chans.get(t.address, f"node{holder}", tls.node(holder))
        await f.impostor_round(ch, t, rng.choice(liars), "wrong_node")


async def forge(
    targets: Sequence[Target],
    members: Sequence[int],
    cluster_id: str,
    *,
    duration: float,
    keys: Sequence[bytes] = (),
    max_rounds: int = 200,
    pace: float = 0.1,
    seed: int = 0,
    stats: ForgeStats | None = None,
    tls: ForgeTls | None = None,
) -> ForgeStats:
    """Send the forged traffic of the module docstring to ``targets`` for ``duration`` seconds
    (at most ``max_rounds`` rounds, ``pace`` s apart): non-member traffic first in each round, then
    malformed traffic under the id of another member, then (``tls``) the four TLS outsiders.
    Never raises on a node's answer."""
    stats = stats if stats is not None else ForgeStats()
    rng = random.Random(seed)
    f = _Forger(cluster_id, keys, stats, rng)
    deadline = time.monotonic() + max(0.0, duration)
    chans = _Channels()
    try:
        for rnd in range(max_rounds):
            if time.monotonic() >= deadline:
                break
            phantoms = rnd % 10 == 0
            jobs = []
            for t in targets:
                jobs.append(f.outsider_round(
                    chans.get(t.address, "outsider", tls.node(OUTSIDER) if tls else None), t, phantoms))
                others = [x for x in members if x != t.node_id]
                if others:
                    m = rng.choice(others)
                    ch = chans.get(t.address, f"node{m}", tls.node(m) if tls else None)
                    jobs.append(f.member_round(ch, t, m, phantoms))
                if tls is not None:
                    jobs.append(_tls_round(f, chans, tls, t, members, rng))
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.gather(*jobs), max(0.5, remaining + RPC_TIMEOUT))
            except TimeoutError:
                break
            stats.rounds += 1
            await asyncio.sleep(pace)
    finally:
        await chans.close()
    return stats
