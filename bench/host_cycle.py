"""Micro-benchmark: the host's Ready cycle, many groups per cycle, no disk.

    python -m bench.host_cycle [--groups G] [--writes W] [--cycles C]

One node (`kvstore.node.host.Host`) leads G single-voter groups on `MemoryNodeStore`. Each round
proposes W puts to every group and runs cycles until the host is idle (the entries are persisted
in one cycle, applied and answered in the next, all groups batched into each cycle). Prints
writes/s and cycles/s: the CPU cost of the host's Ready loop plus the in-memory state machine.
"""

from __future__ import annotations

import argparse
import random
import time

from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.raft import ConfState, Message, Role
from kvstore.storage import commands


def run(groups: int, writes: int, rounds: int) -> tuple[float, float]:
    """(writes/s, cycles/s) over `rounds` rounds."""
    sent: list[Message] = []
    host = Host(1, MemoryNodeStore(), sent.extend, RaftSettings(quiesce_ticks=0), random.Random(1))
    for g in range(1, groups + 1):
        host.open_group(g, ConfState((1,)))
        host.groups[g].core.campaign()
    while host.has_work():
        host.run_cycle()
    assert all(grp.core.role == Role.LEADER for grp in host.groups.values())
    answered = 0

    def done(res: object, err: object) -> None:
        nonlocal answered
        assert err is None, err
        answered += 1

    value = b"v" * 128
    cycles = 0
    t0 = time.perf_counter()
    for r in range(rounds):
        for g in range(1, groups + 1):
            for w in range(writes):
                host.propose(g, commands.encode_put(b"key/%d/%d" % (g, (r * writes + w) % 1000), value), done)
        while host.has_work():
            host.run_cycle()
            cycles += 1
    elapsed = time.perf_counter() - t0
    assert answered == groups * writes * rounds, answered
    return answered / elapsed, cycles / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    for groups, writes in ((1, 1), (1, 64), (16, 4), (256, 1)):
        best = max((run(groups, writes, args.rounds) for _ in range(3)), key=lambda x: x[0])
        print(f"{groups:4d} groups x {writes:3d} writes/round: {best[0]:10,.0f} writes/s  {best[1]:8,.0f} cycles/s"
              " (best of 3)")


if __name__ == "__main__":
    main()
