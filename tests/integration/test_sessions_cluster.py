"""Session expiry on a real 3-node cluster (tests/clusterharness.py): the session table stays at
the cap under more short-lived clients than it holds, and a retried write whose session was
evicted gets an indeterminate SESSION_EXPIRED and is not applied a second time."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from clusterharness import Cluster

from kvstore import errors
from kvstore.client import Client, group_status
from kvstore.storage.machine import MAX_SESSIONS_PER_GROUP
from kvstore.v1 import kv_pb2, kv_pb2_grpc

EXTRA = 1_500


async def _fresh_clients(leader: str, n: int, seed: int) -> int:
    """`n` one-write clients (fresh client id, seq 1) as raw Puts on KV.Stream; returns how many
    succeeded. An attempt that failed (a leader change under load, a timeout) is sent again
    under the same session, as the client library would: exactly once either way."""
    rng = random.Random(seed)
    todo = {i: kv_pb2.PutRequest(key=b"fresh/%d" % (i % 100), value=b"x",
                                 session=kv_pb2.Session(client_id=rng.getrandbits(63) | 1, seq=1, ack=1))
            for i in range(1, n + 1)}
    ok = 0
    for _round in range(5):
        if not todo:
            break
        got = await _stream_puts(leader, todo)
        for op_id, code, hint in got:
            if code == kv_pb2.OK:
                ok += 1
                del todo[op_id]
            elif hint:
                leader = hint
    return ok


async def _stream_puts(address: str, puts: dict[int, kv_pb2.PutRequest]) -> list[tuple[int, int, str]]:
    """Send `puts` (op id -> request) on one KV.Stream; (op id, error code, leader hint) each."""
    room = asyncio.Semaphore(1024)
    ids = sorted(puts)

    async def ops() -> AsyncIterator[kv_pb2.OpBatch]:
        for i in range(0, len(ids), 256):
            b = kv_pb2.OpBatch()
            for op_id in ids[i:i + 256]:
                await room.acquire()
                b.ops.add(id=op_id, put=puts[op_id])
            yield b

    out: list[tuple[int, int, str]] = []
    async with grpc.aio.insecure_channel(address) as ch:
        async for rb in kv_pb2_grpc.KVStub(ch).Stream(ops()):
            for r in rb.results:
                room.release()
                out.append((r.id, r.put.error.code, r.put.error.leader_hint))
            if len(out) == len(ids):
                break
    return out


def _put(leader: str, key: bytes, value: bytes, session: kv_pb2.Session) -> kv_pb2.PutResponse:
    """A raw Put at `leader`, following NOT_LEADER hints (a definite refusal: nothing applied)."""
    for _ in range(10):
        with grpc.insecure_channel(leader) as ch:
            resp: kv_pb2.PutResponse = kv_pb2_grpc.KVStub(ch).Put(
                kv_pb2.PutRequest(key=key, value=value, session=session), timeout=10
            )
        if resp.error.code != kv_pb2.NOT_LEADER or not resp.error.leader_hint:
            return resp
        leader = resp.error.leader_hint
    return resp


def _settled_leader(cluster: Cluster) -> str:
    return cluster.settled_leader().address


def test_session_table_stays_flat_and_an_expired_retry_is_not_applied_twice(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 3)
    try:
        cluster.start()
        leader = _settled_leader(cluster)
        client_id = 0x5E55_1011
        # A client writes once (the reply carries the entry's index) ...
        first = _put(leader, b"target", b"once", kv_pb2.Session(client_id=client_id, seq=1, ack=1))
        assert first.error.code == kv_pb2.OK and first.index > 0
        # ... someone else overwrites the key ...
        assert _put(leader, b"target", b"later", kv_pb2.Session(client_id=7, seq=1, ack=1)).error.code == kv_pb2.OK
        # ... and more short-lived clients than a group keeps sessions come and go.
        t0 = time.monotonic()
        n = MAX_SESSIONS_PER_GROUP + EXTRA
        assert asyncio.run(_fresh_clients(leader, n, seed=3)) == n
        elapsed = time.monotonic() - t0
        # Every replica's table is at the cap (not at n + 2): the oldest sessions were evicted.
        deadline = time.monotonic() + 20
        while True:
            rows = []
            for node in cluster.nodes.values():
                st = node.status()
                g = group_status(st, 1) if st is not None else None
                rows.append((g.sessions, g.sessions_evicted) if g is not None else None)
            if all(r == (MAX_SESSIONS_PER_GROUP, n + 2 - MAX_SESSIONS_PER_GROUP) for r in rows):
                break
            assert time.monotonic() < deadline, f"session tables {rows} after {n + 2} clients"
            time.sleep(0.2)
        # The first client now retries its write (it never saw the reply, say): its session was
        # evicted, so the group refuses it, indeterminately, instead of applying it again.
        retry = kv_pb2.Session(client_id=client_id, seq=1, ack=1, retry=True, horizon=first.index - 1)
        resp = _put(leader, b"target", b"once", retry)
        assert resp.error.code == kv_pb2.SESSION_EXPIRED and resp.error.indeterminate, resp
        err = errors.from_proto(resp.error, is_write=True)
        assert isinstance(err, errors.SessionExpired) and err.indeterminate
        with Client(cluster.endpoints) as c:
            assert c.get(b"target") == b"later"  # not applied a second time
        print(f"{n} short-lived clients in {elapsed:.1f} s")
    finally:
        cluster.stop()
