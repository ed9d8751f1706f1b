"""The backup file (kvstore/backup/format.py): round trips, a total decoder on hostile bytes
(hypothesis), the writer's checks; and `restore` into the data directories of a 5-node cluster
whose members host different groups (kvstore/backup/restore.py), read back from the stores."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.backup.format import (
    MAGIC,
    BackupFormatError,
    BackupInfo,
    BackupKey,
    BackupLease,
    BackupReader,
    BackupWriter,
    check_lease,
    decode_leases,
    verify,
)
from kvstore.backup.restore import RestoreError, group_records, restore
from kvstore.raft.types import ConfState, EntryType
from kvstore.security.authstate import AUTH_KEY, ROOT, AuthCommand, AuthOp, AuthState
from kvstore.shard.ranges import IntervalSet, key_hash
from kvstore.shard.shardmap import META_GROUP, SHARD_MAP_KEY
from kvstore.storage import mvcc
from kvstore.storage.commands import Op, decode_command
from kvstore.storage.store import LmdbNodeStore

pytestmark = pytest.mark.timeout(60)

REV = (1 << 30) << 12 | 7
PW_HASH = b"h" * 32
CONF1 = ConfState((1,))  # (any bytes: the state stores a hash it does not check)


def keys_strategy() -> st.SearchStrategy[list[BackupKey]]:
    key = st.binary(min_size=1, max_size=40)
    meta = st.tuples(st.integers(1, REV), st.integers(0, 1000), st.integers(1, 9))
    return st.dictionaries(key, st.tuples(st.binary(max_size=300), meta), max_size=40).map(
        lambda d: [BackupKey(k, v, c, min(REV, c + dm), ver) for k, (v, (c, dm, ver)) in sorted(d.items())]
    )


def encode(keys: list[BackupKey], auth: bytes = b"", chunk: int | None = None) -> bytes:
    f = io.BytesIO()
    w = BackupWriter(f, BackupInfo(REV, 1_700_000_000_000, 2, 3, 64), auth)
    if chunk is not None:
        import kvstore.backup.format as fmt

        old, fmt.CHUNK_BYTES = fmt.CHUNK_BYTES, chunk
    try:
        for k in keys:
            w.add(k)
        w.finish()
    finally:
        if chunk is not None:
            fmt.CHUNK_BYTES = old
    assert w.size == len(f.getvalue())
    return f.getvalue()


@settings(max_examples=60, deadline=None)
@given(keys_strategy(), st.sampled_from([None, 64, 1]))
def test_round_trip(keys: list[BackupKey], chunk: int | None) -> None:
    auth = AuthState().encode()
    data = encode(keys, auth, chunk)
    r = BackupReader(io.BytesIO(data))
    assert list(r.entries()) == keys
    assert r.auth == auth and r.info.revision == REV and r.size == len(data) and len(r.sha256) == 64
    s = verify(io.BytesIO(data))
    assert s.keys == len(keys) and s.size == len(data)


def _decode_all(data: bytes) -> None:
    verify(io.BytesIO(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys_strategy(), st.data())
def test_any_damage_is_refused_with_one_error_type(keys: list[BackupKey], data: st.DataObject) -> None:
    good = encode(keys, AuthState().encode(), 128)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(good) - 1))
        bit = data.draw(st.integers(0, 7))
        bad = good[:i] + bytes([good[i] ^ (1 << bit)]) + good[i + 1 :]
    elif kind == "truncate":
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "append":
        bad = good + data.draw(st.binary(min_size=1, max_size=20))
    else:
        i = data.draw(st.integers(0, len(good)))
        bad = good[:i] + data.draw(st.binary(min_size=1, max_size=20)) + good[i:]
    with pytest.raises(BackupFormatError):
        _decode_all(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_only_raise_the_format_error(raw: bytes) -> None:
    for data in (raw, MAGIC + b"\x01" + raw):
        with pytest.raises(BackupFormatError):  # (random bytes cannot carry a matching SHA-256)
            _decode_all(data)


def test_forged_but_hashed_files_are_refused() -> None:
    """Files whose SHA-256 is right but whose contents break the rules (as a forger would write
    them, bypassing the writer's checks)."""
    import hashlib
    import struct

    def file(*records: tuple[int, bytes]) -> bytes:
        body = MAGIC + b"\x01" + b"".join(struct.pack(">BI", t, len(p)) + p for t, p in records)
        return body + hashlib.sha256(body).digest()

    info = (1, struct.pack(">QQIBI", REV, 0, 1, 3, 16))

    def kv(key: bytes, create: int, mod: int, version: int = 1, value: bytes = b"v") -> bytes:
        return struct.pack(">HIQQQ", len(key), len(value), create, mod, version) + key + value

    def chunk(*kvs: bytes) -> tuple[int, bytes]:
        return 3, struct.pack(">I", len(kvs)) + b"".join(kvs)

    def end(keys: int, records: int) -> tuple[int, bytes]:
        return 0, struct.pack(">QQ", keys, records)

    assert verify(io.BytesIO(file(info, chunk(kv(b"a", 1, 2)), end(1, 3)))).keys == 1
    cases = {
        "no info": file(chunk(kv(b"a", 1, 2)), end(1, 2)),
        "keys out of order": file(info, chunk(kv(b"b", 1, 2), kv(b"a", 1, 2)), end(2, 3)),
        "order across chunks": file(info, chunk(kv(b"b", 1, 2)), chunk(kv(b"b", 1, 2)), end(2, 4)),
        "mod above R": file(info, chunk(kv(b"a", 1, REV + 1)), end(1, 3)),
        "create above mod": file(info, chunk(kv(b"a", 3, 2)), end(1, 3)),
        "version 0": file(info, chunk(kv(b"a", 1, 2, 0)), end(1, 3)),
        "empty key": file(info, chunk(kv(b"", 1, 2)), end(1, 3)),
        "long key": file(info, chunk(kv(b"k" * 504, 1, 2)), end(1, 3)),
        "bad counts": file(info, chunk(kv(b"a", 1, 2)), end(2, 3)),
        "no end": file(info, chunk(kv(b"a", 1, 2))),
        "bad auth": file(info, (2, b"not an auth state"), end(0, 3)),
        "auth among keys": file(info, chunk(kv(b"a", 1, 2)), (2, AuthState().encode()), end(1, 4)),
        "two infos": file(info, info, end(0, 3)),
        "unknown tag": file(info, (9, b""), end(0, 3)),
        "empty chunk": file(info, (3, struct.pack(">I", 0)), end(0, 3)),
        "chunk tail": file(info, (3, chunk(kv(b"a", 1, 2))[1] + b"x"), end(1, 3)),
        "zero groups": file((1, struct.pack(">QQIBI", REV, 0, 0, 3, 16)), end(0, 2)),
        "huge length": MAGIC + b"\x01" + struct.pack(">BI", 1, 0xFFFFFFFF),
        "version 2": MAGIC + b"\x02",
    }
    for name, data in cases.items():
        with pytest.raises(BackupFormatError):
            verify(io.BytesIO(data))
        assert name


def test_writer_refuses_what_a_reader_would() -> None:
    f = io.BytesIO()
    w = BackupWriter(f, BackupInfo(REV, 0, 1, 3, 16))
    w.add(BackupKey(b"b", b"", 1, 1, 1))
    for bad in [BackupKey(b"a", b"", 1, 1, 1), BackupKey(b"c", b"", 2, 1, 1), BackupKey(b"c", b"", 1, REV + 1, 1),
                BackupKey(b"c", b"", 1, 1, 0), BackupKey(b"", b"", 1, 1, 1)]:
        with pytest.raises(BackupFormatError):
            w.add(bad)
    with pytest.raises(BackupFormatError):
        BackupWriter(io.BytesIO(), BackupInfo(REV, 0, 0, 3, 16))
    with pytest.raises(BackupFormatError, match="auth state does not decode"):  # the reader would refuse it
        BackupWriter(io.BytesIO(), BackupInfo(REV, 0, 1, 3, 16), b"not an auth state")


def test_restore_five_members_four_groups(tmp_path: Path) -> None:
    """Each member holds the groups the new map gives it, with exactly the backup's keys of their
    ranges, metadata and a revision state at R; the metadata group's bootstrap log is the same
    on every member."""
    keys = [BackupKey(f"key{i:04d}".encode(), f"value{i}".encode(), 4096 + i, 4096 * 2 + i, 1 + i % 3)
            for i in range(300)]
    keys += [BackupKey(f"keyR{i}".encode(), b"at R", 4096, REV, 2) for i in range(8)]  # written at R itself
    path = tmp_path / "b.kvbk"
    auth = AuthState()
    for cmd in (AuthCommand(AuthOp.USER_ADD, user=ROOT, password=PW_HASH), AuthCommand(AuthOp.ENABLE, token_key=b"k" * 32)):
        auth = auth.apply(cmd)
    path.write_bytes(encode(keys, auth.encode()))
    peers = {i: f"127.0.0.1:{20000 + i}" for i in range(1, 6)}
    held: dict[int, dict[bytes, bytes]] = {}
    meta_logs = set()
    for nid in peers:
        res = restore(path, tmp_path / f"n{nid}", nid, peers, groups=4, replication=3)
        smap = res.shard_map
        assert len(smap.groups) == 4
        with LmdbNodeStore(tmp_path / f"n{nid}" / "db", map_size=1 << 30, state_sync="checkpoint") as store:
            assert sorted(store.groups()) == sorted({META_GROUP, *res.groups})
            log = store.log_storage(META_GROUP)
            meta_logs.add(tuple((e.type, e.data) for e in log.entries(log.first_index(), log.last_index() + 1)))
            for g, n in res.groups.items():
                assert store.applied_index(g) == 1
                rows = dict(store.scan(g, b"", None))
                assert len(rows) == n
                assert all(key_hash(k) in smap.bootstrap_ranges(g) for k in rows)
                assert held.setdefault(g, rows) == rows  # every replica of a group holds the same
                kv = store.revisions
                # last = compact = R, not kept: the 24-byte state row any binary reads
                assert kv.rev_state(g) == mvcc.RevState(REV, REV, n + 1)
                assert len(mvcc.RevState(REV, REV, n + 1).encode()) == 24
                for k in keys:
                    if k.key in rows:
                        v, _ = kv.get_version(g, k.key, REV)  # a read at R: the backup's version
                        assert v is not None and v.value == k.value
                        assert (v.meta.create_revision, v.meta.mod_revision, v.meta.version) == (
                            k.create_revision, k.mod_revision, k.version)
                        with pytest.raises(mvcc.Compacted):
                            kv.get_version(g, k.key, REV - 1)
                # a watch from R is refused (the backup has no deletes at R); from R + 1 it reads
                with pytest.raises(mvcc.Compacted):
                    kv.changes(g, REV, REV, 1000, 1 << 20, True)
                assert kv.changes(g, REV + 1, REV + 1, 1000, 1 << 20, True).changes == []
                shards = store.shard_state(g)
                assert shards is not None and shards.active == smap.bootstrap_ranges(g)
    assert len(meta_logs) == 1
    (log,) = meta_logs
    cmds = [decode_command(d) for t, d in log if t == EntryType.NORMAL]
    assert [c.op for c in cmds] == [Op.CLOSE, Op.PUT, Op.PUT]
    assert cmds[0].revision == REV and cmds[1].key == SHARD_MAP_KEY and cmds[2].key == AUTH_KEY
    restored = AuthState.decode(cmds[2].value)
    assert restored.users == auth.users and restored.enabled and restored.token_key != auth.token_key
    union = {k: v for rows in held.values() for k, v in rows.items()}
    assert union == {k.key: k.value for k in keys}
    assert sum(len(r) for r in held.values()) == len(keys)  # each key in exactly one group
    with pytest.raises(RestoreError, match="not empty"):
        restore(path, tmp_path / "n1", 1, peers)
    with pytest.raises(RestoreError, match="not in --peers"):
        restore(path, tmp_path / "n9", 9, peers)
    assert mvcc.REVISION_MAX > REV


def test_a_scan_without_a_map_takes_no_part_for_the_whole() -> None:
    """Regression (found by test_backup_cluster.py's restored cluster): a client that scanned before the
    metadata group had applied its map took group 1's part for the whole keyspace."""
    from types import SimpleNamespace

    from kvstore.client.scans import _whole
    from kvstore.shard.ranges import IntervalSet

    half = IntervalSet([(0, 2**63 - 1)])
    other = IntervalSet([(2**63, 2**64 - 1)])
    parts = [SimpleNamespace(owned=half)]
    assert not _whole(parts, sharded=False)
    assert _whole([SimpleNamespace(owned=IntervalSet.full())], sharded=False)
    assert _whole([SimpleNamespace(owned=None)], sharded=False)
    assert _whole([SimpleNamespace(owned=half), SimpleNamespace(owned=other)], sharded=True)
    assert not _whole([SimpleNamespace(owned=half), SimpleNamespace(owned=half)], sharded=True)



def test_a_pass_over_a_file_that_changed_since_it_was_verified_is_refused(tmp_path: Path) -> None:
    """Restore reads the file once to verify it and again per hosted group: a pass that reads
    another (valid) file raises instead of mixing two backups in one data directory."""
    path = tmp_path / "b.kvbk"
    path.write_bytes(encode([BackupKey(b"k", b"v", 1, 1, 1)], b""))
    with path.open("rb") as f:
        verified = verify(f).sha256
    assert [r[0] for r in group_records(path, IntervalSet.full(), REV, [], verified)]
    path.write_bytes(encode([BackupKey(b"k", b"other", 1, 1, 1)], b""))
    with pytest.raises(RestoreError, match="changed while it was being restored"):
        list(group_records(path, IntervalSet.full(), REV, [], verified))


def leases_strategy() -> st.SearchStrategy[list[BackupLease]]:
    lease = st.builds(
        lambda hi, g, ttl, frac, ks: BackupLease((hi << 12) | g, ttl, int(ttl * 1000 * frac), tuple(sorted(ks))),
        st.integers(1, 2**40), st.integers(1, 4095), st.integers(1, 100), st.floats(0, 1),
        st.sets(st.binary(min_size=1, max_size=20), max_size=5),
    )
    return st.lists(lease, max_size=8, unique_by=lambda le: le.id).map(lambda ls: _one_lease_per_key(
        sorted(ls, key=lambda le: le.id)))


def _one_lease_per_key(ls: list[BackupLease]) -> list[BackupLease]:
    seen: set[bytes] = set()
    out = []
    for le in ls:
        out.append(BackupLease(le.id, le.ttl_s, le.remaining_ms, tuple(k for k in le.keys if k not in seen)))
        seen.update(le.keys)
    return out


def encode_with_leases(keys: list[BackupKey], ls: list[BackupLease], chunk: int | None = None) -> bytes:
    import kvstore.backup.format as fmt

    f = io.BytesIO()
    old = fmt.CHUNK_BYTES
    if chunk is not None:
        fmt.CHUNK_BYTES = chunk
    try:
        w = BackupWriter(f, BackupInfo(REV, 1_700_000_000_000, 2, 3, 64))
        for k in keys:
            w.add(k)
        for le in ls:
            w.add_lease(le)
        w.finish()
    finally:
        fmt.CHUNK_BYTES = old
    return f.getvalue()


@settings(max_examples=60, deadline=None)
@given(keys_strategy(), leases_strategy(), st.sampled_from([None, 64, 1]))
def test_leases_round_trip(keys: list[BackupKey], ls: list[BackupLease], chunk: int | None) -> None:
    data = encode_with_leases(keys, ls, chunk)
    r = BackupReader(io.BytesIO(data))
    assert list(r.entries()) == keys
    assert r.leases == ls


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys_strategy(), leases_strategy(), st.data())
def test_damage_in_leases_is_refused_with_one_error_type(keys: list[BackupKey], ls: list[BackupLease],
                                                         data: st.DataObject) -> None:
    good = encode_with_leases(keys, ls, 128)
    i = data.draw(st.integers(0, len(good) - 1))
    bad = good[:i] + bytes([good[i] ^ (1 << data.draw(st.integers(0, 7)))]) + good[i + 1 :]
    with pytest.raises(BackupFormatError):
        _decode_all(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_lease_chunk_decoder_is_total(raw: bytes) -> None:
    try:
        for le in decode_leases(raw):
            check_lease(le, 0)
    except BackupFormatError:
        pass


def test_writer_refuses_bad_leases() -> None:
    w = BackupWriter(io.BytesIO(), BackupInfo(REV, 1, 2, 3, 64))
    for bad in (BackupLease(0, 10, 0), BackupLease(4096, 10, 0), BackupLease(4097, 0, 0), BackupLease(4097, 10, 10_001),
                BackupLease(4097, 10, 0, (b"",))):
        with pytest.raises(BackupFormatError):
            w.add_lease(bad)
    w.add_lease(BackupLease(8193, 10, 5))
    with pytest.raises(BackupFormatError):
        w.add_lease(BackupLease(4097, 10, 5))  # out of order
    with pytest.raises(BackupFormatError):
        w.add(BackupKey(b"k", b"v", 1, 1, 1))  # keys after leases


def test_restore_carries_leases(tmp_path: Path) -> None:
    """The lease's record lands in its home group with the saved remaining TTL, its keys'
    attachments in the groups holding them; a revoke there deletes them."""
    from kvstore.raft.types import Entry
    from kvstore.storage import commands, leases
    from kvstore.storage.store import ApplyBatch, GroupWrite

    keys = [BackupKey(f"k{i:03d}".encode(), b"v", 4096 + i, 4096 + i, 1) for i in range(40)]
    lid = leases.make_id(1, 99)
    attached = tuple(k.key for k in keys[:10])
    path = tmp_path / "b.kvbk"
    path.write_bytes(encode_with_leases(keys, [BackupLease(lid, 30, 12_000, attached)]))
    peers = {1: "127.0.0.1:20001"}
    res = restore(path, tmp_path / "n1", 1, peers, groups=2, replication=1)
    with LmdbNodeStore(tmp_path / "n1" / "db", map_size=1 << 30, state_sync="checkpoint") as store:
        kv = store.revisions
        assert kv.read_rows(1, lambda rows: leases.get_record(rows, lid)) == leases.Record(30, 12_000, 1)
        found = []
        for g in res.groups:
            here = kv.read_rows(g, lambda rows: leases.attached_keys(rows, lid))
            # the count row a LEASE_PUT's limit reads: one per attached key of the group
            assert kv.read_rows(g, lambda rows: leases.attached_count(rows, lid)) == len(here)
            found += here
        assert sorted(found) == sorted(attached)
        for g in res.groups:
            cmd = commands.Command.lease_command(
                leases.LeaseCmd(leases.Kind.REVOKE if g == 1 else leases.Kind.DROP, lid))
            e = Entry(1, store.applied_index(g) + 1, EntryType.NORMAL, commands.encode_command(cmd))
            store.persist([GroupWrite(g, [e])])
            store.apply([ApplyBatch(g, [e], CONF1)])
        left = {k for g in res.groups for k, _ in store.scan(g, b"", None)}
        assert left == {k.key for k in keys[10:]}


def _forged_with_leases(ls: list[BackupLease]) -> bytes:
    """A well-hashed file whose writer was made to skip the one-lease-per-key check (a forger's)."""
    f = io.BytesIO()
    w = BackupWriter(f, BackupInfo(REV, 1_700_000_000_000, 2, 3, 64))
    w.add(BackupKey(b"k", b"v", 1, 1, 1))
    for le in ls:
        w._attached.clear()
        w.add_lease(le)
    w.finish()
    return f.getvalue()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sets(st.sampled_from([b"a", b"b", b"c", b"d"]), max_size=3), min_size=1, max_size=4))
