"""Transactions on a real 3-node cluster with two data groups: the client's `txn` (compares,
both branches, one revision for all writes, seen by a watch as one batch), `kvctl txn` in
etcdctl's format, a transaction across both groups (two-phase commit: one revision), and
concurrent optimistic increments of a key pair that never lose an update."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from clusterharness import Cluster

from kvstore.client import AsyncClient, Client, Compare, Op, OpResponse, TxnResponse
from kvstore.shard.shardmap import ShardMap
from kvstore.v1 import kv_pb2, kv_pb2_grpc


def _keys_by_group(m: ShardMap, prefix: bytes, n: int) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    i = 0
    while len(out) < 2 or min(len(v) for v in out.values()) < n:
        k = prefix + b"%d" % i
        out.setdefault(m.group_for_key(k), []).append(k)
        i += 1
    return out


def _kvctl(cluster: Cluster, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints), "--timeout", "20",
         "txn", *args],
        input=stdin, capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    c = Cluster(Path(tmp_path_factory.mktemp("txn")), 3, extra_args=["--groups", "2"]).start()
    try:
        yield c  # type: ignore[misc]
    finally:
        c.stop()


def test_client_txn_kvctl_txn_and_a_cross_group_txn(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        by_group = _keys_by_group(m, b"t/", 3)
        (g1, (a, b, absent)), (g2, (other, _, _)) = sorted((g, ks[:3]) for g, ks in by_group.items())[:2]

        # create both keys if a is absent: both writes at one revision
        r = c.txn([Compare.create(a, "=", 0)], [Op.put(a, b"1"), Op.put(b, b"2"), Op.get(a)], [Op.get(a)])
        assert r.succeeded and r.revision > 0
        assert [x.kind for x in r.responses] == ["put", "put", "get"]
        assert r.responses[0].revision == r.revision
        kv = r.responses[2].kv
        assert kv is not None and (kv.key, kv.value, kv.mod_revision, kv.version) == (a, b"1", r.revision, 1)
        ra, rb = c.read(a), c.read(b)
        assert (ra.value, rb.value) == (b"1", b"2")
        assert ra.mod_revision == rb.mod_revision == r.revision
        # a watch from that revision delivers both changes in one batch at it
        batch = next(iter(c.watch_batches(prefix=b"t/", start_revision=r.revision)))
        assert batch.revision == r.revision
        assert sorted((e.key, e.value, e.mod_revision) for e in batch.events) == [
            (a, b"1", r.revision), (b, b"2", r.revision)]

        # the same transaction again: the compare fails, the failure branch reads
        r2 = c.txn([Compare.create(a, "=", 0)], [Op.put(a, b"x")], [Op.get(a), Op.delete(b), Op.get(absent)])
        assert not r2.succeeded and r2.revision > r.revision  # the delete wrote
        assert r2.responses[0].kv is not None and r2.responses[0].kv.value == b"1"
        assert r2.responses[1].deleted and r2.responses[2].kv is None
        assert c.get(b) is None

        # keys in two groups: a two-phase commit, both writes at one revision
        assert g1 != g2
        rx = c.txn([], [Op.put(b, b"cross"), Op.put(other, b"cross")])
        assert rx.succeeded and c.read(b).mod_revision == c.read(other).mod_revision == rx.revision
        c.txn([], [Op.delete(b), Op.delete(other)])
        assert c.get(a) == b"1" and c.get(other) is None

    # kvctl txn, in etcdctl's format and output
    sa, sb = a.decode(), b.decode()
    p = _kvctl(cluster, f'value("{sa}") = "1"\nversion("{sa}") > "0"\n\nput {sa} "two words"\nget {sa}\n'
                        f'del {sb}\nget {sb}\n\nget {sa}\n\n')
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"SUCCESS\n\nOK\n\n{sa}\ntwo words\n\n0\n\n"
    p = _kvctl(cluster, f'mod("{sa}") < "1"\n\nput {sa} never\n\nget {sa}\n')
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"FAILURE\n\n{sa}\ntwo words\n"
    p = _kvctl(cluster, f'\nput {sa} "two words"\nput {other.decode()} y\n\n')
    assert p.returncode == 0 and p.stdout == "SUCCESS\n\nOK\n\nOK\n", (p.stdout, p.stderr)
    p = _kvctl(cluster, 'bogus("k") = "1"\n\n\n')
    assert p.returncode == 2 and "unknown target bogus" in p.stderr
    p = _kvctl(cluster, f'\nget {sa}\n\n', "-o", "json")
    assert p.returncode == 0 and '"succeeded": true' in p.stdout and '"value": "two words"' in p.stdout


def test_concurrent_txn_increments_of_a_key_pair_lose_no_update(cluster: Cluster) -> None:
    workers, each = 6, 5

    async def main() -> tuple[bytes | None, bytes | None, int]:
        async with AsyncClient(cluster.endpoints, timeout=30) as c:
            m = await c.shard_map(refresh=True)
            assert m is not None
            x, y = next(ks for ks in _keys_by_group(m, b"pair/", 2).values() if len(ks) >= 2)[:2]
            conflicts = 0

            async def worker() -> None:
                nonlocal conflicts
                for _ in range(each):
                    cur = await c.read(x)
                    mod, n = cur.mod_revision, int(cur.value or b"0")
                    while True:
                        # compare the mod revision read: no one wrote x since; then both keys move
                        r = await c.txn(
                            [Compare.mod(x, "=", mod)],
                            [Op.put(x, b"%d" % (n + 1)), Op.put(y, b"%d" % (n + 1))],
                            [Op.get(x)],
                        )
                        if r.succeeded:
                            break
                        conflicts += 1
                        kv = r.responses[0].kv
                        assert kv is not None
                        mod, n = kv.mod_revision, int(kv.value)

            await asyncio.gather(*(worker() for _ in range(workers)))
            return (await c.get(x)), (await c.get(y)), conflicts

    vx, vy, conflicts = asyncio.run(main())
    print(f"\n{workers * each} increments, {conflicts} compare failures retried")
    assert vx == vy == b"%d" % (workers * each)


def test_concurrent_bank_transfers_across_groups_keep_the_total(cluster: Cluster) -> None:
    """Accounts in both groups; concurrent transfers, each a transaction across two groups that
    reads both balances (its failure branch) and moves one unit if neither changed since: the
    total never changes and every committed transfer is in the final balances (no lost update)."""
    workers, each, start = 4, 4, 50

    async def main() -> tuple[dict[bytes, int], dict[bytes, int], int]:
        async with AsyncClient(cluster.endpoints, timeout=30) as c:
            m = await c.shard_map(refresh=True)
            assert m is not None
            by_group = _keys_by_group(m, b"bank/", 2)
            accts = [k for ks in list(by_group.values())[:2] for k in ks[:2]]
            r = await c.txn([], [Op.put(k, b"%d" % start) for k in accts])
            assert r.succeeded
            moved = {k: 0 for k in accts}
            retries = 0

            async def worker(w: int) -> None:
                nonlocal retries
                for i in range(each):
                    src = accts[(w + i) % len(accts)]
                    dst = next(k for k in accts[(w + i + 1) % len(accts):] + accts
                               if m.group_for_key(k) != m.group_for_key(src))
                    while True:
                        cur = await c.txn([], [Op.get(src), Op.get(dst)])
                        (s, d) = (cur.responses[0].kv, cur.responses[1].kv)
                        assert s is not None and d is not None
                        r = await c.txn(
                            [Compare.mod(src, "=", s.mod_revision), Compare.mod(dst, "=", d.mod_revision)],
                            [Op.put(src, b"%d" % (int(s.value) - 1)), Op.put(dst, b"%d" % (int(d.value) + 1))],
                        )
                        if r.succeeded:
                            moved[src] -= 1
                            moved[dst] += 1
                            break
                        retries += 1

            await asyncio.gather(*(worker(w) for w in range(workers)))
            final = {k: int(await c.get(k) or b"0") for k in accts}
            return final, moved, retries

    final, moved, retries = asyncio.run(main())
    print(f"\n{workers * each} transfers across groups, {retries} compare failures retried")
    assert sum(final.values()) == start * len(final)
    assert final == {k: start + moved[k] for k in final}


def test_kvctl_delete_prefix_across_groups(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        keys = [b"del/%d" % i for i in range(8)]
        assert len({m.group_for_key(k) for k in keys}) > 1
        assert c.txn([], [Op.put(k, b"x") for k in keys]).succeeded
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints), "--timeout", "20",
         "delete", "--prefix", "del/"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert p.returncode == 0 and p.stdout == "8\n", (p.stdout, p.stderr)
    with Client(cluster.endpoints, timeout=20) as c:
        assert all(c.get(k) is None for k in keys)


def _scan_at(c: Client, prefix: bytes, revision: int) -> list[tuple[bytes, bytes, int]]:
    return [(kv.key, kv.value, kv.mod_revision) for kv in c.scan_kvs(prefix, revision=revision)]


def _items(r: OpResponse) -> list[tuple[bytes, bytes, int]]:
    assert r.kind == "scan"
    return [(kv.key, kv.value, kv.mod_revision) for kv in r.items]


def test_txn_scans_read_every_group_at_the_transactions_revision(cluster: Cluster) -> None:
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        (_, (a, b, _)), (_, (x, y, _)) = sorted((g, ks[:3]) for g, ks in _keys_by_group(m, b"sc/", 3).items())[:2]
        assert c.txn([], [Op.put(k, b"0") for k in (a, b, x, y)]).succeeded

        # compares and writes in one group, the scan over both: it sees the write, at its revision
        r = c.txn([Compare.value(a, "=", b"0")], [Op.put(a, b"1"), Op.scan(prefix=b"sc/")], [Op.get(a)])
        assert r.succeeded and r.revision > 0
        scan = r.responses[1]
        assert scan.revision == r.revision and not scan.more
        assert _items(scan) == _scan_at(c, b"sc/", r.revision)
        assert (a, b"1", r.revision) in _items(scan) and len(scan.items) == 4

        # across groups (two-phase commit): both writes in the scan, at the commit revision
        rx = c.txn([Compare.value(b, "=", b"0")], [Op.put(b, b"2"), Op.put(x, b"2"), Op.scan(b"sc/", b"sc0")])
        sx = rx.responses[2]
        assert rx.succeeded and sx.revision == rx.revision
        assert _items(sx) == _scan_at(c, b"sc/", rx.revision)
        assert {(k, v) for k, v, mod in _items(sx) if mod == rx.revision} == {(b, b"2"), (x, b"2")}

        # the branch taken writes nothing: a read-only transaction at a cut, with a limit
        ro = c.txn([Compare.value(a, "=", b"nope")], [Op.put(a, b"never")],
                   [Op.get(y), Op.txn([], [Op.scan(prefix=b"sc/", limit=2)])])
        assert not ro.succeeded and ro.revision == 0
        nested = ro.responses[1].txn
        assert nested is not None
        sr = nested.responses[0]
        assert sr.revision >= rx.revision and sr.more
        assert _items(sr) == _scan_at(c, b"sc/", sr.revision)[:2]
        assert ro.responses[0].kv is not None and ro.responses[0].kv.value == b"0"

        # kvctl txn with etcdctl's range forms, printed as etcdctl prints a range
        sa = a.decode()
        p = _kvctl(cluster, f'value("{sa}") = "1"\n\nget --prefix sc/ --limit 1\nget {sa} sc0\n\n\n')
        assert p.returncode == 0, p.stderr
        first = min((a, b, x, y))
        assert p.stdout.startswith(f"SUCCESS\n\n{first.decode()}\n")
        assert p.stdout.count("\n") == 2 + 2 + 1 + 2 * sum(1 for k in (a, b, x, y) if a <= k < b"sc0")
        p = _kvctl(cluster, "\nget --from-key sc/ --limit=2\n", "-o", "json")
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        (scan_json,) = out["responses"]
        assert scan_json["scan"]["more"] and scan_json["scan"]["revision"] > 0
        assert [i["key"] for i in scan_json["scan"]["items"]] == sorted(k.decode() for k in (a, b, x, y))[:2]

        # a scan, then writes into its range in both groups (a two-phase commit): each scan shows
        # the state at its place (etcd's sequential semantics): the first the history at the
        # transaction's revision - 1, the one between the puts the first put too, the last (no
        # write after it) the history at the revision
        r = c.txn([], [Op.scan(prefix=b"sc/"), Op.put(y, b"3"), Op.scan(prefix=b"sc/"), Op.put(a, b"3"),
                       Op.scan(prefix=b"sc/", limit=2)])
        rev = r.revision
        assert r.succeeded and rev > 0 and [o.revision for o in r.responses if o.kind == "scan"] == [rev] * 3
        before = _scan_at(c, b"sc/", rev - 1)
        assert _items(r.responses[0]) == before and not r.responses[0].more and (y, b"0") in [i[:2] for i in before]
        assert _items(r.responses[2]) == [(k, b"3", rev) if k == y else (k, v, mod) for k, v, mod in before]
        assert _items(r.responses[4]) == _scan_at(c, b"sc/", rev)[:2] and r.responses[4].more

    # ... the same from a client that checks nothing (the server's own path): a scan then a delete
    body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"sc/")), kv_pb2.TxnOp(delete=y)])
    for ep in cluster.endpoints:  # the write is proposed at y's group's leader
        with grpc.insecure_channel(ep) as ch:
            resp = kv_pb2_grpc.KVStub(ch).Txn(kv_pb2.TxnRequest(txn=body), timeout=20)
        if resp.error.code != kv_pb2.NOT_LEADER:
            break
    assert resp.error.code == kv_pb2.OK and resp.revision > 0 and resp.result.responses[1].delete
    assert (y, b"3") in [(kv.key, kv.value) for kv in resp.result.responses[0].scan.items]

    with Client(cluster.endpoints, timeout=20) as c:
        assert c.get(y) is None
        # etcd's "get --prefix then del --prefix" in one transaction: the keys as they were, all deleted
        r = c.txn([Compare.value(a, "=", b"3")], [Op.scan(prefix=b"sc/", limit=2), Op.delete_range(b"", prefix=b"sc/"),
                                                  Op.scan(prefix=b"sc/")])
        before = _scan_at(c, b"sc/", r.revision - 1)
        assert r.succeeded and r.responses[1].count == len(before) == 3
        assert _items(r.responses[0]) == before[:2] and r.responses[0].more and _items(r.responses[2]) == []
        assert list(c.scan_kvs(b"sc/")) == []
        # the same on an empty prefix writes nothing: evaluated read-only at a cut (the range read there)
        r = c.txn([], [Op.scan(prefix=b"sc/"), Op.delete_range(b"", prefix=b"sc/")])
        assert r.succeeded and r.revision == 0 and r.responses[1].count == 0 and _items(r.responses[0]) == []
        assert c.txn([], [Op.put(b"sq/1", b"a"), Op.put(b"sq/2", b"b")]).succeeded
    p = _kvctl(cluster, "\nget --prefix sq/\ndel --prefix sq/\n\n")  # as etcdctl txn takes it
    assert p.returncode == 0 and p.stdout == "SUCCESS\n\nsq/1\na\nsq/2\nb\n\n2\n", (p.stdout, p.stderr)


def test_txn_scans_under_concurrent_writers_match_history(cluster: Cluster) -> None:
    """Writers put into the scanned prefix (both groups) while transactions write a key of it
    and scan it: each scan after the write must be exactly the prefix at the revision it reports
    (the history read at that revision), hold the transaction's own write at its revision, and
    nothing newer; each scan before the write (sequential) exactly the history at that revision
    - 1. A scan read at any other revision than the writes' fails this."""
    async def main() -> list[tuple[int, TxnResponse]]:
        async with AsyncClient(cluster.endpoints, timeout=20) as c:
            m = await c.shard_map(refresh=True)
            assert m is not None
            keys = [k for ks in _keys_by_group(m, b"cw/", 4).values() for k in ks[:4]]
            stop = asyncio.Event()

            async def writer(w: int) -> None:
                n = 0
                while not stop.is_set():
                    await c.put(keys[(w * 3 + n) % len(keys)], b"w%d-%d" % (w, n))
                    n += 1

            async def txns() -> list[tuple[int, TxnResponse]]:
                out = []
                for i in range(8):
                    own = b"cw/own%d" % (i % 2)
                    if i % 3 == 2:  # read-only
                        r = await c.txn([], [Op.scan(prefix=b"cw/")])
                    elif i % 3 == 1:  # the scan before the write into its range
                        r = await c.txn([Compare.version(own, ">", 1 << 40)], [Op.get(own)],
                                        [Op.scan(prefix=b"cw/"), Op.put(own, b"t%d" % i)])
                    else:
                        r = await c.txn([Compare.version(own, ">", 1 << 40)], [Op.get(own)],
                                        [Op.put(own, b"t%d" % i), Op.scan(prefix=b"cw/")])
                    out.append((i, r))
                stop.set()
                return out

            got = await asyncio.gather(writer(0), writer(1), txns())
            return got[2]

    results = asyncio.run(main())
    with Client(cluster.endpoints, timeout=20) as c:
        for i, r in results:
            scan = r.responses[0 if i % 3 == 1 else -1]
            assert scan.kind == "scan"
            items = _items(scan)
            if i % 3 == 1:  # exactly the history just before the transaction's revision
                assert not r.succeeded and scan.revision == r.revision > 0
                assert items == _scan_at(c, b"cw/", r.revision - 1), i
                assert all(mod < r.revision for _, _, mod in items)
                continue
            assert items == _scan_at(c, b"cw/", scan.revision), i
            assert all(mod <= scan.revision for _, _, mod in items)
            if i % 3 != 2:
                assert not r.succeeded and scan.revision == r.revision > 0
                assert (b"cw/own%d" % (i % 2), b"t%d" % i, r.revision) in items


