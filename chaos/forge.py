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
  and never crash or wedge. Forged but well-formed messages under member ids are out of scope:
  refusing those needs mutual TLS.

:class:`ForgeStats` records how many forged messages and RPCs were sent, by kind, and the gRPC
status codes the calls ended with, as non-member and as member; :meth:`ForgeStats.to_info` is
what goes into the fault window's ``info``. ``accepted_from_outsider`` counts non-member calls
the node answered (status OK) instead of refusing them: it must be 0. Other ends of non-member
calls (e.g. a stream reset while the forger was still writing) are listed in
``unexpected_detail``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from kvstore.raft import EntryType, MessageType
from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import SHARD_MAP_KEY
from kvstore.storage import commands
from kvstore.storage.shardcmd import ShardOp, encode_shard_command
from kvstore.v1 import raft_pb2, raft_pb2_grpc, shard_pb2, shard_pb2_grpc

__all__ = ["FORGED_VALUE", "OUTSIDER", "ForgeStats", "GroupView", "Target", "forge"]

OUTSIDER = 99
"""The non-member node id the forger claims (the harness never gives a node this id)."""
FORGED_VALUE = b"FORGED"
"""The value of every forged PUT: no read may ever return it."""
PHANTOM_GROUPS = 2000
"""Heartbeats for this many nonexistent group ids in one batch."""
PHANTOM_BASE = 100_000
RPC_TIMEOUT = 2.0
HUGE = (1 << 64) - 1
# connection failures: the call did not reach a node (it was not refused, nor accepted)
_UNREACHED = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


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

    def to_info(self) -> dict[str, Any]:
        return {
            "forged_messages": sum(self.messages.values()), "forged_rpcs": self.rpcs, "rounds": self.rounds,
            "by_kind": dict(sorted(self.messages.items())),
            "outsider_codes": dict(sorted(self.outsider_codes.items())),
            "member_codes": dict(sorted(self.member_codes.items())),
            "accepted_from_outsider": self.accepted_from_outsider,
            "accepted_detail": self.accepted_detail[:10],
            "unexpected_detail": self.unexpected_detail[:10],
        }


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
        return str(err.code().name)
    _last_detail[0] = str(err)[:200]
    return type(err).__name__


