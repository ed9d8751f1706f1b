"""Micro-benchmark: CPU cost of ticking 1,000 idle Raft groups, quiesced vs awake.

    python bench/core_quiesce.py [--groups N] [--rounds R]

Builds N three-node groups in memory (3N RaftNodes, messages delivered at once, every Ready
"persisted" into MemoryStorage) and lets them go idle, once with quiescence (`quiesce_ticks=3`,
every group quiesces) and once without. Then times R host tick rounds over the N follower nodes
(one `tick()` per group per round, as a host's tick timer does for all groups of a node), and the
same for the N leaders, whose awake tick also makes a heartbeat Ready the host must drain
(`has_ready()`, then one cycle of the Ready loop `kvstore.raft.readyloop`; the heartbeats are not delivered, check-quorum is off so
the leaders stay leaders). Prints CPU ns per call and microseconds per round of N groups.
"""

from __future__ import annotations

import argparse
import random
import time

from kvstore.raft import Config, ConfState, MemoryStorage, Message, RaftNode, Ready, Role, readyloop


def build_groups(n_groups: int, quiesce_ticks: int) -> tuple[list[RaftNode], list[RaftNode]]:
    """Returns (leaders, followers): one leader and one follower of each idle group."""
    ids = (1, 2, 3)
    conf = ConfState(ids)
    leaders: list[RaftNode] = []
    followers: list[RaftNode] = []
    for g in range(n_groups):
        stores = {i: MemoryStorage.bootstrap(conf, group=g) for i in ids}
        nodes = {
            i: RaftNode(
                Config(id=i, group=g, quiesce_ticks=quiesce_ticks, check_quorum=False),
                stores[i],
                random.Random(g * 10 + i),
            )
            for i in ids
        }
        queue: list[Message] = []

        def persist(i: int, core: RaftNode, rd: Ready, stores: dict[int, MemoryStorage] = stores) -> None:
            readyloop.persist_to_memory(stores[i], rd)

        def pump(nodes: dict[int, RaftNode] = nodes, queue: list[Message] = queue) -> None:
            while True:
                for i in ids:
                    readyloop.drain(i, nodes[i], queue.extend, persist, _applied)
                if not queue:
                    return
                q = queue[:]
                queue.clear()
                for m in q:
                    nodes[m.to].step(m)

        nodes[1].campaign()
        pump()
        assert nodes[1].role == Role.LEADER
        nodes[1].propose(b"last write before going idle")
        pump()
        for _ in range(20):  # idle ticks: with quiescence the whole group goes to sleep
            for i in ids:
                nodes[i].tick()
            pump()
        if quiesce_ticks:
            assert all(n.quiesced for n in nodes.values()), f"group {g} did not quiesce"
        leaders.append(nodes[1])
        followers.append(nodes[2])
    return leaders, followers


def _applied(key: object, rd: Ready) -> None:
    """The groups apply nothing that is measured here."""


def _sent(msgs: list[Message]) -> None:
    """Heartbeats are not delivered: the groups stay idle."""


def _staged(key: object, core: RaftNode, rd: Ready) -> None:
    """The timed rounds persist nothing: an idle leader's heartbeat Ready has nothing to persist."""
    assert not rd.entries and rd.hard_state is None and rd.snapshot is None


def time_ticks(nodes: list[RaftNode], rounds: int) -> float:
    """CPU seconds for `rounds` rounds of one tick() per node (no Ready handling)."""
    for nd in nodes:
        if nd.role != Role.LEADER:
            nd.randomized_election_timeout = 1 << 40  # awake followers must not campaign meanwhile
    t0 = time.process_time()
    for _ in range(rounds):
        for nd in nodes:
            nd.tick()
    return time.process_time() - t0


def time_host_rounds(nodes: list[RaftNode], rounds: int) -> float:
    """CPU seconds for `rounds` host rounds: tick(), has_ready(), and ready()/advance() if ready."""
    for nd in nodes:
        if nd.role != Role.LEADER:
            nd.randomized_election_timeout = 1 << 40
    t0 = time.process_time()
    for _ in range(rounds):
        for nd in nodes:
            nd.tick()
            if nd.has_ready():
                readyloop.run(((nd, nd),), _sent, _staged, _nothing, _applied)
    return time.process_time() - t0


def _nothing() -> None:
    """The persist step of the timed rounds: nothing staged, nothing to make durable."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    n, r = args.groups, args.rounds
    q_leaders, q_followers = build_groups(n, quiesce_ticks=3)
    a_leaders, a_followers = build_groups(n, quiesce_ticks=0)
    assert not any(f.quiesced for f in a_followers)
    print(f"{n} idle 3-node groups, {r} tick rounds, CPU time (best of 5)")
    res: dict[str, float] = {}
    for name, fn, nodes in (
        ("follower tick(), quiesced", time_ticks, q_followers),
        ("follower tick(), awake", time_ticks, a_followers),
        ("leader tick(), quiesced", time_ticks, q_leaders),
        ("leader tick(), awake", time_ticks, a_leaders),
        ("follower tick()+has_ready(), quiesced", time_host_rounds, q_followers),
        ("follower tick()+has_ready(), awake", time_host_rounds, a_followers),
        ("leader tick()+has_ready()+drain, quiesced", time_host_rounds, q_leaders),
        ("leader tick()+has_ready()+drain, awake", time_host_rounds, a_leaders),
    ):
        best = min(fn(nodes, r) for _ in range(5))
        res[name] = best
        print(f"{name:44s} {best / (n * r) * 1e9:7.0f} ns/call  {best / r * 1e6:8.1f} us per round of {n} groups")
    for what in ("follower tick()", "leader tick()", "follower tick()+has_ready()", "leader tick()+has_ready()+drain"):
        print(f"awake/quiesced, {what}: {res[what + ', awake'] / res[what + ', quiesced']:.1f}x")
    assert all(f.quiesced for f in q_followers) and all(ld.quiesced for ld in q_leaders)


if __name__ == "__main__":
    main()
