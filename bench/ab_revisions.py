"""A/B: what revisions and history cost puts, this checkout (A) against another one (B, e.g. the
parent of the revisions merge), alternating in the same run (issue 16's target: at most 10 %
fewer puts/s at 64 in flight).

    python bench/ab_revisions.py --base DIR [--rounds 5] [--seconds 5] [--inflight 64] [--puts 20000] [--nodes 1|3]

DIR is a checkout of the other commit (e.g. `git worktree add --detach DIR <commit>`). Each run
is a fresh process whose `kvstore` is imported from its checkout (working directory and
PYTHONPATH set to it, so `kvstore serve` children import it too): both sides run the same
driver, this directory's, using only APIs both have.

1. Apply only: `apply_revisions.py` (the state machine's apply on LMDB, sync off): puts/s and
   this process's CPU microseconds per put (steadier than the wall clock on a shared machine).
2. Persist cycles: `persist_cycle.py` (what the server's persist thread does per put: WAL
   records and LMDB apply, 64 puts per cycle, sync on, in a temporary directory under this
   checkout, i.e. on its disk): this process's CPU microseconds per put, user + system (the
   kernel's share of the flushes included).
3. End to end: `admission.py`'s driver: one `kvstore serve` (`--nodes 3`: three; one data
   group, data in a temporary directory, each process stopped by its PID), `--inflight` puts in
   flight on one `KV.Stream` to the data group's leader for `--seconds` after a 1 s warm-up:
   puts/s, and the leader process's CPU microseconds per put (all its threads, from /proc:
   steadier than puts/s when other work shares the machine).

Rounds alternate A and B (B first in every second round). Reported: each side's median and the
median of the per-round ratios A/B (this checkout's puts/s over the other's: 0.90 = 10 % fewer),
so slow drift of a shared machine cancels.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _child(checkout: Path, args: list[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run(
        [sys.executable, *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} on {checkout} failed: {out.stderr[-2000:]}")
    return out.stdout


def apply_once(checkout: Path, puts: int) -> tuple[float, float]:
    """(puts/s applied, CPU us per put) of one apply-only run."""
    out = _child(checkout, [str(HERE / "apply_revisions.py"), "--puts", str(puts)], 600)
    m = re.search(r"([\d,]+) puts/s applied \(([\d.]+) CPU us per put\)", out)
    if m is None:
        raise RuntimeError(f"unexpected output: {out!r}")
    return float(m.group(1).replace(",", "")), float(m.group(2))


def persist_once(checkout: Path, puts: int) -> float:
    """CPU microseconds per put (user + system) of one persist-cycle run, on this repository's disk."""
    out = _child(checkout, [str(HERE / "persist_cycle.py"), "--puts", str(puts), "--dir", str(ROOT)], 600)
    m = re.search(r": ([\d.]+) CPU us per put", out)
    if m is None:
        raise RuntimeError(f"unexpected output: {out!r}")
    return float(m.group(1))


