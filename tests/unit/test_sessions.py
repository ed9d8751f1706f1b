"""Client sessions expire: the cap per group, LRU and idle eviction, the eviction horizon, the
retry rule (SESSION_EXPIRED), old 8-byte head rows, snapshots and range installs. Every rule runs
on both `machine.DictState` and the LMDB store (`NodeStore`), with small limits."""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.node.memstore import MemoryNodeStore
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.storage import commands as cmds
from kvstore.storage.commands import ApplyResult
from kvstore.storage.errors import SnapshotFormatError
from kvstore.storage.kvstate import LmdbGroupView
from kvstore.storage.layout import DB_SESSION_LRU, DB_SESSIONS, SESSION_META_TAG, U64, U64_PAIR, group_prefix
from kvstore.storage.machine import (
    LIMITS,
    SESSION_EXPIRED,
    STALE_REQUEST,
    DictState,
    SessionHead,
    SessionLimits,
    SessionMeta,
    apply_data,
)
from kvstore.storage.shardcmd import REC_FLOOR, REC_RESULT, ShardOp, encode_record, encode_shard_command
from kvstore.storage.snapfile import encode_snapshot
from kvstore.storage.store import ApplyBatch, GroupWrite, NodeStore

CONF = ConfState((1, 2, 3))
G = 1


class Backend(Protocol):
    def run(self, *datas: bytes) -> list[ApplyResult]: ...
    def heads(self) -> dict[int, SessionHead]: ...
    def results(self) -> dict[tuple[int, int], bytes]: ...
    def meta(self) -> SessionMeta: ...
    def lru(self) -> list[tuple[int, int]]: ...
    def data(self, key: bytes) -> bytes | None: ...
    @property
    def index(self) -> int: ...


class DictBackend:
    def __init__(self, limits: SessionLimits) -> None:
        self.st = DictState()
        self.limits = limits

    def run(self, *datas: bytes) -> list[ApplyResult]:
        return [self.st.apply(d, self.limits) for d in datas]

    def heads(self) -> dict[int, SessionHead]:
        return dict(self.st.heads)

    def results(self) -> dict[tuple[int, int], bytes]:
        return dict(self.st.sessions)

    def meta(self) -> SessionMeta:
        return self.st.meta

    def lru(self) -> list[tuple[int, int]]:
        return sorted(self.st.lru)

    def data(self, key: bytes) -> bytes | None:
        return self.st.data.get(key)

    @property
    def index(self) -> int:
        return self.st.index


class LmdbBackend:
    def __init__(self, path: Path, limits: SessionLimits) -> None:
        self.store = NodeStore(path, sync=False)
        self.store._kv.session_limits = limits

    def run(self, *datas: bytes) -> list[ApplyResult]:
        start = self.store.applied_index(G) + 1
        es = [Entry(1, start + i, EntryType.NORMAL, d) for i, d in enumerate(datas)]
        self.store.persist([GroupWrite(G, es)])
        out = self.store.apply([ApplyBatch(G, es, CONF)])[0]
        assert all(r is not None for r in out)
        assert [r.index for r in out if r is not None] == [e.index for e in es]  # the entry's index
        return [r for r in out if r is not None]

    def _rows(self, name: bytes) -> Iterator[tuple[bytes, bytes]]:
        env = self.store._env
        p = group_prefix(G)
        with env.read() as txn:
            for k, v in txn.cursor(db=env.db(name)).iternext():
                if k[:8] == p:
                    yield bytes(k[8:]), bytes(v)

    def heads(self) -> dict[int, SessionHead]:
        return {U64.unpack(k)[0]: SessionHead.decode(v) for k, v in self._rows(DB_SESSIONS) if len(k) == 8}

    def results(self) -> dict[tuple[int, int], bytes]:
        return {U64_PAIR.unpack(k): v for k, v in self._rows(DB_SESSIONS) if len(k) == 16}

    def meta(self) -> SessionMeta:
        return self.store.session_meta(G)

    def lru(self) -> list[tuple[int, int]]:
        return [U64_PAIR.unpack(k) for k, _ in self._rows(DB_SESSION_LRU)]

    def data(self, key: bytes) -> bytes | None:
        return self.store.get(G, key)

    @property
    def index(self) -> int:
        return self.store.applied_index(G)


