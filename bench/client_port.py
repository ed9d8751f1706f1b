"""What the client-only port (`--client-listen`: TLS without a client certificate, a token per
stream) costs against the peer port (mutual TLS, the client certificate names the user), A/B on
the same node.

    python bench/client_port.py [--seconds 5] [--rounds 2] [--inflight 64]

One `kvstore serve` process (one data group, TLS, auth enabled, a client port; data and
certificates in a temporary directory removed at the end; the process stopped by its PID).
Puts/s with `--inflight` operations in flight on one `KV.Stream`: A through the peer port as
root by its client certificate, B through the client port as root by a token, alternating A and
B `--rounds` times so both see the same machine. Bounded by `--seconds` per run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.client import Client
from kvstore.v1 import auth_pb2, auth_pb2_grpc, kv_pb2, kv_pb2_grpc

PASSWORD = "bench-client-port"


async def drive(address: str, creds: grpc.ChannelCredentials, token: str | None, seconds: float,
                inflight: int) -> float:
    """Puts/s over one KV.Stream with `inflight` operations outstanding, for `seconds`."""
    md = [("authorization", f"Bearer {token}")] if token else None
    async with grpc.aio.secure_channel(address, creds) as ch:
        q: asyncio.Queue[kv_pb2.OpBatch | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[kv_pb2.OpBatch]:
            while (b := await q.get()) is not None:
                yield b

        call = kv_pb2_grpc.KVStub(ch).Stream(feed(), metadata=md)
        next_id = 0

        def batch(k: int) -> kv_pb2.OpBatch:
            nonlocal next_id
            ops = []
            for _ in range(k):
                next_id += 1
                ops.append(kv_pb2.Op(id=next_id, put=kv_pb2.PutRequest(key=b"k%d" % (next_id % 10_000), value=b"v" * 64)))
            return kv_pb2.OpBatch(ops=ops)

        done = 0
        await q.put(batch(inflight))
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            rb = await call.read()
            if rb is grpc.aio.EOF:
                raise RuntimeError("stream ended")
            bad = [r for r in rb.results if r.put.error.code != kv_pb2.OK]
            if bad:
                raise RuntimeError(f"a put failed: {bad[0].put.error}")
            done += len(rb.results)
            await q.put(batch(len(rb.results)))
        rate = done / (time.monotonic() - t0)
        await q.put(None)
        call.cancel()
        return rate


async def login(address: str, creds: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(address, creds) as ch:
        r = await auth_pb2_grpc.AuthStub(ch).Authenticate(
            auth_pb2.AuthenticateRequest(user="root", password=PASSWORD), timeout=10)
    if r.error.code or not r.token:
        raise RuntimeError(f"login failed: {r.error}")
    return str(r.token)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=64)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvbench-clientport-"))
    c = Cluster(root, n=1, certs_dir=root / "certs", client_ports=True, extra_args=["--groups", "1"])
    try:
        c.start()
        op = auth_pb2.AuthChangeRequest
        with Client(c.endpoints, credentials=c.credentials, timeout=30) as cl:
            cl.auth_call("Change", op(op=op.USER_ADD, user="root", password=PASSWORD))
            cl.auth_call("Change", op(op=op.ENABLE))
            cl.put(b"warm", b"up")
        assert c.credentials is not None and c.certs_dir is not None
        ca = grpc.ssl_channel_credentials((c.certs_dir / "ca.crt").read_bytes())
        client_port = c.client_addresses[1]
        a: list[float] = []
        b: list[float] = []
        for r in range(args.rounds):
            a.append(asyncio.run(drive(c.endpoints[0], c.credentials, None, args.seconds, args.inflight)))
            token = asyncio.run(login(client_port, ca))
            b.append(asyncio.run(drive(client_port, ca, token, args.seconds, args.inflight)))
            print(f"round {r + 1}: peer port, client certificate {a[-1]:.0f} puts/s; "
                  f"client port, token {b[-1]:.0f} puts/s")
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"median at {args.inflight} in flight: A (peer port, certificate) {ma:.0f} puts/s, "
              f"B (client port, token) {mb:.0f} puts/s: B/A = {mb / ma:.3f}")
    finally:
        c.stop()  # by PID
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
