"""`python -m chaos.sim.migration --seeds N [--start S]`, or `--seed S --trace` to replay one seed.

Prints one line per failing seed and a last line `seeds: N, violations: V`; exits 0 only if V == 0.
`--plant BUG` plants a known bug (see plant.py) to watch the simulator catch it; `--scenario NAME`
runs a scripted interleaving of two coordinators (see scenarios.py).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from dataclasses import fields
from typing import Any

from .plant import BUGS, planted
from .scenarios import SCENARIOS, run_scenario
from .sim import MigParams, run_seed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.sim.migration", description=__doc__)
    ap.add_argument("--seeds", type=int, default=100, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--seed", type=int, help="run this one seed (replay)")
    ap.add_argument("--trace", action="store_true", help="print a readable trace of the run")
    ap.add_argument("--plant", choices=sorted(BUGS), help="plant a known bug (to see the simulator catch it)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="a deposed coordinator stops at once (never two coordinators acting together)")
    ap.add_argument("--long-pauses", action="store_true",
                    help="a quarter of the node pauses last 0.5-4 s (a stale coordinator resumes much later)")
    ap.add_argument("--late-requests", action="store_true",
                    help="3%% of the requests reach the group's leader 0.3-5 s after their sender gave up")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="set a MigParams field (a Python literal), e.g. --set max_groups=2")
    ap.add_argument("--external-only", action="store_true",
                    help="skip the protocol invariants; judge only by the clients' history and the final state")
    ap.add_argument("--fault-s", type=float, help="seconds of virtual time with faults (default 5)")
    ap.add_argument("--stop-on-failure", action="store_true")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS),
                    help="run one scripted interleaving of two coordinators instead (see scenarios.py)")
    args = ap.parse_args(argv)

    if args.scenario:
        out = run_scenario(args.scenario)
        print("\n".join(out.lines))
        print(f"scenario {args.scenario}: " + ("ok" if out.ok else "; ".join(out.problems)))
        return 0 if out.ok else 1

    overrides: dict[str, Any] = {}
    if args.no_overlap:
        overrides["overlap"] = False
    if args.long_pauses:
        overrides["long_pause"] = (0.5, 4.0)
    if args.late_requests:
        overrides["p_late"] = 0.03
        overrides["late"] = (0.3, 5.0)
    if args.external_only:
        overrides["protocol_checks"] = False
    if args.fault_s is not None:
        overrides["fault_s"] = args.fault_s
    for item in args.set:
        name, _, text = item.partition("=")
        if name not in {f.name for f in fields(MigParams)}:
            ap.error(f"--set: no parameter {name!r}")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[name] = text
    seeds = [args.seed] if args.seed is not None else list(range(args.start, args.start + args.seeds))
    violations = ops = moves = keys = 0
    t0 = time.perf_counter()
    with planted(args.plant):
        for seed in seeds:
            res = run_seed(seed, trace=args.trace, **overrides)
            ops += res.ops
            moves += res.moves
            keys += res.keys_moved
            if args.trace:
                print("\n".join(res.trace))
            if not res.ok:
                violations += 1
                print(f"seed {seed}: {res.violation}", flush=True)
                if args.stop_on_failure:
                    break
            elif args.seed is not None:
                print(f"seed {seed}: ok ({res.ops} operations, {res.moves} moves, {res.plans} plans, "
                      f"{res.keys_moved} keys installed, {res.sim_s:.1f}s simulated)")
    elapsed = time.perf_counter() - t0
    n = len(seeds)
    print(f"elapsed {elapsed:.1f}s, {n / elapsed:.1f} seeds/s, {ops} client operations checked, "
          f"{moves} moves ({moves / max(1, n):.1f} per seed), {keys} keys installed", file=sys.stderr)
    print(f"seeds: {n}, violations: {violations}")
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
