"""Retention by revisions (`--history-retention-revisions N`): the per-group retention point
(`mvcc.retention_point`, read backwards from a group's change log) on the memory rows and on
both node stores (LMDB and `MemoryNodeStore`) against a model, the cluster-wide point
(`kvstore.node.retention`), and the checks of the request that asks a group's leader for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.retention import MAX_KEEP, check_keep, cluster_point
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState
from kvstore.raft.types import Entry, EntryType, HardState
from kvstore.storage import commands as cmds
from kvstore.storage import mvcc
from kvstore.storage.machine import DictState
from kvstore.storage.store import LmdbNodeStore

CONF = ConfState((1,))
NOW = mvcc.make_revision(mvcc.EPOCH_MS + 3_600_000, 0, 0)
KEYS = [b"a", b"b", b"c"]

op_st = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("del"), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("compact"), st.just(b""), st.integers(0, 40)),
)


def _datas(ops: list[tuple[str, bytes, int]]) -> list[bytes]:
    """The commands of `ops`; a compact names a revision near the ones written so far."""
    out = []
    for i, (kind, key, n) in enumerate(ops):
        if kind == "put":
            out.append(cmds.encode_put(key, b"v%d" % i, revision=NOW + n * mvcc.STEP))
        elif kind == "del":
            out.append(cmds.encode_delete(key))
        else:
            out.append(cmds.encode_compact(NOW + n * mvcc.STEP))
    return out


def _written(s: DictState, datas: list[bytes]) -> list[int]:
    """Apply `datas` to `s`; the revisions of the writes that changed something."""
    revs = []
    for d in datas:
        res = s.apply(d)
        assert res.error is None
        if res.revision and cmds.decode_command(d).op != cmds.Op.COMPACT:
            revs.append(res.revision)
    return revs


def _expected(revs: list[int], compact: int, keep: int) -> int:
    kept = sorted({r for r in revs if r > compact}, reverse=True)
    return kept[keep] if len(kept) > keep else 0


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, max_size=40), st.integers(1, 12))
def test_retention_point_keeps_exactly_the_newest_revisions(ops: list[tuple[str, bytes, int]], keep: int) -> None:
    """The point is the (keep+1)-th newest write revision above the compact revision; compacting
    there leaves exactly the newest `keep` changes, and every read at the point or above answers
    as before the compaction; a read below it is COMPACTED naming it."""
    s = DictState(group=5)
    revs = _written(s, _datas(ops))
    compact = mvcc.rev_state(s.rows).compact
    point = mvcc.retention_point(s.rows, keep)
    assert point == _expected(revs, compact, keep)
    if not point:
        return
    assert point in revs and point > compact
    before = {(k, r): mvcc.version_at(s.rows, k, r, s.data.get(k)) for k in KEYS for r in revs if r >= point}
    assert s.apply(cmds.encode_compact(point)).error is None
    assert mvcc.rev_state(s.rows).compact == point
    assert [r for r, _ in mvcc.changes_from(s.rows, point + 1)] == sorted(r for r in revs if r > point)
    assert len([r for r in revs if r > point]) == keep
    for (k, r), v in before.items():
        assert mvcc.version_at(s.rows, k, r, s.data.get(k)) == v
    assert mvcc.retention_point(s.rows, keep) == 0  # nothing more to compact until the next write


def test_legacy_revision_is_not_a_write_and_several_changes_of_one_revision_count_once() -> None:
    s = DictState(group=3)
    s.data[b"old"] = b"v0"  # LEGACY: its first write records revision 1 in the change log
    r1 = s.apply(cmds.encode_put(b"old", b"v1")).revision
    assert mvcc.retention_point(s.rows, 1) == 0
    r2 = s.apply(cmds.encode_put(b"old", b"v2")).revision
    assert mvcc.retention_point(s.rows, 1) == r1 and mvcc.retention_point(s.rows, 2) == 0
    # Two change rows of one revision (transactions will write them): one revision.
    s.rows.put(mvcc.T_CHANGES, mvcc._PAIR.pack(r2, 99), b"other")
    assert mvcc.retention_point(s.rows, 1) == r1
    with pytest.raises(ValueError):
        mvcc.retention_point(s.rows, 0)


# --- both node stores ------------------------------------------------------------------------
def _open(kind: str, path: Path) -> Any:
    return LmdbNodeStore(path) if kind == "lmdb" else MemoryNodeStore()


def _apply(store: Any, group: int, datas: list[bytes]) -> None:
    if not datas:
        return
    es = [Entry(1, 2 + i, EntryType.NORMAL, d, group) for i, d in enumerate(datas)]
    store.persist_and_apply([GroupWrite(group, es, HardState(1, 0, es[-1].index))], ())
    ls = store.log_storage(group)
    store.persist_and_apply((), [ApplyBatch(group, ls.entries(1, ls.last_index() + 1), CONF)])


@pytest.fixture(params=["lmdb", "mem"])
def stores(request: Any, tmp_path: Path) -> Iterator[Any]:
    opened: list[Any] = []

    def factory() -> Any:
        s = _open(request.param, tmp_path / f"s{len(opened)}")
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


def _point(store: Any, group: int, keep: int, max_rows: int = 0) -> int:
    """The group's point from `store`, walked in steps of `max_rows` rows (0: one step)."""
    walk = mvcc.RetentionWalk(keep)
    steps = 0
    while not store.revisions.retention_step(group, walk, max_rows):
        steps += 1
        assert steps <= 1000
    return walk.point


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(op_st, max_size=30), st.lists(op_st, max_size=30), st.integers(1, 8), st.integers(0, 3))
def test_stores_compute_the_point_of_their_own_group_only(
    stores: Any, ops_a: list[tuple[str, bytes, int]], ops_b: list[tuple[str, bytes, int]], keep: int, rows: int
) -> None:
    """Two adjacent groups (4, 5) and the last one: each store's point is its own group's, as the
    memory rows compute it (the backwards walk never reads a neighbouring group's rows), in one
    step or in steps of a few rows, each its own read view."""
    store = stores()
    for g, ops in ((4, ops_a), (5, ops_b), (mvcc.MAX_GROUPS - 1, ops_a)):
        assert store.bootstrap(g, CONF)
        datas = _datas(ops)
        _apply(store, g, datas)
        model = DictState(group=g)
        revs = _written(model, datas)
        want = _expected(revs, mvcc.rev_state(model.rows).compact, keep)
        assert mvcc.retention_point(model.rows, keep) == want
        assert _point(store, g, keep, rows) == want, g
    assert _point(store, 77, keep) == 0  # a group this node does not have


