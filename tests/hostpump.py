"""Hosts (`kvstore.node.host.Host`) of one in-memory cluster driven to quiescence by hand: shared
by the node-level unit tests that script elections and partitions without the simulator."""

from __future__ import annotations

import random
from collections.abc import Collection

from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.raft import ConfState, Message, Role


def pump(hosts: dict[int, Host], outbox: list[Message], cut: Collection[int] = frozenset(), *,
         run_cut: bool = True, rounds: int = 200) -> None:
    """Run every host's cycles and deliver `outbox`'s messages until nothing moves; a message to
    or from a node in `cut` is dropped, and with `run_cut` False those nodes run no cycles either
    (frozen, not just partitioned). Raises AssertionError if it is still busy after `rounds`."""
    for _ in range(rounds):
        busy = False
        for nid, h in hosts.items():
            while (run_cut or nid not in cut) and h.has_work():
                h.run_cycle()
                busy = True
        msgs, outbox[:] = list(outbox), []
        for m in msgs:
            if m.to not in cut and m.frm not in cut:
                hosts[m.to].step(m)
                busy = True
        if not busy:
            return
    raise AssertionError("never went quiet")


def elected_three() -> tuple[dict[int, Host], list[Message]]:
    """Hosts 1, 2 and 3 of group 0 on memory stores (their messages land in the returned outbox),
    node 1 elected by its campaign and the cluster quiet."""
    outbox: list[Message] = []
    hosts = {i: Host(i, MemoryNodeStore(), outbox.extend, RaftSettings(), random.Random(i)) for i in (1, 2, 3)}
    for h in hosts.values():
        h.open_group(0, ConfState((1, 2, 3)))
    hosts[1].groups[0].core.campaign()
    pump(hosts, outbox)
    assert hosts[1].groups[0].core.role == Role.LEADER
    return hosts, outbox