class _Forger:
    def __init__(self, cluster_id: str, keys: Sequence[bytes], stats: ForgeStats, rng: random.Random) -> None:
        self.cluster_id = cluster_id
        self.keys = list(keys)[:64] or [b"forged/key"]
        self.stats = stats
        self.rng = rng

    def _record(self, outsider: bool, code: str, what: str) -> None:
        self.stats.rpcs += 1
        if outsider:
            self.stats.outsider_codes[code] += 1
            if code.startswith("OK"):  # the node answered instead of refusing at the door
                self.stats.accepted_from_outsider += 1
                self.stats.accepted_detail.append(f"{what}: {code}")
            elif code != "PERMISSION_DENIED" and code not in _UNREACHED:
                self.stats.unexpected_detail.append(f"{what}: {code}: {_last_detail[0]}")
        else:
            self.stats.member_codes[code] += 1

    async def _send(self, ch: grpc.aio.Channel, batch: raft_pb2.RaftBatch, outsider: bool, kind: str) -> None:
        self.stats.messages[kind] += len(batch.messages)
        try:
            await raft_pb2_grpc.RaftStub(ch).Send(iter([batch]), timeout=RPC_TIMEOUT)
            code = "OK"
        except Exception as err:
            code = _code(err)
        self._record(outsider, code, f"Raft.Send {kind}")

    async def _snapshot(self, ch: grpc.aio.Channel, t: Target, frm: int, outsider: bool) -> None:
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
        self.stats.messages["snapshot_garbage" + ("" if outsider else "_member")] += 1
        try:
            done = await raft_pb2_grpc.RaftStub(ch).SendSnapshot(iter(chunks), timeout=RPC_TIMEOUT)
            code = "OK" if not done.installed else "OK_INSTALLED"
        except Exception as err:
            code = _code(err)
        self._record(outsider, code, "Raft.SendSnapshot garbage")

    async def _propose(self, ch: grpc.aio.Channel, req: shard_pb2.GroupProposeRequest, kind: str) -> None:
        self.stats.messages[kind] += 1
        try:
            resp = await shard_pb2_grpc.ShardStub(ch).GroupPropose(req, timeout=RPC_TIMEOUT)
            code = "OK" if not resp.error.code else f"OK_ERROR_{resp.error.code}"
        except Exception as err:
            code = _code(err)
        self._record(True, code, f"Shard.GroupPropose {kind}")

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
        self._record(False, code, f"raw {method}")

    # ----- one round against one node -----

    async def outsider_round(self, ch: grpc.aio.Channel, t: Target, phantoms: bool) -> None:
        o, to, cid = OUTSIDER, t.node_id, self.cluster_id
        for g in t.groups:
            nt = g.term + 1
            put = self.rng.choice(self.keys)
            forged = [
                _msg(MessageType.VOTE, g.group, o, to, term=nt, index=1 << 40, log_term=nt, context=b"transfer"),
                _msg(MessageType.HEARTBEAT, g.group, o, to, term=nt, commit=g.commit),
                _msg(MessageType.HEARTBEAT, g.group, o, to, term=HUGE),
                _msg(MessageType.TIMEOUT_NOW, g.group, o, to, term=g.term),
                _msg(MessageType.APP, g.group, o, to, term=nt, index=g.last_index, log_term=g.term,
                     commit=g.last_index + 2, entries=[
                         raft_pb2.Entry(term=nt, index=g.last_index + 1, type=int(EntryType.NORMAL),
                                        data=commands.encode_put(put, FORGED_VALUE)),
                         raft_pb2.Entry(term=nt, index=g.last_index + 2, type=int(EntryType.NORMAL),
                                        data=commands.encode_put(b"forged/key", FORGED_VALUE))]),
                _msg(MessageType.APP, g.group, o, to, term=nt, index=g.last_index, log_term=g.term,
                     commit=g.last_index + 1, entries=[
                         raft_pb2.Entry(term=nt, index=g.last_index + 1, type=int(EntryType.CONF_CHANGE),
                                        data=b"\x01")]),
            ]
            await self._send(ch, _batch(cid, o, to, forged), True, "outsider_raft")
        if phantoms:
            hb = (_msg(MessageType.HEARTBEAT, PHANTOM_BASE + i, o, to, term=3) for i in range(PHANTOM_GROUPS))
            await self._send(ch, _batch(cid, o, to, hb), True, "outsider_phantom_heartbeats")
        await self._snapshot(ch, t, o, outsider=True)
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
            await self._send(ch, _batch(cid, m, to, bad), False, "member_malformed")
        if phantoms:
            hb = (_msg(MessageType.HEARTBEAT, PHANTOM_BASE + i, m, to, term=3) for i in range(PHANTOM_GROUPS))
            await self._send(ch, _batch(cid, m, to, hb), False, "member_phantom_heartbeats")
        await self._snapshot(ch, t, m, outsider=False)
        # garbage as whole request bodies: random bytes, and a member's real batch cut short
        real = _batch(cid, m, to, [_msg(MessageType.HEARTBEAT, 1, m, to, term=1)]).SerializeToString()
        for method, stream in (("/kvstore.v1.Raft/Send", True), ("/kvstore.v1.Raft/SendSnapshot", True),
                               ("/kvstore.v1.Shard/GroupPropose", False)):
            await self._raw(ch, method, self.rng.randbytes(self.rng.randint(1, 300)), stream, "raw_garbage")
        await self._raw(ch, "/kvstore.v1.Raft/Send", real[: max(1, len(real) - 3)], True, "raw_truncated")


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
) -> ForgeStats:
    """Send the forged traffic of the module docstring to ``targets`` for ``duration`` seconds
    (at most ``max_rounds`` rounds, ``pace`` s apart): non-member traffic first in each round, then
    malformed traffic under the id of another member. Never raises on a node's answer."""
    stats = stats if stats is not None else ForgeStats()
    rng = random.Random(seed)
    f = _Forger(cluster_id, keys, stats, rng)
    deadline = time.monotonic() + max(0.0, duration)
    # never through a proxy: the forger talks to the run's own hosts only
    chans = {t.address: grpc.aio.insecure_channel(t.address, options=[("grpc.enable_http_proxy", 0)])
             for t in targets}
    try:
        for rnd in range(max_rounds):
            if time.monotonic() >= deadline:
                break
            phantoms = rnd % 10 == 0
            jobs = []
            for t in targets:
                jobs.append(f.outsider_round(chans[t.address], t, phantoms))
                others = [x for x in members if x != t.node_id]
                if others:
                    jobs.append(f.member_round(chans[t.address], t, rng.choice(others), phantoms))
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.gather(*jobs), max(0.5, remaining + RPC_TIMEOUT))
            except TimeoutError:
                break
            stats.rounds += 1
            await asyncio.sleep(pace)
    finally:
        for ch in chans.values():
            await ch.close()
    return stats
