"""The state machine's shard commands (SET / FREEZE / BEGIN / INSTALL / ACTIVATE / DROP), ownership
checks of KV commands, and the LMDB pieces that move ranges: export, scan with ownership, snapshots
carrying the shard state, tombstones. Rules run on both `machine.DictState` and LMDB (`NodeStore`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from kvstore.raft import ConfState, Entry, EntryType, HardState
from kvstore.shard.ranges import HASH_MAX, IntervalSet, key_hash
from kvstore.storage import commands as cmds
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import StorageError
from kvstore.storage.machine import STALE_REQUEST, DictState, SessionHead
from kvstore.storage.shardcmd import (
    REC_DATA,
    REC_FLOOR,
    REC_RESULT,
    SHARD_MAGIC,
    ShardOp,
    ShardState,
    encode_record,
    encode_shard_command,
    iter_records,
)
from kvstore.storage.snapfile import TAG_DATA, TAG_SESSION, TAG_SHARDS, SnapshotDecoder
from kvstore.storage.store import ApplyBatch, GroupWrite, NodeStore

CONF1 = ConfState((1,))
EMPTY = IntervalSet()
FULL = IntervalSet.full()
Q = [IntervalSet([(i << 62, ((i + 1) << 62) - 1)]) for i in range(4)]
LOW = Q[0].union(Q[1])
HIGH = Q[2].union(Q[3])
U64 = 1 << 64


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def keys_in(ranges: IntervalSet, n: int, prefix: bytes = b"k") -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        k = b"%s%d" % (prefix, i)
        if key_hash(k) in ranges:
            out.append(k)
        i += 1
    return out


def sc(op: ShardOp, ranges: IntervalSet | None = None, records: bytes = b"") -> bytes:
    return encode_shard_command(op, ranges, records)


def floor_rec(cid: int, floor: int) -> bytes:
    return encode_record(REC_FLOOR, u64(cid), u64(floor))


def result_rec(cid: int, seq: int, res: ApplyResult) -> bytes:
    return encode_record(REC_RESULT, u64(cid) + u64(seq), cmds.encode_result(res))


OK = ApplyResult()


# =================================================================================================
# Two backends behind one interface
# =================================================================================================
@dataclass
class Image:
    """Everything of one group's state machine."""

    data: dict[bytes, bytes]
    floors: dict[int, int]
    results: dict[tuple[int, int], bytes]
    shards: ShardState | None

    def in_ranges(self, ranges: IntervalSet) -> dict[bytes, bytes]:
        return {k: v for k, v in self.data.items() if key_hash(k) in ranges}


class Backend(Protocol):
    def run(self, g: int, *datas: bytes) -> list[ApplyResult]: ...
    def image(self, g: int) -> Image: ...


class DictBackend:
    def __init__(self) -> None:
        self.states: dict[int, DictState] = {}

    def run(self, g: int, *datas: bytes) -> list[ApplyResult]:
        st = self.states.setdefault(g, DictState())
        return [st.apply(d) for d in datas]

    def image(self, g: int) -> Image:
        st = self.states.setdefault(g, DictState())
        return Image(dict(st.data), dict(st.floors), dict(st.sessions), st.shard_state)


def run_lmdb(store: NodeStore, g: int, datas: list[bytes]) -> list[ApplyResult]:
    """Append `datas` as NORMAL entries and apply everything up to them, in one persist_and_apply."""
    ls = store.log_storage(g)
    last = ls.last_index()
    applied = store.applied_index(g)
    new = [Entry(1, last + 1 + i, EntryType.NORMAL, d, g) for i, d in enumerate(datas)]
    pending = ls.entries(applied + 1, last + 1) if last > applied else []
    res = store.persist_and_apply([GroupWrite(g, new)], [ApplyBatch(g, pending + new, CONF1)])[0]
    out = res[len(pending) :]
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def lmdb_image(store: NodeStore, g: int) -> Image:
    """The group's state as its snapshot stream carries it (data, sessions, shard state)."""
    _, chunks = store.snapshot_chunks(g)
    dec = SnapshotDecoder()
    recs = [r for c in chunks for r in dec.feed(c)]
    dec.finish()
    img = Image({}, {}, {}, None)
    for tag, k, v in recs:
        if tag == TAG_DATA:
            img.data[k] = v
        elif tag == TAG_SESSION and len(k) == 8:
            img.floors[int.from_bytes(k, "big")] = SessionHead.decode(v).floor
        elif tag == TAG_SESSION and len(k) == 16:
            img.results[(int.from_bytes(k[:8], "big"), int.from_bytes(k[8:], "big"))] = v
        elif tag == TAG_SHARDS:
            img.shards = ShardState.decode(v)
    assert img.shards == store.shard_state(g)  # the published state is the durable one
    return img


class LmdbBackend:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = NodeStore(path, sync=False)

    def run(self, g: int, *datas: bytes) -> list[ApplyResult]:
        return run_lmdb(self.store, g, list(datas))

    def image(self, g: int) -> Image:
        return lmdb_image(self.store, g)

    def reopen(self) -> None:
        self.store.close()
        self.store = NodeStore(self.path, sync=False)