class MemBackend:
    """The simulator's store (`MemoryNodeStore`), through the same calls as `LmdbBackend`."""

    def __init__(self, limits: SessionLimits) -> None:
        self.store = MemoryNodeStore(session_limits=limits)

    def run(self, *datas: bytes) -> list[ApplyResult]:
        start = self.store.applied_index(G) + 1
        es = [Entry(1, start + i, EntryType.NORMAL, d) for i, d in enumerate(datas)]
        self.store.persist([GroupWrite(G, es)])
        out = self.store.apply([ApplyBatch(G, es, CONF)])[0]
        assert [r.index for r in out if r is not None] == [e.index for e in es]
        return [r for r in out if r is not None]

    def _g(self) -> Any:
        return self.store._groups[G]

    def heads(self) -> dict[int, SessionHead]:
        return dict(self._g().heads)

    def results(self) -> dict[tuple[int, int], bytes]:
        return {(c, q): v for c, d in self._g().results.items() for q, v in d.items()}

    def meta(self) -> SessionMeta:
        return self.store.session_meta(G)

    def lru(self) -> list[tuple[int, int]]:
        return list(self._g().lru)

    def data(self, key: bytes) -> bytes | None:
        return self.store.get(G, key)

    @property
    def index(self) -> int:
        return self.store.applied_index(G)


@pytest.fixture(params=["dict", "lmdb", "mem"])
def make(request: Any, tmp_path: Path) -> Iterator[Any]:
    opened: list[LmdbBackend] = []

    def factory(max_sessions: int = 3, idle_entries: int = 1_000_000, idle_evictions: int = 2) -> Backend:
        limits = SessionLimits(max_sessions, idle_entries, idle_evictions)
        if request.param == "dict":
            return DictBackend(limits)
        if request.param == "mem":
            return MemBackend(limits)
        b = LmdbBackend(tmp_path / f"n{len(opened)}", limits)
        opened.append(b)
        return b

    yield factory
    for b in opened:
        b.store.close()


def consistent(b: Backend) -> None:
    """The LRU index is exactly the head rows' (last, client), the count their number, and every
    cached result belongs to a session that has a head row."""
    heads = b.heads()
    assert b.lru() == sorted((h.last, c) for c, h in heads.items())
    assert b.meta().count == len(heads)
    assert {c for c, _ in b.results()} <= set(heads)


def put(key: bytes, cid: int, seq: int, *, ack: int = 0, retry: bool = False, horizon: int = 0) -> bytes:
    return cmds.encode_put(key, b"v%d" % seq, cid, seq, ack, retry, horizon)


# --- cap and LRU ---------------------------------------------------------------------------------
def test_cap_evicts_least_recently_used(make: Any) -> None:
    b = make(max_sessions=3)
    b.run(put(b"a", 1, 1), put(b"b", 2, 1), put(b"c", 3, 1))  # indexes 1..3
    assert set(b.heads()) == {1, 2, 3} and b.meta() == SessionMeta(3, 0, 0)
    b.run(put(b"a", 1, 2))  # touches client 1 (index 4): client 2 is now the least recent
    b.run(put(b"d", 4, 1))  # index 5: over the cap, client 2 goes
    heads = b.heads()
    assert set(heads) == {1, 3, 4}
    assert heads[1] == SessionHead(0, 4, 1) and heads[4] == SessionHead(0, 5, 5)
    assert b.meta() == SessionMeta(3, 2, 1)  # H = client 2's last (index 2)
    assert (2, 1) not in b.results() and (1, 1) in b.results()
    consistent(b)
    # 50 more one-shot clients: the table stays at the cap, H follows the evictions.
    b.run(*(put(b"x", 100 + i, 1) for i in range(50)))
    assert len(b.heads()) == 3 and b.meta().count == 3 and b.meta().evicted == 51
    assert b.meta().horizon == b.index - 3
    assert len(b.results()) == 3
    consistent(b)


def test_sessionless_and_cached_retries_do_not_touch(make: Any) -> None:
    b = make(max_sessions=2)
    b.run(put(b"a", 1, 1), put(b"b", 2, 1))
    # A duplicate (cached) and a stale request change nothing, not even `last`.
    b.run(put(b"a", 1, 1), cmds.encode_put(b"z", b"0"))
    assert b.heads()[1].last == 1
    b.run(put(b"c", 3, 1))
    assert set(b.heads()) == {2, 3}
    consistent(b)


