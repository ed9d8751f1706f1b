"""The session table under many short-lived clients: it must stay flat (issue 13, finding 9).

    python bench/sessions.py [--clients 100000] [--every 10000] [--window 2048] [--batch 256]
                             [--max-seconds 900]

Starts a 3-node cluster (real `kvstore serve` processes on 127.0.0.1, one data group, data in a
temporary directory removed at the end; every process is stopped by its PID), then plays N
short-lived clients: each has a fresh random 63-bit client id and writes ONE key (seq 1) under
its own session, as a script, a cron job or a `kvctl put` would. Every `--every` clients it
prints, per group, the session count each node's state machine keeps (Admin.Status: replicated
state, so all replicas agree), the evictions so far, and the write rate.

The clients' writes are raw `Put`s on ONE `KV.Stream` over ONE shared gRPC channel to the data
group's leader, `--window` operations in flight: creating 100,000 gRPC channels (and streams)
would measure channel setup, not the state machine, and would take far longer. Each operation
still carries its own fresh session, which is all the server sees of a client.

Bounded: stops after `--clients` clients or `--max-seconds` seconds, whichever comes first, and
prints how many it drove. Exits non-zero if a group's table exceeds the cap.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.storage.machine import MAX_SESSIONS_PER_GROUP
from kvstore.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc


async def table(endpoints: list[str]) -> dict[int, list[tuple[int, int]]]:
    """Per group, (sessions, evicted) as each node reports it."""
    out: dict[int, list[tuple[int, int]]] = {}
    for ep in endpoints:
        async with grpc.aio.insecure_channel(ep) as ch:
            st = await admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=5)
        for g in st.groups:
            out.setdefault(g.group, []).append((g.sessions, g.sessions_evicted))
    return out


async def leader_of(endpoints: list[str], group: int) -> str:
    for _ in range(200):
        for ep in endpoints:
            async with grpc.aio.insecure_channel(ep) as ch:
                st = await admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=5)
            if any(g.group == group and g.role == "leader" for g in st.groups):
                return ep
        await asyncio.sleep(0.1)
    raise SystemExit(f"no leader of group {group}")


async def drive(
    endpoints: list[str], clients: int, every: int, window: int, batch: int, max_seconds: float, seed: int = 1
) -> tuple[int, int, float, int]:
    """Drive up to `clients` one-write clients; returns (clients done, errors, seconds, max
    sessions seen in any group)."""
    rng = random.Random(seed)
    leader = await leader_of(endpoints, 1)
    done = errors = 0
    worst = 0
    room = asyncio.Semaphore(window)
    t0 = time.perf_counter()
    stop_at = t0 + max_seconds
    sent = 0

    async def ops() -> AsyncIterator[kv_pb2.OpBatch]:
        nonlocal sent
        while sent < clients and time.perf_counter() < stop_at:
            n = min(batch, clients - sent)
            for _ in range(n):
                await room.acquire()
            b = kv_pb2.OpBatch()
            for _ in range(n):
                sent += 1
                cid = rng.getrandbits(63) | 1
                b.ops.add(id=sent, put=kv_pb2.PutRequest(
                    key=b"s/%d" % (sent % 1000), value=b"x",
                    session=kv_pb2.Session(client_id=cid, seq=1, ack=1)))
            yield b

    next_report = every
    async with grpc.aio.insecure_channel(leader) as ch:
        call = kv_pb2_grpc.KVStub(ch).Stream(ops())
        async for rb in call:
            for r in rb.results:
                room.release()
                done += 1
                if r.put.error.code != kv_pb2.OK:
                    errors += 1
            if done >= next_report or (done == sent and (sent >= clients or time.perf_counter() >= stop_at)):
                next_report = done - done % every + every
                tab = await table(endpoints)
                dt = time.perf_counter() - t0
                parts = []
                for g, rows in sorted(tab.items()):
                    worst = max(worst, *(s for s, _ in rows))
                    parts.append(f"group {g}: sessions {'/'.join(str(s) for s, _ in rows)} "
                                 f"evicted {max(e for _, e in rows)}")
                print(f"{done:>7} clients  {dt:7.1f} s  {done / dt:7.0f} clients/s  errors {errors}  "
                      + "; ".join(parts), flush=True)
                if done == sent and (sent >= clients or time.perf_counter() >= stop_at):
                    break
    return done, errors, time.perf_counter() - t0, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=900.0)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvbench-sessions-"))
    cluster = Cluster(root, 3)
    try:
        cluster.start()
        print(f"cluster up on {', '.join(cluster.endpoints)}; cap {MAX_SESSIONS_PER_GROUP} sessions per group")
        done, errors, dt, worst = asyncio.run(
            drive(cluster.endpoints, a.clients, a.every, a.window, a.batch, a.max_seconds)
        )
        print(f"{done} short-lived clients in {dt:.1f} s ({done / dt:,.0f}/s), {errors} errors; "
              f"largest session table seen: {worst} (cap {MAX_SESSIONS_PER_GROUP})")
        if worst > MAX_SESSIONS_PER_GROUP:
            raise SystemExit("FAIL: a session table exceeded the cap")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