@pytest.fixture(params=["dict", "lmdb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "dict":
        yield DictBackend()
        return
    b = LmdbBackend(tmp_path / "n")
    yield b
    b.store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path / "n1", sync=False)
    yield s
    s.close()


def refused(r: ApplyResult) -> bool:
    return r.wrong_shard and r.error is not None and not (r.swapped or r.found or r.existed)


# =================================================================================================
# Bootstrap
# =================================================================================================
def test_bootstrap_with_initial_ranges(tmp_path: Path) -> None:
    ranges = IntervalSet([(0, 99), (1 << 63, HASH_MAX)])
    s = NodeStore(tmp_path / "a", sync=False)
    assert s.bootstrap(4, CONF1, [sc(ShardOp.SET, ranges)])
    assert not s.bootstrap(4, CONF1, [sc(ShardOp.SET, FULL)])
    assert s.shard_state(4) is None  # nothing applied yet
    ls = s.log_storage(4)
    assert (ls.last_index(), s.hard_state(4)) == (2, HardState(1, 0, 2))
    # Every initial member computes the same log from the same arguments.
    other = NodeStore(tmp_path / "b", sync=False)
    other.bootstrap(4, CONF1, [sc(ShardOp.SET, ranges)])
    assert other.log_storage(4).entries(1, 3) == ls.entries(1, 3)
    other.close()
    res = s.apply([ApplyBatch(4, ls.entries(1, 3), CONF1)])[0]
    assert res == [None, OK]
    assert s.shard_state(4) == ShardState(ranges, EMPTY)
    s.close()
    s = NodeStore(tmp_path / "a", sync=False)
    assert s.shard_state(4) == ShardState(ranges, EMPTY)
    # A second SET is refused.
    r = run_lmdb(s, 4, [sc(ShardOp.SET, FULL)])[0]
    assert r.error is not None and "already has ranges" in r.error
    assert s.shard_state(4) == ShardState(ranges, EMPTY)
    # A group bootstrapped without shard commands is unsharded: it serves every key.
    assert s.bootstrap(5, CONF1)
    assert run_lmdb(s, 5, [cmds.encode_put(k, b"v") for k in keys_in(FULL, 5)]) == [OK] * 5
    assert s.shard_state(5) is None
    s.close()


def test_set_on_an_empty_sharded_group_is_allowed(backend: Backend) -> None:
    assert backend.run(1, sc(ShardOp.SET, EMPTY)) == [OK]
    assert backend.image(1).shards == ShardState(EMPTY, EMPTY)
    assert refused(backend.run(1, cmds.encode_put(b"x", b"1"))[0])  # serves nothing
    assert backend.run(1, sc(ShardOp.SET, LOW)) == [OK]
    assert backend.image(1).shards == ShardState(LOW, EMPTY)


# =================================================================================================
# Ownership of KV commands
# =================================================================================================
def test_wrong_shard_is_not_applied_not_cached_and_its_retry_applies_after_activate(backend: Backend) -> None:
    b = backend
    assert b.run(1, sc(ShardOp.SET, LOW)) == [OK]
    k_in = keys_in(LOW, 1)[0]
    out = keys_in(HIGH, 3)
    assert b.run(1, cmds.encode_put(k_in, b"v", 7, 1, 0)) == [OK]
    before = b.image(1)
    writes = [
        cmds.encode_put(out[0], b"x", 7, 2, 2),
        cmds.encode_delete(out[1], 7, 3, 3),
        cmds.encode_cas(out[2], True, b"", b"c", 7, 4, 4),
    ]
    anon = [cmds.encode_put(out[0], b"x"), cmds.encode_delete(out[1]), cmds.encode_cas(out[2], True, b"", b"c")]
    for r in b.run(1, *writes, *anon):
        assert refused(r), r
    after = b.image(1)
    assert after == before  # no data, no floor raised by the ack, no cached result
    assert after.floors.get(7, 0) == 0 and set(after.results) == {(7, 1)}
    # The range becomes served: the very same requests are applied, once.
    assert b.run(1, sc(ShardOp.BEGIN, HIGH), sc(ShardOp.ACTIVATE, HIGH)) == [OK, OK]
    assert b.run(1, *writes) == [OK, ApplyResult(existed=False), ApplyResult(swapped=True)]
    img = b.image(1)
    assert img.data == {k_in: b"v", out[0]: b"x", out[2]: b"c"}
    assert img.floors == {7: 4} and set(img.results) == {(7, 4)}
    assert b.run(1, writes[2]) == [ApplyResult(swapped=True)]  # cached
    assert b.image(1) == img


def test_cached_result_is_returned_after_the_range_froze(backend: Backend) -> None:
    b = backend
    assert b.run(1, sc(ShardOp.SET, FULL)) == [OK]
    k = keys_in(Q[1], 1)[0]
    write = cmds.encode_cas(k, True, b"", b"v1", 7, 5, 4)
    assert b.run(1, write) == [ApplyResult(swapped=True)]
    assert b.run(1, sc(ShardOp.FREEZE, Q[1])) == [OK]
    before = b.image(1)
    assert before.shards == ShardState(FULL.difference(Q[1]), Q[1])
    r = b.run(
        1,
        write,  # the retry: its cached result, not WRONG_SHARD
        cmds.encode_put(k, b"v2", 7, 6, 5),  # a new write of a frozen key
        cmds.encode_delete(k),
        cmds.encode_cas(k, False, b"v1", b"v3", 8, 1, 1),
        cmds.encode_put(k, b"v2", 7, 3, 3),  # below the floor: stale, whatever the ownership
    )
    assert r[0] == ApplyResult(swapped=True)
    assert refused(r[1]) and refused(r[2]) and refused(r[3])
    assert r[4].error == STALE_REQUEST and not r[4].wrong_shard
    assert b.image(1) == before  # frozen data is immutable, refusals recorded nothing


# =================================================================================================
# FREEZE / BEGIN / INSTALL / ACTIVATE / DROP
# =================================================================================================
def test_freeze_rules(backend: Backend) -> None:
    b = backend
    b.run(1, sc(ShardOp.SET, LOW))
    b.run(1, *(cmds.encode_put(k, b"v") for k in keys_in(LOW, 20)))
    start = b.image(1)
    for bad in (Q[2], Q[1].union(Q[2]), FULL):
        r = b.run(1, sc(ShardOp.FREEZE, bad))[0]
        assert r.error is not None and "does not serve" in r.error
        assert b.image(1) == start
    assert b.run(1, sc(ShardOp.FREEZE, Q[1])) == [OK]
    img = b.image(1)
    assert img.shards == ShardState(Q[0], Q[1]) and img.data == start.data
    for again in (Q[1], IntervalSet([(Q[1].intervals[0][0] + 5, Q[1].intervals[0][0] + 9)]), EMPTY):
        assert b.run(1, sc(ShardOp.FREEZE, again)) == [OK]  # idempotent
        assert b.image(1) == img
    r = b.run(1, sc(ShardOp.FREEZE, Q[1].union(Q[2])))[0]  # partly frozen, partly unowned
    assert r.error is not None and b.image(1) == img
    assert b.run(1, sc(ShardOp.FREEZE, LOW)) == [OK]  # partly frozen, partly active
    assert b.image(1).shards == ShardState(EMPTY, LOW) and b.image(1).data == start.data
    # An unsharded group serves everything: it can freeze any range.
    ks = keys_in(FULL, 30, b"u")
    b.run(2, *(cmds.encode_put(k, b"u") for k in ks))
    assert b.run(2, sc(ShardOp.FREEZE, Q[3])) == [OK]
    assert b.image(2).shards == ShardState(FULL.difference(Q[3]), Q[3])
    res = b.run(2, *(cmds.encode_put(k, b"w") for k in ks))
    assert [refused(r) for r in res] == [key_hash(k) in Q[3] for k in ks]


def test_begin_rules(backend: Backend) -> None:
    b = backend
    lows, highs = keys_in(LOW, 15, b"l"), keys_in(HIGH, 30, b"h")
    b.run(1, *(cmds.encode_put(k, b"v") for k in lows + highs))  # unsharded: everything served
    assert b.run(1, sc(ShardOp.SET, LOW)) == [OK]  # SET does not delete: leftovers in HIGH stay
    start = b.image(1)
    assert set(start.data) == set(lows + highs)
    for served in (LOW, Q[0], EMPTY):
        assert b.run(1, sc(ShardOp.BEGIN, served)) == [ApplyResult(existed=True)]
        assert b.image(1) == start
    r = b.run(1, sc(ShardOp.BEGIN, Q[1].union(Q[2])))[0]  # partly served
    assert r.error is not None and not r.existed and b.image(1) == start
    # BEGIN deletes leftover data in exactly the ranges.
    assert b.run(1, sc(ShardOp.BEGIN, Q[2])) == [OK]
    img = b.image(1)
    assert set(img.data) == set(lows) | {k for k in highs if key_hash(k) in Q[3]}
    assert img.shards == ShardState(LOW, EMPTY, Q[2], 0)
    assert b.run(1, sc(ShardOp.BEGIN, Q[2])) == [OK] and b.image(1) == img  # idempotent
    # Ranges overlapping frozen ones cannot be received.
    assert b.run(1, sc(ShardOp.FREEZE, Q[0])) == [OK]
    frozen = b.image(1)
    for bad in (Q[0], Q[0].union(Q[3])):
        r = b.run(1, sc(ShardOp.BEGIN, bad))[0]
        assert r.error is not None and "overlap" in r.error and b.image(1) == frozen


def test_install_activate_drop_move_a_range(backend: Backend) -> None:
    """A move of Q1 from group 1 to group 2, step by step, with every idempotent repetition."""
    b = backend
    b.run(1, sc(ShardOp.SET, LOW))
    b.run(2, sc(ShardOp.SET, HIGH))
    k1 = keys_in(LOW, 40, b"a")
    k2 = keys_in(HIGH, 10, b"b")
    b.run(1, *(cmds.encode_put(k, b"one-" + k) for k in k1))
    b.run(2, *(cmds.encode_put(k, b"two-" + k) for k in k2))
    assert b.run(1, sc(ShardOp.FREEZE, Q[1])) == [OK]
    src = b.image(1)
    moving = src.in_ranges(Q[1])
    assert moving and len(moving) < len(k1)
    records = b"".join(encode_record(REC_DATA, k, v) for k, v in sorted(moving.items()))
    assert b.run(2, sc(ShardOp.BEGIN, Q[1])) == [OK]
    before_install = b.image(2)
    assert before_install.shards == ShardState(HIGH, EMPTY, Q[1], 0)
    assert b.run(2, sc(ShardOp.INSTALL, records=records)) == [OK]
    installed = b.image(2)
    assert installed.data == {**before_install.data, **moving}
    assert b.run(2, sc(ShardOp.INSTALL, records=records)) == [OK] and b.image(2) == installed
    # Installed but not active: not served yet.
    some = next(iter(moving))
    assert refused(b.run(2, cmds.encode_put(some, b"early"))[0])
    assert b.run(2, sc(ShardOp.ACTIVATE, Q[1])) == [OK]
    active = b.image(2)
    assert active.shards == ShardState(HIGH.union(Q[1]), EMPTY) and active.data == installed.data
    assert b.run(2, sc(ShardOp.ACTIVATE, Q[1])) == [OK] and b.image(2) == active
    assert b.run(2, sc(ShardOp.ACTIVATE, EMPTY)) == [OK] and b.image(2) == active
    assert b.run(2, cmds.encode_cas(some, False, moving[some], b"moved")) == [
        ApplyResult(swapped=True, found=True)
    ]
    # The source: frozen ranges cannot be activated again; served ranges cannot be dropped.
    r = b.run(1, sc(ShardOp.ACTIVATE, Q[1]))[0]
    assert r.error is not None and "froze" in r.error
    for bad in (Q[0], LOW, FULL):
        r = b.run(1, sc(ShardOp.DROP, bad))[0]
        assert r.error is not None and "serves" in r.error
    assert b.image(1) == src
    assert b.run(1, sc(ShardOp.DROP, Q[1])) == [OK]
    dropped = b.image(1)
    assert dropped.shards == ShardState(Q[0], EMPTY)
    assert dropped.data == src.in_ranges(Q[0])
    assert b.run(1, sc(ShardOp.DROP, Q[1])) == [OK] and b.image(1) == dropped  # idempotent
    # And back: group 2 freezes Q1, group 1 receives it again.
    assert b.run(2, sc(ShardOp.FREEZE, Q[1])) == [OK]
    back = b.image(2).in_ranges(Q[1])
    recs = b"".join(encode_record(REC_DATA, k, v) for k, v in back.items())
    assert b.run(1, sc(ShardOp.BEGIN, Q[1]), sc(ShardOp.INSTALL, records=recs), sc(ShardOp.ACTIVATE, Q[1])) == [
        OK
    ] * 3
    assert b.image(1).data == {**src.in_ranges(Q[0]), **back}
    assert b.image(1).shards == ShardState(LOW, EMPTY)


def test_install_merges_sessions(backend: Backend) -> None:
    b = backend
    b.run(2, sc(ShardOp.SET, HIGH))
    kh = keys_in(HIGH, 3)
    own = b.run(
        2,
        cmds.encode_put(kh[0], b"a", 5, 4, 4),  # client 5: floor 4, results 4 and 5
        cmds.encode_put(kh[1], b"b", 5, 5, 4),
        cmds.encode_put(kh[2], b"c", 6, 10, 10),  # client 6: floor 10, result 10
    )
    assert own == [OK] * 3
    start = b.image(2)
    assert start.floors == {5: 4, 6: 10}
    r7 = ApplyResult(swapped=True, found=True)
    r12 = ApplyResult(existed=True)
    r8 = ApplyResult(found=True, current=b"cur")
    recs = b"".join(
        [
            floor_rec(5, 2),  # lower than ours: ours stays
            result_rec(5, 3, r7),  # below our floor: skipped
            result_rec(5, 5, r7),  # we have seq 5 already: ours stays
            result_rec(5, 7, r7),  # new: added
            floor_rec(6, 12),  # higher: raised, our results below it forgotten
            result_rec(6, 11, r7),  # below the new floor: skipped
            result_rec(6, 12, r12),
            floor_rec(8, 3),  # a client we did not know
            result_rec(8, 2, r7),
            result_rec(8, 3, r8),
        ]
    )
    assert b.run(2, sc(ShardOp.INSTALL, records=recs)) == [OK]
    img = b.image(2)
    assert img.data == start.data
    assert img.floors == {5: 4, 6: 12, 8: 3}
    assert img.results == {
        (5, 4): start.results[(5, 4)],
        (5, 5): start.results[(5, 5)],
        (5, 7): cmds.encode_result(r7),
        (6, 12): cmds.encode_result(r12),
        (8, 3): cmds.encode_result(r8),
    }
    assert b.run(2, sc(ShardOp.INSTALL, records=recs)) == [OK] and b.image(2) == img  # idempotent
    # The merged table answers retries.
    res = b.run(
        2,
        cmds.encode_put(kh[0], b"zz", 5, 7, 4),
        cmds.encode_put(kh[0], b"zz", 8, 3, 3),
        cmds.encode_put(kh[0], b"zz", 6, 11, 11),
    )
    assert res[0] == r7 and res[1] == r8 and res[2].error == STALE_REQUEST
    assert b.image(2) == img


def test_refused_install_changes_nothing(backend: Backend) -> None:
    """INSTALL of a row whose key the group serves is refused, and a refusal changes nothing:
    rows before the offending one must not stay applied."""
    b = backend
    b.run(2, sc(ShardOp.SET, HIGH))
    served = keys_in(HIGH, 1)[0]
    b.run(2, cmds.encode_put(served, b"mine"), sc(ShardOp.BEGIN, Q[1]))
    before = b.image(2)
    fresh = keys_in(Q[1], 1)[0]
    recs = encode_record(REC_DATA, fresh, b"new") + floor_rec(9, 5) + encode_record(REC_DATA, served, b"theirs")
    r = b.run(2, sc(ShardOp.INSTALL, records=recs))[0]
    assert r.error is not None and "served key" in r.error
    assert b.image(2) == before


def test_install_into_a_frozen_range_is_refused(backend: Backend) -> None:
    """A frozen range's data is immutable until DROP (shardcmd's invariant): INSTALL must not
    write into it."""
    b = backend
    b.run(1, sc(ShardOp.SET, LOW))
    k = keys_in(Q[1], 1)[0]
    b.run(1, cmds.encode_put(k, b"orig"), sc(ShardOp.FREEZE, Q[1]))
    before = b.image(1)
    r = b.run(1, sc(ShardOp.INSTALL, records=encode_record(REC_DATA, k, b"overwritten")))[0]
    assert r.error is not None
    assert b.image(1) == before


@pytest.mark.parametrize("op", [ShardOp.BEGIN, ShardOp.ACTIVATE, ShardOp.DROP])
def test_unsharded_group_keeps_serving_every_key_after_range_commands(backend: Backend, op: ShardOp) -> None:
    """A group without shard state (the metadata group) serves every key, so Q1 is already active
    there: BEGIN/ACTIVATE of it must not shrink what the group serves, and DROP of a served range is
    refused. Either way its data stays (a misdirected command must not wipe the metadata group)."""
    b = backend
    ks = keys_in(FULL, 40, b"m")
    b.run(0, *(cmds.encode_put(k, b"v") for k in ks))
    before = b.image(0)
    assert before.shards is None
    b.run(0, sc(op, Q[1]))
    after = b.image(0)
    assert after.data == before.data
    res = b.run(0, *(cmds.encode_put(k, b"w") for k in ks))
    assert not any(r.wrong_shard for r in res), (op.name, after.shards)


# =================================================================================================
# Malformed shard commands
# =================================================================================================
HEAD_INSTALL = bytes([SHARD_MAGIC, ShardOp.INSTALL])
MALFORMED = {
    "magic-only": bytes([SHARD_MAGIC]),
    "op-0": bytes([SHARD_MAGIC, 0]) + LOW.encode(),
    "op-9": bytes([SHARD_MAGIC, 9]) + LOW.encode(),
    "set-truncated": bytes([SHARD_MAGIC, ShardOp.SET]) + LOW.encode()[:-1],
    "set-no-ranges": bytes([SHARD_MAGIC, ShardOp.SET]),
    "freeze-trailing": bytes([SHARD_MAGIC, ShardOp.FREEZE]) + Q[0].encode() + b"x",
    "activate-lo-gt-hi": bytes([SHARD_MAGIC, ShardOp.ACTIVATE]) + b"\x00\x00\x00\x01" + u64(9) + u64(3),
    "drop-truncated-count": bytes([SHARD_MAGIC, ShardOp.DROP]) + b"\x00\x00",
    "install-header-truncated": HEAD_INSTALL + b"\x01\x00\x00",
    "install-bad-tag": HEAD_INSTALL + encode_record(9, b"k", b"v"),
    "install-tag-0": HEAD_INSTALL + encode_record(0, b"k", b"v"),
    "install-overlong": HEAD_INSTALL + encode_record(REC_DATA, b"k", b"v")[:-1],
    "install-good-then-bad": HEAD_INSTALL + encode_record(REC_DATA, b"new-key", b"v") + b"\x01\xff",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_shard_commands_are_errors_that_change_nothing(backend: Backend, case: str) -> None:
    b = backend
    b.run(1, sc(ShardOp.SET, LOW), sc(ShardOp.FREEZE, Q[1]))
    b.run(1, *(cmds.encode_put(k, b"v", 3, i + 1, i) for i, k in enumerate(keys_in(Q[0], 5))))
    before = b.image(1)
    r = b.run(1, MALFORMED[case])[0]
    assert r.error is not None and "malformed shard command" in r.error, r
    assert not (r.swapped or r.found or r.existed or r.wrong_shard)
    assert b.image(1) == before


MALFORMED_RECORDS = {
    "floor-key-3-bytes": encode_record(REC_FLOOR, b"abc", u64(5)),
    "floor-value-2-bytes": encode_record(REC_FLOOR, u64(5), b"\x00\x07"),
    "result-key-8-bytes": encode_record(REC_RESULT, u64(5), cmds.encode_result(OK)),
    "result-value-not-a-result": encode_record(REC_RESULT, u64(5) + u64(9), b"\x07garbage"),
    "data-key-too-long": encode_record(REC_DATA, keys_in(HIGH, 1, b"x" * cmds.MAX_KEY_SIZE)[0], b"v"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_RECORDS))
def test_install_with_malformed_records_is_an_error_that_changes_nothing(backend: Backend, case: str) -> None:
    """Install records are command bytes from the log: whatever they hold, applying them must give
    an error result (not raise, which would stop the group's apply loop on every replica) and
    change nothing, and later commands must still apply."""
    b = backend
    b.run(1, sc(ShardOp.SET, LOW), sc(ShardOp.BEGIN, HIGH))
    k = keys_in(LOW, 1)[0]
    b.run(1, cmds.encode_put(k, b"v", 5, 1, 1))
    before = b.image(1)
    good = encode_record(REC_DATA, keys_in(HIGH, 1)[0], b"v")
    r = b.run(1, sc(ShardOp.INSTALL, records=good + MALFORMED_RECORDS[case]))[0]
    assert r.error is not None, r
    assert b.image(1) == before
    # The group goes on applying, including a retry of the (client, seq) a bad row named.
    assert b.run(1, cmds.encode_put(k, b"w", 5, 9, 2), cmds.encode_put(k, b"w2", 5, 9, 2)) == [OK, OK]
    assert b.image(1).data[k] == b"w"


# =================================================================================================
# DictState and LMDB agree
# =================================================================================================
def _random_ranges(rng: random.Random) -> IntervalSet:
    if rng.random() < 0.5:
        return IntervalSet(q for qs in rng.sample(Q, rng.randint(1, 3)) for q in qs)
    pts = sorted(rng.randrange(U64) for _ in range(2 * rng.randint(1, 3)))
    return IntervalSet(zip(pts[::2], pts[1::2], strict=True))


def test_dict_state_and_lmdb_agree_on_shard_commands(tmp_path: Path) -> None:
    rng = random.Random(11)
    d, lm = DictBackend(), LmdbBackend(tmp_path / "n")
    keys = [b"key%d" % i for i in range(60)]
    seqs = {1: 0, 2: 0}
    ops = [ShardOp.FREEZE, ShardOp.BEGIN, ShardOp.ACTIVATE, ShardOp.DROP, ShardOp.INSTALL]
    first = [sc(ShardOp.SET, _random_ranges(rng))]
    kinds: dict[str, int] = {}
    for step in range(80):
        batch = first if step == 0 else []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.3:
                op = rng.choice(ops)
                if op == ShardOp.INSTALL:
                    recs = [
                        encode_record(REC_DATA, rng.choice(keys), b"i%d" % rng.randint(0, 9))
                        for _ in range(rng.randint(0, 4))
                    ]
                    c = rng.choice((1, 2, 3))
                    recs.append(floor_rec(c, rng.randint(0, 20)))
                    recs.append(result_rec(c, rng.randint(0, 25), ApplyResult(existed=True)))
                    batch.append(sc(op, records=b"".join(recs)))
                else:
                    batch.append(sc(op, _random_ranges(rng)))
                continue
            key = rng.choice(keys)
            cid = rng.choice((0, 1, 2))
            seq = ack = 0
            if cid:
                seqs[cid] += 1
                seq = seqs[cid]
                ack = rng.randint(max(seq - 3, 0), seq)
            if rng.random() < 0.5:
                batch.append(cmds.encode_put(key, b"%d" % step, cid, seq, ack))
            elif rng.random() < 0.5:
                batch.append(cmds.encode_delete(key, cid, seq, ack))
            else:
                batch.append(cmds.encode_cas(key, False, b"%d" % rng.randint(0, step), b"c", cid, seq, ack))
        got, want = lm.run(1, *batch), d.run(1, *batch)
        assert got == want, step
        for r in want:
            kind = "wrong_shard" if r.wrong_shard else "error" if r.error else "ok"
            kinds[kind] = kinds.get(kind, 0) + 1
        if step % 10 == 9:
            assert lm.image(1) == d.image(1), step
    assert lm.image(1) == d.image(1)
    print(f"\nshard differential: {kinds}")
    assert all(kinds.get(k, 0) > 10 for k in ("ok", "wrong_shard", "error")), kinds
    lm.reopen()
    assert lm.image(1) == d.image(1)
    lm.store.close()


# =================================================================================================
# LMDB: export / install, scans with ownership, snapshots, tombstones
# =================================================================================================
def test_export_install_round_trip(tmp_path: Path) -> None:
    a = NodeStore(tmp_path / "a", sync=False)
    b = NodeStore(tmp_path / "b", sync=False)
    moving = Q[1].union(IntervalSet([(3 << 62, (3 << 62) + (1 << 58))]))
    n = 3000
    keys = [b"user%05d" % i for i in range(n)]
    in_r = [k for k in keys if key_hash(k) in moving]
    assert 700 < len(in_r) < 1000
    # Group 1 on node a: everything, written by client 11 (ack trailing), client 12 (no acks), anonymous.
    run_lmdb(a, 1, [sc(ShardOp.SET, FULL)])
    batch = []
    for i, k in enumerate(keys):
        if i % 3 == 0:
            batch.append(cmds.encode_put(k, b"v%d" % i, 11, i + 1, max(i - 1, 0)))
        elif i % 3 == 1 and i < 30:
            batch.append(cmds.encode_put(k, b"v%d" % i, 12, i, 0))
        else:
            batch.append(cmds.encode_put(k, b"v%d" % i))
    for lo in range(0, n, 500):
        run_lmdb(a, 1, batch[lo : lo + 500])
    # Client 11's last write, to a moving key, is a CAS whose result is cached.
    last = in_r[-1]
    assert run_lmdb(a, 1, [cmds.encode_cas(last, False, a.get(1, last) or b"", b"cas", 11, n + 1, n)]) == [
        ApplyResult(swapped=True, found=True)
    ]
    # Group 2 on node b: serves Q0 only, with its own keys and sessions.
    run_lmdb(b, 2, [sc(ShardOp.SET, Q[0])])
    bkeys = keys_in(Q[0], 20, b"b-own")
    run_lmdb(b, 2, [cmds.encode_put(k, b"b", 12, 100 + i, 100 + i) for i, k in enumerate(bkeys)])
    run_lmdb(b, 2, [cmds.encode_put(bkeys[0], b"b", 13, 5, 5)])
    # Export needs the ranges frozen.
    with pytest.raises(StorageError, match="not frozen"):
        a.export_range(1, moving)
    with pytest.raises(StorageError, match="not frozen"):
        b.export_range(3, moving)  # a group without shard state
    assert run_lmdb(a, 1, [sc(ShardOp.FREEZE, moving)]) == [OK]
    with pytest.raises(StorageError, match="not frozen"):
        a.export_range(1, moving.union(Q[0]))
    src = lmdb_image(a, 1)
    b_before = lmdb_image(b, 2)
    chunks = list(a.export_range(1, moving, chunk_bytes=4 << 10))
    assert len(chunks) > 3
    assert sum(c for _, c in chunks) == len(in_r)
    seen: dict[bytes, bytes] = {}
    for data, count in chunks:
        rows = [(k, v) for tag, k, v in iter_records(data) if tag == REC_DATA]
        assert len(rows) == count
        seen.update(rows)
    assert seen == src.in_ranges(moving)
    # Receive: BEGIN, INSTALL every chunk (twice: idempotent), ACTIVATE.
    assert run_lmdb(b, 2, [sc(ShardOp.BEGIN, moving)]) == [OK]
    assert run_lmdb(b, 2, [sc(ShardOp.INSTALL, records=c) for c, _ in chunks]) == [OK] * len(chunks)
    once = lmdb_image(b, 2)
    assert run_lmdb(b, 2, [sc(ShardOp.INSTALL, records=c) for c, _ in chunks]) == [OK] * len(chunks)
    assert lmdb_image(b, 2) == once
    assert run_lmdb(b, 2, [sc(ShardOp.ACTIVATE, moving)]) == [OK]
    got = lmdb_image(b, 2)
    assert got.shards == ShardState(Q[0].union(moving), EMPTY)
    assert got.in_ranges(moving) == src.in_ranges(moving)
    assert got.in_ranges(Q[0]) == b_before.in_ranges(Q[0])
    assert len(got.data) == len(in_r) + len(b_before.data)
    floors = {c: max(src.floors.get(c, 0), b_before.floors.get(c, 0)) for c in {*src.floors, *b_before.floors}}
    assert got.floors == floors and floors[11] == n and floors[12] == 119 and floors[13] == 5
    results = {k: v for k, v in src.results.items() if k[1] >= floors[k[0]]}
    results.update({k: v for k, v in b_before.results.items() if k[1] >= floors[k[0]]})
    assert got.results == results and (11, n + 1) in results
    # A retry at the new owner of a write applied at the old one: its cached result, applied once.
    assert run_lmdb(b, 2, [cmds.encode_cas(last, False, b"x", b"again", 11, n + 1, n)]) == [
        ApplyResult(swapped=True, found=True)
    ]
    assert b.get(2, last) == b"cas"
    # The source drops the moved data and keeps the rest.
    assert run_lmdb(a, 1, [sc(ShardOp.DROP, moving)]) == [OK]
    after = lmdb_image(a, 1)
    assert after.in_ranges(moving) == {} and after.data == src.in_ranges(FULL.difference(moving))
    assert after.shards == ShardState(FULL.difference(moving), EMPTY)
    assert after.floors == src.floors and after.results == src.results
    with pytest.raises(StorageError, match="not frozen"):
        a.export_range(1, moving)
    a.close()
    b.close()


def test_scan_chunks_with_ownership(store: NodeStore) -> None:
    keys = [b"s%04d" % i for i in range(600)]
    run_lmdb(store, 1, [cmds.encode_put(k, b"v" + k) for k in keys])
    owned = Q[1].union(IntervalSet([(3 << 62, (3 << 62) + (1 << 61))]))
    want = [(k, b"v" + k) for k in sorted(keys) if key_hash(k) in owned]
    assert 100 < len(want) < 300

    def scan(start: bytes, end: bytes | None, limit: int, owned: IntervalSet | None, items: int = 7) -> list[Any]:
        chunks = list(store.scan_chunks(1, start, end, limit, chunk_items=items, owned=owned))
        assert all(0 < len(c) <= items for c in chunks)
        return [kv for c in chunks for kv in c]

    assert scan(b"", None, 0, owned) == want
    assert scan(b"", None, 5, owned) == want[:5]
    assert scan(b"", None, len(want) + 10, owned) == want
    assert scan(b"s0100", b"s0300", 0, owned) == [kv for kv in want if b"s0100" <= kv[0] < b"s0300"]
    assert scan(b"s0100", b"s0300", 3, owned, items=2) == [kv for kv in want if b"s0100" <= kv[0] < b"s0300"][:3]
    assert scan(b"", None, 0, EMPTY) == []
    assert scan(b"", None, 0, FULL) == scan(b"", None, 0, None) == [(k, b"v" + k) for k in keys]
    # Chunks also end at chunk_bytes.
    sized = list(store.scan_chunks(1, b"", None, 0, chunk_items=1000, chunk_bytes=100, owned=owned))
    assert [kv for c in sized for kv in c] == want and len(sized) > 10


def test_snapshot_carries_the_shard_state(tmp_path: Path) -> None:
    n1 = NodeStore(tmp_path / "n1", sync=False, snapshot_chunk_size=1024)
    n2 = NodeStore(tmp_path / "n2", sync=False)
    run_lmdb(n1, 1, [sc(ShardOp.SET, LOW)])
    run_lmdb(n1, 1, [cmds.encode_put(k, b"v", 4, i + 1, i) for i, k in enumerate(keys_in(LOW, 50))])
    run_lmdb(n1, 1, [sc(ShardOp.FREEZE, Q[1])])
    want = ShardState(Q[0], Q[1])
    assert n1.shard_state(1) == want
    # Node 2 has stale state of group 1, with other ranges.
    run_lmdb(n2, 1, [sc(ShardOp.SET, HIGH), cmds.encode_put(keys_in(HIGH, 1)[0], b"stale")])

    def transfer(src: NodeStore, dst: NodeStore, g: int) -> None:
        meta, chunks = src.snapshot_chunks(g)
        path = dst.receive_snapshot(g, chunks)
        dst.persist([GroupWrite(g, [], HardState(meta.term, 0, meta.index), meta, path)])

    transfer(n1, n2, 1)
    assert n2.shard_state(1) == want
    assert lmdb_image(n2, 1) == lmdb_image(n1, 1)
    n2.close()
    n2 = NodeStore(tmp_path / "n2", sync=False)
    assert n2.shard_state(1) == want
    assert lmdb_image(n2, 1) == lmdb_image(n1, 1)
    k0, k1, k2 = keys_in(Q[0], 1)[0], keys_in(Q[1], 1)[0], keys_in(HIGH, 1)[0]
    res = run_lmdb(n2, 1, [cmds.encode_put(k, b"new") for k in (k0, k1, k2)])
    assert res[0] == OK and refused(res[1]) and refused(res[2])
    # A snapshot of an unsharded group replaces a sharded one: the shard state goes away.
    run_lmdb(n1, 3, [cmds.encode_put(b"plain%d" % i, b"1") for i in range(3)])  # newer than n2's
    run_lmdb(n2, 3, [sc(ShardOp.SET, Q[2])])
    transfer(n1, n2, 3)
    assert n2.shard_state(3) is None and lmdb_image(n2, 3) == lmdb_image(n1, 3)
    n2.close()
    n2 = NodeStore(tmp_path / "n2", sync=False)
    assert n2.shard_state(3) is None and n2.shard_state(1) == want
    assert run_lmdb(n2, 3, [cmds.encode_put(k2, b"x")]) == [OK]
    n1.close()
    n2.close()


def test_destroy_group_with_tombstone(tmp_path: Path) -> None:
    path = tmp_path / "n"
    s = NodeStore(path, sync=False)
    for g in (1, 2, 3):
        assert s.bootstrap(g, CONF1, [sc(ShardOp.SET, Q[g])])
        run_lmdb(s, g, [cmds.encode_put(k, b"v", 7, i + 1, i) for i, k in enumerate(keys_in(Q[g], 10))])
    keep = lmdb_image(s, 3), s.applied_index(3)
    s.destroy_group(1, tombstone=True)
    s.destroy_group(2)  # no tombstone: may come back
    assert s.tombstones() == {1}
    assert s.groups() == [3]
    assert s.shard_state(1) is None and s.applied_index(1) == 0 and s.count_keys(1) == 0
    assert not s.bootstrap(1, CONF1, [sc(ShardOp.SET, Q[1])])
    assert s.groups() == [3] and s.log_storage(1).last_index() == 0
    s.close()
    s = NodeStore(path, sync=False)
    assert s.tombstones() == {1} and s.groups() == [3]
    assert s.shard_state(1) is None and s.applied_index(1) == 0 and s.count_keys(1) == 0
    assert s.scan(1, b"", None, 0) == [] and s.log_storage(1).last_index() == 0
    assert not s.bootstrap(1, CONF1, [sc(ShardOp.SET, Q[1])])
    assert (lmdb_image(s, 3), s.applied_index(3)) == keep
    # Group 2 had no tombstone: it can be created again, from scratch.
    assert s.bootstrap(2, CONF1, [sc(ShardOp.SET, Q[2])])
    run_lmdb(s, 2, [])
    assert s.shard_state(2) == ShardState(Q[2], EMPTY) and s.count_keys(2) == 0
    # Destroying twice, or a group that never existed, is harmless; tombstones accumulate.
    s.destroy_group(1, tombstone=True)
    s.destroy_group(9, tombstone=True)
    assert s.tombstones() == {1, 9} and s.groups() == [2, 3]
    s.close()


def test_racing_installations_never_activate_wiped_data(backend: Backend) -> None:
    """Two coordinators (an old metadata leader that has not noticed yet, and the new one) both
    install the same range: the later BEGIN supersedes the earlier installation, whose INSTALL and
    ACTIVATE are then refused, so no ACTIVATE ever serves data another BEGIN wiped."""
    b = backend
    b.run(2, sc(ShardOp.SET, LOW))
    key = keys_in(Q[2], 1)[0]
    rows = encode_record(REC_DATA, key, b"v1")

    def tok(op: ShardOp, token: int, ranges: IntervalSet | None = None, records: bytes = b"") -> bytes:
        return encode_shard_command(op, ranges, records, token=token)

    assert b.run(2, tok(ShardOp.BEGIN, 11, Q[2]), tok(ShardOp.INSTALL, 11, records=rows)) == [OK, OK]
    # The second coordinator begins: the first one's rows are wiped...
    assert b.run(2, tok(ShardOp.BEGIN, 22, Q[2])) == [OK]
    assert b.image(2).data == {}
    # ...and the first coordinator can neither install more nor activate what is left.
    late = b.run(2, tok(ShardOp.INSTALL, 11, records=rows), tok(ShardOp.ACTIVATE, 11, Q[2]))
    assert all(r.error is not None for r in late)
    assert b.image(2).shards is not None and not b.image(2).shards.active.overlaps(Q[2])
    # The second one finishes normally; a late duplicate ACTIVATE of either is harmless.
    assert b.run(2, tok(ShardOp.INSTALL, 22, records=rows), tok(ShardOp.ACTIVATE, 22, Q[2])) == [OK, OK]
    assert b.run(2, tok(ShardOp.ACTIVATE, 11, Q[2]), tok(ShardOp.ACTIVATE, 22, Q[2])) == [OK, OK]
    img = b.image(2)
    assert img.data == {key: b"v1"} and img.shards is not None and Q[2].issubset(img.shards.active)
    # Installing into a range that is served now is refused (a straggler's BEGIN reports existed).
    assert b.run(2, tok(ShardOp.BEGIN, 33, Q[2]))[0].existed
    assert b.run(2, tok(ShardOp.INSTALL, 22, records=encode_record(REC_DATA, key, b"old")))[0].error is not None
    assert b.image(2).data == {key: b"v1"}


def test_commands_of_an_older_move_are_refused(backend: Backend) -> None:
    """Shard commands are fenced by move id: once a group accepted a command of move N, a late
    command of an older move (a paused coordinator resuming, a retry reaching the leader late)
    is refused and changes nothing; DROP never touches a range being installed."""
    b = backend
    b.run(1, sc(ShardOp.SET, LOW))

    def mv(op: ShardOp, move: int, ranges: IntervalSet, token: int = 0) -> bytes:
        return encode_shard_command(op, ranges, token=token, move=move)

    assert b.run(1, mv(ShardOp.FREEZE, 3, Q[0]), mv(ShardOp.DROP, 3, Q[0])) == [OK, OK]
    # Move 5 brings Q[0] back: BEGIN under a token, then a late DROP of move 3 arrives.
    assert b.run(1, mv(ShardOp.BEGIN, 5, Q[0], token=9)) == [OK]
    before = b.image(1)
    late = b.run(1, mv(ShardOp.DROP, 3, Q[0]), mv(ShardOp.FREEZE, 3, Q[1]))
    assert all(r.error is not None and "stale" in r.error for r in late)
    assert b.image(1) == before
    # A DROP of the current move is refused too while the range is being installed.
    assert b.run(1, mv(ShardOp.DROP, 5, Q[0]))[0].error is not None
    assert b.run(1, mv(ShardOp.ACTIVATE, 5, Q[0], token=9)) == [OK]
    st = b.image(1).shards
    assert st is not None and st.move == 5 and LOW.issubset(st.active)