# --- idle expiry ---------------------------------------------------------------------------------
def test_idle_sessions_expire_a_bounded_number_per_entry(make: Any) -> None:
    b = make(max_sessions=100, idle_entries=5, idle_evictions=1)
    b.run(put(b"a", 1, 1), put(b"b", 2, 1), put(b"c", 3, 1))  # last = 1, 2, 3
    b.run(cmds.encode_put(b"n", b"0"))  # index 4: nobody idle for 5 entries yet
    assert set(b.heads()) == {1, 2, 3}
    b.run(cmds.encode_put(b"n", b"0"), put(b"c", 3, 2))  # index 5: 1+5 > 5; index 6: client 1 idle
    assert set(b.heads()) == {2, 3} and b.meta() == SessionMeta(2, 1, 1)
    b.run(*(cmds.encode_put(b"n", b"0") for _ in range(20)))  # index 7: client 2 goes; 3 at 11
    assert b.heads() == {} and b.meta() == SessionMeta(0, 6, 3)
    consistent(b)
    # With idle_evictions=1 two sessions idle at once take two entries.
    b2 = make(max_sessions=100, idle_entries=2, idle_evictions=1)
    b2.run(put(b"a", 1, 1), put(b"b", 2, 1), cmds.encode_put(b"n", b"0"))  # index 3: 1+2 <= 3
    assert set(b2.heads()) == {2}
    b2.run(cmds.encode_put(b"n", b"0"))
    assert b2.heads() == {}


# --- the retry rule ------------------------------------------------------------------------------
def test_retry_after_eviction_is_refused_not_applied_twice(make: Any) -> None:
    b = make(max_sessions=1)
    (r,) = b.run(cmds.encode_cas(b"k", True, b"", b"first", 7, 1, 1))  # index 1: applied
    assert r == ApplyResult(swapped=True)
    b.run(put(b"k", 8, 1))  # index 2: client 7 evicted (H = 1); client 8 writes k
    assert set(b.heads()) == {8} and b.meta().horizon == 1
    before = (b.heads(), b.results(), b.meta(), b.data(b"k"))
    # The client had seen nothing (horizon 0) before its first attempt: refused, indeterminate.
    (r,) = b.run(cmds.encode_cas(b"k", True, b"", b"first", 7, 1, 1, retry=True, horizon=0))
    assert r.session_expired and r.error == SESSION_EXPIRED and not r.swapped
    assert (b.heads(), b.results(), b.meta(), b.data(b"k")) == before  # nothing changed, not cached
    # The same command without `retry` (a client that never sent it before) is applied.
    (r,) = b.run(cmds.encode_cas(b"k", True, b"", b"x", 7, 1, 1))
    assert not r.session_expired and r.found and not r.swapped
    consistent(b)


def test_retry_applied_when_no_eviction_since_the_horizon(make: Any) -> None:
    b = make(max_sessions=1)
    b.run(put(b"a", 5, 1), put(b"b", 6, 1))  # index 2 evicts client 5 (H = 1)
    # A retry whose horizon is at or above H: no session the client's attempt could have touched
    # was evicted, so the first attempt was not applied; this is the first application.
    (r,) = b.run(put(b"c", 9, 1, retry=True, horizon=2))
    assert not r.session_expired and not r.error and b.data(b"c") == b"v1"
    # A retry whose session exists since before its horizon: applied (first attempt not applied).
    b2 = make(max_sessions=2)
    b2.run(put(b"a", 5, 1), put(b"b", 6, 1), put(b"c", 7, 1))  # index 3 evicts 5: H = 1
    b2.run(put(b"d", 7, 2))  # index 4: client 7 (created 3) touched
    (r,) = b2.run(put(b"e", 7, 3, retry=True, horizon=3))
    assert not r.session_expired and b2.data(b"e") == b"v3"
    # ... but a session recreated after the horizon (an eviction in between) is refused.
    (r,) = b2.run(put(b"f", 6, 5, retry=True, horizon=2))  # client 6: created 2 <= 2: applied
    assert not r.session_expired
    b2.run(put(b"g", 11, 1), put(b"h", 12, 1))  # evicts 7 and 6 (H = 6)
    b2.run(put(b"i", 6, 9))  # client 6 recreated at index 9 by another write
    (r,) = b2.run(put(b"j", 6, 7, retry=True, horizon=5))
    assert r.session_expired and b2.data(b"j") is None
    consistent(b2)