def test_a_key_attached_to_two_leases_is_refused(key_sets: list[set[bytes]]) -> None:
    ls = [BackupLease((i + 1) << 12 | 1, 10, 0, tuple(sorted(ks))) for i, ks in enumerate(key_sets)]
    data = _forged_with_leases(ls)
    twice = sum(len(ks) for ks in key_sets) != len(set().union(*key_sets))
    if twice:
        with pytest.raises(BackupFormatError, match="attached to lease"):
            _decode_all(data)
        with pytest.raises(BackupFormatError, match="attached to lease"):
            encode_with_leases([], ls)  # the writer refuses it too
    else:
        r = BackupReader(io.BytesIO(data))
        list(r.entries())
        assert r.leases == ls


def test_restore_refuses_a_key_attached_to_two_leases(tmp_path: Path) -> None:
    path = tmp_path / "b.kvbk"
    path.write_bytes(_forged_with_leases([BackupLease(4097, 10, 0, (b"k",)), BackupLease(8193, 10, 0, (b"k",))]))
    with pytest.raises(BackupFormatError, match="attached to lease 2001 and to an earlier lease"):
        restore(path, tmp_path / "n1", 1, {1: "127.0.0.1:20001"}, groups=2, replication=1)
    assert not (tmp_path / "n1").exists()
    verified = "0" * 64
    with pytest.raises((BackupFormatError, RestoreError)):
        list(group_records(path, IntervalSet.full(), REV, [], verified, 1, homes={1}))


