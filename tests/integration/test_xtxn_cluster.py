"""A cross-group transaction's coordinator killed mid-way on a real 3-node cluster (two data
groups), recovered by later readers: node 1 (whose coordinator halts after the commit point,
`KVSTORE_PLANT_XTXN_HALT`) is killed with its intents in both groups, and a reader through the
other nodes finds both writes (resolved COMMITTED from the record); node 2 (which halts after
preparing, before any record) is killed too, and a writer and a reader find neither of its
writes (resolved ABORTED)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from clusterharness import Cluster

from kvstore.client import Client
from kvstore.server.xtxn_run import PLANT_ENV
from kvstore.shard.shardmap import ShardMap
from kvstore.v1 import kv_pb2, kv_pb2_grpc


def _pair(m: ShardMap, prefix: bytes) -> tuple[bytes, bytes]:
    by: dict[int, bytes] = {}
    i = 0
    while len(by) < 2:
        k = prefix + b"%d" % i
        by.setdefault(m.group_for_key(k), k)
        i += 1
    (_, a), (_, b) = sorted(by.items())
    return a, b


def _txn_at(node_address: str, a: bytes, b: bytes, value: bytes) -> None:
    """Send the transaction to one node (it coordinates: it halts, so the call times out)."""
    body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=a, value=value)),
                                   kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b, value=value))])
    with grpc.insecure_channel(node_address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            kv_pb2_grpc.KVStub(ch).Txn(kv_pb2.TxnRequest(txn=body), timeout=2)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_killed_coordinator_is_recovered_by_readers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, PLANT_ENV, "1:record,2:prepare")
    c = Cluster(tmp_path, 3, extra_args=["--groups", "2"]).start()
    try:
        c.wait_cluster_version()
        eps = c.endpoints
        with Client(eps, timeout=30) as cl:
            m = cl.shard_map(refresh=True)
            assert m is not None
            a, b = _pair(m, b"kill/")
            cl.put(a, b"0")
            cl.put(b, b"0")

        # node 1 passes the commit point, then dies
        _txn_at(c.nodes[1].address, a, b, b"1")
        c.nodes[1].kill9()
        with Client([c.nodes[2].address, c.nodes[3].address], timeout=30) as cl:
            ra, rb = cl.read(a), cl.read(b)  # waits for the intents' resolution (COMMITTED)
            assert (ra.value, rb.value) == (b"1", b"1")
            assert ra.mod_revision == rb.mod_revision

        # node 1 back; node 2 prepares, then dies before any record
        c.nodes[1].start()
        _txn_at(c.nodes[2].address, a, b, b"2")
        c.nodes[2].kill9()
        with Client([c.nodes[1].address, c.nodes[3].address], timeout=30) as cl:
            cl.put(a, b"3")  # refused while locked, resolved ABORTED, then applied
            assert cl.get(a) == b"3" and cl.get(b) == b"1"
    finally:
        c.stop()