def test_compacting_at_the_point_on_a_store_keeps_the_last_revisions_readable(stores: Any) -> None:
    store = stores()
    assert store.bootstrap(4, CONF)
    datas = [cmds.encode_put(b"k%d" % (i % 3), b"v%d" % i) for i in range(10)]
    _apply(store, 4, datas)
    revs = [store.revisions.get_version(4, b"k%d" % (i % 3))[0] for i in range(3)]
    assert all(v is not None for v in revs)
    point = _point(store, 4, 4)
    assert point > 0
    ls = store.log_storage(4)
    n = ls.last_index()
    es = [Entry(1, n + 1, EntryType.NORMAL, cmds.encode_compact(point), 4)]
    store.persist_and_apply([GroupWrite(4, es, HardState(1, 0, n + 1))], ())
    store.persist_and_apply((), [ApplyBatch(4, es, CONF)])
    st_ = store.revisions.rev_state(4)
    assert st_.compact == point
    kept = [c.revision for c in store.revisions.changes(4, point + 1, st_.last, 100, 1 << 20, False).changes]
    assert len(kept) == 4 and all(r > point for r in kept)
    for r in [point, *kept]:
        store.revisions.get_version(4, b"k0", r)  # no Compacted
    with pytest.raises(mvcc.Compacted) as e:
        store.revisions.get_version(4, b"k0", point - 1)
    assert e.value.compact_revision == point
    assert _point(store, 4, 4) == 0


def test_a_walk_resumed_after_writes_keeps_at_least_what_one_view_keeps() -> None:
    """Steps of a walk are separate views: writes between them land above where it stopped and
    are not counted, so the point is at most what one view after them finds (it keeps more)."""
    s = DictState(group=6)
    revs = [s.apply(cmds.encode_put(b"k%d" % (i % 4), b"v")).revision for i in range(20)]
    walk = mvcc.RetentionWalk(5)
    assert not mvcc.retention_step(s.rows, walk, 3)
    revs += [s.apply(cmds.encode_put(b"k0", b"w")).revision for _ in range(4)]
    while not mvcc.retention_step(s.rows, walk, 3):
        pass
    one_view = mvcc.retention_point(s.rows, 5)
    assert walk.point == revs[-4 - 6] and one_view == revs[-6] and walk.point < one_view


