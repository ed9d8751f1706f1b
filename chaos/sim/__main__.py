"""`python -m chaos.sim --seeds N [--nodes 3|5] [--start S]` or `--seed S --trace`.

Prints one line per failing seed and a last line `seeds: N, violations: V`; exits 0 only if V == 0.
"""

from __future__ import annotations

import argparse
import sys
import time

from .plant import BUGS, planted
from .simulator import run_seed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.sim", description=__doc__)
    ap.add_argument("--seeds", type=int, default=100, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--seed", type=int, help="run this one seed (replay)")
    ap.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    ap.add_argument("--trace", action="store_true", help="print a readable trace of the run")
    ap.add_argument("--plant", choices=sorted(BUGS), help="plant a known bug (to see the simulator catch it)")
    ap.add_argument("--stop-on-failure", action="store_true")
    args = ap.parse_args(argv)

    seeds = [args.seed] if args.seed is not None else list(range(args.start, args.start + args.seeds))
    violations = 0
    ops = 0
    t0 = time.perf_counter()
    with planted(args.plant):
        for seed in seeds:
            res = run_seed(seed, nodes=args.nodes, trace=args.trace)
            ops += res.ops
            if args.trace:
                print("\n".join(res.trace))
            if not res.ok:
                violations += 1
                print(f"seed {seed}: {res.violation}", flush=True)
                if args.stop_on_failure:
                    break
            elif args.seed is not None:
                print(f"seed {seed}: ok ({res.ops} operations, {res.events} events, {res.sim_ms} ms simulated)")
    elapsed = time.perf_counter() - t0
    n = len(seeds)
    print(f"elapsed {elapsed:.1f}s, {n / elapsed:.1f} seeds/s, {ops} client operations checked", file=sys.stderr)
    print(f"seeds: {n}, violations: {violations}")
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
