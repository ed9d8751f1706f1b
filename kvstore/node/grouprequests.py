"""Pure checks and answers behind the internal `Shard` RPCs (`kvstore.server.shards` is their
asyncio/gRPC adapter): what a GroupPropose, ExportRange or ShardOp request may ask, which nodes
to try for a group's leader, how range moves are described.

Synchronous and deterministic, no I/O (`tests/unit/test_purity.py`). Requests are read through
small structural protocols (the generated protobuf messages satisfy them), so this module does
not import gRPC. Every check is total: whatever the fields hold, it returns or raises a definite
`kvstore.errors.KVError` (InvalidArgument, or WrongShard for a move this node's map does not show
yet), nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from kvstore import errors
from kvstore.node.alarms import ALARMS_KEY, decode_alarms
from kvstore.node.host import Host
from kvstore.node.retention import check_keep
from kvstore.node.version import VERSIONS_KEY, check_version_change, members_of
from kvstore.raft import ConfChange
from kvstore.security.authstate import AUTH_KEY, AuthError, AuthState
from kvstore.shard.ranges import IntervalSet
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap, ShardMapError
from kvstore.storage import commands
from kvstore.storage.shardcmd import ShardOp, decode_shard_command

MAX_EXPORT_CHUNK = 4 << 20
"""Largest chunk an ExportRange caller may ask for (a chunk is held in memory whole)."""
DEFAULT_EXPORT_CHUNK = 512 << 10
"""The chunk size of an ExportRange that asks for none."""
MAX_WAIT = 3600.0
"""Longest a ShardOp with `wait` may wait, in seconds."""


class GroupRequest(Protocol):
    """What `check_group_request` reads of a GroupPropose request."""

    @property
    def group(self) -> int: ...
    @property
    def command(self) -> bytes: ...
    @property
    def conf_change(self) -> bytes: ...
    @property
    def read_barrier(self) -> bool: ...
    @property
    def transfer(self) -> bool: ...
    @property
    def from_node(self) -> int: ...
    @property
    def retention_keep(self) -> int: ...


def check_group_request(request: GroupRequest, smap: ShardMap | None) -> ConfChange | None:
    """Refuse (definite InvalidArgument) a GroupPropose request that the node's own code would
    never send: the metadata group takes only compare-and-swaps of the shard map whose new value
    is a valid map of a higher version that changes no client address but the sender's own
    (`check_client_addresses`), and of the alarm set (`kvstore.node.alarms`) between
    valid encodings, and of the cluster version by the sender advertising its own level
    or the raise over the members of `smap` (`version.check_version_change`), and of the auth state whose new value is a valid state one version after
    the old one (`check_auth_change`); a data group only shard commands that decode (never SET,
    which only a group's bootstrap log carries) and that belong to a range move of the shard map
    `smap`, with that move's ranges, in the group that plays that part in it (FREEZE and DROP in
    the source, BEGIN, INSTALL and ACTIVATE in the target); a retention request (`retention_keep`,
    a read) needs a number of revisions in 1..`retention.MAX_KEEP`; a LEASE_DROP, LEASE_STATUS or
    LEASE_ORPHAN that decodes goes to a data group; a COMPACT or a CLOSE (history and
    revision state only) goes to any group (the receiving leader checks a CLOSE's revision
    against its clock: `kvstore.node.closes`); a well-formed command of a transaction across
    groups (PREPARE .. FINALIZE: a member's coordinator or resolver) goes to a data group, never
    to the metadata group; a conf change must decode. A move
    this node's map does not show yet is refused as WRONG_SHARD (the caller retries: the map
    may lag the coordinator's by a little). Returns the decoded conf change, if any. So no
    request can write garbage into group 0, a malformed command into any log, or freeze or drop
    ranges no move is moving, whoever sends it. A request asks for exactly one thing (a conf
    change, a retention walk, a read barrier, a transfer, or a command): one that sets several is
    refused rather than served by whichever field is looked at first."""
    kinds = [name for name, isset in (
        ("conf_change", bool(request.conf_change)), ("retention_keep", bool(request.retention_keep)),
        ("read_barrier", request.read_barrier), ("transfer", request.transfer), ("command", bool(request.command)),
    ) if isset]
    if len(kinds) > 1:
        raise errors.InvalidArgument(f"a GroupPropose request asks for one thing; this one sets {', '.join(kinds)}")
    if request.conf_change:
        try:
            return ConfChange.decode(request.conf_change)
        except ValueError as err:
            raise errors.InvalidArgument(f"malformed conf change: {err}") from None
    if request.retention_keep:
        check_keep(request.retention_keep)  # a read of the change log: changes nothing
        return None
    if request.read_barrier or request.transfer:
        return None
    data = request.command
    if request.group != META_GROUP and (_decodes_as(data, commands.Op.LEASE_DROP)
                                        or _decodes_as(data, commands.Op.LEASE_STATUS)
                                        or _decodes_as(data, commands.Op.LEASE_ORPHAN)):
        # A revoked lease's keys deleted in another group (the home leader's lease clock,
        # node/lessor.py); the orphan sweep's question to a lease's home (changes nothing) and
        # its guarded DROP (node/orphans.py).
        return None
    if _is_history_command(data):
        # KV.Compact's fan-out (admin only at the client edge), or a close for a read at a
        # revision: idempotent, changes no data.
        return None
    if request.group != META_GROUP and _is_cross_command(data):
        # A cross-group transaction's step, from a member's coordinator or resolver (this RPC is
        # internal: only members reach it); never from a client port.
        return None
    if request.group == META_GROUP:
        try:
            cmd = commands.decode_command(data)
        except ValueError as err:
            raise errors.InvalidArgument(f"malformed command for the metadata group: {err}") from None
        if cmd.op == commands.Op.CAS and cmd.key == AUTH_KEY:
            check_auth_change(cmd.expect_absent, cmd.expected, cmd.value)
            return None
        if cmd.op == commands.Op.CAS and cmd.key == ALARMS_KEY:
            try:
                decode_alarms(cmd.value)
                if not cmd.expect_absent:
                    decode_alarms(cmd.expected)
            except ValueError as err:
                raise errors.InvalidArgument(f"not a valid alarm set: {err}") from None
            return None
        if cmd.op == commands.Op.CAS and cmd.key == VERSIONS_KEY:
            try:
                check_version_change(cmd.expect_absent, cmd.expected, cmd.value, request.from_node, members_of(smap))
            except ValueError as err:
                raise errors.InvalidArgument(f"not a valid cluster version change: {err}") from None
            return None
        if cmd.op != commands.Op.CAS or cmd.key != SHARD_MAP_KEY or cmd.expect_absent:
            raise errors.InvalidArgument(
                "the metadata group takes only compare-and-swaps of the shard map, the alarm set, the auth state "
                "and the cluster version"
            )
        try:
            old, new = ShardMap.decode(cmd.expected), ShardMap.decode(cmd.value)
        except ShardMapError as err:
            raise errors.InvalidArgument(f"not a valid shard map: {err}") from None
        if new.version <= old.version:
            raise errors.InvalidArgument(f"shard map version {new.version} does not follow {old.version}")
        check_client_addresses(old, new, request.from_node)
        return None
    try:
        sc = decode_shard_command(data)
    except ValueError as err:
        raise errors.InvalidArgument(f"not a shard command: {err}") from None
    if sc.op == ShardOp.SET:
        raise errors.InvalidArgument("SET is carried only by a group's bootstrap log")
    mv = next((x for x in smap.moves if x.id == sc.move), None) if smap is not None else None
    if mv is None:
        version = smap.version if smap is not None else 0
        raise errors.WrongShard(f"no range move {sc.move} in this node's shard map (version {version})",
                                shard_version=version)
    part = mv.source if sc.op in (ShardOp.FREEZE, ShardOp.DROP) else mv.target
    if request.group != part or (sc.op != ShardOp.INSTALL and sc.ranges != mv.ranges):
        raise errors.InvalidArgument(f"{sc.op.name} in group {request.group} is not a step of range move {mv.id}")
    return None


def refused_for_good(err: errors.KVError, map_version: int) -> bool:
    """Whether a GroupPropose refusal is final for a caller whose shard map is at `map_version`:
    a WrongShard from a node whose map is at least that new (`shard_version`; 0: not about the
    map, e.g. a group not hosted there). The only such refusal is `check_group_request`'s "no
    range move N in this node's shard map": a move leaves the map only when it finishes, and the
    caller's step of it was planned from a map no newer than its own, so move N is finished (a
    racing coordinator did it) and every node, now or later, refuses the step too. Retrying
    helps only a node whose map is behind the caller's (it may not show the move yet); retried
    until the caller's deadline, a stale coordinator's step kept its node's coordinator from the
    next move for the whole deadline (found by the simulator; `test_node_sim_moves.py`'s
    stale-step test searches seeds for the scenario)."""
    return isinstance(err, errors.WrongShard) and 0 < map_version <= err.shard_version


def check_client_addresses(old: ShardMap, new: ShardMap, sender: int) -> None:
    """A map CAS from node `sender` may change only `sender`'s own client address (each node
    publishes its own: `kvstore.node.clientaddr`), or drop the address of a node the new map no
    longer lists (the coordinator's membership update); errors.InvalidArgument otherwise. So a
    member cannot point clients at a client address of its choosing for another node."""
    for n in sorted(set(old.clients) | set(new.clients)):
        if old.clients.get(n) != new.clients.get(n) and n != sender and n in new.nodes:
            raise errors.InvalidArgument(f"node {sender} may not change node {n}'s client address")


def _is_history_command(data: bytes) -> bool:
    """Whether `data` is a well-formed COMPACT (`KV.Compact`) or CLOSE command."""
    return is_close(data) or _decodes_as(data, commands.Op.COMPACT)


def _is_cross_command(data: bytes) -> bool:
    """Whether `data` is a well-formed command of a transaction across groups (PREPARE ..
    FINALIZE: idempotent, each checked again at apply)."""
    if len(data) < 2 or data[1] not in commands.X_OPS:
        return False
    try:
        commands.decode_command(data)
    except ValueError:
        return False
    return True


def is_close(data: bytes) -> bool:
    """Whether `data` is a well-formed CLOSE command (a close forwarded to the group's leader)."""
    return _decodes_as(data, commands.Op.CLOSE)


def _decodes_as(data: bytes, op: commands.Op) -> bool:
    try:
        return commands.decode_command(data).op == op
    except ValueError:
        return False


def check_auth_change(expect_absent: bool, expected: bytes, value: bytes) -> None:
    """A CAS of the auth state must replace a valid state (or none) by a valid state of the next
    version; errors.InvalidArgument (definite) otherwise."""
    try:
        old = AuthState() if expect_absent else AuthState.decode(expected)
        new = AuthState.decode(value)
    except AuthError as err:
        raise errors.InvalidArgument(f"not a valid auth state: {err}") from None
    if new.version != old.version + 1:
        raise errors.InvalidArgument(f"auth state version {new.version} does not follow {old.version}")


def check_export_request(lo: Sequence[int], hi: Sequence[int], chunk_bytes: int) -> tuple[IntervalSet, int]:
    """The ranges and chunk size an ExportRange request asks for: `lo` and `hi` pair up into
    valid hash intervals, `chunk_bytes` is at most `MAX_EXPORT_CHUNK` (0: the default).
    Definite InvalidArgument otherwise."""
    if chunk_bytes > MAX_EXPORT_CHUNK:
        raise errors.InvalidArgument(f"chunk_bytes {chunk_bytes} exceeds {MAX_EXPORT_CHUNK}")
    if chunk_bytes < 0:
        raise errors.InvalidArgument(f"chunk_bytes {chunk_bytes} is negative")
    if len(lo) != len(hi):
        raise errors.InvalidArgument(f"{len(lo)} range starts but {len(hi)} range ends")
    try:
        ranges = IntervalSet(zip(lo, hi, strict=True))
    except ValueError as err:
        raise errors.InvalidArgument(str(err)) from None
    return ranges, chunk_bytes or DEFAULT_EXPORT_CHUNK


def check_wait_timeout(wait: bool, timeout: float) -> None:
    """A ShardOp that waits gives a timeout in 0..MAX_WAIT seconds (NaN is refused too)."""
    if wait and not (math.isfinite(timeout) and 0 <= timeout <= MAX_WAIT):
        raise errors.InvalidArgument(f"timeout {timeout} is outside 0..{MAX_WAIT:g} seconds")


def leader_candidates(host: Host, smap: ShardMap | None, group: int) -> list[int]:
    """Nodes to try for `group`'s leader, best guess first, each once: the leader this node
    knows, the group's members in the shard map, the members of its local replica; for the
    metadata group (or if nothing else is known) every node this host knows."""
    out: list[int] = []
    lead, _ = host.leader_of(group)
    if lead:
        out.append(lead)
    if smap is not None and group in smap.groups:
        out += [n for n in smap.groups[group].members() if n not in out]
    g = host.groups.get(group)
    if g is not None:
        out += [n for n in sorted(g.core.conf.members()) if n not in out]
    if group == META_GROUP or not out:
        out += [n for n in sorted(host.members) if n not in out]
    return out


def describe_moves(m: ShardMap) -> str:
    """One line on the range moves in progress in `m`."""
    if not m.moves:
        return "no range moves in progress"
    return "; ".join(f"move {mv.id}: group {mv.source} -> {mv.target} ({mv.state.name.lower()})" for mv in m.moves)
