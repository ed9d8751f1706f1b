"""The host's Ready cycle with a real LMDB store: when waiting writes are answered."""

from __future__ import annotations

import random
from pathlib import Path

from kvstore.raft import ConfState, Message, Role
from kvstore.server.host import Host, RaftSettings
from kvstore.storage import commands
from kvstore.storage.store import NodeStore


def _single_voter(tmp_path: Path) -> tuple[Host, NodeStore]:
    store = NodeStore(tmp_path / "n1", sync=True)
    sent: list[Message] = []
    host = Host(1, store, sent.extend, RaftSettings(), random.Random(1))
    host.open_group(1, ConfState((1,)))
    host.groups[1].core.campaign()
    while host.has_work():
        host.run_cycle()
    assert host.groups[1].core.role == Role.LEADER
    return host, store


def test_a_write_is_answered_from_inside_its_apply_transaction_and_only_once(tmp_path: Path) -> None:
    """The answer comes as soon as the state machine computed the result, before the transaction
    commits (the entry is committed already, so the outcome is decided); reads cannot see the
    write before then either, because the applied index moves only after the commit."""
    host, store = _single_voter(tmp_path)
    try:
        answers: list[tuple[object, object, int]] = []

        def answered(res: object, err: object) -> None:
            answers.append((res, err, store.applied_index(1)))

        before = store.applied_index(1)
        idx = host.propose(1, commands.encode_cas(b"k", True, b"", b"v", 7, 1, 1), answered)
        cycle = host.begin_cycle()
        assert cycle is not None and not cycle.applies  # first the entry is made durable
        cycle.persist()
        host.end_cycle(cycle)
        assert answers == []
        cycle = host.begin_cycle()
        assert cycle is not None and [e.index for a in cycle.applies for e in a.entries] == [idx]
        cycle.on_applied = host.answer_writes
        cycle.persist()
        assert len(answers) == 1
        res, err, applied_then = answers[0]
        assert err is None and getattr(res, "swapped", None) is True
        assert applied_then == before  # answered before its transaction committed
        host.end_cycle(cycle)
        assert len(answers) == 1  # end_cycle does not answer it again
        assert store.applied_index(1) == idx and host.groups[1].core.applied == idx
        assert store.get(1, b"k") == b"v"
    finally:
        store.close()


def test_without_an_early_hook_end_cycle_answers(tmp_path: Path) -> None:
    host, store = _single_voter(tmp_path)
    try:
        answers: list[object] = []
        idx = host.propose(1, commands.encode_put(b"a", b"1"), lambda r, e: answers.append(e))
        while host.has_work():
            host.run_cycle()
        assert answers == [None] and store.applied_index(1) == idx
    finally:
        store.close()
