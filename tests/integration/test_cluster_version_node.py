"""The cluster version on a real node (kvstore/node/version.py, kvstore/server/versions.py): a node
run as an older release (feature level 1, before transactions) advertises its level by itself,
Admin.Status reports the cluster version and every member's level, and a TXN (level 2) is refused
with a definite error on the unary and the streaming paths, nothing written, until the member
advertises level 2 (its upgrade) and the leader raises the version; a node whose release supports
less than the cluster version stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from onenode import one_node

from kvstore import errors
from kvstore.client import AsyncClient, Op
from kvstore.node.version import (
    COMMAND_LEVELS,
    LEVEL_BASE,
    LEVEL_TRANSACTIONS,
    SUPPORTED_LEVEL,
    advertise_command,
)
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import commands
from kvstore.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(60)


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_status_reports_levels_and_the_gate_holds_until_the_member_advertises(tmp_path: Path) -> None:
    asyncio.run(_gate_on_a_node(tmp_path))


async def _gate_on_a_node(tmp_path: Path) -> None:
    async with one_node(tmp_path, feature_level=LEVEL_BASE) as n, grpc.aio.insecure_channel(n.address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        kv = kv_pb2_grpc.KVStub(ch)

        async def advertised() -> bool:
            st = await admin.Status(admin_pb2.StatusRequest(), timeout=5)
            return dict(st.member_levels) == {1: LEVEL_BASE}

        await wait_for(advertised, "node 1 advertising its level")
        st = await admin.Status(admin_pb2.StatusRequest(), timeout=5)
        assert st.cluster_version == 1 and st.supported_level == LEVEL_BASE
        assert COMMAND_LEVELS[commands.Op.TXN] == LEVEL_TRANSACTIONS < SUPPORTED_LEVEL

        node = n.node
        assert node.versions is not None and node.host is not None and node.caller is not None
        versions = node.versions
        body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"gated", value=b"v"))])
        r = await kv.Txn(kv_pb2.TxnRequest(txn=body), timeout=5)
        assert r.error.code == kv_pb2.INVALID_ARGUMENT and not r.error.indeterminate
        assert "needs cluster version 2" in r.error.message and "node 1 (advertises 1)" in r.error.message
        # a range delete inside a transaction is level 6's form of TXN: refused before anything is prepared
        ranged = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(delete_range=kv_pb2.TxnRange(prefix=b"gated"))])
        r = await kv.Txn(kv_pb2.TxnRequest(txn=ranged), timeout=5)
        assert r.error.code == kv_pb2.INVALID_ARGUMENT and not r.error.indeterminate
        assert "TXN with a range delete needs cluster version 6" in r.error.message, r.error.message
        async with AsyncClient([n.address], timeout=5) as client:
            with pytest.raises(errors.InvalidArgument) as e:
                await client.txn([], [Op.put(b"gated", b"v")])  # KV.Stream
            assert e.value.definite and "needs cluster version 2" in e.value.message
            assert node.store is not None and node.store.get(1, b"gated") is None
            await client.delete(b"warm")  # level 1 kinds still pass

            # The member is upgraded: it advertises 2 (what its loop proposes), and the loop on
            # the metadata group's leader (this node) raises the cluster version.
            versions.supported = 2
            cmd = advertise_command(versions.value, versions.raw, 1, 2)
            assert cmd is not None
            assert (await node.caller.propose(META_GROUP, cmd)).swapped

            async def raised() -> bool:
                st = await admin.Status(admin_pb2.StatusRequest(), timeout=5)
                return st.cluster_version == 2

            await wait_for(raised, "the cluster version raised to 2")
            res = await client.txn([], [Op.put(b"gated", b"v")])
            assert res.succeeded
            assert await client.get(b"gated") == b"v"

        # A downgrade below the cluster version: the node refuses to go on (it may meet kinds it
        # does not know). Its own advertisement of level 1 is what wakes its loop here.
        versions.supported = 1
        cmd = advertise_command(versions.value, versions.raw, 1, 1)
        assert cmd is not None and (await node.caller.propose(META_GROUP, cmd)).swapped
        await asyncio.wait_for(node.died.wait(), 20)
        assert node.fatal is not None and "cluster version is 2" in node.fatal
