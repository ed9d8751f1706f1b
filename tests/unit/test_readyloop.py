"""The one Ready loop (`kvstore.raft.readyloop`): the order of its steps, batching over groups,
and a persist step that fails and is retried."""

from __future__ import annotations

from raftnet import Network

from kvstore.raft import Message, MessageType, RaftNode, Ready, readyloop


def _pending_follower() -> tuple[Network, RaftNode, Message]:
    """A 3-node network with leader 1 and entry x committed (the followers do not know yet); the
    leader's append of entry y, not yet delivered, which tells follower 2 that x is committed."""
    net = Network((1, 2, 3))
    leader = net.elect(1)
    net.heartbeat(1)
    net.propose(1, b"x")
    leader.propose(b"y")
    out: list[Message] = []  # the leader's messages, held back from the network
    storage = net.members[1].storage
    readyloop.drain(1, leader, out.extend, lambda k, c, rd: readyloop.persist_to_memory(storage, rd), lambda k, rd: None)
    apps = [m for m in out if m.type == MessageType.APP and m.to == 2]
    assert len(apps) == 1
    return net, net.node(2), apps[0]


def test_steps_run_in_order_and_dependent_messages_wait_for_persist() -> None:
    net, follower, app = _pending_follower()
    follower.step(app)
    storage = net.members[2].storage
    events: list[str] = []

    def send(msgs: list[Message]) -> None:
        events.append("send " + ",".join(m.type.name for m in msgs))

    def stage(key: int, core: RaftNode, rd: Ready) -> None:
        events.append(f"stage {len(rd.entries)} entries")

    def persist() -> None:
        events.append("persist")

    def apply(key: int, rd: Ready) -> None:
        events.append(f"apply (applied {follower.applied})")

    def after(key: int, rd: Ready) -> None:
        events.append(f"after (applied {follower.applied})")

    x = follower.applied + 1  # entry x, the next to apply
    turn = readyloop.begin([(2, follower)], send, stage)
    assert turn is not None and not turn.sent_early  # an append's response waits for durability
    rd = turn.readies[0][2]
    assert [e.data for e in rd.committed_entries] == [b"x"] and rd.committed_entries[0].index == x
    assert events == ["stage 1 entries"]
    readyloop.persist_to_memory(storage, rd)
    persist()
    assert readyloop.end(turn, send, apply, after) == 1
    assert events == [
        "stage 1 entries",
        "persist",
        "send APP_RESP",
        f"apply (applied {x - 1})",  # before the core advances
        f"after (applied {x})",
    ]


def test_a_failed_persist_sends_nothing_that_waits_and_the_same_turn_ends_later() -> None:
    net, follower, app = _pending_follower()
    follower.step(app)
    sent: list[Message] = []
    turn = readyloop.begin([(2, follower)], sent.extend, lambda k, c, rd: None)
    assert turn is not None
    # the persist step failed: `end` is not called; the core keeps its outstanding Ready
    assert sent == [] and not follower.has_ready()
    last = follower.log.last_index()
    follower.step(app)  # a duplicate meanwhile changes nothing that needs the lost write
    readyloop.persist_to_memory(net.members[2].storage, turn.readies[0][2])  # the retry works
    readyloop.end(turn, sent.extend, lambda k, rd: None)
    assert [m.type for m in sent] == [MessageType.APP_RESP] and sent[0].index == last
    assert net.members[2].storage.last_index() == last


def test_one_cycle_batches_every_group_into_one_send_per_step() -> None:
    net_a, fa, app_a = _pending_follower()
    net_b, fb, app_b = _pending_follower()
    fa.step(app_a)
    fb.step(app_b)
    sends: list[list[Message]] = []
    staged: list[str] = []
    persisted = {"a": net_a.members[2].storage, "b": net_b.members[2].storage}

    def stage(key: str, core: RaftNode, rd: Ready) -> None:
        staged.append(key)

    turn = readyloop.begin([("a", fa), ("b", fb)], sends.append, stage)
    assert turn is not None and staged == ["a", "b"] and sends == []
    for key, _, rd in turn.readies:  # the persist step: one batch for both groups
        readyloop.persist_to_memory(persisted[key], rd)
    assert readyloop.end(turn, sends.append, lambda k, rd: None) == 2
    assert len(sends) == 1 and [m.type for m in sends[0]] == [MessageType.APP_RESP] * 2
    assert not fa.has_ready() and not fb.has_ready()


def test_drain_runs_until_no_ready() -> None:
    net, follower, app = _pending_follower()
    follower.step(app)
    sent: list[Message] = []
    storage = net.members[2].storage
    cycles = readyloop.drain(2, follower, sent.extend, lambda k, c, rd: readyloop.persist_to_memory(storage, rd),
                             lambda k, rd: None)
    assert cycles >= 1 and not follower.has_ready()
    assert storage.last_index() == follower.log.last_index() and any(m.type == MessageType.APP_RESP for m in sent)
    assert readyloop.drain(2, follower, sent.extend, lambda k, c, rd: None, lambda k, rd: None) == 0
