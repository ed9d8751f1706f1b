"""A prefix watch when no node hosts every group (README, "Watch"): a real 5-node cluster of
`kvstore serve` processes with 5 data groups of 3 replicas each, so every node hosts 3 of them.
The client covers the groups with sub-watches at a few nodes and merges them
(`kvstore/client/watchmerge.py`); checked: every put exactly once, in order, across the kill of a
node serving a sub-watch; and `kvctl watch --prefix` from now sees every later put. The same
cluster serves kvstore's Txn with scans at nodes lacking groups (`server/remote_reads.py`): the
scans match the history under concurrent writers, and groups elsewhere are read as the caller."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from clusterharness import Cluster, start_watching_cli, stop_cli

from kvstore.client import AsyncClient, Client, Compare, Op, WatchEvent
from kvstore.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("wmerge"), 5, extra_args=["--groups", "5", "--replication", "3"])
    try:
        yield c.start()
    finally:
        c.stop()


async def _keys_over_every_group(kv: AsyncClient, prefix: bytes, n: int) -> list[bytes]:
    m = await kv.shard_map(refresh=True)
    assert m is not None
    groups = m.data_groups()
    members = [set(m.groups[g].members()) for g in groups]
    assert len(groups) == 5 and not set.intersection(*members), "some node hosts every group"
    keys = [prefix + b"%02d" % i for i in range(n)]
    assert {m.group_for_key(k) for k in keys} == set(groups), "the keys do not span every group"
    return keys


def test_a_prefix_watch_merged_across_nodes_sees_every_put_once_in_order_across_a_kill(cluster: Cluster) -> None:
    """A stuck run fails with a report: which side (writer, watch) is stuck, the last acked put
    and the last event, the client's watch attempts (revision, parts, their nodes, why each
    ended) and where every task of the client waits."""
    asyncio.run(_merged_across_a_kill(cluster))


BOUND = 150
"""Seconds the writer and the watch get together (about 3 s unloaded)."""


class _Attempts(logging.Handler):
    """The client's watch log (each attempt: its revision, its parts and their nodes; why each
    ended), with the time since the test began: what a stuck run's report shows."""

    def __init__(self, t0: float) -> None:
        super().__init__(logging.DEBUG)
        self.t0 = t0
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{time.monotonic() - self.t0:7.2f}s {record.getMessage()}")


def _task_stacks() -> str:
    """Where every other task of the loop waits (coroutine frames, innermost last)."""
    out = []
    for t in asyncio.all_tasks():
        if t is asyncio.current_task():
            continue
        frames = []
        coro: Any = t.get_coro()
        while coro is not None and hasattr(coro, "cr_frame"):
            if coro.cr_frame is not None:
                frames.append(f"{coro.cr_code.co_name}:{coro.cr_frame.f_lineno}")
            coro = coro.cr_await
        out.append(f"  {t.get_name()}: {' > '.join(frames) or '?'}")
    return "\n".join(sorted(out))


async def _merged_across_a_kill(cluster: Cluster) -> None:
    t0 = time.monotonic()
    attempts = _Attempts(t0)
    wlog = logging.getLogger("kvstore.client.watches")
    level = wlog.level
    wlog.addHandler(attempts)
    wlog.setLevel(logging.DEBUG)
    try:
        await _merged_across_a_kill_logged(cluster, attempts, t0)
    finally:
        wlog.removeHandler(attempts)
        wlog.setLevel(level)


