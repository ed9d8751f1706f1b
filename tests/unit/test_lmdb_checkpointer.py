"""The LMDB checkpointer (`--state-sync checkpoint`, `storage/lmdbckpt.py`, `LmdbNodeStore.checkpoint`):
the record's total decoder, recovery after an unclean stop (the unsynced commits after the last
checkpoint lost, even as garbage on disk: the restored meta pages and a replay of the WAL give
exactly the acknowledged state), a clean stop that needs no restore, the WAL compaction bound, a
map growth followed by a checkpoint, and a damaged record refused."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.node.store import ApplyBatch, AuditHead, GroupWrite
from kvstore.raft.types import ConfState, Entry, EntryType, HardState
from kvstore.storage import commands as cmds
from kvstore.storage import lmdbckpt
from kvstore.storage.errors import StorageError, StorageFullError, StorageIOError
from kvstore.storage.lmdbckpt import Checkpoint, CheckpointCorruptError
from kvstore.storage.store import CheckpointPolicy, LmdbNodeStore

CONF = ConfState((1,))
PSIZE = 4096


def _metas(txnid: int, psize: int = PSIZE) -> bytes:
    out = bytearray(2 * psize)
    for pg in (0, 1):
        off = pg * psize
        struct.pack_into("=QHH", out, off, pg, 0, lmdbckpt.P_META)
        struct.pack_into("=II", out, off + lmdbckpt.META_MAGIC_OFFSET, lmdbckpt.MDB_MAGIC, lmdbckpt.MDB_DATA_VERSION)
        struct.pack_into("=Q", out, off + lmdbckpt.META_TXNID_OFFSET, txnid - (1 - pg))
    return bytes(out)


def _record(applied: list[tuple[int, int]], txnid: int = 9) -> Checkpoint:
    return Checkpoint(PSIZE, txnid, tuple(sorted(dict(applied).items())), _metas(txnid))


# --- the record ---------------------------------------------------------------------------------------
@given(st.dictionaries(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), max_size=20), st.integers(1, 2**63))
def test_a_record_round_trips(applied: dict[int, int], txnid: int) -> None:
    ckpt = _record(list(applied.items()), txnid)
    assert lmdbckpt.decode(lmdbckpt.encode(ckpt)) == ckpt


@given(st.binary(max_size=300))
def test_random_bytes_are_refused_never_crash(raw: bytes) -> None:
    with pytest.raises(CheckpointCorruptError):
        lmdbckpt.decode(raw)
    with pytest.raises(CheckpointCorruptError):
        lmdbckpt.decode(lmdbckpt.MAGIC + raw)


@settings(max_examples=300)
@given(st.data())
def test_a_torn_or_changed_record_is_refused(data: st.DataObject) -> None:
    raw = lmdbckpt.encode(_record([(0, 5), (3, 7)]))
    how = data.draw(st.sampled_from(["cut", "flip", "grow"]))
    if how == "cut":
        bad = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "grow":
        bad = raw + data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        bad = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
    with pytest.raises(CheckpointCorruptError):
        lmdbckpt.decode(bad)


def _forge(ckpt_bytes: bytes) -> bytes:
    """The same bytes with a valid checksum (a forgery: only the field checks can refuse it)."""
    from crc32c import crc32c

    body = ckpt_bytes[:-4]
    return body + struct.pack(">I", crc32c(body))


@pytest.mark.parametrize("what", ["page-size", "meta-magic", "meta-pgno", "txnid", "group-order", "count"])
def test_a_forged_record_with_a_good_checksum_is_refused(what: str) -> None:
    raw = bytearray(lmdbckpt.encode(_record([(1, 5), (3, 7)], txnid=9)))
    head = struct.calcsize(">8sIQI")
    if what == "page-size":
        struct.pack_into(">I", raw, 8, 3000)
    elif what == "meta-magic":
        struct.pack_into("=I", raw, head + 32 + lmdbckpt.META_MAGIC_OFFSET, 0xDEADBEEF)
    elif what == "meta-pgno":
        struct.pack_into("=Q", raw, head + 32 + PSIZE, 7)
    elif what == "txnid":
        struct.pack_into(">Q", raw, 12, 10)
    elif what == "group-order":
        struct.pack_into(">Q", raw, head + 16, 0)
        struct.pack_into(">Q", raw, head, 3)
    else:
        struct.pack_into(">I", raw, 20, 1 << 30)
    with pytest.raises(CheckpointCorruptError):
        lmdbckpt.decode(_forge(bytes(raw)))


# --- the store ------------------------------------------------------------------------------------------
def _open(path: Path, **kw: Any) -> LmdbNodeStore:
    return LmdbNodeStore(path, state_sync="checkpoint", **kw)


def _cycle(s: LmdbNodeStore, start: int, n: int) -> list[Any]:
    """One Ready cycle of a one-member group: persist n puts (committed at once) and apply them."""
    ls = s.log_storage(1)
    assert ls.last_index() + 1 == start
    ents = [
        Entry(1, start + i, EntryType.NORMAL, cmds.encode_put(b"k%d" % ((start + i) % 37), b"v%d" % (start + i), 5, start + i, 0), 1)
        for i in range(n)
    ]
    res = s.persist_and_apply([GroupWrite(1, ents, HardState(1, 1, ents[-1].index))],
                              [ApplyBatch(1, ents, CONF)])
    return [(r.index, r.revision, cmds.encode_result(r)) for r in res[0] if r is not None]


def _bootstrapped(path: Path, **kw: Any) -> LmdbNodeStore:
    s = _open(path, **kw)
    s.bootstrap(1, CONF)
    ls = s.log_storage(1)
    s.persist_and_apply((), [ApplyBatch(1, ls.entries(1, ls.last_index() + 1), CONF)])
    return s


def _crash_copy(src: Path, dst: Path, ckpt: Checkpoint) -> None:
    """What a power loss may leave of a store that never closed: every page not in the checkpointed
    tree (above its last page) is garbage, and the meta pages name a newer, broken transaction."""
    shutil.copytree(src, dst)
    data = dst / "data.mdb"
    raw = bytearray(data.read_bytes())
    last_pg = struct.unpack_from("=Q", ckpt.metas, PSIZE + lmdbckpt.META_TXNID_OFFSET - 8)[0]
    last_pg = max(last_pg, struct.unpack_from("=Q", ckpt.metas, lmdbckpt.META_TXNID_OFFSET - 8)[0])
    for off in range((last_pg + 1) * PSIZE, len(raw), PSIZE):
        raw[off : off + PSIZE] = b"\xa5" * PSIZE
    for pg in (0, 1):
        struct.pack_into("=Q", raw, pg * PSIZE + lmdbckpt.META_TXNID_OFFSET, ckpt.txnid + 50 + pg)
    data.write_bytes(bytes(raw))


def _state(s: LmdbNodeStore) -> tuple[Any, ...]:
    return (s.applied_index(1), s.scan(1, b"", None), s.session_meta(1), s.revisions.rev_state(1))


def test_recovery_restores_the_checkpoint_and_the_replay_gives_the_acknowledged_state(tmp_path: Path) -> None:
    s = _bootstrapped(tmp_path / "a", checkpoint_policy=CheckpointPolicy(cycles=1 << 30, bytes=1 << 40, seconds=1e9))
    acked: list[Any] = []
    nxt = s.log_storage(1).last_index() + 1
    for _ in range(10):
        acked += _cycle(s, nxt, 20)
        nxt += 20
    s.checkpoint()
    at_ckpt = s.applied_index(1)
    for _ in range(30):  # unsynced commits: free pages of older trees reused, the map grows in the file
        acked += _cycle(s, nxt, 20)
        nxt += 20
    live = _state(s)
    saved = lmdbckpt.read(tmp_path / "a")
    assert saved is not None and saved.applied_map() == {1: at_ckpt}
    _crash_copy(tmp_path / "a", tmp_path / "b", saved)
    s.close()

    r = _open(tmp_path / "b")
    try:
        assert r.restored
        assert r.applied_index(1) == at_ckpt < live[0]
        ls = r.log_storage(1)
        assert ls.hard_state.commit == ls.last_index() == live[0]
        # the replay a core does from the applied index: the same results, the same state
        ents = ls.entries(at_ckpt + 1, ls.last_index() + 1)
        res = r.persist_and_apply((), [ApplyBatch(1, ents, CONF)])[0]
        again = [(x.index, x.revision, cmds.encode_result(x)) for x in res if x is not None]
        assert again == [a for a in acked if a[0] > at_ckpt]
        assert _state(r) == live
        # the replay done, the next cycle checkpoints first: another crash would not replay it again
        before = r.checkpoints
        _cycle(r, live[0] + 1, 1)
        r.wait_checkpoint()  # (it runs in the background)
        assert r.checkpoints == before + 1 and r.checkpointed_applied(1) == live[0]
    finally:
        r.close()


def test_a_clean_stop_restores_nothing_and_loses_nothing(tmp_path: Path) -> None:
    s = _bootstrapped(tmp_path / "a")
    nxt = s.log_storage(1).last_index() + 1
    for _ in range(5):
        _cycle(s, nxt, 10)
        nxt += 10
    live = _state(s)
    s.close()
    r = _open(tmp_path / "a")
    try:
        assert not r.restored
        assert _state(r) == live
    finally:
        r.close()


def test_compaction_never_passes_the_checkpointed_applied_index(tmp_path: Path) -> None:
    s = _bootstrapped(tmp_path / "a", checkpoint_policy=CheckpointPolicy(cycles=1 << 30, bytes=1 << 40, seconds=1e9))
    try:
        s.checkpoint()
        at_ckpt = s.applied_index(1)
        nxt = at_ckpt + 1
        for _ in range(5):
            _cycle(s, nxt, 10)
            nxt += 10
        applied = s.applied_index(1)
        assert s.checkpointed_applied(1) == at_ckpt < applied
        s.compact(1, applied)
        assert s.log_storage(1).first_index() == at_ckpt + 1
        before = s.checkpoints
        _cycle(s, nxt, 1)  # the held-back compaction asked for a checkpoint: this cycle starts it first
        s.wait_checkpoint()
        assert s.checkpoints == before + 1 and s.checkpointed_applied(1) == applied
        s.compact(1, applied)
        assert s.log_storage(1).first_index() == applied + 1
    finally:
        s.close()


def test_the_policy_checkpoints_between_cycles(tmp_path: Path) -> None:
    s = _bootstrapped(tmp_path / "a", checkpoint_policy=CheckpointPolicy(cycles=4, bytes=1 << 40, seconds=1e9))
    try:
        s.checkpoint()
        before = s.checkpoints
        nxt = s.log_storage(1).last_index() + 1
        for _ in range(9):
            _cycle(s, nxt, 2)
            s.wait_checkpoint()  # (it runs in the background: one at a time)
            nxt += 2
        assert s.checkpoints - before == 2  # before the 5th and the 9th applying cycle
        saved = lmdbckpt.read(tmp_path / "a")
        assert saved is not None and saved.applied_map()[1] == s.checkpointed_applied(1) == nxt - 1 - 2
    finally:
        s.close()


def test_a_map_growth_is_followed_by_a_checkpoint(tmp_path: Path) -> None:
    s = _bootstrapped(tmp_path / "a", map_size=1 << 20,
                      checkpoint_policy=CheckpointPolicy(cycles=1 << 30, bytes=1 << 40, seconds=1e9))
    try:
        grows, ckpts = s._env.grow_count, s.checkpoints
        nxt = s.log_storage(1).last_index() + 1
        while s._env.grow_count == grows:
            ls = s.log_storage(1)
            ents = [Entry(1, nxt + i, EntryType.NORMAL, cmds.encode_put(b"big%d" % (nxt + i), b"x" * 4000, 0, 0, 0), 1)
                    for i in range(20)]
            s.persist_and_apply([GroupWrite(1, ents, HardState(1, 1, ents[-1].index))], [ApplyBatch(1, ents, CONF)])
            nxt += 20
            assert ls.last_index() == nxt - 1 and nxt < 5000
        assert s.checkpoints > ckpts and s._env.pinned
        saved = lmdbckpt.read(tmp_path / "a")
        assert saved is not None and saved.applied_map()[1] == s.checkpointed_applied(1) > 0
    finally:
        s.close()


def test_a_damaged_record_is_refused_at_open(tmp_path: Path) -> None:
    s = _bootstrapped(tmp_path / "a")
    s.close()
    rec = tmp_path / "a" / lmdbckpt.CHECKPOINT_FILE
    raw = bytearray(rec.read_bytes())
    raw[30] ^= 1
    rec.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError):
        _open(tmp_path / "a")


def test_commit_mode_after_an_unclean_checkpoint_mode_stop_restores_then_drops_the_record(tmp_path: Path) -> None:
    s = _bootstrapped(tmp_path / "a", checkpoint_policy=CheckpointPolicy(cycles=1 << 30, bytes=1 << 40, seconds=1e9))
    s.checkpoint()
    at_ckpt = s.applied_index(1)
    _cycle(s, at_ckpt + 1, 10)
    saved = lmdbckpt.read(tmp_path / "a")
    assert saved is not None
    _crash_copy(tmp_path / "a", tmp_path / "b", saved)
    s.close()
    r = LmdbNodeStore(tmp_path / "b", state_sync="commit")
    try:
        assert r.restored and r.applied_index(1) == at_ckpt
        assert not (tmp_path / "b" / lmdbckpt.CHECKPOINT_FILE).exists()
    finally:
        r.close()


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.integers(0, 11))
def test_random_cycles_then_a_crash_replay_to_the_same_state(tmp_path: Path, sizes: list[int], ckpt_after: int) -> None:
    root = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    s = _bootstrapped(root / "a", checkpoint_policy=CheckpointPolicy(cycles=1 << 30, bytes=1 << 40, seconds=1e9))
    nxt = s.log_storage(1).last_index() + 1
    for i, n in enumerate(sizes):
        if i == ckpt_after:
            s.checkpoint()
        _cycle(s, nxt, n)
        nxt += n
    live = _state(s)
    saved = lmdbckpt.read(root / "a")
    assert saved is not None
    _crash_copy(root / "a", root / "b", saved)
    s.close()
    r = _open(root / "b")
    try:
        ls = r.log_storage(1)
        a = r.applied_index(1)
        assert a == saved.applied_map().get(1, 0)
        if a < ls.last_index():
            r.persist_and_apply((), [ApplyBatch(1, ls.entries(a + 1, ls.last_index() + 1), CONF)])
        assert _state(r) == live
    finally:
        r.close()


def test_no_room_for_the_record_keeps_the_previous_checkpoint_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _bootstrapped(tmp_path / "a", checkpoint_policy=CheckpointPolicy(cycles=1 << 30, bytes=1 << 40, seconds=1e9))
    try:
        s.checkpoint()
        before = lmdbckpt.read(tmp_path / "a")
        nxt = s.log_storage(1).last_index() + 1
        _cycle(s, nxt, 5)
        real = os.fdatasync

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(lmdbckpt.os, "fdatasync", full)
        with pytest.raises(StorageFullError):
            s.checkpoint()
        monkeypatch.setattr(lmdbckpt.os, "fdatasync", real)
        assert s.full and s._env.pinned
        assert lmdbckpt.read(tmp_path / "a") == before
        assert not (tmp_path / "a" / (lmdbckpt.CHECKPOINT_FILE + ".new")).exists()
        _cycle(s, nxt + 5, 5)  # the store goes on; the next checkpoint succeeds
        s.checkpoint()
        assert s.checkpointed_applied(1) == nxt + 9
    finally:
        s.close()


def test_a_failed_flush_fails_the_store_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _bootstrapped(tmp_path / "a")
    try:
        nxt = s.log_storage(1).last_index() + 1

        def eio(self: Any) -> None:
            raise StorageIOError("simulated: fdatasync failed (EIO)")

        monkeypatch.setattr(type(s._env), "sync_all", eio)
        with pytest.raises(StorageIOError):
            s.checkpoint()
        monkeypatch.undo()
        with pytest.raises(StorageIOError, match="must be restarted"):
            _cycle(s, nxt, 1)
        with pytest.raises(StorageIOError, match="must be restarted"):
            s.set_audit_head(AuditHead(1, b"m" * 32, 0))
    finally:
        s.close()


def test_a_second_opener_is_refused_while_the_store_is_open(tmp_path: Path) -> None:
    """Restoring meta pages under an LMDB another process has open would corrupt it."""
    s = _bootstrapped(tmp_path / "a")
    try:
        with pytest.raises(StorageError, match="open in another process"):
            _open(tmp_path / "a")
    finally:
        s.close()
    _open(tmp_path / "a").close()  # released at close


def test_cycles_go_on_while_a_background_checkpoint_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy's checkpoint is prepared between cycles (pin, meta pages, applied indexes) and
    flushed on a thread of its own: cycles commit meanwhile, and the record names the prepared
    snapshot, made durable only once the flush is done."""
    s = _bootstrapped(tmp_path / "a", checkpoint_policy=CheckpointPolicy(cycles=2, bytes=1 << 40, seconds=1e9))
    try:
        s.checkpoint()
        release, flushing = threading.Event(), threading.Event()
        real = type(s._env).sync_all

        def slow(env: Any) -> None:
            flushing.set()
            assert release.wait(30)
            real(env)

        monkeypatch.setattr(type(s._env), "sync_all", slow)
        nxt = s.log_storage(1).last_index() + 1
        _cycle(s, nxt, 3)
        _cycle(s, nxt + 3, 3)
        prepared_at = s.applied_index(1)
        before = s.checkpoints
        _cycle(s, nxt + 6, 3)  # starts the checkpoint of `prepared_at`, then applies
        assert flushing.wait(30)
        for i in range(5):  # not blocked by the flush
            _cycle(s, nxt + 9 + 3 * i, 3)
        assert s.checkpoints == before and s.checkpointed_applied(1) == nxt - 1
        release.set()
        s.wait_checkpoint()
        monkeypatch.undo()
        assert s.checkpoints == before + 1 and s.checkpointed_applied(1) == prepared_at
        saved = lmdbckpt.read(tmp_path / "a")
        assert saved is not None and saved.applied_map()[1] == prepared_at
    finally:
        s.close()


