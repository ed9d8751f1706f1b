"""`python -m chaos.sim --seeds N [--nodes 3|5] [--start S] [--quiesce auto|on|off]` or `--seed S --trace`.

`--engine nodes` runs whole nodes (`chaos/sim/nodes.py`: the real node logic, host, state
machine, store and range moves, `--moves auto|on|off`) instead of Raft cores alone (`chaos/sim/simulator.py`).

Prints one line per failing seed, a summary, and a last line `seeds: N, violations: V`; exits 0
only if V == 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .nodes import run_node_seed
from .plant import ALL_BUGS, planted
from .simulator import SimResult, run_seed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.sim", description=__doc__)
    ap.add_argument("--seeds", type=int, default=100, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--seed", type=int, help="run this one seed (replay)")
    ap.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    ap.add_argument("--trace", action="store_true", help="print a readable trace of the run")
    ap.add_argument("--plant", choices=sorted(ALL_BUGS), help="plant a known bug (to see the simulator catch it)")
    ap.add_argument("--engine", choices=("raft", "nodes"), default="raft",
                    help="simulate Raft cores alone (raft) or whole nodes (nodes)")
    ap.add_argument("--stop-on-failure", action="store_true")
    ap.add_argument(
        "--quiesce", choices=("auto", "on", "off"), default="auto",
        help="quiescence of idle groups: on a fixed half of the seeds (auto), on every seed, or off",
    )
    ap.add_argument(
        "--moves", choices=("auto", "on", "off"), default="auto",
        help="(--engine nodes) range moves: on a fixed half of the seeds (auto), on every seed, or off",
    )
    args = ap.parse_args(argv)
    quiesce = {"auto": None, "on": True, "off": False}[args.quiesce]

    seeds = [args.seed] if args.seed is not None else list(range(args.start, args.start + args.seeds))
    if args.engine == "nodes":
        return _run_nodes(seeds, args)
    violations = 0
    ops = 0
    t0 = time.perf_counter()
    results: list[SimResult] = []
    with planted(args.plant):
        for seed in seeds:
            res = run_seed(seed, nodes=args.nodes, trace=args.trace, quiesce=quiesce)
            results.append(res)
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
    print(quiesce_summary(results))
    print(f"seeds: {n}, violations: {violations}")
    return 0 if violations == 0 else 1


def _run_nodes(seeds: list[int], args: argparse.Namespace) -> int:
    if not args.trace:
        logging.disable(logging.CRITICAL)  # the nodes' own logs (refused forgeries...) are expected
    violations = ops = forged = 0
    refused: dict[str, int] = {}
    moved: dict[str, int] = {}
    with_moves = 0
    t0 = time.perf_counter()
    with planted(args.plant):
        for seed in seeds:
            res = run_node_seed(seed, nodes=args.nodes, trace=args.trace,
                                moves={"auto": None, "on": True, "off": False}[args.moves])
            ops += res.ops
            forged += res.forged
            for k, v in res.refused.items():
                refused[k] = refused.get(k, 0) + v
            with_moves += bool(res.moves)
            for k, v in res.moves.items():
                moved[k] = moved.get(k, 0) + v
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
    print(f"forged messages {forged}, refused by admission: {dict(sorted(refused.items()))}")
    print(f"range moves in {with_moves}/{n} seeds: {dict(sorted(moved.items()))}")
    print(f"seeds: {n}, violations: {violations}")
    return 0 if violations == 0 else 1


def quiesce_summary(results: list[SimResult]) -> str:
    on = [r for r in results if r.quiesce_ticks]
    if not on:
        return f"quiescence: off in all {len(results)} seeds"
    qs = [r.quiesce for r in on]
    slept = sum(1 for q in qs if q.leader_quiesces)
    under_faults = sum(1 for q in qs if q.leader_quiesces_under_faults)
    kinds = {k: sum(1 for q in qs if q.scenario == k) for k in ("crash", "isolate")}
    skipped = sum(1 for q in qs if q.scenario.startswith("skipped"))
    rec = [q.recovered_ms for q in qs if q.recovered_ms is not None]
    worst = f", new leader + write within {max(rec)} ms (worst), {sum(rec) // len(rec)} ms (mean)" if rec else ""
    return (
        f"quiescence: on in {len(on)}/{len(results)} seeds; leader quiesced in {slept}/{len(on)} seeds "
        f"({sum(q.leader_quiesces for q in qs)} times), under faults in {under_faults}/{len(on)} "
        f"({sum(q.leader_quiesces_under_faults for q in qs)} times); followers quiesced "
        f"{sum(q.follower_quiesces for q in qs)} times; {sum(q.wakes for q in qs)} wake-ups, "
        f"{sum(q.host_wakes for q in qs)} by host liveness; quiesced-leader scenario: crash {kinds['crash']}, "
        f"isolate {kinds['isolate']}, skipped {skipped}{worst}"
    )


if __name__ == "__main__":
    sys.exit(main())