def test_stale_floor_still_wins_over_expiry(make: Any) -> None:
    b = make(max_sessions=5)
    b.run(put(b"a", 1, 1), put(b"a", 1, 2, ack=2))
    (r,) = b.run(put(b"a", 1, 1, retry=True))
    assert r.error == STALE_REQUEST and not r.session_expired


# --- random agreement of DictState and LMDB --------------------------------------------------------
def test_dict_lmdb_and_memory_agree_under_churn(tmp_path: Path) -> None:
    limits = SessionLimits(4, 7, 1)
    d = DictBackend(limits)
    lm = LmdbBackend(tmp_path / "n", limits)
    mem = MemBackend(limits)
    rng = random.Random(5)
    try:
        for _ in range(20):
            batch = []
            for _ in range(rng.randint(1, 12)):
                cid = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, rng.randint(9, 1 << 40)])
                seq = rng.randint(1, 6)
                batch.append(put(bytes([rng.randint(97, 100)]), cid, seq, ack=rng.randint(0, seq),
                                 retry=rng.random() < 0.3, horizon=rng.randint(0, d.index + 5)))
            assert lm.run(*batch) == d.run(*batch) == mem.run(*batch)
            assert (lm.heads(), lm.results(), lm.meta(), lm.lru()) == (d.heads(), d.results(), d.meta(), d.lru())
            assert (mem.heads(), mem.results(), mem.meta(), mem.lru()) == (d.heads(), d.results(), d.meta(), d.lru())
            consistent(lm)
            consistent(mem)
        assert d.meta().evicted > 10
    finally:
        lm.store.close()


@pytest.mark.parametrize("dirty_cap,skip_cap", [(1, 0), (2, 1), (3, 4), (16, 4)])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_held_back_heads_agree_with_dict_state_at_any_batch_boundaries(
    dirty_cap: int, skip_cap: int, data: st.DataObject) -> None:
    """`LmdbGroupView` holds session heads back within a batch (`flush_sessions`); whatever the
    caps on what it holds and wherever batches begin and end, the results, heads, LRU rows,
    cached results and meta row equal `DictState`'s, which writes every entry through."""
    from unittest import mock

    from kvstore.storage import kvstate

    with (mock.patch.object(kvstate, "MAX_DIRTY_HEADS", dirty_cap),
          mock.patch.object(kvstate, "MAX_STALE_LRU_SKIPS", skip_cap)):
        _held_back_agree(data)


def _held_back_agree(data: st.DataObject) -> None:
    limits = SessionLimits(data.draw(st.integers(2, 6)), data.draw(st.integers(1, 12)), data.draw(st.integers(0, 2)))
    clients = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=8, unique=True))
    seqs: dict[int, int] = {}
    cmds_: list[bytes] = []
    for _ in range(data.draw(st.integers(1, 60))):
        cid = data.draw(st.sampled_from([*clients, 0]))
        seq = seqs[cid] = seqs.get(cid, 0) + data.draw(st.integers(0, 1))  # 0: a repeat (cached result)
        cmds_.append(put(data.draw(st.sampled_from([b"a", b"b", b"c"])), cid, max(seq, 1),
                         ack=data.draw(st.integers(0, max(seq, 1))), retry=data.draw(st.booleans())))
    d = DictBackend(limits)
    root = Path(tempfile.mkdtemp(prefix="held-"))
    lm = LmdbBackend(root / "n", limits)
    try:
        i = 0
        while i < len(cmds_):
            n = data.draw(st.integers(1, 20))
            batch = cmds_[i : i + n]
            i += n
            assert lm.run(*batch) == d.run(*batch)
            assert (lm.heads(), lm.results(), lm.meta(), lm.lru()) == (d.heads(), d.results(), d.meta(), d.lru())
            consistent(lm)
    finally:
        lm.store.close()
        shutil.rmtree(root, ignore_errors=True)


