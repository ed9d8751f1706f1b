"""A node whose Ready loop (or any loop it needs) dies does not linger serving nothing: it logs
the traceback, turns health NOT_SERVING and its process exits non-zero (issue 13, loud failure)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from clusterharness import free_ports
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.server import main as server_main
from kvstore.server.config import NodeConfig
from kvstore.server.node import Node


def _cfg(tmp_path: Path) -> NodeConfig:
    (port,) = free_ports(1)
    addr = f"127.0.0.1:{port}"
    return NodeConfig(id=1, data_dir=tmp_path / "n1", listen=addr, peers={1: addr})


class _Planted(Exception):
    pass


def _plant(node: Node) -> None:
    """From now on the host's Ready cycle raises (a bug, not a storage error)."""
    assert node.host is not None

    def boom() -> None:
        raise _Planted("planted bug in the Ready cycle")

    node.host.begin_cycle = boom  # type: ignore[method-assign,assignment]
    node.wake()


async def _health(addr: str) -> int:
    async with grpc.aio.insecure_channel(addr) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kvstore.v1.KV"))
        return int(resp.status)


def test_a_dead_ready_loop_makes_the_node_not_serving_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="kvstore.node")

    async def scenario() -> None:
        cfg = _cfg(tmp_path)
        node = Node(cfg)
        await node.start()
        try:
            assert await _health(cfg.listen) == health_pb2.HealthCheckResponse.SERVING
            _plant(node)
            await asyncio.wait_for(node.died.wait(), 10)
            assert node.fatal is not None and "ready-loop" in node.fatal
            assert await _health(cfg.listen) == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await node.stop(grace=0.1)

    asyncio.run(scenario())
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "task ready-loop died" in text
    assert any(r.exc_info and r.exc_info[0] is _Planted for r in caplog.records), "no traceback logged"


def test_the_process_exits_non_zero_when_a_loop_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class PlantedNode(Node):
        async def start(self) -> None:
            await super().start()
            _plant(self)

    monkeypatch.setattr(server_main, "Node", PlantedNode)
    code = asyncio.run(asyncio.wait_for(server_main.serve(_cfg(tmp_path)), 30))
    assert code == 1
