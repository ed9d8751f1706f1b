"""The cluster version (kvstore/node/version.py): the total decoder of the replicated value,
hostile levels refused, advertisement and raise decisions applied by the real state-machine rules,
the forwarded-write check, and the gate a proposal passes before it reaches a log."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.grouprequests import check_group_request
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.node.version import (
    COMMAND_LEVELS,
    LEVEL_BASE,
    LEVEL_TRANSACTIONS,
    MAX_LEVEL,
    MAX_MEMBERS,
    SUPPORTED_LEVEL,
    VERSIONS_KEY,
    ClusterVersion,
    CommandGate,
    advertise_command,
    check_level,
    check_version_change,
    decode_versions,
    encode_versions,
    raise_command,
)
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.shard.shardmap import META_GROUP, ShardMap
from kvstore.storage import commands
from kvstore.storage.machine import DictState, UnknownCommandKind
from kvstore.storage.store import LmdbNodeStore

FAKE_KIND = 0xEE
"""A command kind no release has: placed at level 2 by the test's table (a kind beyond TXN)."""


def test_table_covers_every_command_kind_and_this_binary_supports_them() -> None:
    assert set(COMMAND_LEVELS) == {int(op) for op in commands.Op}
    assert all(LEVEL_BASE <= lv <= SUPPORTED_LEVEL for lv in COMMAND_LEVELS.values())
    assert LEVEL_TRANSACTIONS == 2


levels = st.integers(1, MAX_LEVEL)
versions = st.builds(
    ClusterVersion, levels, st.dictionaries(st.integers(1, (1 << 63) - 1), levels, max_size=20),
)


@given(versions)
def test_encoding_round_trips(v: ClusterVersion) -> None:
    assert decode_versions(encode_versions(v)) == v


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=64), versions.map(encode_versions).flatmap(
    lambda b: st.tuples(st.integers(0, len(b)), st.binary(max_size=4)).map(lambda t: b[:t[0]] + t[1] + b[t[0]:]))))
def test_decoder_is_total(data: bytes) -> None:
    try:
        v = decode_versions(data)
    except ValueError:
        return
    assert encode_versions(v) == data  # only canonical encodings decode


@pytest.mark.parametrize("level", [0, -1, MAX_LEVEL + 1, 1 << 64, 10**100, True, 1.0, "2"])
def test_hostile_levels_are_refused(level: object) -> None:
    with pytest.raises(ValueError):
        check_level(level)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        advertise_command(ClusterVersion(), None, 3, level)  # type: ignore[arg-type]


def test_hostile_encodings_are_refused() -> None:
    head = struct.Struct(">4sHI")
    entry = struct.Struct(">QH")
    for bad in (
        head.pack(b"KVV1", 0, 0),  # cluster version 0
        head.pack(b"KVV1", 1, 1) + entry.pack(2, 0),  # a level 0 advertisement
        head.pack(b"KVV1", 1, 1) + entry.pack(0, 1),  # node 0
        head.pack(b"KVV1", 1, 1) + entry.pack(1 << 63, 1),  # node id beyond 63 bits
        head.pack(b"KVV1", 1, 2) + entry.pack(2, 1) + entry.pack(2, 1),  # a duplicate
        head.pack(b"KVV1", 1, 2) + entry.pack(3, 1) + entry.pack(2, 1),  # out of order
        head.pack(b"KVV1", 1, 0xFFFFFFFF),  # a huge count
        head.pack(b"KVV2", 1, 0),
    ):
        with pytest.raises(ValueError):
            decode_versions(bad)


def apply(state: DictState, cmd: bytes | None) -> None:
    """Apply `cmd` to the metadata group's state with the real apply rules; it must swap."""
    assert cmd is not None
    res = state.apply(cmd)
    assert res.swapped, res


def stored(state: DictState) -> tuple[ClusterVersion, bytes | None]:
    raw = state.get(VERSIONS_KEY)
    return (ClusterVersion() if raw is None else decode_versions(raw)), raw


