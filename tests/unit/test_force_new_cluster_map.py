"""`--force-new-cluster`'s decisions (kvstore/node/forcenew.py) on maps and logs: the rewritten
map names the survivor alone in the groups it hosts and keeps the lost groups' placements (and
lists them), a second rewrite is nothing to do, and `force_logs` appends the conf changes that
leave the survivor alone, committed, on the real write-ahead-log store."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.node.forcenew import ForceError, conf_at_end, force_logs, lost_groups, rewrite_map
from kvstore.node.store import GroupWrite
from kvstore.raft import ConfChange, ConfChangeType
from kvstore.raft.types import ConfState, Entry, EntryType
from kvstore.shard.shardmap import META_GROUP, ShardMap
from kvstore.storage.store import LmdbNodeStore


def test_the_map_names_the_survivor_alone_and_lists_the_lost_groups() -> None:
    m = ShardMap.initial([1, 2, 3, 4, 5], groups=5, replication=3,
                         addresses={n: f"127.0.0.1:{1000 + n}" for n in range(1, 6)})
    m = m.with_client(2, "127.0.0.1:2002")
    hosted = m.groups_of_node(1)
    lost = lost_groups(m, 1)
    assert lost and set(lost) == set(m.groups) - set(hosted)
    new = rewrite_map(m, 1, "127.0.0.1:1001")
    assert new is not None and new.version > m.version
    assert new.nodes == {1: "127.0.0.1:1001"} and new.clients == {}
    for g in hosted:
        assert new.groups[g].voters == (1,) and new.groups[g].learners == ()
    for g in lost:
        assert new.groups[g] == m.groups[g]
    assert new.routes == m.routes
    assert rewrite_map(new, 1, "127.0.0.1:1001") is None


def test_force_logs_leaves_the_node_alone_in_every_group_it_hosts(tmp_path: Path) -> None:
    store = LmdbNodeStore(tmp_path / "db", sync=False)
    try:
        with pytest.raises(ForceError, match="does not host the metadata group"):
            force_logs(store, 1)
        store.bootstrap(META_GROUP, ConfState((2, 3)), [])  # hosted, but node 1 is not (yet) a member
        with pytest.raises(ForceError, match="not a member of the metadata group"):
            force_logs(store, 1)
    finally:
        store.close()
    store = LmdbNodeStore(tmp_path / "db2", sync=False)
    try:
        for g, conf in ((META_GROUP, ConfState((1, 2, 3))), (1, ConfState((2, 3), (1,))), (2, ConfState((2, 3)))):
            store.bootstrap(g, conf, [])
        # Group 2: node 1 was being added (a conf change in the log, uncommitted): it counts.
        last, hs = store.log_storage(2).last_index(), store.hard_state(2)
        cc = Entry(1, last + 1, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_LEARNER, 1).encode(), group=2)
        store.persist_and_apply([GroupWrite(2, [cc], hs)], [])
        assert conf_at_end(store, 2) == ConfState((2, 3), (1,)) and store.hard_state(2).commit == last
        done = {f.group: f for f in force_logs(store, 1)}
        assert done[META_GROUP].removed == (2, 3) and not done[META_GROUP].promoted
        assert done[1].removed == (2, 3) and done[1].promoted
        assert done[2].removed == (2, 3) and done[2].promoted
        for g, f in done.items():
            assert conf_at_end(store, g) == ConfState((1,))
            assert store.hard_state(g).commit == f.last == store.log_storage(g).last_index()
        again = force_logs(store, 1)  # idempotent: nothing more to append
        assert all(not f.removed and not f.promoted for f in again)
        assert [store.log_storage(g).last_index() for g in (0, 1, 2)] == [done[g].last for g in (0, 1, 2)]
    finally:
        store.close()
