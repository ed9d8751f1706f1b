"""`Host.leads_current`: a node leads a group with a current view of its state only once it has
applied an entry of its own term. The move coordinator acts only then (a new metadata leader that
drove from its lagging map proposed steps of finished moves, refused everywhere until the
request's deadline: a stall after every metadata failover, found by the whole-node simulator)."""

from __future__ import annotations

from collections.abc import Callable

from hostpump import elected_three, pump

from kvstore.node.host import Host
from kvstore.raft import Message, MessageType, Role
from kvstore.storage import commands


def _pump(hosts: dict[int, Host], outbox: list[Message], cut: frozenset[int] = frozenset()) -> None:
    pump(hosts, outbox, cut)


def test_a_new_leader_is_current_only_after_applying_an_entry_of_its_term() -> None:
    hosts, outbox = elected_three()
    assert hosts[1].leads_current(0)
    assert not hosts[2].leads_current(0) and not hosts[3].leads_current(0)  # followers
    assert not hosts[1].leads_current(7)  # a group it does not host

    # Node 1 appends a write and replicates it, but hears no acknowledgement (nothing commits it
    # yet); node 3 takes over with the write in its log, and until it applied an entry of its own
    # term its state does not show what its log holds (nor, in general, what was committed).
    hosts[1].propose(0, commands.encode_put(b"map", b"v2"), lambda r, e: None)
    _step_until_quiet(hosts, outbox, drop=lambda m: m.to == 1)
    core3 = hosts[3].groups[0].core
    # Node 1 hands its leadership to node 3 (the TIMEOUT_NOW of a leadership transfer).
    hosts[3].step(Message(MessageType.TIMEOUT_NOW, 3, 1, term=core3.term, group=0))
    _step_until_quiet(hosts, outbox, drop=lambda m: 1 in (m.to, m.frm), stop=lambda: core3.role == Role.LEADER)
    assert core3.role == Role.LEADER
    assert hosts[3].store.get(0, b"map") is None
    assert not hosts[3].leads_current(0)  # leader, but its state does not show its log yet
    _pump(hosts, outbox, cut=frozenset({1}))
    assert hosts[3].store.get(0, b"map") == b"v2"
    assert hosts[3].leads_current(0)
    assert not hosts[2].leads_current(0)


def _step_until_quiet(hosts: dict[int, Host], outbox: list[Message], drop: Callable[[Message], bool],
                      stop: Callable[[], bool] = lambda: False) -> None:
    """Run cycles and deliver messages (but those `drop` says) one round at a time, until quiet or
    `stop()`."""
    for _ in range(100):
        if stop():
            return
        busy = False
        for h in hosts.values():
            while h.has_work():
                h.run_cycle()
                busy = True
        msgs, outbox[:] = list(outbox), []
        for m in msgs:
            if not drop(m):
                hosts[m.to].step(m)
                busy = True
        if not busy:
            return