# --- the cluster-wide point and the request's checks --------------------------------------------
@given(st.dictionaries(st.integers(1, 4095), st.integers(0, mvcc.REVISION_MAX), max_size=8))
def test_cluster_point_is_the_highest_group_point(points: dict[int, int]) -> None:
    """The highest point: at most the cluster's own (keep+1)-th newest revision (each group's
    point is at most that), so the cluster's newest `keep` revisions are kept everywhere."""
    assert cluster_point(points) == max(points.values(), default=0)


@given(st.integers(-(1 << 70), 1 << 70))
def test_keep_is_checked_totally(keep: int) -> None:
    if 1 <= keep <= MAX_KEEP:
        assert check_keep(keep) == keep
    else:
        with pytest.raises(errors.InvalidArgument):
            check_keep(keep)


@given(
    st.lists(st.lists(st.integers(1, 300), max_size=25), min_size=1, max_size=5),
    st.integers(1, 10),
)
def test_the_cluster_point_keeps_the_clusters_newest_revisions_and_each_group_at_most_its_own(
    logs: list[list[int]], keep: int
) -> None:
    """Groups' change logs (revisions unique across groups: the slot): R = the highest group
    point keeps every one of the cluster's `keep` newest revisions, and no group more than
    `keep` of its own."""
    revs = [sorted({r * mvcc.STEP + g for r in log}) for g, log in enumerate(logs, start=1)]
    points = {g: _expected(rs, 0, keep) for g, rs in enumerate(revs, start=1)}
    r = cluster_point(points)
    newest = sorted((x for rs in revs for x in rs), reverse=True)[:keep]
    assert all(x > r for x in newest)
    assert all(len([x for x in rs if x > r]) <= keep for rs in revs)


# --- the request on the wire and the leader's answer ----------------------------------------------
def _three_hosts() -> tuple[dict[int, Any], list[Any]]:
    import random

    from kvstore.node.host import Host, RaftSettings

    outbox: list[Any] = []
    hosts = {i: Host(i, MemoryNodeStore(), outbox.extend, RaftSettings(), random.Random(i)) for i in (1, 2, 3)}
    for h in hosts.values():
        h.open_group(5, ConfState((1, 2, 3)))
    hosts[1].groups[5].core.campaign()
    return hosts, outbox


def _pump(hosts: dict[int, Any], outbox: list[Any]) -> None:
    for _ in range(500):
        busy = False
        for h in hosts.values():
            while h.has_work():
                h.run_cycle()
                busy = True
        msgs, outbox[:] = list(outbox), []
        for m in msgs:
            hosts[m.to].step(m)
            busy = True
        if not busy:
            return
    raise AssertionError("never went quiet")


def test_the_groups_leader_answers_from_its_change_log_and_others_point_to_it() -> None:
    from kvstore.node.retention import begin_walk, walk_step

    def group_point(host: Any, group: int, keep: int) -> int:
        walk = begin_walk(host, group, keep)
        while not walk_step(host, group, walk):
            pass
        return walk.point

    hosts, outbox = _three_hosts()
    _pump(hosts, outbox)
    revs: list[int] = []
    for i in range(6):
        hosts[1].propose(5, cmds.encode_put(b"k%d" % (i % 2), b"v%d" % i), lambda r, e: revs.append(r.revision))
        _pump(hosts, outbox)
    assert len(revs) == 6 and revs == sorted(revs)
    assert group_point(hosts[1], 5, 2) == revs[-3]
    assert group_point(hosts[1], 5, 6) == 0
    with pytest.raises(errors.NotLeader) as e:
        group_point(hosts[2], 5, 2)
    assert e.value.leader_id == 1
    with pytest.raises(errors.WrongShard):
        group_point(hosts[1], 9, 2)
    with pytest.raises(errors.InvalidArgument):
        group_point(hosts[1], 5, 0)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_any_group_propose_bytes_with_a_retention_request_are_checked_totally(raw: bytes) -> None:
    """Whatever a peer sends, the check returns or refuses definitely; a retention request is
    accepted only with a number of revisions in range (and then changes nothing)."""
    from google.protobuf.message import DecodeError

    from kvstore.node.grouprequests import check_group_request
    from kvstore.v1 import shard_pb2

    try:
        req = shard_pb2.GroupProposeRequest.FromString(raw)
    except DecodeError:
        return
    try:
        check_group_request(req, None)
    except errors.KVError as err:
        assert not err.indeterminate
        assert not (req.retention_keep and 1 <= req.retention_keep <= MAX_KEEP and not req.conf_change)
    else:
        assert req.retention_keep == 0 or 1 <= req.retention_keep <= MAX_KEEP or req.conf_change


