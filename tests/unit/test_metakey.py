"""`MetaKeyTracker`: one key of the metadata group as of the node's applied state (the shard map,
the alarms and the auth state are all followed through it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from kvstore.node.alarms import ALARMS_KEY, Alarm, AlarmTracker, AlarmType, encode_alarms
from kvstore.node.metakey import MetaKeyTracker
from kvstore.node.tracker import ShardTracker
from kvstore.security.authstate import AUTH_KEY, AuthState
from kvstore.security.guard import AuthTracker
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY, ShardMap


@dataclass
class Group0:
    """Group 0's applied state, as the tracker reads it from a node's store."""

    applied: int = 0
    data: dict[bytes, bytes] = field(default_factory=dict)
    reads: int = 0

    def has_group(self, group: int) -> bool:
        return group == META_GROUP

    def applied_index(self, group: int) -> int:
        return self.applied

    def get(self, group: int, key: bytes) -> bytes | None:
        self.reads += 1
        return self.data.get(key)

    def apply(self, key: bytes, value: bytes | None) -> None:
        self.applied += 1
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value


def _int_tracker(store: Group0, absent: int | None = None) -> MetaKeyTracker[int]:
    def decode(b: bytes) -> int:
        if not b.isdigit():
            raise ValueError(f"not a number: {b!r}")
        return int(b)

    return MetaKeyTracker(store, b"k", "number", decode, -1, absent=absent)


def test_a_value_is_read_once_per_applied_index_and_decoded_only_when_its_bytes_change() -> None:
    g0 = Group0()
    t = _int_tracker(g0)
    calls: list[int] = []
    t.on_change.append(lambda: calls.append(t.value))
    assert not t.refresh() and t.value == -1 and t.stored is None  # never stored
    g0.apply(b"k", b"7")
    assert t.refresh() and t.value == 7 and t.stored == b"7" and calls == [7]
    reads = g0.reads
    assert not t.refresh() and g0.reads == reads  # nothing applied since: no read at all
    g0.apply(b"other", b"x")
    assert not t.refresh() and calls == [7]  # applied, but the key's bytes are the same


def test_a_value_that_does_not_decode_is_ignored_and_the_last_good_one_stays() -> None:
    g0 = Group0()
    t = _int_tracker(g0)
    g0.apply(b"k", b"5")
    assert t.refresh()
    g0.apply(b"k", b"garbage")
    assert not t.refresh() and t.value == 5 and t.stored == b"5"
    g0.apply(b"k", b"6")
    assert t.refresh() and t.value == 6


def test_a_deleted_key_keeps_the_value_unless_an_absent_value_is_given() -> None:
    for absent, after in ((None, 3), (0, 0)):
        g0 = Group0()
        t = _int_tracker(g0, absent)
        g0.apply(b"k", b"3")
        assert t.refresh()
        g0.apply(b"k", None)
        assert t.refresh() is (absent is not None) and t.value == after


@given(st.lists(st.one_of(st.none(), st.binary(max_size=6), st.integers(0, 999).map(lambda i: b"%d" % i)), max_size=30))
def test_the_value_is_always_the_last_stored_value_that_decoded(history: list[bytes | None]) -> None:
    g0 = Group0()
    t = _int_tracker(g0, absent=0)
    stored, want = None, -1  # the model: bytes that do not decode change nothing
    for v in history:
        g0.apply(b"k", v)
        t.refresh()
        if v != stored and (v is None or v.isdigit()):
            stored, want = v, (0 if v is None else int(v))
        assert (t.value, t.stored) == (want, stored)


def test_the_three_trackers_keep_their_public_views() -> None:
    g0 = Group0()
    shards, alarms, auth = ShardTracker(g0), AlarmTracker(g0), AuthTracker(g0)
    assert (shards.map, shards.raw, shards.version) == (None, b"", 0)
    assert (alarms.alarms, alarms.raw, alarms.nospace) == (frozenset(), None, False)
    assert auth.state == AuthState() and auth.raw == b""
    m = ShardMap.initial([1, 2, 3], 1, 3, 16, {1: "a:1", 2: "b:1", 3: "c:1"})
    g0.apply(SHARD_MAP_KEY, m.encode())
    g0.apply(ALARMS_KEY, encode_alarms([Alarm(2, AlarmType.NOSPACE)]))
    g0.apply(AUTH_KEY, AuthState().encode())
    assert shards.refresh() and shards.map == m and shards.raw == m.encode() and shards.version == m.version
    assert alarms.refresh() and alarms.nospace and alarms.raw is not None
    assert not auth.refresh() or auth.raw == AuthState().encode()
    g0.apply(ALARMS_KEY, None)  # every alarm disarmed
    assert alarms.refresh() and alarms.alarms == frozenset() and not alarms.nospace and alarms.raw is None