async def _merged_across_a_kill_logged(cluster: Cluster, attempts: _Attempts, t0: float) -> None:
    async with AsyncClient(cluster.endpoints, timeout=30) as kv:
        keys = await _keys_over_every_group(kv, b"mk/", 40)
        start = await kv.put(b"mk/start", b"0")
        acked: list[tuple[int, bytes, bytes]] = []
        seen: list[WatchEvent] = []
        serving: list[int] = []
        killed: list[int] = []
        last_batch = [start, 0.0]  # its revision, when

        async def writer() -> None:
            for i in range(120):
                k, v = keys[i % len(keys)], b"w%d" % i
                acked.append((await kv.put(k, v), k, v))
                if i == 40:
                    while not serving:  # the watch delivered something: kill a node serving a part of it
                        await asyncio.sleep(0.01)
                    victim = cluster.nodes[serving[-1]]
                    victim.kill9()
                    killed.append(victim.id)
                    attempts.lines.append(f"{time.monotonic() - t0:7.2f}s (test) killed node {victim.id}")

        async def watch() -> None:
            async for batch in kv.watch_batches(prefix=b"mk/", start_revision=start + 1, progress=True):
                seen.extend(batch.events)
                last_batch[:] = [batch.revision, time.monotonic() - t0]
                if batch.events:
                    serving.append(batch.node_id)
                if w.done() and batch.revision >= max(a[0] for a in acked):
                    return

        w = asyncio.create_task(writer(), name="writer")
        wt = asyncio.create_task(watch(), name="watch")
        try:
            done, pending = await asyncio.wait({w, wt}, timeout=BOUND, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # a side that failed: its error
            if pending:  # stuck: which side, and where
                nodes = ", ".join(f"{n}={cluster.nodes[n].address}" for n in sorted(cluster.nodes))
                report = (
                    f"stuck after {BOUND} s: {' and '.join(sorted(t.get_name() for t in pending))}\n"
                    f"writer: {len(acked)}/120 puts acked, the last at revision {acked[-1][0] if acked else 0}"
                    f"{' (done)' if w.done() else ', a put in flight'}; killed {killed}\n"
                    f"watch: {len(seen)} events, the last at revision {seen[-1].revision if seen else 0}; last "
                    f"batch at revision {last_batch[0]} ({last_batch[1]:.2f}s); resumes {kv.watch_resumes}; "
                    f"served by nodes {sorted(set(serving))}\nnodes: {nodes}\n"
                    "the client's watch attempts:\n" + "\n".join(attempts.lines[-30:]) +
                    "\ntasks:\n" + _task_stacks())
                pytest.fail(report)
        finally:
            for t in (w, wt):
                t.cancel()
            await asyncio.wait({w, wt})
            for nid in killed:
                cluster.nodes[nid].start()
        resumes = kv.watch_resumes
    got = [(e.revision, e.key, e.value) for e in seen]
    assert got == sorted(acked), "events differ from the puts (missing, repeated or out of order)"
    assert killed and resumes >= 1
    assert len(set(serving)) >= 2, "the watch was not served by several nodes"


def test_a_watch_of_some_groups_needs_the_nodes_shard_map_version(cluster: Cluster) -> None:
    asyncio.run(_version_checked(cluster))


async def _version_checked(cluster: Cluster) -> None:
    async with AsyncClient(cluster.endpoints, timeout=30) as kv:
        m = await kv.shard_map(refresh=True)
        assert m is not None
    node = cluster.nodes[1]
    [g, *_] = m.groups_of_node(1)
    async with grpc.aio.insecure_channel(node.address) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)  # (a node killed by an earlier test restarts)
        stub = kv_pb2_grpc.KVStub(ch)

        async def create(version: int) -> kv_pb2.WatchResponse:
            call = stub.Watch(iter([kv_pb2.WatchRequest(create_request=kv_pb2.WatchCreateRequest(
                prefix=b"sv/", groups=[g], shard_version=version, watch_id=1))]))
            try:
                return await asyncio.wait_for(call.__aiter__().__anext__(), 20)
            finally:
                call.cancel()

        for _ in range(300):  # until the node (maybe just restarted) serves its groups: bounded
            r = await create(m.version)
            if r.created:
                break
            assert r.canceled and r.error.code != kv_pb2.INVALID_ARGUMENT, r
            await asyncio.sleep(0.1)
        assert r.created and not r.canceled, r
        r = await create(m.version + 7)  # another map version: its cover may lack a group
        assert r.canceled and r.error.code == kv_pb2.WRONG_SHARD and not r.error.indeterminate, r
        assert r.error.shard_version == m.version and "version" in r.cancel_reason