# --- old rows, snapshots ---------------------------------------------------------------------------
def test_old_eight_byte_head_rows_decode(tmp_path: Path) -> None:
    assert SessionHead.decode(U64.pack(7)) == SessionHead(7, 0, 0)
    b = LmdbBackend(tmp_path / "n", SessionLimits(3, 1_000_000, 2))
    try:
        env = b.store._env
        # The previous release's rows: floor 3 for client 9 (8-byte value), a cached result of seq 3.
        env.write(lambda txn: (
            txn.put(group_prefix(G) + U64.pack(9), U64.pack(3), db=env.db(DB_SESSIONS)),
            txn.put(group_prefix(G) + U64_PAIR.pack(9, 3), cmds.encode_result(ApplyResult()), db=env.db(DB_SESSIONS)),
        ))
        b.run(cmds.encode_put(b"x", b"1"))
        (r1, r2, _r3) = b.run(put(b"k", 9, 2), put(b"k", 9, 3), put(b"k", 9, 4))
        assert r1.error == STALE_REQUEST and r2 == ApplyResult() and b.data(b"k") == b"v4"
        assert b.heads()[9] == SessionHead(3, 4, 0)  # rewritten in the new format, same incarnation
        assert b.lru() == [(4, 9)]
    finally:
        b.store.close()


def test_snapshot_round_trip_keeps_count_horizon_and_lru(tmp_path: Path) -> None:
    limits = SessionLimits(3, 1_000_000, 2)
    a = LmdbBackend(tmp_path / "a", limits)
    c = LmdbBackend(tmp_path / "c", limits)
    try:
        a.run(*(put(b"k%d" % i, 10 + i, 1) for i in range(6)), put(b"z", 11, 2))
        meta_a = a.meta()
        assert meta_a.count == 3 and meta_a.horizon > 0
        meta, chunks = a.store.snapshot_chunks(G)
        path = c.store.receive_snapshot(G, chunks)
        c.store.persist([GroupWrite(G, [], HardState(meta.term, 0, meta.index), meta, path)])
        assert (c.heads(), c.results(), c.meta(), c.lru()) == (a.heads(), a.results(), a.meta(), a.lru())
        # Both evict the same session next, and refuse the same retry.
        more = [put(b"n", 99, 1), put(b"k0", 10, 1, retry=True, horizon=1)]
        assert c.run(*more) == a.run(*more)
        assert (c.heads(), c.meta(), c.lru()) == (a.heads(), a.meta(), a.lru())
    finally:
        a.store.close()
        c.store.close()


@pytest.mark.parametrize("key,value", [
    (U64.pack(1), b"\x00" * 5),  # a head row of 5 bytes
    (U64.pack(1), U64.pack(1) + U64.pack(1) + U64.pack(2)),  # created after last
    (SESSION_META_TAG, b"\x00" * 7),
    (b"\x00" * 3, b""),  # neither head, result nor meta
    (U64_PAIR.pack(1, 1), b"\x09\x00"),  # not a result
])
def test_snapshot_with_a_bad_session_row_is_refused(tmp_path: Path, key: bytes, value: bytes) -> None:
    from kvstore.raft.types import SnapshotMeta
    from kvstore.storage.snapfile import TAG_SESSION

    store = NodeStore(tmp_path / "n", sync=False)
    try:
        meta = SnapshotMeta(5, 1, CONF)
        path = store.receive_snapshot(G, encode_snapshot(G, meta, [(TAG_SESSION, key, value)], 64))
        with pytest.raises(SnapshotFormatError, match="session"):
            store.persist([GroupWrite(G, [], HardState(1, 0, 5), meta, path)])
    finally:
        store.close()


