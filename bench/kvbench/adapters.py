"""One interface over both systems for the load generator: put, get, scan, and a put that keeps
trying until acknowledged (for failover).

- kvstore goes through its own client library (``kvstore.client.AsyncClient``): leader
  discovery, sessions, retries and all, as an application would use it.
- etcd goes through its v3 gRPC KV API with the generated stubs of ``kvstore/etcdpb`` over one
  grpc.aio channel to one member (the leader by default, as the kvstore client also talks to the
  leader; a follower would forward writes to the leader, one more hop). Range is linearizable
  (etcd's default: ``serializable`` false).

Each adapter holds one channel per member it talks to and is used from one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

import grpc
import grpc.aio

from bench.kvbench.tls import ClusterCerts
from kvstore.client import AsyncClient, Compare, Op
from kvstore.errors import KVError
from kvstore.etcdpb.etcdserverpb import rpc_pb2 as etcd_pb2
from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc as etcd_pb2_grpc

#: The range end that makes an etcd Range cover every key >= its start.
ETCD_RANGE_TO_END = b"\x00"


class Adapter(Protocol):
    system: str

    async def put(self, key: bytes, value: bytes) -> None: ...

    async def get(self, key: bytes) -> bytes | None: ...

    async def scan(self, start: bytes, limit: int) -> int: ...

    async def txn2(self, k1: bytes, k2: bytes, value: bytes) -> None:
        """A transaction of 2 compares (each key's version > 0: the keys are preloaded, so they
        hold) and 2 puts; raises unless it succeeded."""
        ...

    async def pairs(self, keys: Sequence[bytes], cross: bool = False) -> list[tuple[bytes, bytes]]:
        """Pairs of `keys` for the transactions (kvstore: keys of one group; `cross`: of two
        groups, a two-phase commit)."""
        ...

    def prefer(self, endpoint: str) -> None: ...

    async def put_until_ack(self, key: bytes, value: bytes, timeout: float) -> int: ...

    async def probe_put(self, key: bytes, value: bytes, probe: int, timeout: float) -> None: ...

    async def close(self) -> None: ...


class KvstoreAdapter:
    system = "kvstore"

    def __init__(self, endpoints: Sequence[str], timeout: float = 10.0, certs: ClusterCerts | None = None) -> None:
        self.client = AsyncClient(
            list(endpoints), timeout=timeout, certs_dir=certs.client_dir if certs is not None else None
        )

    async def put(self, key: bytes, value: bytes) -> None:
        await self.client.put(key, value)

    async def get(self, key: bytes) -> bytes | None:
        return await self.client.get(key)  # linearizable (the default)

    async def scan(self, start: bytes, limit: int) -> int:
        n = 0
        async for chunk in self.client.scan_chunks(start=start, limit=limit):
            n += len(chunk)
        return n

    async def txn2(self, k1: bytes, k2: bytes, value: bytes) -> None:
        r = await self.client.txn(
            [Compare.version(k1, ">", 0), Compare.version(k2, ">", 0)], [Op.put(k1, value), Op.put(k2, value)]
        )
        if not r.succeeded:
            raise LookupError(f"transaction on {k1!r}, {k2!r} did not succeed")

    async def pairs(self, keys: Sequence[bytes], cross: bool = False) -> list[tuple[bytes, bytes]]:
        m = await self.client.shard_map(refresh=True)
        by_group: dict[int, list[bytes]] = {}
        for k in keys:
            by_group.setdefault(m.group_for_key(k) if m is not None else 0, []).append(k)
        if cross:  # the first key of each pair in one group, the second in the next
            gs = [by_group[g] for g in sorted(by_group)]
            return [(a, b) for i in range(len(gs) - 1) for a, b in zip(gs[i], gs[i + 1], strict=False)]
        return [(ks[i], ks[i + 1]) for ks in by_group.values() for i in range(0, len(ks) - 1, 2)]

    def prefer(self, endpoint: str) -> None:
        """The client finds the leader by itself."""

    async def put_until_ack(self, key: bytes, value: bytes, timeout: float) -> int:
        """The client's own retry loop (redirects, discovery, backoff) within ``timeout``; a
        definite error before the deadline is retried after 10 ms. Returns the attempts made."""
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            attempts += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no write acknowledged within {timeout:g} s")
            try:
                await self.client.put(key, value, timeout=left)
                return attempts
            except KVError:
                await asyncio.sleep(0.01)

    async def probe_put(self, key: bytes, value: bytes, probe: int, timeout: float) -> None:
        """One failover probe: a put through the client library (its own retries included)."""
        await self.client.put(key, value, timeout=timeout)

    async def close(self) -> None:
        await self.client.close()


class EtcdAdapter:
    system = "etcd"

    def __init__(
        self, endpoints: Sequence[str], timeout: float = 10.0, target: str | None = None,
        certs: ClusterCerts | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._credentials = (
            grpc.ssl_channel_credentials(
                root_certificates=certs.ca.read_bytes(), private_key=certs.client_key.read_bytes(),
                certificate_chain=certs.client_cert.read_bytes(),
            )
            if certs is not None
            else None
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, etcd_pb2_grpc.KVStub] = {}
        self.target = target or self.endpoints[0]
        self._kv = self._stub(self.target)

    def _stub(self, endpoint: str) -> etcd_pb2_grpc.KVStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            ch = self._channels[endpoint] = (
                grpc.aio.insecure_channel(endpoint)
                if self._credentials is None
                else grpc.aio.secure_channel(endpoint, self._credentials)
            )
            stub = self._stubs[endpoint] = etcd_pb2_grpc.KVStub(ch)
        return stub

    def prefer(self, endpoint: str) -> None:
        self.target = endpoint
        self._kv = self._stub(endpoint)

    async def put(self, key: bytes, value: bytes) -> None:
        await self._kv.Put(etcd_pb2.PutRequest(key=key, value=value), timeout=self.timeout)

    async def get(self, key: bytes) -> bytes | None:
        resp: etcd_pb2.RangeResponse = await self._kv.Range(etcd_pb2.RangeRequest(key=key), timeout=self.timeout)
        return resp.kvs[0].value if resp.kvs else None

    async def scan(self, start: bytes, limit: int) -> int:
        req = etcd_pb2.RangeRequest(key=start, range_end=ETCD_RANGE_TO_END, limit=limit)
        resp: etcd_pb2.RangeResponse = await self._kv.Range(req, timeout=self.timeout)
        return len(resp.kvs)

    async def txn2(self, k1: bytes, k2: bytes, value: bytes) -> None:
        gt = etcd_pb2.Compare.GREATER
        ver = etcd_pb2.Compare.VERSION
        req = etcd_pb2.TxnRequest(
            compare=[etcd_pb2.Compare(result=gt, target=ver, key=k1, version=0),
                     etcd_pb2.Compare(result=gt, target=ver, key=k2, version=0)],
            success=[etcd_pb2.RequestOp(request_put=etcd_pb2.PutRequest(key=k1, value=value)),
                     etcd_pb2.RequestOp(request_put=etcd_pb2.PutRequest(key=k2, value=value))],
        )
        resp: etcd_pb2.TxnResponse = await self._kv.Txn(req, timeout=self.timeout)
        if not resp.succeeded:
            raise LookupError(f"transaction on {k1!r}, {k2!r} did not succeed")

    async def pairs(self, keys: Sequence[bytes], cross: bool = False) -> list[tuple[bytes, bytes]]:
        return [(keys[i], keys[i + 1]) for i in range(0, len(keys) - 1, 2)]  # one keyspace: cross is moot

    async def put_until_ack(self, key: bytes, value: bytes, timeout: float, attempt_timeout: float = 2.0) -> int:
        """Put at the preferred member; on any error try the next member after 10 ms (as
        clientv3 moves to another endpoint), each attempt bounded by ``attempt_timeout``."""
        deadline = time.monotonic() + timeout
        order = self.endpoints.index(self.target) if self.target in self.endpoints else 0
        attempts = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no write acknowledged within {timeout:g} s")
            ep = self.endpoints[(order + attempts) % len(self.endpoints)]
            attempts += 1
            try:
                await self._stub(ep).Put(
                    etcd_pb2.PutRequest(key=key, value=value), timeout=min(left, attempt_timeout)
                )
                self.prefer(ep)
                return attempts
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.01)

    async def probe_put(self, key: bytes, value: bytes, probe: int, timeout: float) -> None:
        """One failover probe: one Put at the next member in turn, starting at the preferred one
        (a follower forwards it to the leader it knows, which may be the dead one: then only the
        deadline ends it, so probes overlap)."""
        start = self.endpoints.index(self.target) if self.target in self.endpoints else 0
        ep = self.endpoints[(start + probe) % len(self.endpoints)]
        await self._stub(ep).Put(etcd_pb2.PutRequest(key=key, value=value), timeout=timeout)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for ch in channels:
            await ch.close()


def make_adapter(
    system: str, endpoints: Sequence[str], *, leader: str | None = None, timeout: float = 10.0,
    certs: ClusterCerts | None = None,
) -> Adapter:
    """An adapter for `system` (`kvstore`, `etcd`, or either with `-tls`, which needs `certs`;
    `etcd-api`: etcd's adapter on a kvstore cluster)."""
    base = system.removesuffix("-tls")
    if base != system and certs is None:
        raise ValueError(f"{system} needs the cluster's certificates")
    adapter: KvstoreAdapter | EtcdAdapter
    if base == "kvstore":
        adapter = KvstoreAdapter(endpoints, timeout, certs=certs)
    elif system == "etcd-api":  # kvstore through its etcd API: etcd's own adapter, unchanged
        adapter = EtcdAdapter(endpoints, timeout, target=leader)
    elif base == "etcd":
        adapter = EtcdAdapter(endpoints, timeout, target=leader, certs=certs)
    else:
        raise ValueError(f"unknown system {system!r}")
    adapter.system = system  # what the results are labelled with
    return adapter
