"""etcd's `Maintenance.Snapshot` on an in-process node (kvstore/server/etcd/maintenance.py): the
backup is written under the node's data directory and nothing is left behind when the client
goes away while the save runs."""

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
