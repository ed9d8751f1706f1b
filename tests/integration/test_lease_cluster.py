"""Leases on a real 3-node cluster with two data groups: a lease homed in one group with keys in
both, kept alive across a kill -9 of its home group's leader (the keys stay), then left to expire
(the keys go, in both groups at one revision, and a watch sees their DELETEs at that revision); a
revoke deletes a lease's keys in both groups at one revision too; a put with a revoked lease is
refused (definite); kvctl's lease commands print etcdctl's lines; keys a range move took to a new
data group are deleted there when their lease expires; a put with a lease that died before a data
group was created, delayed past the death, attaches its key there (issue 17's gap B) and the
orphan sweep deletes it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from clusterharness import Cluster

from kvstore.backup.format import BackupReader
from kvstore.client import Client, Compare, Op
from kvstore.errors import InvalidArgument, LeaseNotFound
from kvstore.shard.shardmap import ShardMap
from kvstore.storage import leases
from kvstore.v1 import kv_pb2, kv_pb2_grpc

TTL = 3


def _keys_by_group(m: ShardMap, prefix: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while len(out) < 2:
        k = prefix + b"%d" % i
        out.setdefault(m.group_for_key(k), k)
        i += 1
    return out


def _wait(cond: Callable[[], bool], what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _raw_txn(cluster: Cluster, body: kv_pb2.TxnBody) -> kv_pb2.TxnResponse:
    """A raw KV.Txn (no session, no client library): sent to the first node, then where a
    NOT_LEADER points, again while a group has no leader (an earlier test restarts a killed
    leader: its groups may be electing). Those refusals are definite: nothing was applied."""
    where = [cluster.endpoints[0]]
    got: list[kv_pb2.TxnResponse] = []

    def answered() -> bool:
        with grpc.insecure_channel(where[0]) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            r = kv_pb2_grpc.KVStub(ch).Txn(kv_pb2.TxnRequest(txn=body), timeout=20)
        got[:] = [r]
        if r.error.code == kv_pb2.NOT_LEADER and r.error.leader_hint:
            where[0] = r.error.leader_hint
        return r.error.code not in (kv_pb2.NOT_LEADER, kv_pb2.NO_LEADER)

    _wait(answered, "a raw Txn answered by a leader")
    return got[0]


def _kvctl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints), "--timeout", "20",
         *args], capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    c = Cluster(Path(tmp_path_factory.mktemp("lease")), 3,
                extra_args=["--groups", "2", "--lease-orphan-sweep", "0.5"]).start()
    try:
        c.wait_cluster_version()
        yield c  # type: ignore[misc]
    finally:
        c.stop()


def test_keep_alive_holds_across_a_leader_kill_and_expiry_deletes_everywhere(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        keys = _keys_by_group(m, b"l/")
        home = min(keys)
        lid = c.lease_grant(TTL, leases.make_id(home, 0x5EED))
        assert leases.home_group(lid) == home
        revs = [c.put(k, b"v", lease=lid) for k in keys.values()]
        # its keys come from the answering node's replicas, which may lag the key's group leader
        _wait(lambda: sorted(c.lease_time_to_live(lid, keys=True).keys) == sorted(keys.values()),
              "the lease's keys in the answering node's replicas")
        info = c.lease_time_to_live(lid, keys=True)
        assert info.granted_ttl == TTL and 0 <= info.ttl <= TTL and sorted(info.keys) == sorted(keys.values())
        assert lid in c.lease_list()

        stop = threading.Event()
        renewals: list[int] = []

        def keep() -> None:
            with Client(cluster.endpoints, timeout=20) as k:
                while not stop.is_set():
                    renewals.append(k.lease_keep_alive_once(lid))
                    stop.wait(0.5)

        t = threading.Thread(target=keep, daemon=True)
        t.start()
        leader = cluster.settled_leader(home)
        leader.kill9()
        # kept alive past two TTLs with the home group's leader gone: the keys stay
        kill_at = time.monotonic()
        _wait(lambda: time.monotonic() - kill_at > 2 * TTL and len(renewals) > 4 * TTL, "renewals after the kill")
        assert all(r == TTL for r in renewals)
        for k in keys.values():
            assert c.get(k) == b"v"

        stop.set()
        t.join(30)
        _wait(lambda: all(c.get(k) is None for k in keys.values()), "the lease's keys deleted in both groups")
        assert c.lease_time_to_live(lid).ttl == -1
        assert lid not in c.lease_list()
        # the watch saw each key's DELETE, every one at the same revision: one atomic deletion
        # across the two groups (the home group's RECORD was its commit point)
        deletes: dict[bytes, int] = {}
        for batch in c.watch_batches(prefix=b"l/", start_revision=min(revs)):
            deletes.update({e.key: e.mod_revision for e in batch.events if e.type == "DELETE"})
            if set(deletes) == set(keys.values()):
                break
        assert len(set(deletes.values())) == 1, deletes
        # a put with the dead lease is refused, definitely
        with pytest.raises(InvalidArgument) as e:
            c.put(keys[home], b"w", lease=lid)
        assert leases.NOT_FOUND in e.value.message and e.value.definite
        leader.start()


def test_a_revoke_deletes_keys_in_both_groups_at_one_revision(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        keys = _keys_by_group(m, b"r/")
        lid = c.lease_grant(60, leases.make_id(max(keys), 0xBEEF))
        revs = [c.put(k, b"v", lease=lid) for k in keys.values()]
        assert c.lease_revoke(lid) == len(keys)
        deletes: dict[bytes, int] = {}
        for batch in c.watch_batches(prefix=b"r/", start_revision=min(revs)):
            deletes.update({e.key: e.mod_revision for e in batch.events if e.type == "DELETE"})
            if set(deletes) == set(keys.values()):
                break
        assert len(set(deletes.values())) == 1, deletes
        assert all(c.get(k) is None for k in keys.values())
        with pytest.raises(InvalidArgument) as e:
            c.lease_revoke(lid)
        assert leases.NOT_FOUND in e.value.message and e.value.definite
        for k in keys.values():  # every group holds the lease's tombstone (no DROP follows the deletion)
            with pytest.raises(InvalidArgument) as e:
                c.put(k, b"again", lease=lid)
            assert leases.NOT_FOUND in e.value.message and e.value.definite


def test_a_txn_across_groups_puts_keys_on_one_lease_and_the_revoke_deletes_both(cluster: Cluster) -> None:
    """Issue 17: a transaction whose leased puts are in the two groups (a two-phase commit; the
    client checks the lease at its home for `checked`), its keys' leases compared across the
    groups; `kvctl txn`'s `put --lease` likewise (under `lease("k") = "ID"` compares), and a raw KV.Txn without `checked` (the
    coordinating node checks the lease at its home); the revoke deletes every key at one
    revision."""
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        keys = _keys_by_group(m, b"xl/")
        lid = c.lease_grant(60, leases.make_id(min(keys), 0xFACE))
        first = c.txn([Compare.create(k, "=", 0) for k in keys.values()],
                      [Op.put(k, b"v", lease=lid) for k in keys.values()])
        assert first.succeeded and first.revision
        more = _keys_by_group(m, b"xm/")
        line = "".join(f"put {k.decode()} w --lease={lid:x}\n" for k in more.values())
        # etcdctl's lease compare (the id in hex) on the keys the first transaction attached
        held_by = "".join(f'lease("{k.decode()}") = "{lid:x}"\n' for k in keys.values())
        out = subprocess.run(
            [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints), "--timeout", "20",
             "txn"], input=held_by + "\n" + line + "\n", capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert out.returncode == 0 and out.stdout.startswith("SUCCESS"), (out.stdout, out.stderr)
        raw = _keys_by_group(m, b"xr/")  # KV.Txn without `checked`: the coordinator asks the home
        body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=k, value=b"r", lease=lid))
                                       for k in raw.values()])
        got = _raw_txn(cluster, body)
        assert got.error.code == kv_pb2.OK and got.result.succeeded, got.error
        # one leased put alone, in a group other than the lease's home (one group's TXN): the
        # node stamps it as a cross-group one's, not refused for the missing `checked`
        single = next(k for g, k in _keys_by_group(m, b"xs/").items() if g != leases.home_group(lid))
        one = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=single, value=b"s", lease=lid))])
        got = _raw_txn(cluster, one)
        assert got.error.code == kv_pb2.OK and got.result.succeeded, got.error
        every = [*keys.values(), *more.values(), *raw.values(), single]
        held = c.txn([Compare.lease(k, "=", lid) for k in every], [Op.get(k) for k in every])
        assert held.succeeded and sorted(c.lease_time_to_live(lid, keys=True).keys) == sorted(every)
        assert c.lease_revoke(lid) == len(every)
        deletes: dict[bytes, int] = {}
        for batch in c.watch_batches(prefix=b"x", start_revision=first.revision):
            deletes.update({e.key: e.mod_revision for e in batch.events if e.type == "DELETE"})
            if set(deletes) >= set(every):
                break
        assert len({deletes[k] for k in every}) == 1, deletes  # one revision in both groups
        assert all(c.get(k) is None for k in every)
        with pytest.raises(LeaseNotFound) as e:  # the dead lease: refused whole, nothing written
            c.txn([], [Op.put(b"xn/plain", b"p"), *(Op.put(k, b"again", lease=lid) for k in keys.values())])
        assert e.value.definite and c.get(b"xn/plain") is None


def test_an_election_made_before_its_session_started(cluster: Cluster) -> None:
    import asyncio

    from kvstore.client import AsyncClient
    from kvstore.client.concurrency import Election, Session

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, timeout=20) as client:
            s = Session(client, ttl=10)
            e = Election(s, b"elect/x")  # its key follows the session's lease, granted below
            async with s:
                held = await e.campaign(b"me")
                assert held.key == b"elect/x/%016x" % s.lease
                assert await e.leader() == (b"me", held.fence)
                await e.release()
                assert await e.leader() is None

    cluster.wait_leader()
    asyncio.run(main())


def test_kvctl_lease_commands(cluster: Cluster) -> None:
    cluster.wait_leader()
    g = _kvctl(cluster, "lease", "grant", "60")
    assert g.returncode == 0, g.stderr
    words = g.stdout.split()
    assert words[0] == "lease" and words[2:] == ["granted", "with", "TTL(60s)"], g.stdout
    hex_id = words[1]
    assert len(hex_id) == 16 and int(hex_id, 16) > 0
    p = _kvctl(cluster, "put", "--lease", hex_id, "lk", "v")
    assert p.returncode == 0, p.stderr
    ttl = _kvctl(cluster, "lease", "timetolive", hex_id, "--keys")
    assert ttl.returncode == 0, ttl.stderr
    assert ttl.stdout.startswith(f"lease {hex_id} granted with TTL(60s), remaining(")
    assert ttl.stdout.rstrip().endswith("attached keys([lk])"), ttl.stdout
    ka = _kvctl(cluster, "lease", "keep-alive", "--once", hex_id)
    assert ka.returncode == 0 and ka.stdout == f"lease {hex_id} keepalived with TTL(60)\n", (ka.stdout, ka.stderr)
    ls = _kvctl(cluster, "lease", "list")
    assert ls.returncode == 0 and hex_id in ls.stdout.split() and ls.stdout.startswith("found "), ls.stdout
    # a backup carries the lease: its TTL, remaining TTL and keys
    backup = cluster.root / "with-lease.kvbk"
    sv = _kvctl(cluster, "snapshot", "save", str(backup))
    assert sv.returncode == 0, sv.stderr
    with open(backup, "rb") as f:
        reader = BackupReader(f)
        list(reader.entries())
    found = [le for le in reader.leases if le.id == int(hex_id, 16)]
    assert len(found) == 1, (reader.leases, hex_id, sv.stdout)
    saved = found[0]
    assert saved.ttl_s == 60 and 0 < saved.remaining_ms <= 60_000 and saved.keys == (b"lk",)
    rv = _kvctl(cluster, "lease", "revoke", hex_id)
    assert rv.returncode == 0 and rv.stdout == f"lease {hex_id} revoked\n", (rv.stdout, rv.stderr)
    with Client(cluster.endpoints, timeout=20) as c:  # "lk" may be in another group: deleted right after
        _wait(lambda: c.get(b"lk") is None, "the revoked lease's key deleted")
    assert _kvctl(cluster, "get", "lk").returncode == 1
    assert _kvctl(cluster, "lease", "timetolive", hex_id).stdout == f"lease {hex_id} already expired\n"
    dead = _kvctl(cluster, "lease", "keep-alive", hex_id)
    assert dead.returncode == 1 and dead.stdout == f"lease {hex_id} expired or revoked.\n"
    bad = _kvctl(cluster, "put", "--lease", hex_id, "lk", "v")
    assert bad.returncode == 2 and leases.NOT_FOUND in bad.stderr, (bad.returncode, bad.stderr)
    junk = _kvctl(cluster, "lease", "revoke", "zz")
    assert junk.returncode == 2 and "hexadecimal" in junk.stderr


def test_mutex_fencing_tokens_under_a_leader_kill(cluster: Cluster) -> None:
    """Three sessions contend for one lock, each holding it a moment per turn, while one group's
    leader is killed: the resource (which refuses a token below the highest it has seen) never
    sees two holders at once, and the tokens it accepts only grow."""
    import asyncio

    from kvstore.client import AsyncClient
    from kvstore.client.concurrency import Mutex, Session

    cluster.wait_leader()
    accepted: list[int] = []
    inside: list[int] = []

    async def worker(i: int, turns: int) -> None:
        async with AsyncClient(cluster.endpoints, timeout=20) as client, Session(client, ttl=10) as s:
            m = Mutex(s, b"locks/res")
            for _ in range(turns):
                held = await m.acquire()
                assert not inside, f"worker {i} got the lock while {inside} holds it"
                assert not accepted or held.fence > accepted[-1], (held.fence, accepted)
                inside.append(i)
                accepted.append(held.fence)
                await asyncio.sleep(0.05)
                inside.remove(i)
                await m.release()

    async def main() -> None:
        tasks = [asyncio.create_task(worker(i, 4)) for i in range(3)]
        await asyncio.sleep(1.0)
        leader = await asyncio.to_thread(cluster.settled_leader, 1)  # (blocking: not on the loop)
        leader.kill9()
        await asyncio.gather(*tasks)
        leader.start()

    asyncio.run(main())
    assert len(accepted) == 12 and accepted == sorted(accepted)


def test_kvctl_lock_passes_the_fencing_token(cluster: Cluster) -> None:
    cluster.wait_leader()
    r = _kvctl(cluster, "lock", "--ttl", "5", "jobs/nightly", "--", sys.executable, "-c",
               "import os; print('fence', os.environ['KVSTORE_LOCK_FENCE'])")
    assert r.returncode == 0, r.stderr
    key_line, fence_line = r.stdout.splitlines()[:2]
    assert key_line.startswith("jobs/nightly/") and int(fence_line.split()[1]) > 0
    with Client(cluster.endpoints, timeout=20) as c:  # released when the command exited
        _wait(lambda: not list(c.scan(b"jobs/nightly/")), "the lock key released")


def test_keys_moved_to_a_new_group_are_deleted_there_when_the_lease_expires(cluster: Cluster) -> None:
    """Last in this module (it adds a third data group): a range move carries each key's lease
    attachment, so the lease's expiry deletes the keys in the group they moved to. The lease is
    kept alive until the move finished, then left to expire.

    Gap B, then: a lease in each old data group is revoked before the group is added, its
    LeaseTimeToLive answer (`checked`) kept; after, a LeasePut with it (as a client's delayed
    put: less than 60 s after its check) for a key of the new group, sent to that group's leader
    (not the lease home's, which would check the record again), is accepted (the new group holds
    no tombstone of the lease), and the orphan sweep deletes the key (then keeps a tombstone)."""
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        lid = c.lease_grant(TTL, leases.make_id(min(m.data_groups()), 0xD00D))
        dead: dict[int, tuple[int, int]] = {}  # home group -> (lease, its last `checked`)
        for g in m.data_groups():
            d = c.lease_grant(60, leases.make_id(g, 0xDEAD))
            dead[g] = (d, c.lease_time_to_live(d).checked)
        keys = [b"mv/%d" % i for i in range(30)]
        moving = threading.Event()
        moving.set()

        def keep_alive() -> None:
            with Client(cluster.endpoints, timeout=20) as k:
                while moving.is_set():
                    k.lease_keep_alive_once(lid)
                    time.sleep(0.5)

        t = threading.Thread(target=keep_alive, daemon=True)
        t.start()
        try:
            for k in keys:
                c.put(k, b"v", lease=lid)
            for d, _ in dead.values():
                c.lease_revoke(d)
            c.add_group(wait=True, timeout=120)
            _wait(lambda: sorted(c.lease_time_to_live(lid, keys=True).keys) == sorted(keys),
                  "every key attached after the move")  # (read from this node's replicas)
        finally:
            moving.clear()
            t.join()
        after = c.shard_map(refresh=True)
        assert after is not None and len(after.data_groups()) == len(m.data_groups()) + 1
        assert [k for k in keys if after.group_for_key(k) != m.group_for_key(k)]  # (2/3)**30: some moved
        _wait(lambda: all(c.get(k) is None for k in keys), "the lease's keys deleted where they are")
        assert c.lease_time_to_live(lid).ttl < 0  # expired

        new = (set(after.data_groups()) - set(m.data_groups())).pop()
        key = next(k for i in range(1000) if after.group_for_key(k := b"late/%d" % i) == new)
        for _ in range(5):  # (bounded) until the put reaches the new group's current leader
            # the leaders every node names (not necessarily the balancer's preferred ones: a group
            # added under load may keep its first leader for a while)
            lead = cluster.settled_leader(new, preferred=False)
            homes = [g for g in dead if cluster.settled_leader(g, preferred=False).id != lead.id]
            assert homes, "every old data group is led by the new group's leader"
            d, checked = dead[homes[0]]
            req = kv_pb2.LeasePutRequest(key=key, value=b"late", lease=d, checked=checked)
            with lead.channel() as ch:
                resp = kv_pb2_grpc.KVStub(ch).LeasePut(req, timeout=20)
            if resp.error.code != kv_pb2.NOT_LEADER:
                break
        assert resp.error.code == kv_pb2.OK and resp.revision > 0, resp.error  # gap B: attached after the death
        _wait(lambda: c.get(key) is None, "the orphan sweep deleting the key of the dead lease")
        for _ in range(5):  # (bounded) at the new group's current leader
            with cluster.settled_leader(new, preferred=False).channel() as ch:
                again = kv_pb2_grpc.KVStub(ch).LeasePut(req, timeout=20)
            if again.error.code != kv_pb2.NOT_LEADER:
                break
        assert again.error.code == kv_pb2.INVALID_ARGUMENT and leases.NOT_FOUND in again.error.message
