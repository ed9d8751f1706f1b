"""What exact reads at a revision across groups cost: reads that need a CLOSE against reads that
do not, and linearizable scans across groups with and without their second phase.

    python bench/closed_reads.py [--n 200]

Real `kvstore serve` processes on 127.0.0.1 (free ports): 3 nodes, `--groups 3`; data in a
temporary directory removed at the end; every process stopped by PID. One client, one operation
at a time (latency, not throughput), `--n` operations per row; prints median and p99 in ms.

- a current linearizable get, for scale;
- get at R, R already passed by the group (no close: served from history at once);
- get at R, R ahead of every group's last revision (each read closes its group at R: one log
  entry; R is fresh each time, 100 ms ahead of the wall clock);
- linearizable scan across the 3 groups, no writes meanwhile (after the first, every group is
  closed at the same revision: one phase);
- the same while another client writes to one group (the others are below its revision: a
  second phase that closes them and re-reads them at it, each scan), then a scan at a fixed
  passed revision and a current get of another group under that writer, for scale.

On a checkout without closes (e.g. the parent commit) the same script runs too: its reads at a
revision are not exact across groups and never close (compare in the same hour; bench/README.md).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterharness import Cluster

from kvstore.client import Client
from kvstore.storage import mvcc


def _ms(samples: list[float]) -> str:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return f"median {statistics.median(s) * 1000:7.2f} ms   p99 {p99 * 1000:7.2f} ms   (n={len(s)})"


def _time(n: int, op: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        op(i)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    n = max(10, min(args.n, 5000))
    tmp = Path(tempfile.mkdtemp(prefix="bench-closed-"))
    c = Cluster(tmp, 3, extra_args=["--groups", "3"])
    try:
        c.start()
        with Client(c.endpoints, timeout=30) as kv:
            m = kv.shard_map(refresh=True)
            assert m is not None
            keys: dict[int, bytes] = {}
            i = 0
            while len(keys) < len(m.data_groups()):
                k = b"cr/%d" % i
                keys.setdefault(m.group_for_key(k), k)
                i += 1
            revs = {g: kv.put(k, b"v") for g, k in keys.items()}
            g0 = sorted(keys)[0]
            k0 = keys[g0]
            for g, k in keys.items():  # warm up every path
                kv.get(k, revision=revs[g])
            dict(kv.scan(b"cr/"))

            rows: list[tuple[str, list[float]]] = []
            rows.append(("get, current (linearizable)", _time(n, lambda i: kv.get(k0))))
            rows.append(("get at R already passed (no close)", _time(n, lambda i: kv.get(k0, revision=revs[g0]))))

            def ahead(i: int) -> object:
                r = mvcc.make_revision(time.time_ns() // 1_000_000 + 100, i % 1000, 0)
                return kv.get(k0, revision=r)

            rows.append(("get at R ahead of the group (a CLOSE each)", _time(n, ahead)))
            rows.append(("scan 3 groups, linearizable, no writes", _time(n, lambda i: dict(kv.scan(b"cr/")))))
            stop = threading.Event()
            writes = [0]

            def writer() -> None:
                with Client(c.endpoints, timeout=30) as w:
                    while not stop.is_set() and writes[0] < 200_000:
                        w.put(k0, b"%d" % writes[0])
                        writes[0] += 1

            t = threading.Thread(target=writer)
            t.start()
            try:
                while writes[0] < 5:
                    time.sleep(0.01)
                rows.append((
                    "scan 3 groups, linearizable, writer on 1 group (2nd phase)",
                    _time(n, lambda i: dict(kv.scan(b"cr/"))),
                ))
                other = keys[sorted(keys)[1]]
                rows.append((
                    "scan 3 groups at a fixed passed R, writer on 1 group",
                    _time(n, lambda i: dict(kv.scan(b"cr/", revision=revs[g0]))),
                ))
                rows.append(("get, current, writer on another group", _time(n, lambda i: kv.get(other))))
            finally:
                stop.set()
                t.join(60)
        print(f"exact reads at a revision, 3 nodes, 3 data groups, one client, one op at a time ({n} per row)")
        for name, samples in rows:
            print(f"  {name:<62} {_ms(samples)}")
        print(f"  (the writer did {writes[0]} puts meanwhile)")
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
