"""`python -m chaos.sim --seeds N [--nodes 3|5] [--start S] [--quiesce auto|on|off] [--moves auto|on|off]
[--watches auto|on|off] [--txns auto|on|off] [--locks auto|on|off]` or `--seed S --trace`.

Runs whole simulated nodes (`chaos/sim/nodes.py`: the real node logic, host, state machine,
store, reads and range moves) under the seed's faults. Prints one line per failing seed, a
summary, and a last line `seeds: N, violations: V`; exits 0 only if V == 0.

A long soak on 2 cores: one process per core, each on its own range of seeds, e.g.
`python -m chaos.sim --seeds 50000 --start 0 & python -m chaos.sim --seeds 50000 --start 50000`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Literal

from .leases import leases_by_default
from .locks import locks_by_default
from .nodes import NodeSimResult, run_node_seed
from .plant import ALL_BUGS, planted
from .txn_model import txn_model_by_default
from .txn_pairs import txn_pairs_by_default


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=100, help="number of seeds to run")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--seed", type=int, help="run this one seed (replay)")
    ap.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    ap.add_argument("--trace", action="store_true", help="print a readable trace of the run")
    ap.add_argument("--plant", choices=sorted(ALL_BUGS), help="plant a known bug (to see the simulator catch it)")
    ap.add_argument("--stop-on-failure", action="store_true")
    ap.add_argument(
        "--quiesce", choices=("auto", "on", "off"), default="auto",
        help="quiescence of idle groups (and the quiesced-leader scenario): on a fixed half of the seeds "
             "(auto), on every seed, or off",
    )
    ap.add_argument(
        "--moves", choices=("auto", "on", "off"), default="auto",
        help="range moves: on a fixed half of the seeds (auto), on every seed, or off",
    )
    ap.add_argument(
        "--watches", choices=("auto", "on", "off"), default="auto",
        help="watchers on the real watch hub, checked (chaos/sim/watches.py): on a fixed fifth of the seeds "
             "(auto), on every seed, or off",
    )
    ap.add_argument(
        "--state-sync", choices=("checkpoint", "commit"), default=None,
        help="the stores' state-machine durability (default: NodeSimParams.state_sync, checkpoint)",
    )
    ap.add_argument(
        "--txn-pairs", choices=("auto", "on", "ranges", "off"), default="auto",
        help="multi-key transactions on key pairs, checked for atomicity (chaos/sim/txn_pairs.py): on a fixed "
             "fifth of the seeds (auto), on every seed, on every seed with the pairs across groups only and many "
             "range deletes in transactions (ranges), or off",
    )
    ap.add_argument(
        "--leases", choices=("auto", "on", "off"), default="auto",
        help="lease clients with the real lease clock and drifting clocks, checked for early expiry and the "
             "expiry bound (chaos/sim/leases.py): on a fixed fifth of the seeds (auto), on every seed, or off",
    )
    ap.add_argument(
        "--lease-txns", choices=("on", "off"), default="off",
        help="with the lease clients: half of them attach both keys of their lease in one transaction across "
             "groups (leased puts in a two-phase commit; chaos/sim/leases.py)",
    )
    ap.add_argument(
        "--txns", choices=("auto", "on", "off"), default="auto",
        help="general transactions (one group and across groups) checked for strict serializability against a "
             "sequential model (chaos/sim/txn_model.py): on a fixed share of the seeds (auto), on every seed, or off",
    )
    ap.add_argument(
        "--locks", choices=("auto", "on", "off"), default="auto",
        help="lock clients (concurrency.py's Mutex protocol) with fencing tokens checked by a resource "
             "(chaos/sim/locks.py): on a fixed share of the seeds (auto), on every seed, or off",
    )
    args = ap.parse_args(argv)
    from . import nodes

    nodes.STATE_SYNC = args.state_sync
    quiesce = {"auto": None, "on": True, "off": False}[args.quiesce]
    moves = {"auto": None, "on": True, "off": False}[args.moves]
    watches = {"auto": None, "on": True, "off": False}[args.watches]
    txn_pairs: bool | Literal["ranges"] | None = {"auto": None, "on": True, "ranges": "ranges", "off": False}[
        args.txn_pairs]
    use_leases = {"auto": None, "on": True, "off": False}[args.leases]
    use_txns = {"auto": None, "on": True, "off": False}[args.txns]
    use_locks = {"auto": None, "on": True, "off": False}[args.locks]
    if not args.trace:
        logging.disable(logging.CRITICAL)  # the nodes' own logs (refused forgeries...) are expected

    seeds = [args.seed] if args.seed is not None else list(range(args.start, args.start + args.seeds))
    results: list[NodeSimResult] = []
    violations = ops = 0
    t0 = time.perf_counter()
    with planted(args.plant):
        for seed in seeds:
            pairs = txn_pairs_by_default(seed) if txn_pairs is None else txn_pairs
            lz = leases_by_default(seed) if use_leases is None else use_leases
            tx = txn_model_by_default(seed) if use_txns is None else use_txns
            lk = locks_by_default(seed) if use_locks is None else use_locks
            res = run_node_seed(seed, nodes=args.nodes, trace=args.trace, moves=moves, quiesce=quiesce, watches=watches,
                                txn_pairs=pairs, leases=lz, txns=tx, locks=lk, lease_txns=args.lease_txns == "on")
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
    n = len(results)
    sim_s = sum(r.sim_ms for r in results) / 1000
    print(f"elapsed {elapsed:.1f}s, {n / elapsed:.2f} seeds/s, {sim_s / max(n, 1):.1f} s simulated per seed, "
          f"{ops} client operations checked", file=sys.stderr)
    print(nodes_summary(results))
    print(quiesce_summary(results))
    print(txn_pairs_summary(results))
    print(txn_model_summary(results))
    print(watch_summary(results))
    print(lease_summary(results))
    print(lock_summary(results))
    print(f"seeds: {len(seeds)}, violations: {violations}")
    return 0 if violations == 0 else 1


def nodes_summary(results: list[NodeSimResult]) -> str:
    refused: dict[str, int] = {}
    moved: dict[str, int] = {}
    for r in results:
        for k, v in r.refused.items():
            refused[k] = refused.get(k, 0) + v
        for k, v in r.moves.items():
            moved[k] = moved.get(k, 0) + v
    with_moves = sum(1 for r in results if r.moves)
    closed = [r.closed_reads for r in results if r.closed_reads is not None]
    return (
        f"forged messages {sum(r.forged for r in results)}, refused by admission: {dict(sorted(refused.items()))}; "
        f"voters replaced by new nodes: {sum(r.membership_changes for r in results)}\n"
        f"range moves in {with_moves}/{len(results)} seeds: {dict(sorted(moved.items()))}\n"
        f"cross-group scans in {len(closed)}/{len(results)} seeds: {sum(c.scans for c in closed)} "
        f"({sum(c.at_revision for c in closed)} at a revision, {sum(c.linearizable for c in closed)} linearizable, "
        f"{sum(c.second_phase for c in closed)} with a second phase), {sum(c.checked for c in closed)} checked, "
        f"{sum(c.failed for c in closed)} failed, {sum(c.raced_moves for c in closed)} raced moves, "
        f"{sum(c.closes_forwarded for c in closed)} closes forwarded"
    )


def watch_summary(results: list[NodeSimResult]) -> str:
    ws = [r.watches for r in results if r.watches is not None]
    if not ws:
        return f"watchers: off in all {len(results)} seeds"
    refused: dict[str, int] = {}
    canceled: dict[str, int] = {}
    for w in ws:
        for k, v in w.refused.items():
            refused[k] = refused.get(k, 0) + v
        for k, v in w.canceled.items():
            canceled[k] = canceled.get(k, 0) + v
    return (
        f"watchers in {len(ws)}/{len(results)} seeds: {sum(w.chains for w in ws)} watches, "
        f"{sum(w.creates for w in ws)} creates, {sum(w.events for w in ws)} events delivered, "
        f"{sum(w.checked_events for w in ws)} checked against the history in {sum(w.checked_chains for w in ws)} "
        f"watches, {sum(w.progress for w in ws)} replies without events, {sum(w.resumes for w in ws)} resumes; "
        f"creates refused {dict(sorted(refused.items()))}; canceled by the server {dict(sorted(canceled.items()))}, "
        f"by the client {sum(w.client_cancels for w in ws)}, broken by crashes {sum(w.broken for w in ws)}; "
        f"{sum(w.compactions for w in ws)} compactions, {sum(w.closes for w in ws)} closes of idle groups "
        f"({sum(w.closes_forwarded for w in ws)} forwarded); {sum(w.merged for w in ws)} merged watches "
        f"({sum(w.subs for w in ws)} sub-watches, {sum(w.asks for w in ws)} progress requests at a revision)"
    )


def lease_summary(results: list[NodeSimResult]) -> str:
    on = [r.leases for r in results if r.leases is not None]
    if not on:
        return "leases: off"
    return (f"leases: {len(on)} seeds, {sum(s.granted for s in on)} granted, {sum(s.renewed for s in on)} renewals, "
            f"{sum(s.attached for s in on)} keys attached ({sum(s.attached_by_txn for s in on)} by a TXN; "
            f"{sum(s.attached_across for s in on)} leases' keys by one transaction across groups), "
            f"{sum(s.expired for s in on)} expired, "
            f"{sum(s.kept for s in on)} kept alive to the end, {sum(s.rewrites for s in on)} attached keys rewritten "
            f"by cross-group transactions, {sum(s.cross_deletions for s in on)} deletions across groups committed, "
            f"{sum(s.atomic_checked for s in on)} leases' keys in 2 groups checked deleted at one revision, "
            f"{sum(s.stale_plans for s in on)} deletions planned over a stale map, "
            f"{sum(s.orphans_swept for s in on)} orphaned keys swept")


def lock_summary(results: list[NodeSimResult]) -> str:
    on = [r.locks for r in results if r.locks is not None]
    if not on:
        return "locks: off"
    return (f"locks: {len(on)} seeds, {sum(s.sessions for s in on)} sessions, {sum(s.acquired for s in on)} "
            f"acquisitions checked, resource accepted {sum(s.accepted for s in on)} operations and refused "
            f"{sum(s.refused for s in on)} stale tokens; {sum(s.paused for s in on)} holders paused, "
            f"{sum(s.crashed for s in on)} crashed, {sum(s.lost for s in on)} sessions lost; "
            f"{sum(s.scans for s in on)} queue scans ({sum(s.scans_failed for s in on)} failed, retried)")


def txn_pairs_summary(results: list[NodeSimResult]) -> str:
    on = [r.txn_pairs for r in results if r.txn_pairs is not None]
    if not on:
        return "pair transactions: off"
    return (f"pair transactions in {len(on)}/{len(results)} seeds: {sum(s.issued for s in on)} issued, "
            f"{sum(s.answered for s in on)} answered ({sum(s.writes for s in on)} wrote), "
            f"{sum(s.reads_checked for s in on)} reads of both keys checked equal, "
            f"{sum(s.refused for s in on)} refused or unanswered; across groups {sum(s.cross_answered for s in on)} "
            f"answered ({sum(s.range_deletes for s in on)} range deletes, {sum(s.txn_range_deletes for s in on)} "
            f"transactions with one), {sum(s.cross_died for s in on)} "
            f"coordinators died, {sum(s.cross_resolved for s in on)} intents resolved, "
            f"{sum(s.cross_finished for s in on)} records finished by the sweep")


def txn_model_summary(results: list[NodeSimResult]) -> str:
    on = [r.txns for r in results if r.txns is not None]
    if not on:
        return "general transactions: off"
    return (f"general transactions in {len(on)}/{len(results)} seeds: {sum(s.issued for s in on)} issued, "
            f"{sum(s.answered for s in on)} answered ({sum(s.cross_answered for s in on)} across groups, "
            f"{sum(s.failed_branch for s in on)} took the else branch): {sum(s.writers_checked for s in on)} writers "
            f"checked at their revision, {sum(s.readers_checked for s in on)} read-only ones at a state, "
            f"{sum(s.unanswered_committed for s in on)} unanswered write sets explained, "
            f"{sum(s.realtime_pairs for s in on)} real-time pairs; {sum(s.refused for s in on)} refused or unanswered; "
            f"{sum(s.settled for s in on)} runs went on for a transaction's unfinished COMMIT")


def quiesce_summary(results: list[NodeSimResult]) -> str:
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
        f"{sum(q.follower_quiesces for q in qs)} times; {sum(q.wakes for q in qs)} wake-ups; "
        f"quiesced-leader scenario: crash {kinds['crash']}, isolate {kinds['isolate']}, skipped {skipped}{worst}"
    )


if __name__ == "__main__":
    sys.exit(main())
