"""How soon a node that was down serves again: a 3-node cluster takes puts while one node is
killed (kill -9) for `--down` seconds; the node is started again, and the time is measured from
its start to its first linearizable Get of the last key written, answered by that node itself
(a follower: it must hear its groups' leaders and catch up first).

    python -m bench.rejoin [--down 30] [--rounds 1]

Real `kvstore serve` processes on 127.0.0.1 (free ports), data in a temporary directory that is
removed at the end; puts every 50 ms while the node is down (at most 10,000). Prints one line per
round: the time and the answers the node gave before it served (UNAVAILABLE: not listening yet;
STALE_REPLICA: no leader heard yet, or not caught up).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.client import Client
from kvstore.v1 import kv_pb2, kv_pb2_grpc

PUT_EVERY = 0.05
MAX_PUTS = 10_000
SERVE_DEADLINE = 120.0


def one_round(down: float, data_root: Path | None = None) -> tuple[float, int, dict[str, int]]:
    """(seconds from the node's start to its first serving of the last put, puts while it was
    down, answers it gave before by code); the cluster's data in a new directory under
    `data_root` (None: the system's temporary directory), removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="kvbench-rejoin-", dir=data_root))
    cluster = Cluster(root, 3)
    try:
        cluster.start()
        cluster.wait_serving()
        with Client(cluster.endpoints, timeout=10) as kv:
            for i in range(50):
                kv.put(b"k%03d" % i, b"v")
            victim = cluster.nodes[3]
            victim.kill9()
            end = time.monotonic() + down
            n = 0
            while time.monotonic() < end and n < MAX_PUTS:
                kv.put(b"k%03d" % (n % 50), b"w%d" % n)
                n += 1
                time.sleep(PUT_EVERY)
        key, value = b"k%03d" % ((n - 1) % 50), b"w%d" % (n - 1)
        victim.start()
        t0 = time.monotonic()
        answers: dict[str, int] = {}
        with grpc.insecure_channel(victim.address) as ch:
            stub = kv_pb2_grpc.KVStub(ch)
            while True:
                if time.monotonic() - t0 > SERVE_DEADLINE:
                    raise SystemExit(f"node {victim.id} did not serve within {SERVE_DEADLINE:.0f} s: {answers}")
                try:
                    r = stub.Get(kv_pb2.GetRequest(key=key), timeout=2)
                    if r.error.code == kv_pb2.OK and r.found and r.value == value:
                        return time.monotonic() - t0, n, answers
                    code = kv_pb2.ErrorCode.Name(r.error.code)
                except grpc.RpcError as err:
                    code = err.code().name
                answers[code] = answers.get(code, 0) + 1
                time.sleep(0.05)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--down", type=float, default=30.0, help="seconds the node stays down")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--data-root", type=Path, default=None, help="where the cluster's data directory goes")
    a = ap.parse_args()
    for r in range(a.rounds):
        took, puts, answers = one_round(a.down, a.data_root)
        print(f"round {r + 1}: down {a.down:.0f} s ({puts} puts meanwhile); served the last put "
              f"{took:.2f} s after its start; before that it answered {answers}", flush=True)


if __name__ == "__main__":
    main()
