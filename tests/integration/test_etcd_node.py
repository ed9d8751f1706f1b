"""etcd's API on an in-process node: `Maintenance.Snapshot` writes the backup under the node's
data directory and leaves nothing behind when the client goes away while the save runs;
`HashKV`'s header carries the revision served; `Election.Proclaim` is etcd's one Txn (the leader
key's create revision compared, the value put with the request's lease; a stale leader or a gone
lease writes nothing); a node starts by removing the Snapshot files a crash left
(kvstore/server/etcd/maintenance.py, recipes.py); a linearizable Range at the leader is a
counted ReadIndex read that sees the last write."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from onenode import one_node

from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

pytestmark = pytest.mark.timeout(120)

KEYS = 4000
"""Enough keys that the save reports progress (every 1,000 keys) while it writes."""


def _leftovers(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.iterdir() if "etcd-snapshot" in p.name]


def test_a_snapshot_whose_client_goes_away_mid_save_leaves_nothing(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where a save outside the data directory would go

    async def main() -> None:
        async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            for start in range(0, KEYS, 100):
                await kv.Txn(rpc_pb2.TxnRequest(success=[
                    rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"s/%05d" % i, value=b"v" * 64))
                    for i in range(start, start + 100)]), timeout=30)
            data_dir = Path(n.node.cfg.data_dir)

            # a whole snapshot streams, and its file is gone once the call ended
            blobs = [r.blob async for r in rpc_pb2_grpc.MaintenanceStub(ch).Snapshot(rpc_pb2.SnapshotRequest(),
                                                                                  timeout=60)]
            assert sum(map(len, blobs)) > KEYS * 64
            assert _leftovers(data_dir, scratch) == []

            # the client goes away while the save writes its file: once the save stopped,
            # nothing is left in the data directory or the temporary directory
            call = rpc_pb2_grpc.MaintenanceStub(ch).Snapshot(rpc_pb2.SnapshotRequest(), timeout=60)
            first = asyncio.ensure_future(call.read())
            deadline = time.monotonic() + 30
            while not any(p.name.endswith(".part") for p in _leftovers(data_dir, scratch)):
                assert not first.done(), "the save finished before it was seen writing: more KEYS"
                assert time.monotonic() < deadline, "the save never started writing"
                await asyncio.sleep(0.001)
            call.cancel()
            deadline = time.monotonic() + 30
            while left := _leftovers(data_dir, scratch):
                assert time.monotonic() < deadline, f"left behind: {left}"
                await asyncio.sleep(0.01)

    asyncio.run(main())


def test_hashkv_header_is_the_revision_served_and_proclaim_is_one_txn(tmp_path: Path) -> None:
    """(Also: a Snapshot's files left by a crash are gone once the node started over its data directory.)"""
    data_dir = tmp_path / "n1"
    data_dir.mkdir()
    crashed = [data_dir / ".etcd-snapshot-abc.kvbackup", data_dir / "..etcd-snapshot-abc.kvbackup.x1.part"]
    for p in crashed:
        p.write_bytes(b"a full copy of the store")

    async def main() -> None:
        async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
            assert Path(n.node.cfg.data_dir) == data_dir and _leftovers(data_dir) == []
            kv, lease = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.LeaseStub(ch)
            put = await kv.Put(rpc_pb2.PutRequest(key=b"h", value=b"1"), timeout=10)
            m = rpc_pb2_grpc.MaintenanceStub(ch)
            far = put.header.revision * 4
            h = await m.HashKV(rpc_pb2.HashKVRequest(revision=far), timeout=10)
            assert put.header.revision <= h.header.revision < far  # served at the group's last, not asked
            now = await m.HashKV(rpc_pb2.HashKVRequest(), timeout=10)
            assert (now.hash, now.header.revision) == (h.hash, h.header.revision)

            from kvstore.etcdpb.v3electionpb import v3election_pb2 as epb
            from kvstore.etcdpb.v3electionpb import v3election_pb2_grpc as epb_grpc

            mine, other, gone = [await lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=10)
                                 for _ in range(3)]
            await lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=gone.ID), timeout=10)
            elect = epb_grpc.ElectionStub(ch)
            leader = (await elect.Campaign(epb.CampaignRequest(name=b"pe", lease=mine.ID, value=b"a"),
                                           timeout=10)).leader

            async def held() -> list[tuple[bytes, int]]:
                return [(x.value, x.lease) for x in (await kv.Range(rpc_pb2.RangeRequest(key=leader.key),
                                                                    timeout=10)).kvs]

            # etcd's one Txn: If(CreateRevision(key) == rev) Then(Put(key, value, leader.lease))
            p = await elect.Proclaim(epb.ProclaimRequest(leader=leader, value=b"b"), timeout=10)
            assert await held() == [(b"b", mine.ID)] and p.header.revision > leader.rev
            moved = epb.LeaderKey(name=leader.name, key=leader.key, rev=leader.rev, lease=other.ID)
            await elect.Proclaim(epb.ProclaimRequest(leader=moved, value=b"c"), timeout=10)
            assert await held() == [(b"c", other.ID)]  # the request's lease, as etcd's session lease
            refusals = [(epb.LeaderKey(name=leader.name, key=leader.key, rev=leader.rev + 1, lease=mine.ID),
                         grpc.StatusCode.FAILED_PRECONDITION, "election: not leader"),
                        (epb.LeaderKey(name=leader.name, key=leader.key, rev=leader.rev, lease=gone.ID),
                         grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"),
                        (epb.LeaderKey(name=leader.name, key=leader.key, rev=leader.rev, lease=0),
                         grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")]
            for lk, code, text in refusals:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await elect.Proclaim(epb.ProclaimRequest(leader=lk, value=b"no"), timeout=10)
                assert (e.value.code(), e.value.details()) == (code, text)
                assert dict(e.value.trailing_metadata() or ()).get("kvstore-outcome") == "definite"
            assert await held() == [(b"c", other.ID)]  # nothing written

    asyncio.run(main())


def test_linearizable_ranges_at_the_leader_are_readindex_reads_that_see_the_last_write(tmp_path: Path) -> None:
    """etcd's Range at the leader is a ReadIndex read (`KVRequests.read_point`'s leader path,
    counted as a linearizable leader read); concurrent Ranges after a Put all see it; a
    serializable Range is not one."""

    async def main() -> None:
        async with one_node(tmp_path) as n, grpc.aio.insecure_channel(n.address) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            registry = n.node.metrics.registry

            def leader_reads() -> float:
                got = registry.get_sample_value("kvstore_reads_by_level_total",
                                                {"level": "linearizable", "role": "leader"})
                return got or 0.0

            before = leader_reads()
            for i in range(5):
                put = await kv.Put(rpc_pb2.PutRequest(key=b"lin", value=b"v%d" % i), timeout=10)
                got = await asyncio.gather(*(kv.Range(rpc_pb2.RangeRequest(key=b"lin"), timeout=10) for _ in range(8)))
                assert {r.kvs[0].value for r in got} == {b"v%d" % i}
                assert all(r.header.revision >= put.header.revision for r in got)
            assert leader_reads() - before == 40
            ser = await kv.Range(rpc_pb2.RangeRequest(key=b"lin", serializable=True), timeout=10)
            assert ser.kvs[0].value == b"v4"
            assert leader_reads() - before == 40

    asyncio.run(main())