# --- range installs --------------------------------------------------------------------------------
def test_install_sets_last_and_respects_the_cap(make: Any) -> None:
    b = make(max_sessions=3)
    half = IntervalSet([(0, (1 << 63) - 1)])  # the ranges being moved in
    own = [k for k in (b"k%d" % i for i in range(100)) if key_hash(k) not in half]
    b.run(encode_shard_command(ShardOp.SET, IntervalSet.full().difference(half)))  # index 1
    b.run(put(own[0], 1, 1), put(own[1], 2, 1))  # local sessions: last 2 and 3
    b.run(encode_shard_command(ShardOp.BEGIN, half, token=5, move=1))
    recs = b"".join([
        encode_record(REC_FLOOR, U64.pack(40), U64.pack(2)),
        encode_record(REC_RESULT, U64_PAIR.pack(40, 2), cmds.encode_result(ApplyResult())),
        encode_record(REC_FLOOR, U64.pack(41), U64.pack(0)),
        encode_record(REC_RESULT, U64_PAIR.pack(43, 1), cmds.encode_result(ApplyResult(existed=True))),
    ])
    (r,) = b.run(encode_shard_command(ShardOp.INSTALL, records=recs, token=5, move=1))
    assert r.error is None
    idx = b.index
    heads = b.heads()
    # Installed sessions are the most recent (last = created = the INSTALL's index; a result alone
    # creates its session too); the cap holds after the entry: the two older local ones went.
    assert set(heads) == {40, 41, 43}
    assert heads[40] == SessionHead(2, idx, idx) and heads[41] == SessionHead(0, idx, idx)
    assert heads[43] == SessionHead(0, idx, idx) and (43, 1) in b.results() and (40, 2) in b.results()
    assert b.meta() == SessionMeta(3, 3, 2)
    consistent(b)
    # The installed result answers a retry; an installed session is "new since" any horizon the
    # client learned elsewhere (0), so a retry of another seq is refused while H > 0.
    (r,) = b.run(put(b"x", 40, 2, retry=True, horizon=0))
    assert r == ApplyResult()
    (r,) = b.run(put(b"x", 41, 1, retry=True, horizon=0))
    assert r.session_expired
    # A new session evicts the oldest: installed ones tie on `last`, the lowest client id goes.
    b.run(put(own[2], 50, 1))
    assert set(b.heads()) == {41, 43, 50}
    consistent(b)


# --- fuzz: every decode added or changed is total (ValueError only) ---------------------------------
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_decodes_raise_only_value_error(data: bytes) -> None:
    for decode in (cmds.decode_command, cmds.decode_result, SessionHead.decode, SessionMeta.decode):
        with contextlib.suppress(ValueError):
            decode(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 2]), st.integers(0, 3), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1), st.integers(0, 255), st.integers(0, 2**64 - 1), st.binary(max_size=40),
)
def test_fuzz_command_headers(
    version: int, op: int, cid: int, seq: int, ack: int, flags: int, horizon: int, tail: bytes
) -> None:
    import struct

    head = (struct.pack(">BBQQQBQ", version, op, cid, seq, ack, flags, horizon) if version == 2
            else struct.pack(">BBQQQ", version, op, cid, seq, ack))
    try:
        c = cmds.decode_command(head + tail)
    except ValueError:
        return
    assert (c.client_id, c.seq, c.ack) == (cid, seq, ack)
    assert version == 2 or (not c.retry and c.horizon == 0)
    if version == 2:
        assert flags in (0, 1) and c.retry == bool(flags) and c.horizon == horizon
    assert cmds.decode_command(cmds.encode_command(c)) == c


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.booleans(), st.booleans())
def test_fuzz_round_trips(a: int, b: int, c: int, retry: bool, expired: bool) -> None:
    cmd = cmds.Command.put(b"k", b"v", a, b, c, retry, a)
    assert cmds.decode_command(cmds.encode_command(cmd)) == cmd
    res = ApplyResult(session_expired=expired, error=SESSION_EXPIRED if expired else None)
    assert cmds.decode_result(cmds.encode_result(res)) == res
    if c >= min(a, b):
        h = SessionHead(a, b, min(a, b))
        assert SessionHead.decode(h.encode()) == h
    m = SessionMeta(a, b, c)
    assert SessionMeta.decode(m.encode()) == m


def test_version_one_commands_still_decode() -> None:
    import struct

    v1 = struct.pack(">BBQQQ", 1, 1, 7, 3, 2) + struct.pack(">I", 1) + b"k" + b"val"
    assert cmds.decode_command(v1) == cmds.Command.put(b"k", b"val", 7, 3, 2)
    assert cmds.encode_command(cmds.Command.put(b"k", b"val", 7, 3, 2))[0] == 3
    v2 = struct.pack(">BBQQQBQ", 2, 1, 7, 3, 2, 1, 9) + struct.pack(">I", 1) + b"k" + b"val"
    assert cmds.decode_command(v2) == cmds.Command.put(b"k", b"val", 7, 3, 2, True, 9, 0)


def test_limits_are_the_documented_defaults() -> None:
    assert SessionLimits(10_000, 1_000_000, 2) == LIMITS
    with pytest.raises(ValueError):
        SessionLimits(0)
    # apply_data without limits uses them.
    st_ = DictState()
    st_.index = 1
    assert apply_data(st_, put(b"a", 1, 1)) == ApplyResult()
    assert isinstance(LmdbGroupView, type)