def test_a_lagging_member_holds_the_version_back_and_the_gate_refuses_until_it_advertises() -> None:
    meta = DictState(group=META_GROUP)
    members = {1, 2, 3}
    gate = CommandGate(lambda: stored(meta)[0], lambda: members, {**COMMAND_LEVELS, FAKE_KIND: LEVEL_TRANSACTIONS})
    put = commands.encode_put(b"k", b"v")
    fake = bytes([commands.FORMAT_VERSION, FAKE_KIND]) + put[2:]
    # Nodes 1 and 2 run a release with level 2, node 3 the old one.
    for node, level in ((1, 2), (2, 2), (3, 1)):
        v, raw = stored(meta)
        apply(meta, advertise_command(v, raw, node, level))
    v, raw = stored(meta)
    assert v == ClusterVersion(LEVEL_BASE, {1: 2, 2: 2, 3: 1})
    assert raise_command(v, raw, members) is None  # the minimum (1) is not above the version
    gate.check(put)  # level 1 commands pass
    with pytest.raises(errors.ClusterVersionTooLow) as e:
        gate.check(fake)
    assert e.value.definite
    assert "needs cluster version 2" in e.value.message and "node 3 (advertises 1)" in e.value.message
    assert "node 1" not in e.value.message
    # A member that never advertised holds it back too, and is named.
    with pytest.raises(errors.ClusterVersionTooLow, match=r"node 4 \(not advertised\)"):
        CommandGate(lambda: v, lambda: {1, 2, 3, 4}, {FAKE_KIND: 2}).check(fake)
    # Node 3 is upgraded: it advertises 2, the metadata leader raises the version, the gate admits.
    apply(meta, advertise_command(v, raw, 3, 2))
    v, raw = stored(meta)
    assert raise_command(v, raw, {1, 2, 3, 4}) is None  # node 4 has not advertised
    apply(meta, raise_command(v, raw, members))
    v, raw = stored(meta)
    assert v.cluster == 2
    gate.check(fake)
    # Never lowered: a member that advertises less later does not bring it down.
    apply(meta, advertise_command(v, raw, 3, 1))
    v, raw = stored(meta)
    assert raise_command(v, raw, members) is None and v.cluster == 2


def test_the_raise_drops_entries_of_nodes_that_left() -> None:
    v = ClusterVersion(1, {1: 2, 2: 2, 9: 1})
    cmd = raise_command(v, encode_versions(v), {1, 2})
    assert cmd is not None
    assert decode_versions(commands.decode_command(cmd).value) == ClusterVersion(2, {1: 2, 2: 2})


def test_garbage_and_shard_commands_pass_the_gate_untouched() -> None:
    gate = CommandGate(lambda: ClusterVersion(), lambda: {1}, {FAKE_KIND: 2})
    for data in (b"", b"\x03", b"\xff" * 10):
        gate.check(data)


def test_the_gate_refuses_a_kind_no_table_knows() -> None:
    """A well-formed command of a kind neither the release nor the gate's table knows would stop
    every replica at apply (`UnknownCommandKind`): refused before the log, definite."""
    put = commands.encode_put(b"k", b"v")
    unknown = bytes([commands.FORMAT_VERSION, 99]) + put[2:]
    assert commands.unknown_kind(unknown) == 99
    for table in (COMMAND_LEVELS, {commands.Op.PUT: LEVEL_BASE}):
        with pytest.raises(errors.InvalidArgument, match="kind 99 is unknown") as e:
            CommandGate(lambda: ClusterVersion(SUPPORTED_LEVEL), lambda: {1}, table).check(unknown)
        assert e.value.definite
    CommandGate(lambda: ClusterVersion(), lambda: {1}).check(put)  # a known kind passes


def test_no_value_beyond_the_members_limit_is_written() -> None:
    """`decode_versions` refuses more than MAX_MEMBERS entries, so the encoder never makes one
    (a committed value no tracker reads would make every later compare-and-swap fail)."""
    full = ClusterVersion(1, {n: 1 for n in range(1, MAX_MEMBERS + 1)})
    assert decode_versions(encode_versions(full)) == full
    with pytest.raises(ValueError, match="at most"):
        advertise_command(full, encode_versions(full), MAX_MEMBERS + 1, 1)


class Req:
    def __init__(self, command: bytes, sender: int) -> None:
        self.group = META_GROUP
        self.command = command
        self.conf_change = b""
        self.read_barrier = False
        self.transfer = False
        self.from_node = sender
        self.retention_keep = 0