def test_restore_leaves_keys_of_a_lease_homed_in_a_missing_group_unattached(tmp_path: Path) -> None:
    """A lease whose home group the new cluster lacks is not restored, and (as the docstring
    says) its keys come back unattached: no attachment row points at a lease that is nowhere."""
    from kvstore.storage import leases

    keys = [BackupKey(f"k{i:03d}".encode(), b"v", 4096 + i, 4096 + i, 1) for i in range(20)]
    home_here, home_gone = leases.make_id(1, 5), leases.make_id(3, 7)
    path = tmp_path / "b.kvbk"
    path.write_bytes(encode_with_leases(keys, [BackupLease(home_here, 30, 1000, (b"k000",)),
                                               BackupLease(home_gone, 30, 1000, (b"k001", b"k002"))]))
    res = restore(path, tmp_path / "n1", 1, {1: "127.0.0.1:20001"}, groups=2, replication=1)
    with LmdbNodeStore(tmp_path / "n1" / "db", map_size=1 << 30, state_sync="checkpoint") as store:
        kv = store.revisions
        owners = {k: kv.read_rows(g, lambda rows, k=k: leases.lease_of(rows, k))
                  for g in res.groups for k in (b"k000", b"k001", b"k002")
                  if kv.read_rows(g, lambda rows, k=k: leases.lease_of(rows, k))}
        assert owners == {b"k000": home_here}
        assert all(not kv.read_rows(g, lambda rows: leases.attached_keys(rows, home_gone)) for g in res.groups)
        assert all(kv.read_rows(g, lambda rows: leases.get_record(rows, home_gone)) is None for g in res.groups)
        found = {k for g in res.groups for k, _ in store.scan(g, b"", None)}
        assert {b"k001", b"k002"} <= found  # the keys themselves are restored