@given(st.integers(0, 4095), st.integers(0, (1 << 64) - 1))
def test_an_answered_point_must_be_a_revision_of_the_group(group: int, revision: int) -> None:
    from kvstore.node.retention import check_point

    ok = revision == 0 or (revision <= mvcc.REVISION_MAX and revision % mvcc.STEP == group)
    if ok:
        assert check_point(group, revision) == revision
    else:
        with pytest.raises(errors.InvalidArgument):
            check_point(group, revision)


# --- range moves and configuration ----------------------------------------------------------------
def test_history_that_moved_with_its_range_counts_in_the_target_and_stays_readable() -> None:
    """A range moves from group 1 to group 2 with its history (REC_HISTORY records, then the
    source drops it): the target's change log holds the moved revisions, so the cluster point
    still keeps the cluster's newest revisions, now read from the target."""
    from kvstore.shard.ranges import IntervalSet, key_hash
    from kvstore.storage.shardcmd import (
        REC_CLOSED,
        REC_DATA,
        REC_HISTORY,
        ShardOp,
        encode_record,
        encode_shard_command,
    )

    keep = 3
    full = IntervalSet.full()
    src, dst = DictState(group=1), DictState(group=2)
    assert src.apply(encode_shard_command(ShardOp.SET, full)).error is None
    assert dst.apply(encode_shard_command(ShardOp.SET, IntervalSet())).error is None
    writes = [(b"m", src.apply(cmds.encode_put(b"m", b"%d" % i, revision=NOW)).revision, b"%d" % i) for i in range(5)]
    writes.append((b"s", src.apply(cmds.encode_put(b"s", b"x")).revision, b"x"))
    rng = IntervalSet([(key_hash(b"m"), key_hash(b"m"))])
    assert src.apply(encode_shard_command(ShardOp.FREEZE, rng, move=1)).error is None
    st_ = mvcc.rev_state(src.rows)
    records = (
        encode_record(REC_DATA, b"m", src.data[b"m"])
        + encode_record(REC_HISTORY, b"m", mvcc.encode_versions(mvcc.key_history(src.rows, b"m")))
        + encode_record(REC_CLOSED, b"", mvcc._PAIR.pack(st_.last, st_.compact))
    )
    assert dst.apply(encode_shard_command(ShardOp.BEGIN, rng, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.INSTALL, records=records, move=1, token=5)).error is None
    assert dst.apply(encode_shard_command(ShardOp.ACTIVATE, rng, move=1, token=5)).error is None
    assert src.apply(encode_shard_command(ShardOp.DROP, rng, move=1)).error is None
    # The moved key's revisions are the target's now: 5 of them, the source keeps only "s".
    assert mvcc.retention_point(dst.rows, keep) == writes[1][1]
    assert mvcc.retention_point(src.rows, keep) == 0
    writes.append((b"m", dst.apply(cmds.encode_put(b"m", b"after")).revision, b"after"))
    r = cluster_point({1: mvcc.retention_point(src.rows, keep), 2: mvcc.retention_point(dst.rows, keep)})
    newest = sorted(writes, key=lambda w: w[1])[-keep:]
    assert all(w[1] > r for w in newest) and r == writes[2][1]
    for s in (src, dst):
        assert s.apply(cmds.encode_compact(r)).error is None
    for key, rev, value in writes:
        s = dst if key == b"m" else src
        if rev >= r or key == b"s":  # "s" is the source's newest: its last clamps the compaction
            assert mvcc.version_at(s.rows, key, rev, s.data.get(key)) is not None
            assert mvcc.version_at(s.rows, key, rev, s.data.get(key)).value == value  # type: ignore[union-attr]
    assert mvcc.rev_state(dst.rows).compact == r
    assert len([x for x, _ in mvcc.changes_from(dst.rows, r + 1)]) == keep


@pytest.mark.parametrize(
    ("time_s", "revs", "interval", "ok"),
    [(0, 0, 0, True), (3600, 0, 0, True), (0, 1000, 0, True), (0, 1000, 0.3, True), (3600, 1000, 0, False),
     (0, MAX_KEEP + 1, 0, False), (0, -1, 0, False), (0, 10, 0.01, False), (0, 10, 86401, False)],
)
def test_the_serve_options_of_retention(time_s: float, revs: int, interval: float, ok: bool) -> None:
    """By time or by revisions, not both (one compact revision per round); N and the interval in range."""
    from kvstore.server.config import NodeConfig

    cfg = NodeConfig(id=1, data_dir=Path("d"), listen="127.0.0.1:1", peers={1: "127.0.0.1:1"},
                     history_retention=time_s, history_retention_revisions=revs, history_retention_interval=interval)
    if ok:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match="history-retention"):
            cfg.validate()
