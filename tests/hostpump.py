"""Hosts (`kvstore.node.host.Host`) of one in-memory cluster driven to quiescence by hand: shared
by the node-level unit tests that script elections and partitions without the simulator."""

from __future__ import annotations

from collections.abc import Collection

from kvstore.node.host import Host
from kvstore.raft import Message


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
