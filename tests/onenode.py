"""A one-node cluster inside the test's own event loop (no subprocess): cheap enough to start per
test, and its services can be patched to fail in ways a real node only fails by accident."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from clusterharness import free_ports

from kvstore.node.host import RaftSettings
from kvstore.security.audit import AuditSettings
from kvstore.server.admission import AdmissionSettings
from kvstore.server.config import NodeConfig
from kvstore.server.node import Node
from kvstore.v1 import kv_pb2, kv_pb2_grpc


@dataclass
class OneNode:
    node: Node
    address: str
    client_address: str = ""
    """The client-only port (`one_node(client_port=True)`), "" without one."""


@contextlib.asynccontextmanager
async def one_node(
    tmp_path: Path, *, request_timeout: float = 3.0, audit: AuditSettings | None = None,
    admission: AdmissionSettings | None = None, client_port: bool = False, feature_level: int | None = None,
    groups: int = 1,
) -> AsyncIterator[OneNode]:
    """Start node 1 of a one-member cluster (`groups` data groups) and wait until it leads it
    (`admission`: its admission control settings; a refusal of the first write by them counts
    as "serving")."""
    port, cport = free_ports(2)
    address = f"127.0.0.1:{port}"
    client_address = f"127.0.0.1:{cport}" if client_port else ""
    cfg = NodeConfig(
        client_listen=client_address,
        id=1, data_dir=tmp_path / "n1", listen=address, peers={1: address}, sync=False,
        request_timeout=request_timeout, raft=RaftSettings(tick_ms=20), groups=groups, replication=1, audit=audit,
        admission=admission or AdmissionSettings(),
    )
    if feature_level is not None:
        cfg.feature_level = feature_level
    node = Node(cfg)
    await node.start()
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = kv_pb2_grpc.KVStub(ch)
            deadline = time.monotonic() + 20
            while True:  # the data group elects itself and the shard map is applied
                try:
                    r = await stub.Put(kv_pb2.PutRequest(key=b"warm", value=b"up"), timeout=2)
                except grpc.aio.AioRpcError as e:  # a rate limit refused the call: the node serves
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        break
                    raise
                if r.error.code in (kv_pb2.OK, kv_pb2.RESOURCE_EXHAUSTED):
                    break
                assert time.monotonic() < deadline, f"the node never served a write: {r.error}"
                await asyncio.sleep(0.05)
        # The cluster version reaches the node's level once it advertised it (the gate refuses
        # transactions before that): a test of the gate itself passes a lower `feature_level`.
        versions = node.versions
        while feature_level is None and versions is not None and versions.value.cluster < cfg.feature_level:
            assert time.monotonic() < deadline, f"the cluster version stayed at {versions.value.cluster}"
            await asyncio.sleep(0.02)
        yield OneNode(node, address, client_address)
    finally:
        await node.stop(grace=0.5)