def e2e_once(checkout: Path, seconds: float, inflight: int, nodes: int = 1) -> tuple[float, float]:
    """(puts/s, the serving node's CPU microseconds per put) of one end-to-end run (`nodes`
    nodes, `inflight` puts in flight)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import ab_revisions; "
        "print(*ab_revisions.e2e_run(float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))"
    )
    out = _child(checkout, ["-c", code, str(HERE), str(seconds), str(inflight), str(nodes)], seconds + 180)
    rate, cpu = out.strip().splitlines()[-1].split()
    return float(rate), float(cpu)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) process `pid` used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def e2e_run(seconds: float, inflight: int, nodes: int = 1) -> tuple[float, float]:
    """In the child (its checkout's `kvstore`): `nodes` `kvstore serve` processes (one data
    group, data in a temporary directory, each stopped by its PID), a 1 s warm-up, then
    `admission.drive` for `seconds` against the data group's leader. Returns puts/s and that
    leader's CPU microseconds per put over the measured window (its CPU time, every thread:
    steadier than the wall clock on a shared machine; the window also holds the stream's
    set-up, a few puts)."""
    import asyncio
    import importlib
    import shutil
    import tempfile

    admission = importlib.import_module("admission")  # this directory's driver (on sys.path in the child)
    from clusterharness import Cluster

    root = Path(tempfile.mkdtemp(prefix="kvbench-ab-"))
    c = Cluster(root, n=nodes, extra_args=["--groups", "1"])
    try:
        c.start()
        ld = c.wait_leader() if nodes == 1 else c.settled_leader(1)
        assert ld.proc is not None
        asyncio.run(admission.drive(ld.address, 1.0, inflight))
        cpu0 = _process_cpu(ld.proc.pid)
        rate = asyncio.run(admission.drive(ld.address, seconds, inflight))
        cpu = _process_cpu(ld.proc.pid) - cpu0
        return rate, cpu / (rate * seconds) * 1e6
    finally:
        c.stop()  # each process by its PID
        shutil.rmtree(root, ignore_errors=True)


def _summary(name: str, a: list[float], b: list[float], higher_is_better: bool = True) -> str:
    ratios = [x / y if higher_is_better else y / x for x, y in zip(a, b, strict=True)]
    return (
        f"{name}: A median {statistics.median(a):,.1f}, B median {statistics.median(b):,.1f}; "
        f"A/B per round {' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a checkout of the commit to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=1, help="nodes of the end-to-end cluster (1 or 3)")
    ap.add_argument("--puts", type=int, default=20_000)
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument("--skip-persist", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    a = ap.parse_args()
    base = a.base.resolve()
    if not (base / "kvstore" / "__init__.py").is_file():
        ap.error(f"{base} is not a kvstore checkout")
    sides = {"A": ROOT, "B": base}
    ap_rate: dict[str, list[float]] = {"A": [], "B": []}
    ap_cpu: dict[str, list[float]] = {"A": [], "B": []}
    persist_cpu: dict[str, list[float]] = {"A": [], "B": []}
    e2e: dict[str, list[float]] = {"A": [], "B": []}
    e2e_cpu: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(a.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        line: list[str] = []
        for side in order:
            if not a.skip_apply:
                rate, cpu = apply_once(sides[side], a.puts)
                ap_rate[side].append(rate)
                ap_cpu[side].append(cpu)
                line.append(f"{side} apply {rate:,.0f} puts/s ({cpu:.1f} CPU us/put)")
            if not a.skip_persist:
                cpu = persist_once(sides[side], a.puts)
                persist_cpu[side].append(cpu)
                line.append(f"{side} persist {cpu:.1f} CPU us/put")
            if not a.skip_e2e:
                rate, cpu = e2e_once(sides[side], a.seconds, a.inflight, a.nodes)
                e2e[side].append(rate)
                e2e_cpu[side].append(cpu)
                line.append(f"{side} end to end {rate:,.0f} puts/s ({cpu:.1f} server CPU us/put)")
        print(f"round {r + 1}: " + "; ".join(line), flush=True)
    print(f"A = {ROOT}, B = {base}; {a.rounds} alternating rounds")
    if not a.skip_apply:
        print(_summary("apply puts/s (wall)", ap_rate["A"], ap_rate["B"]))
        print(_summary("apply CPU us per put (as a rate: B cpu / A cpu)", ap_cpu["A"], ap_cpu["B"], False))
    if not a.skip_persist:
        print(_summary("persist cycles CPU us per put (as a rate: B cpu / A cpu)", persist_cpu["A"], persist_cpu["B"], False))
    if not a.skip_e2e:
        print(_summary(f"end to end puts/s at {a.inflight} in flight, {a.nodes} node(s)", e2e["A"], e2e["B"]))
        print(_summary("end to end server CPU us per put (as a rate: B cpu / A cpu)", e2e_cpu["A"], e2e_cpu["B"], False))


if __name__ == "__main__":
    main()
