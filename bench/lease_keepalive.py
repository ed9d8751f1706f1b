"""Lease keep-alive cost with many leases, on a 3-node kvstore cluster on 127.0.0.1 (data on disk,
fsync on):

    python -m bench.lease_keepalive --leases 10000 --ttl 60 --idle 10

Grants N leases (homed in one data group, so one leader renews them all), then renews every lease
once over one LeaseKeepAlive stream to that leader (each renewal is a RENEW through the group's
log, the replies pipelined: renewals per second), then measures the CPU the nodes spend holding
the N leases idle for `--idle` seconds (the lease clock's scans and remaining-TTL checkpoints:
CPU seconds per second, per node). Then (unless `--no-etcd`) the same three measurements on a
3-node etcd 3.4 on 127.0.0.1 (fsync on) in the same run, through etcd's own Lease API
(`LeaseGrant`, one `LeaseKeepAlive` stream to its leader; stubs in kvstore/etcdpb), and the ratios
kvstore / etcd. Prints one JSON line per measurement. The two keep-alives give different
guarantees: etcd's leader answers a keep-alive from memory without a log entry (its TTLs reset on
a leader change), kvstore's is a RENEW through the group's log (the remaining TTL survives leader
changes); bench/README.md says more.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import click
import grpc

from bench.kvbench.clusters import EtcdCluster, KvstoreCluster, proc_cpu_seconds
from kvstore.client import AsyncClient
from kvstore.errors import InvalidArgument
from kvstore.etcdpb.etcdserverpb import rpc_pb2 as etcd_pb2
from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc as etcd_pb2_grpc
from kvstore.storage import leases
from kvstore.v1 import kv_pb2, kv_pb2_grpc


async def _leader_of(client: AsyncClient, group: int, endpoints: list[str]) -> str:
    deadline = time.monotonic() + 60
    while True:  # a new cluster raises its version to the leases' level within a few seconds
        try:
            await client.leases.revoke(await client.leases.grant(5))
            break
        except InvalidArgument as err:
            if "cluster version" not in err.message or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    await asyncio.sleep(5)  # the leader balancer hands each group to its preferred node after a start
    for ep in endpoints:
        async with grpc.aio.insecure_channel(ep) as ch:
            r = await kv_pb2_grpc.KVStub(ch).LeaseTimeToLive(
                kv_pb2.LeaseTimeToLiveRequest(id=leases.make_id(group, 1)), timeout=5)
            if r.error.code == kv_pb2.OK:
                return ep
    raise RuntimeError(f"no leader of group {group} found")


async def _run(n: int, ttl: int, idle: float, inflight: int, cluster: KvstoreCluster) -> dict[str, float]:
    eps = cluster.endpoints
    async with AsyncClient(eps, timeout=30) as client:
        group = 1
        leader = await _leader_of(client, group, eps)
        ids = [leases.make_id(group, i + 1000) for i in range(n)]
        async with grpc.aio.insecure_channel(leader) as ch:
            stub = kv_pb2_grpc.KVStub(ch)
            sem = asyncio.Semaphore(inflight)

            async def grant(lid: int) -> None:
                async with sem:
                    r = await stub.LeaseGrant(kv_pb2.LeaseGrantRequest(ttl=ttl, id=lid), timeout=30)
                    assert r.error.code == kv_pb2.OK, r.error

            t0 = time.perf_counter()
            await asyncio.gather(*(grant(i) for i in ids))
            dt = time.perf_counter() - t0
            print(json.dumps({"system": "kvstore", "measure": "grant", "leases": n, "seconds": round(dt, 3), "per_s": round(n / dt)}))
            res = {"grant_per_s": n / dt}

            async def requests() -> object:
                for i in ids:
                    yield kv_pb2.LeaseKeepAliveRequest(id=i)

            t0 = time.perf_counter()
            got = 0
            async for resp in stub.LeaseKeepAlive(requests(), timeout=600):
                assert resp.error.code == kv_pb2.OK and resp.ttl == ttl, resp
                got += 1
                if got == n:
                    break
            dt = time.perf_counter() - t0
            print(json.dumps({"system": "kvstore", "measure": "keep-alive (each lease once, one stream)", "leases": n,
                              "seconds": round(dt, 3), "renewals_per_s": round(n / dt)}))
            res["renewals_per_s"] = n / dt
    res["idle_cpu"] = await _idle_cpu(cluster.pids(), idle, n, "kvstore")
    return res


async def _idle_cpu(pids: list[int], idle: float, n: int, system: str) -> float:
    """CPU seconds per second the nodes spend over ``idle`` seconds (printed per node); returns
    the sum over the nodes."""
    c0 = [proc_cpu_seconds([p]) for p in pids]
    await asyncio.sleep(idle)
    c1 = [proc_cpu_seconds([p]) for p in pids]
    per = [(b - a) / idle for a, b in zip(c0, c1, strict=True)]
    print(json.dumps({"system": system, "measure": f"idle with {n} live leases", "seconds": idle,
                      "cpu_s_per_s_per_node": [round(x, 3) for x in per]}))
    return sum(per)


async def _etcd_leader(endpoints: list[str]) -> str:
    """The client URL of the member every member names as leader (polled until they agree)."""
    deadline = time.monotonic() + 60
    while True:
        ids: dict[int, str] = {}
        leaders: set[int] = set()
        for ep in endpoints:
            try:
                async with grpc.aio.insecure_channel(ep) as ch:
                    r = await etcd_pb2_grpc.MaintenanceStub(ch).Status(etcd_pb2.StatusRequest(), timeout=5)
                ids[r.header.member_id] = ep
                leaders.add(r.leader)
            except grpc.RpcError:
                pass
        if len(leaders) == 1 and (lead := next(iter(leaders))) in ids:
            return ids[lead]
        if time.monotonic() > deadline:
            raise RuntimeError(f"etcd: no agreed leader among {endpoints}")
        await asyncio.sleep(0.5)


async def _run_etcd(n: int, ttl: int, idle: float, inflight: int, cluster: EtcdCluster) -> dict[str, float]:
    """The same measurements on etcd, through its Lease API at its leader."""
    leader = await _etcd_leader(cluster.endpoints)
    res: dict[str, float] = {}
    async with grpc.aio.insecure_channel(leader) as ch:
        stub = etcd_pb2_grpc.LeaseStub(ch)
        sem = asyncio.Semaphore(inflight)
        ids = [i + 1000 for i in range(n)]

        async def grant(lid: int) -> None:
            async with sem:
                r = await stub.LeaseGrant(etcd_pb2.LeaseGrantRequest(TTL=ttl, ID=lid), timeout=30)
                if r.error or lid != r.ID:
                    raise RuntimeError(f"etcd LeaseGrant {lid}: {r.error or r.ID}")

        t0 = time.perf_counter()
        await asyncio.gather(*(grant(i) for i in ids))
        dt = time.perf_counter() - t0
        print(json.dumps({"system": "etcd", "measure": "grant", "leases": n, "seconds": round(dt, 3),
                          "per_s": round(n / dt)}))
        res["grant_per_s"] = n / dt

        async def requests() -> object:
            for i in ids:
                yield etcd_pb2.LeaseKeepAliveRequest(ID=i)

        t0 = time.perf_counter()
        got = 0
        async for resp in stub.LeaseKeepAlive(requests(), timeout=600):
            if resp.TTL <= 0:
                raise RuntimeError(f"etcd keep-alive of {resp.ID}: lease not found")
            got += 1
            if got == n:
                break
        dt = time.perf_counter() - t0
        print(json.dumps({"system": "etcd", "measure": "keep-alive (each lease once, one stream)", "leases": n,
                          "seconds": round(dt, 3), "renewals_per_s": round(n / dt)}))
        res["renewals_per_s"] = n / dt
    res["idle_cpu"] = await _idle_cpu(cluster.pids(), idle, n, "etcd")
    return res


@click.command()
@click.option("--leases", "n", default=10_000, show_default=True)
@click.option("--ttl", default=60, show_default=True, help="Seconds (long enough that none expires during the run).")
@click.option("--idle", default=10.0, show_default=True, help="Seconds of idle CPU measured with the leases held.")
@click.option("--inflight", default=256, show_default=True, help="Grants in flight at once.")
@click.option("--etcd/--no-etcd", "with_etcd", default=True, show_default=True,
              help="Also measure etcd 3.4 (the etcd binary) in the same run and print the ratios.")
def main(n: int, ttl: int, idle: float, inflight: int, with_etcd: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="lease-bench-") as d:
        cluster = KvstoreCluster(Path(d) / "kvstore", ["--groups", "2"])
        cluster.start()
        try:
            kv = asyncio.run(_run(n, ttl, idle, inflight, cluster))
        finally:
            cluster.stop()
        if not with_etcd:
            return
        etcd = EtcdCluster(Path(d) / "etcd")
        etcd.start()
        try:
            et = asyncio.run(_run_etcd(n, ttl, idle, inflight, etcd))
        finally:
            etcd.stop()
    print(json.dumps({"measure": "ratios kvstore / etcd", "leases": n,
                      **{k: round(kv[k] / et[k], 3) if et[k] else None for k in kv}}))


if __name__ == "__main__":
    main()