def test_a_checkpoint_prepared_before_a_map_growth_is_dropped(tmp_path: Path) -> None:
    """A growth kills every read transaction of the process, a prepared checkpoint's pin too: its
    record must never be written (its tree would not be pinned); the growth's own checkpoint
    (newer) stands."""
    s = _bootstrapped(tmp_path / "a", map_size=1 << 20,
                      checkpoint_policy=CheckpointPolicy(cycles=1 << 30, bytes=1 << 40, seconds=1e9))
    try:
        with s._env.write_lock:
            prepared = s._prepare_checkpoint()
        grows = s._env.grow_count
        nxt = s.log_storage(1).last_index() + 1
        while s._env.grow_count == grows:
            ents = [Entry(1, nxt + i, EntryType.NORMAL, cmds.encode_put(b"g%d" % (nxt + i), b"y" * 4000, 0, 0, 0), 1)
                    for i in range(20)]
            s.persist_and_apply([GroupWrite(1, ents, HardState(1, 1, ents[-1].index))], [ApplyBatch(1, ents, CONF)])
            nxt += 20
            assert nxt < 5000
        after_growth = lmdbckpt.read(tmp_path / "a")
        count = s.checkpoints
        assert s._finish_checkpoint(prepared)  # dropped, and covered by the growth's newer checkpoint
        assert s.checkpoints == count and lmdbckpt.read(tmp_path / "a") == after_growth
        assert after_growth is not None and after_growth.txnid > prepared[1].txnid and s._env.pinned
    finally:
        s.close()