def test_a_lease_compare_in_a_txn_with_scans_compares_the_keys_lease(cluster: Cluster) -> None:
    """Issue 17: a Txn with scans may compare a key's lease, as etcd: a read-only one (evaluated
    at a cut, the lease read with the key's version) takes the branch the lease says, both ways,
    for a leased key, a key without a lease and an absent key (lease 0); one whose failure branch
    writes writes exactly when the compare fails. Through the client library, a raw KV.Txn at
    every node (each hosts both groups here) and `kvctl txn`."""
    with Client(cluster.endpoints, timeout=20) as c:
        lid = c.lease_grant(60)
        c.put(b"lc/k", b"v", lease=lid)
        c.put(b"lc/plain", b"p")
        scan = [Op.scan(prefix=b"lc/")]
        held = c.txn([Compare.lease(b"lc/k", "=", lid)], scan, [Op.get(b"lc/k")])
        assert held.succeeded and [kv.key for kv in held.responses[0].items] == [b"lc/k", b"lc/plain"]
        assert not c.txn([Compare.lease(b"lc/k", "=", lid + 1)], scan, [Op.get(b"lc/k")]).succeeded
        assert not c.txn([Compare.lease(b"lc/k", "=", 0)], scan, []).succeeded
        assert c.txn([Compare.lease(b"lc/plain", "=", 0)], scan, []).succeeded
        assert not c.txn([Compare.lease(b"lc/plain", ">", 0)], scan, []).succeeded
        assert c.txn([Compare.lease(b"lc/absent", "=", 0)], scan, []).succeeded
        # the failure branch writes: it runs (and writes) exactly when the compare fails
        r = c.txn([Compare.lease(b"lc/k", "=", lid)], scan, [Op.put(b"lc/wrong", b"x")])
        assert r.succeeded and c.get(b"lc/wrong") is None
        r = c.txn([Compare.lease(b"lc/k", "!=", lid)], scan, [Op.put(b"lc/right", b"x"), Op.scan(prefix=b"lc/")])
        assert not r.succeeded and r.revision > 0 and c.get(b"lc/right") == b"x"
        assert [kv.key for kv in r.responses[1].items] == [b"lc/k", b"lc/plain", b"lc/right"]
        c.put(b"lc/k", b"v2")  # a plain put detaches the key: its lease is 0 from then on
        assert c.txn([Compare.lease(b"lc/k", "=", 0)], scan, []).succeeded
        c.put(b"lc/k", b"v3", lease=lid)
    for i, ep in enumerate(cluster.endpoints):  # a raw KV.Txn (nested compare and scan) at every node
        for number, want in ((lid, True), (lid + 1, False)):
            body = kv_pb2.TxnBody(
                compares=[kv_pb2.Compare(key=b"lc/k", target=kv_pb2.COMPARE_LEASE, result=kv_pb2.EQUAL,
                                         number=number)],
                success=[kv_pb2.TxnOp(txn=kv_pb2.TxnBody(success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(
                    prefix=b"lc/"))]))],
                failure=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"lc/k"))])
            with grpc.insecure_channel(ep) as ch:
                resp = kv_pb2_grpc.KVStub(ch).Txn(kv_pb2.TxnRequest(txn=body), timeout=20)
            assert resp.error.code == kv_pb2.OK and resp.result.succeeded == want, (i, resp.error)
    p = _kvctl(cluster, f'lease("lc/k") = "{lid:x}"\n\nget --prefix lc/\n\nput lc/wrong x\n')
    assert p.returncode == 0 and p.stdout.startswith("SUCCESS"), (p.stdout, p.stderr)
    p = _kvctl(cluster, f'lease("lc/k") = "{lid + 1:x}"\n\nget --prefix lc/\n\nget lc/k\n')
    assert p.returncode == 0 and p.stdout.startswith("FAILURE"), (p.stdout, p.stderr)
    with Client(cluster.endpoints, timeout=20) as c:
        assert c.get(b"lc/wrong") is None