@settings(max_examples=40, deadline=None)
@given(keys_strategy(), st.data())
def test_etcd_envelope_is_read_and_any_damage_to_it_refused(keys: list[BackupKey], data: st.DataObject) -> None:
    """etcd's Maintenance.Snapshot streams the backup then `etcd_envelope` (padding, length,
    SHA-256): the whole is 32 bytes past a multiple of 512 (etcdctl's check) and reads as the
    backup; any changed or missing byte of the envelope is refused (the one format error)."""
    import hashlib

    from kvstore.backup.format import BackupFormatError, etcd_envelope, verify

    raw = encode(keys)
    wrapped = raw + etcd_envelope(len(raw), hashlib.sha256(raw))
    assert len(wrapped) % 512 == 32
    assert hashlib.sha256(wrapped[:-32]).digest() == wrapped[-32:]
    assert verify(io.BytesIO(wrapped)).keys == verify(io.BytesIO(raw)).keys == len(keys)
    i = data.draw(st.integers(len(raw), len(wrapped) - 1))
    damaged = data.draw(st.sampled_from([
        wrapped[:i] + bytes([wrapped[i] ^ data.draw(st.integers(1, 255))]) + wrapped[i + 1:],
        wrapped[:i], wrapped + data.draw(st.binary(min_size=1, max_size=600)),
    ]))
    if damaged != raw:
        with pytest.raises(BackupFormatError):
            verify(io.BytesIO(damaged))
