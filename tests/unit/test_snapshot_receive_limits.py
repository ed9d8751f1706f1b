"""`Raft.SendSnapshot` is bounded against a broken or hostile member: a cap on streams in flight
per sender, and a free-space reserve the received file may not eat into (so a member cannot fill
the disk the node's write-ahead log needs). A real gRPC server on loopback runs the real
`RaftService`; only the free-space reading is injected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio

from kvstore.raft import Message
from kvstore.transport.service import RaftService, SnapshotLimits
from kvstore.v1 import raft_pb2, raft_pb2_grpc


def _chunk(data: bytes = b"", *, first: bool = False, last: bool = False) -> raft_pb2.SnapshotChunk:
    c = raft_pb2.SnapshotChunk(cluster_id="c", to=1, data=data, last=last)
    setattr(c, "from", 2)
    if first:
        c.message.CopyFrom(raft_pb2.RaftMessage())
    return c


async def _serve(svc: RaftService) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    raft_pb2_grpc.add_RaftServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_snapshot_streams_per_sender_are_capped(tmp_path: Path) -> None:
    async def main() -> None:
        delivered: list[Message] = []
        svc = RaftService(1, "c", delivered.append, tmp_path / "snaps", snapshot_limits=SnapshotLimits(per_sender=1))
        server, port = await _serve(svc)
        release = asyncio.Event()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = raft_pb2_grpc.RaftStub(ch)

                async def held() -> AsyncIterator[raft_pb2.SnapshotChunk]:
                    yield _chunk(b"x" * 100, first=True)
                    await release.wait()

                first = asyncio.ensure_future(stub.SendSnapshot(held(), timeout=30))
                for _ in range(500):  # wait until the server counts the first stream
                    if svc._receiving.get(2):
                        break
                    await asyncio.sleep(0.01)
                assert svc._receiving == {2: 1}

                async def second() -> AsyncIterator[raft_pb2.SnapshotChunk]:
                    yield _chunk(b"y", first=True, last=True)

                refused = await stub.SendSnapshot(second(), timeout=30)
                assert not refused.installed and "snapshots in flight from node 2" in refused.error
                release.set()
                done = await first
                assert not done.installed and "ended early" in done.error
                assert svc._receiving == {}
                # the slot is free again: the next stream is read (and refused for its content)
                again = await stub.SendSnapshot(second(), timeout=30)
                assert not again.installed and "in flight" not in again.error
            assert delivered == []
            assert list((tmp_path / "snaps").iterdir()) == []  # every refused file deleted
        finally:
            release.set()
            await server.stop(None)

    asyncio.run(main())


def test_a_snapshot_that_would_fill_the_disk_is_refused_and_deleted(tmp_path: Path) -> None:
    async def main() -> None:
        free = [10 << 20]
        written: list[int] = []

        def disk_usage(path: Path) -> tuple[int, int]:
            size = sum(p.stat().st_size for p in path.iterdir())
            written.append(size)
            return 1 << 30, free[0] - size

        limits = SnapshotLimits(reserve_bytes=4 << 20, check_every=1 << 20)
        svc = RaftService(1, "c", lambda m: None, tmp_path / "snaps", snapshot_limits=limits, disk_usage=disk_usage)
        server, port = await _serve(svc)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = raft_pb2_grpc.RaftStub(ch)

                async def endless() -> AsyncIterator[raft_pb2.SnapshotChunk]:
                    yield _chunk(b"z" * (256 << 10), first=True)
                    for _ in range(400):  # 100 MiB if nothing stopped it: bounded anyway
                        yield _chunk(b"z" * (256 << 10))

                done = await stub.SendSnapshot(endless(), timeout=60)
                assert not done.installed and "bytes free" in done.error
                # it stopped before the reserve: at most 10 - 4 MiB were ever written
                assert max(written) <= (6 << 20)
            assert list((tmp_path / "snaps").iterdir()) == []
            assert svc._receiving == {}
            # a small file system: the reserve is a tenth of it, not 256 MiB
            svc.disk_usage = lambda path: (64 << 20, 60 << 20)
            svc.snapshot_limits = SnapshotLimits()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = raft_pb2_grpc.RaftStub(ch)

                async def small() -> AsyncIterator[raft_pb2.SnapshotChunk]:
                    yield _chunk(b"z" * 1000, first=True, last=True)

                done = await stub.SendSnapshot(small(), timeout=60)
                assert not done.installed and "bytes free" not in done.error  # read, then refused as no snapshot
        finally:
            await server.stop(None)

    asyncio.run(main())
