"""The pure checks behind the internal Shard RPCs (`kvstore.node.grouprequests`): total under
hostile input (fuzzed with hypothesis), and what they accept is what the node's own code sends."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.alarms import ALARMS_KEY, Alarm, AlarmType, decode_alarms, encode_alarms
from kvstore.node.grouprequests import (
    DEFAULT_EXPORT_CHUNK,
    MAX_EXPORT_CHUNK,
    MAX_WAIT,
    check_export_request,
    check_group_request,
    check_wait_timeout,
    describe_moves,
    leader_candidates,
    refused_for_good,
)
from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.raft import ConfChange, ConfState
from kvstore.raft.types import ConfChangeType
from kvstore.shard.ranges import HASH_MAX, IntervalSet
from kvstore.shard.shardmap import SHARD_MAP_KEY, ShardMap
from kvstore.storage import commands
from kvstore.storage.shardcmd import ShardOp, decode_shard_command, encode_shard_command
from kvstore.storage.xtxn import TxnId, XCmd, XOp
from kvstore.v1 import shard_pb2

MAP = ShardMap.initial([1, 2, 3], 2, 3, 16, {1: "a:1", 2: "b:1", 3: "c:1"})
PLANNED = MAP.plan_add_group([1, 2, 3])


@dataclass(slots=True)
class Req:
    """A GroupPropose request as plain fields (the protocol the check reads)."""

    group: int
    command: bytes = b""
    conf_change: bytes = b""
    read_barrier: bool = False
    transfer: bool = False
    from_node: int = 0
    retention_keep: int = 0


def _valid_commands() -> list[tuple[int, bytes]]:
    """(group, command) pairs the node's own coordinator sends for PLANNED's moves."""
    alarms = encode_alarms([Alarm(2, AlarmType.NOSPACE)])
    out = [
        (0, commands.encode_cas(SHARD_MAP_KEY, False, MAP.encode(), PLANNED.encode())),
        (0, commands.encode_cas(ALARMS_KEY, True, b"", alarms)),
        (0, commands.encode_cas(ALARMS_KEY, False, alarms, encode_alarms([]))),
    ]
    for mv in PLANNED.moves:
        out.append((mv.source, encode_shard_command(ShardOp.FREEZE, mv.ranges, move=mv.id)))
        out.append((mv.target, encode_shard_command(ShardOp.BEGIN, mv.ranges, token=3, move=mv.id)))
        out.append((mv.target, encode_shard_command(ShardOp.ACTIVATE, mv.ranges, token=3, move=mv.id)))
        out.append((mv.source, encode_shard_command(ShardOp.DROP, mv.ranges, move=mv.id)))
    # the steps of a transaction across groups (a member's coordinator or resolver), to data groups
    tid = TxnId(1, 2)
    out += [
        (1, commands.encode_command(commands.Command.cross(XCmd(XOp.PREPARE, tid, 1, 5, keys=(b"k",)), revision=9))),
        (2, commands.encode_command(commands.Command.cross(XCmd(XOp.COMMIT, tid, at=9, writes=((b"k", b"v"),))))),
        (1, commands.encode_command(commands.Command.cross(XCmd(XOp.RECORD, tid, start=5, at=9), 4, 1, 1))),
        (2, commands.encode_command(commands.Command.cross(XCmd(XOp.ABORT, tid)))),
    ]
    return out


VALID = _valid_commands()


@st.composite
def hostile_commands(draw: st.DrawFn) -> tuple[int, bytes]:
    """Valid commands, the same with bytes flipped, cut or extended, in any group, or noise."""
    group, data = draw(st.sampled_from(VALID))
    how = draw(st.sampled_from(["as is", "flip", "cut", "extend", "noise"]))
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    elif how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "extend":
        data = data + draw(st.binary(min_size=1, max_size=16))
    elif how == "noise":
        data = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        group = draw(st.integers(0, 6))
    return group, data


@settings(max_examples=400, deadline=None)
@given(hostile_commands(), st.sampled_from([MAP, PLANNED, None]))
def test_group_request_check_is_total_and_accepts_only_real_move_steps(
    cmd: tuple[int, bytes], smap: ShardMap | None
) -> None:
    group, data = cmd
    try:
        out = check_group_request(Req(group, data), smap)
    except (errors.InvalidArgument, errors.WrongShard):
        return
    assert out is None
    if group == 0:
        decoded = commands.decode_command(data)
        assert decoded.op == commands.Op.CAS and decoded.key in (SHARD_MAP_KEY, ALARMS_KEY)
        if decoded.key == ALARMS_KEY:
            decode_alarms(decoded.value)  # a valid alarm set, or the check would have refused it
            return
        assert ShardMap.decode(decoded.value).version > ShardMap.decode(decoded.expected).version
        return
    if len(data) > 1 and data[1] in commands.X_OPS:  # a cross-group step: any data group, well-formed
        assert commands.decode_command(data).x is not None
        return
    assert smap is not None
    sc = decode_shard_command(data)
    mv = next(m for m in smap.moves if m.id == sc.move)
    assert sc.op != ShardOp.SET
    assert group == (mv.source if sc.op in (ShardOp.FREEZE, ShardOp.DROP) else mv.target)
    assert sc.op == ShardOp.INSTALL or sc.ranges == mv.ranges


def test_cross_group_steps_go_to_data_groups_only() -> None:
    prepare = commands.encode_command(
        commands.Command.cross(XCmd(XOp.PREPARE, TxnId(1, 2), 1, 5, keys=(b"k",)), revision=9))
    assert check_group_request(Req(1, prepare), MAP) is None
    with pytest.raises(errors.InvalidArgument):
        check_group_request(Req(0, prepare), MAP)  # never the metadata group
    with pytest.raises(errors.InvalidArgument):
        check_group_request(Req(1, prepare[:-1]), MAP)  # malformed: not a cross step, not a shard command


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=48), st.booleans(), st.booleans())
def test_conf_change_bytes_decode_or_are_refused(raw: bytes, barrier: bool, transfer: bool) -> None:
    try:
        out = check_group_request(Req(1, conf_change=raw, read_barrier=barrier, transfer=transfer), MAP)
    except errors.InvalidArgument:
        # empty conf change bytes mean "no conf change": a barrier or transfer alone passes, and
        # anything else is checked as a command (an empty one, refused); a request that asks
        # for two things is refused whatever they are
        asked = bool(raw) + barrier + transfer
        assert asked != 1 or (raw and not _decodes(raw))
        return
    assert bool(raw) + barrier + transfer == 1
    if raw:
        assert out == ConfChange.decode(raw)
    else:
        assert out is None


def _decodes(raw: bytes) -> bool:
    try:
        ConfChange.decode(raw)
    except ValueError:
        return False
    return True


KINDS = ("conf_change", "retention_keep", "read_barrier", "transfer", "command")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(KINDS), min_size=2, max_size=5, unique=True))
def test_a_request_that_asks_for_several_things_is_refused(kinds: list[str]) -> None:
    req = Req(
        1,
        command=encode_shard_command(ShardOp.FREEZE, IntervalSet.full(), move=1) if "command" in kinds else b"",
        conf_change=ConfChange(ConfChangeType.ADD_VOTER, 4).encode() if "conf_change" in kinds else b"",
        read_barrier="read_barrier" in kinds, transfer="transfer" in kinds,
        retention_keep=100 if "retention_keep" in kinds else 0,
    )
    with pytest.raises(errors.InvalidArgument, match="asks for one thing"):
        check_group_request(req, PLANNED)


def test_protobuf_requests_satisfy_the_protocol() -> None:
    mv = PLANNED.moves[0]
    freeze = shard_pb2.GroupProposeRequest(
        group=mv.source, command=encode_shard_command(ShardOp.FREEZE, mv.ranges, move=mv.id)
    )
    assert check_group_request(freeze, PLANNED) is None
    with pytest.raises(errors.WrongShard):
        check_group_request(freeze, MAP)  # a move this node's map does not show yet


ints = st.one_of(st.integers(0, HASH_MAX), st.integers(-(1 << 70), 1 << 70))


@settings(max_examples=300, deadline=None)
@given(st.lists(ints, max_size=6), st.lists(ints, max_size=6), st.integers(-(1 << 40), 1 << 40))
def test_export_request_check_is_total(lo: list[int], hi: list[int], chunk: int) -> None:
    try:
        ranges, size = check_export_request(lo, hi, chunk)
    except errors.InvalidArgument:
        ok = (
            0 <= chunk <= MAX_EXPORT_CHUNK
            and len(lo) == len(hi)
            and all(0 <= a <= b <= HASH_MAX for a, b in zip(lo, hi, strict=True))
        )
        assert not ok
        return
    assert len(lo) == len(hi) and 0 <= chunk <= MAX_EXPORT_CHUNK
    assert size == (chunk or DEFAULT_EXPORT_CHUNK)
    assert ranges == IntervalSet(zip(lo, hi, strict=True))


@given(st.floats(allow_nan=True, allow_infinity=True), st.booleans())
def test_wait_timeout_check(timeout: float, wait: bool) -> None:
    fine = not wait or (math.isfinite(timeout) and 0 <= timeout <= MAX_WAIT)
    if fine:
        check_wait_timeout(wait, timeout)
    else:
        with pytest.raises(errors.InvalidArgument):
            check_wait_timeout(wait, timeout)


def test_leader_candidates_best_guess_first_each_once() -> None:
    host = Host(1, MemoryNodeStore(), lambda msgs: None, RaftSettings(), random.Random(1),
                members={1: "a:1", 2: "b:1", 3: "c:1", 4: "d:1"})
    host.open_group(1, ConfState((1, 2, 3)))
    cands = leader_candidates(host, MAP, 1)
    assert sorted(cands) == sorted(MAP.groups[1].members()) and len(set(cands)) == len(cands)
    assert leader_candidates(host, None, 1) == [1, 2, 3]  # the local replica's members
    assert leader_candidates(host, None, 7) == [1, 2, 3, 4]  # nothing known: every node
    meta = leader_candidates(host, MAP, 0)
    assert sorted(meta) == [1, 2, 3, 4]


def test_describe_moves() -> None:
    assert describe_moves(MAP) == "no range moves in progress"
    text = describe_moves(PLANNED)
    for mv in PLANNED.moves:
        assert f"move {mv.id}: group {mv.source} -> {mv.target} (pending)" in text


def test_a_step_of_a_finished_move_is_refused_for_good_only_by_a_map_as_new_as_the_callers() -> None:
    """`refused_for_good`: a stale coordinator's step of a move a racing coordinator finished is
    refused by every node whose map is at least as new as the caller's (final: the caller stops
    at once instead of retrying until its deadline); a node whose map is behind (it does not show
    the move yet) refuses it too, but that refusal is retried. Other refusals are not final."""
    mv = PLANNED.moves[0]
    step = Req(mv.source, encode_shard_command(ShardOp.FREEZE, mv.ranges, move=mv.id))
    assert check_group_request(step, PLANNED) is None  # the caller's map: the move is there
    finished = PLANNED.finish_move(mv.id)
    later = finished.with_nodes(dict(finished.nodes))  # one version newer still
    for receiver in (finished, later):
        with pytest.raises(errors.WrongShard) as got:
            check_group_request(step, receiver)
        assert got.value.shard_version == receiver.version
        for caller_version in (PLANNED.version, finished.version):  # the caller knows the map it planned from or newer
            if caller_version <= receiver.version:
                assert refused_for_good(got.value, caller_version)
    with pytest.raises(errors.WrongShard) as behind:  # a node whose map does not show the move yet
        check_group_request(step, MAP)
    assert not refused_for_good(behind.value, PLANNED.version)
    assert not refused_for_good(errors.WrongShard("group 3 is not on this node"), PLANNED.version)
    assert not refused_for_good(errors.NotLeader(2), PLANNED.version)
    assert not refused_for_good(errors.WrongShard("x", shard_version=9), 0)  # a caller with no map


@given(st.integers(0, 50), st.integers(0, 50))
def test_refused_for_good_is_exactly_a_map_at_least_the_callers(receiver: int, caller: int) -> None:
    err = errors.WrongShard("no range move 7 in this node's shard map", shard_version=receiver)
    assert refused_for_good(err, caller) == (0 < caller <= receiver)