def test_forwarded_changes_may_only_touch_the_senders_own_level() -> None:
    v = ClusterVersion(1, {1: 1, 2: 1})
    raw = encode_versions(v)
    own = advertise_command(v, raw, 2, 2)
    assert own is not None
    assert check_group_request(Req(own, 2), None) is None
    with pytest.raises(errors.InvalidArgument, match="may not change node 2"):
        check_group_request(Req(own, 1), None)
    # A raise must be exactly the one over the members (the map of the checking node).
    both = ClusterVersion(1, {1: 2, 2: 2, 3: 1})
    raw = encode_versions(both)
    smap = ShardMap.initial([1, 2], groups=1, replication=2)
    raised = raise_command(both, raw, {1, 2})
    assert raised is not None
    assert check_group_request(Req(raised, 1), smap) is None
    with pytest.raises(errors.InvalidArgument, match="lowest level every member advertised"):
        check_group_request(Req(raised, 1), ShardMap.initial([1, 2, 3], groups=1, replication=3))
    forged = commands.encode_cas(VERSIONS_KEY, False, raw, encode_versions(ClusterVersion(2, {1: 2, 2: 2, 3: 1})))
    with pytest.raises(errors.InvalidArgument, match="lowest level every member advertised"):
        check_group_request(Req(forged, 1), smap)
    garbage = commands.encode_cas(VERSIONS_KEY, False, raw, b"KVV1garbage")
    with pytest.raises(errors.InvalidArgument, match="not a valid cluster version"):
        check_group_request(Req(garbage, 1), None)
    first = advertise_command(ClusterVersion(), None, 1, 1)
    assert first is not None and check_group_request(Req(first, 1), None) is None


@given(st.binary(max_size=40), st.binary(max_size=40), st.booleans(), st.integers(0, 5))
def test_check_version_change_is_total(expected: bytes, value: bytes, absent: bool, sender: int) -> None:
    with contextlib.suppress(ValueError):  # anything else escaping fails the test
        check_version_change(absent, expected, value, sender, {1, 2})


def test_kvctl_status_prints_the_version_line() -> None:
    from kvstore.cli.kvctl import _version_line
    from kvstore.client.types import NodeStatus, Status

    nodes = [
        NodeStatus("a", Status(1, cluster_version=1, supported_level=1, member_levels=((1, 1),))),
        NodeStatus("b", Status(2, cluster_version=2, supported_level=2, member_levels=((1, 2), (2, 2)))),
        NodeStatus("c"),
    ]
    assert _version_line(nodes) == "cluster version 2; feature levels: node 1 = 2, node 2 = 2"
    assert _version_line([NodeStatus("c")]) == ""


def test_an_unknown_command_kind_stops_apply_instead_of_diverging(tmp_path: Path) -> None:
    """A replica of an older release meeting a kind it does not know (written by a newer one)
    must not apply it as an error result (the newer replicas apply it): the whole apply
    transaction is abandoned and `UnknownCommandKind` says why. Garbage is still an error result."""
    put = commands.encode_put(b"k", b"v")
    unknown = bytes([commands.FORMAT_VERSION, FAKE_KIND]) + put[2:]
    assert commands.unknown_kind(unknown) == FAKE_KIND and commands.unknown_kind(put) is None
    assert commands.unknown_kind(b"\x07garbage") is None
    with pytest.raises(UnknownCommandKind, match=f"kind {FAKE_KIND}"):
        DictState().apply(unknown)
    store = LmdbNodeStore(tmp_path / "db", sync=False)
    try:
        conf = ConfState((1,))
        store.bootstrap(1, conf, [])
        start = store.applied_index(1) + 1
        es = [Entry(1, start + i, EntryType.NORMAL, d, group=1) for i, d in enumerate((put, unknown))]
        store.persist_and_apply([GroupWrite(1, es, HardState(1, 0, start + 1))], [])
        with pytest.raises(UnknownCommandKind):
            store.persist_and_apply([], [ApplyBatch(1, es, conf)])
        assert store.applied_index(1) == start - 1 and store.get(1, b"k") is None  # nothing of the batch
        res = store.persist_and_apply([], [ApplyBatch(1, es[:1], conf)])
        assert store.get(1, b"k") == b"v" and res
    finally:
        store.close()