def _stopped(p: subprocess.Popen[str]) -> str:
    """Its exit code and stderr (its `--debug` log of the watch's attempts); one still running is
    first made to print every thread's stack (SIGABRT with faulthandler on) and killed."""
    if p.poll() is None:
        p.send_signal(signal.SIGABRT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    err = p.stderr.read() if p.stderr is not None else ""
    return f"kvctl exited {p.returncode}; its stderr:\n{err[-12000:]}"


def _kvctl(cluster: Cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", ",".join(cluster.endpoints),
            "--timeout", "20", *args]


def test_kvctl_watch_prefix_from_now_sees_every_later_put_once_in_order(cluster: Cluster) -> None:
    """From now: the puts it prints are exactly the acknowledged ones from some point on (no gap,
    no repeat, none missing once it started), through the last one."""
    p = start_watching_cli(_kvctl(cluster, "--debug", "-o", "json", "watch", "--prefix", "kc/"))
    lines: list[dict] = []  # type: ignore[type-arg]
    first = threading.Event()

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(json.loads(line))
            first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    async def writes() -> list[int]:
        async with AsyncClient(cluster.endpoints, timeout=30) as kv:
            keys = await _keys_over_every_group(kv, b"kc/", 20)
            acked: list[int] = []
            deadline = time.monotonic() + 60  # kvctl's start-up is slow on a loaded machine
            for i in range(3000):  # until the watch prints its first event (bounded in count and time)
                acked.append(await kv.put(keys[i % len(keys)], b"c%d" % i))
                if first.is_set() or time.monotonic() > deadline or p.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            assert first.is_set(), f"kvctl watch printed nothing; {_stopped(p)}"
            for i in range(30):
                acked.append(await kv.put(keys[i % len(keys)], b"d%d" % i))
            return acked

    try:
        acked = asyncio.run(writes())
        for _ in range(3000):  # until the last put is printed (bounded)
            if lines and lines[-1]["revision"] >= acked[-1]:
                break
            reader.join(0.01)
    finally:
        code = stop_cli(p)
    assert code == 0, p.stderr.read() if p.stderr is not None else ""
    revs = [x["revision"] for x in lines]
    assert revs and revs[-1] == acked[-1]
    k = acked.index(revs[0])
    assert revs == acked[k:], "kvctl watch missed, repeated or reordered a put"
    assert all(x["type"] == "PUT" and x["key"].startswith("kc/") for x in lines)


async def _history_at(kv: AsyncClient, prefix: bytes, revision: int) -> list[tuple[bytes, bytes, int]]:
    """The prefix as the client's own fan-out scan reads it exactly at `revision`."""
    return [(x.key, x.value, x.mod_revision) async for batch in kv.scan_kvs(prefix, revision=revision) for x in batch]


def test_txn_scans_at_nodes_lacking_groups_match_history_under_writers(cluster: Cluster) -> None:
    """kvstore's Txn with a scan over a prefix spread across every group, served by a node that
    lacks some groups (every node here lacks two): the parts of those groups, their share of the
    cut and the transaction's compare keys there are read at nodes that host them. Writers put
    into the prefix meanwhile; each scan must be exactly the prefix at the revision it reports
    (the history read there by the client), hold the transaction's own write, nothing newer; a
    scan before the write (sequential) exactly the history at the revision - 1."""
    async def main() -> list[tuple[int, list[tuple[bytes, bytes, int]], int, bool, int]]:
        async with AsyncClient(cluster.endpoints, timeout=30) as kv:
            keys = await _keys_over_every_group(kv, b"tx/", 15)
            m = await kv.shard_map()
            assert m is not None
            one_per_group = list({m.group_for_key(k): k for k in keys}.values())
            stop = asyncio.Event()

            async def writer(w: int) -> None:
                n = 0
                while not stop.is_set():
                    await kv.put(keys[(w * 7 + n) % len(keys)], b"w%d-%d" % (w, n))
                    n += 1

            async def txns() -> list[tuple[int, list[tuple[bytes, bytes, int]], int, bool, int]]:
                out = []
                for i in range(6):
                    own = keys[i * 2]  # in a different group each time: a different serving leader
                    if i % 3 == 2:  # read-only, compares on a key of every group (read at the cut)
                        r = await kv.txn([Compare.version(k, ">", 1 << 40) for k in one_per_group], [],
                                         [Op.scan(prefix=b"tx/")])
                    elif i % 3 == 1:  # the scan before the write into its range: at the revision - 1
                        r = await kv.txn([Compare.version(own, ">", 1 << 40)], [Op.get(own)],
                                         [Op.scan(prefix=b"tx/"), Op.put(own, b"t%d" % i)])
                    else:
                        r = await kv.txn([Compare.version(own, ">", 1 << 40)], [Op.get(own)],
                                         [Op.put(own, b"t%d" % i), Op.scan(prefix=b"tx/")])
                    scan = r.responses[0 if i % 3 == 1 else -1]
                    assert scan.kind == "scan" and not scan.more
                    items = [(x.key, x.value, x.mod_revision) for x in scan.items]
                    out.append((i, items, scan.revision, r.succeeded, r.revision))
                stop.set()
                return out

            got = (await asyncio.gather(writer(0), writer(1), txns()))[2]
            for i, items, rev, succeeded, wrote in got:
                if i % 3 == 1:  # the state just before the transaction: the history at its revision - 1
                    assert rev == wrote > 0 and not succeeded and items == await _history_at(kv, b"tx/", wrote - 1), i
                    assert all(mod < wrote for _, _, mod in items)
                    continue
                assert items == await _history_at(kv, b"tx/", rev), i
                assert all(mod <= rev for _, _, mod in items) and not succeeded
                if i % 3 != 2:
                    assert rev == wrote > 0 and (keys[i * 2], b"t%d" % i, wrote) in items, i
            return got

    got = asyncio.run(main())
    assert len(got) == 6 and all(items for _, items, _, _, _ in got)


def test_txn_scans_read_groups_elsewhere_as_the_caller(cluster: Cluster) -> None:
    """With auth on, a Txn scanning a prefix over every group, sent to a node lacking two of
    them, reads their parts at other nodes with the caller's token: a user with READ on the
    prefix gets every key; one with READ on only part of it is refused (definite)."""
    from kvstore.v1 import auth_pb2, auth_pb2_grpc

    Change = auth_pb2.AuthChangeRequest
    scan = kv_pb2.TxnRequest(txn=kv_pb2.TxnBody(success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"ta/"))]))

    def bearer(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def main() -> None:
        async with AsyncClient(cluster.endpoints, timeout=30) as kv:
            keys = await _keys_over_every_group(kv, b"ta/", 20)
            for k in keys:
                await kv.put(k, b"v")
            m = await kv.shard_map()
            assert m is not None
        assert len(m.groups_of_node(1)) < len(m.data_groups())
        async with grpc.aio.insecure_channel(cluster.nodes[1].address) as ch:
            auth, kvs = auth_pb2_grpc.AuthStub(ch), kv_pb2_grpc.KVStub(ch)

            async def change(token: str = "", **kw: Any) -> None:
                r = await auth.Change(Change(**kw), metadata=bearer(token) if token else None, timeout=10)
                assert r.error.code == kv_pb2.OK, (kw, r.error)

            async def login(user: str) -> str:
                r = await auth.Authenticate(auth_pb2.AuthenticateRequest(user=user, password=user + "pw"), timeout=10)
                assert r.error.code == kv_pb2.OK, r.error
                return r.token

            for user, end in (("root", b""), ("tareader", b"ta0"), ("tahalf", b"ta/10")):
                await change(op=Change.USER_ADD, user=user, password=user + "pw")
                if end:
                    await change(op=Change.ROLE_ADD, role=user)
                    await change(op=Change.ROLE_GRANT, role=user,
                                 permission=auth_pb2.Permission(kind=auth_pb2.READ, key=b"ta/", range_end=end))
                    await change(op=Change.USER_GRANT_ROLE, user=user, role=user)
            await change(op=Change.ENABLE)
            root = await login("root")
            try:
                r = await kvs.Txn(scan, metadata=bearer(await login("tareader")), timeout=30)
                assert r.error.code == kv_pb2.OK, r.error
                assert [kv.key for kv in r.result.responses[0].scan.items] == sorted(keys)
                r = await kvs.Txn(scan, metadata=bearer(await login("tahalf")), timeout=30)
                assert r.error.code == kv_pb2.PERMISSION_DENIED and not r.error.indeterminate, r.error
            finally:
                await change(root, op=Change.DISABLE)
                for user in ("tareader", "tahalf"):
                    await change(op=Change.USER_DELETE, user=user)
                    await change(op=Change.ROLE_DELETE, role=user)
                await change(op=Change.USER_DELETE, user="root")

    asyncio.run(main())


def test_a_lease_compare_with_scans_on_keys_of_groups_here_and_elsewhere(cluster: Cluster) -> None:
    """Issue 17 at a node lacking groups: a read-only Txn with a scan and a LEASE compare, sent
    to node 1, on a key of a group node 1 does NOT host (its version and lease read at a node
    that does: a Get with_lease through `RemoteReads`) and on one of a group it hosts: each takes
    the branch the key's lease says, both ways, in kvstore's Txn and in etcd's Txn with a range
    (etcd's stubs). A Get with_lease answers the lease from the key's view; with a revision it
    is a definite INVALID_ARGUMENT."""
    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    async def keys() -> list[bytes]:
        async with AsyncClient(cluster.endpoints, timeout=30) as kv:
            every = await _keys_over_every_group(kv, b"lq/", 20)
            for k in every:
                await kv.put(k, b"-")
            return every

    every = asyncio.run(keys())
    with Client(cluster.endpoints, timeout=30) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        node = cluster.nodes[1]
        here = set(m.groups_of_node(node.id))
        far = next(k for k in every if m.group_for_key(k) not in here)
        near = next(k for k in every if m.group_for_key(k) in here)
        host_of_far = next(n for n in cluster.nodes.values() if m.group_for_key(far) in m.groups_of_node(n.id))
        lid = c.lease_grant(60)
        for k in (far, near):
            c.put(k, b"v", lease=lid)

    def lease_is(key: bytes, number: int) -> kv_pb2.Compare:
        return kv_pb2.Compare(key=key, target=kv_pb2.COMPARE_LEASE, result=kv_pb2.EQUAL, number=number)

    def served(kvs: kv_pb2_grpc.KVStub, req: kv_pb2.GetRequest) -> kv_pb2.GetResponse:
        """`req` at one replica, once it serves linearizable reads: the module's earlier test
        restarted a node with kill -9, and until it hears the group's leader it answers the
        definite STALE_REPLICA ("knows no leader"), which a client takes to another replica."""
        deadline = time.monotonic() + 30
        while True:
            r = kvs.Get(req, timeout=30)
            if r.error.code != kv_pb2.STALE_REPLICA or time.monotonic() > deadline:
                return r
            time.sleep(0.05)

    for key, addr in ((far, host_of_far.address), (near, node.address)):  # a Get at a node hosting the key
        with grpc.insecure_channel(addr) as ch:
            kvs = kv_pb2_grpc.KVStub(ch)
            got = served(kvs, kv_pb2.GetRequest(key=key, with_lease=True))
            assert got.error.code == kv_pb2.OK and got.lease_read and got.lease == lid and got.found, got
            plain = kvs.Get(kv_pb2.GetRequest(key=key), timeout=30)
            assert not plain.lease_read and plain.lease == 0
            at = kvs.Get(kv_pb2.GetRequest(key=key, with_lease=True, revision=got.mod_revision), timeout=30)
            assert at.error.code == kv_pb2.INVALID_ARGUMENT and not at.error.indeterminate, at.error
            other = next(k for k in every if k != key and m.group_for_key(k) == m.group_for_key(key))
            none = served(kvs, kv_pb2.GetRequest(key=other, with_lease=True))  # no lease: 0, read
            assert none.error.code == kv_pb2.OK and none.found and none.lease_read and none.lease == 0, none
    with grpc.insecure_channel(node.address) as ch:  # node 1 lacks far's group
        kvs, etcd = kv_pb2_grpc.KVStub(ch), rpc_pb2_grpc.KVStub(ch)
        for key in (far, near):
            for number, want in ((lid, True), (lid + 1, False), (0, False)):
                body = kv_pb2.TxnBody(compares=[lease_is(key, number)],
                                      success=[kv_pb2.TxnOp(scan=kv_pb2.TxnScan(prefix=b"lq/"))],
                                      failure=[kv_pb2.TxnOp(get=key)])
                r = kvs.Txn(kv_pb2.TxnRequest(txn=body), timeout=30)
                assert r.error.code == kv_pb2.OK and r.result.succeeded == want and not r.revision, (key, r.error)
                if want:
                    assert len(r.result.responses[0].scan.items) == 20
                e = etcd.Txn(rpc_pb2.TxnRequest(
                    compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.LEASE, result=rpc_pb2.Compare.EQUAL,
                                             lease=number)],
                    success=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"lq/", range_end=b"lq0"))],
                    failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))]), timeout=30)
                assert e.succeeded == want, (key, number)
                rng = e.responses[0].response_range
                assert rng.count == (20 if want else 1) and key in {kv.key for kv in rng.kvs}