def test_a_txn_range_delete_across_groups_at_one_revision(cluster: Cluster) -> None:
    """A transaction with a range delete (`Op.delete_range`): every key of the prefix in both
    groups deleted at the transaction's revision (a leased key detached from its lease), a get
    after it reads the key absent, a put after it survives; a watch sees one DELETE per key at
    that revision; `kvctl txn` takes etcdctl's `del --prefix` and prints the count."""
    with Client(cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        keys = [b"dr/%d" % i for i in range(6)]
        assert len({m.group_for_key(k) for k in keys}) > 1
        lid = c.lease_grant(60)
        c.put(keys[0], b"leased", lease=lid)
        assert c.txn([], [Op.put(k, b"x") for k in keys[1:]] + [Op.put(b"drc", b"go")]).succeeded
        r = c.txn([Compare.value(b"drc", "=", b"go")],
                  [Op.get(keys[1]), Op.delete_range(b"", prefix=b"dr/"), Op.get(keys[1]), Op.put(b"dr/new", b"n")])
        assert r.succeeded and r.revision > 0
        assert [x.kind for x in r.responses] == ["get", "delete_range", "get", "put"]
        assert r.responses[0].kv is not None and r.responses[1].count == 6 and r.responses[2].kv is None
        assert all(c.get(k) is None for k in keys) and c.read(b"dr/new").mod_revision == r.revision
        assert c.lease_time_to_live(lid, keys=True).keys == ()
        events: list[tuple[bytes, bool, int]] = []
        for batch in c.watch_batches(prefix=b"dr/", start_revision=r.revision):
            events += [(e.key, e.type == "DELETE", e.mod_revision) for e in batch.events]
            if len(events) >= 7:
                break
        assert sorted(events) == sorted([(k, True, r.revision) for k in keys] + [(b"dr/new", False, r.revision)])
        # the other branch: a compare that fails runs no range delete
        r2 = c.txn([Compare.value(b"drc", "=", b"stop")], [Op.delete_range(b"dr/", b"dr0")], [Op.get(b"dr/new")])
        assert not r2.succeeded and r2.revision == 0 and c.get(b"dr/new") == b"n"
    p = _kvctl(cluster, '\ndel --prefix dr/\nget dr/new\n\n')
    assert p.returncode == 0 and p.stdout == "SUCCESS\n\n1\n\n", (p.stdout, p.stderr)
