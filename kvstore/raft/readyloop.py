"""The Ready loop: the one implementation of "handle a Ready", for one Raft group or many.

Everything that drives a `RaftNode` (the multi-raft host `kvstore.node.host`, the core-level test
network `tests/raftnet.py`, the core benchmarks) runs its Readies through here; what differs
between them is injected: how a Ready is made durable (`stage` + the caller's persist step),
where messages go (`send`) and what applying means (`apply`, `after`).

One cycle over a set of groups (each a caller's key `K` and its core), in this order:

1. `begin`: take the Ready of every group given (the caller passes only groups that have one);
   hand every `Ready.messages` to `send` in one call (these may leave before anything is
   durable); `stage(key, core, ready)` each Ready into the caller's batch;
2. the caller's persist step: snapshots, entries and hard states of ALL staged Readies made
   durable together (one write, one fsync; it may also apply the committed entries inside the
   same transaction), possibly on another thread;
3. `end`, only once that step succeeded: hand every `Ready.persisted_messages` (vote and append
   responses, which promise durable state) to `send` in one call; then per group, in the order
   taken: `apply(key, ready)` (hand out the committed entries and read states), `core.advance`,
   `after(key, ready)` (anything that looks at the advanced core).

Invariants (the callers rely on them):
- a persisted message never leaves, and no group advances, before the persist step returned;
  a caller whose persist failed does not call `end`, and may persist the same staged batch
  again and then `end` it (the cores keep their outstanding Readies meanwhile);
- `apply` sees a group's committed entries exactly once and in log order, before `advance`;
- `send` is never called with an empty list.

Pure and synchronous (standard library only, like the rest of `kvstore.raft`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .core import RaftNode
from .memstorage import MemoryStorage
from .types import Message, Ready

K = TypeVar("K")

Send = Callable[[list[Message]], None]
Stage = Callable[[K, RaftNode, Ready], None]
Apply = Callable[[K, Ready], None]


@dataclass(slots=True)
class Turn(Generic[K]):
    """One cycle in flight: the Readies taken, in order, with their groups."""

    readies: list[tuple[K, RaftNode, Ready]]
    sent_early: bool
    """`begin` handed messages to `send` (they may have left before the batch is durable)."""


def begin(groups: Iterable[tuple[K, RaftNode]], send: Send, stage: Stage[K]) -> Turn[K] | None:
    """Step 1: take each group's Ready, send what need not wait, stage the rest. Returns None if
    no group was given. Every core given must have a Ready (`has_ready()`)."""
    readies = [(key, core, core.ready()) for key, core in groups]
    if not readies:
        return None
    immediate = _gather(readies, persisted=False)
    if immediate:
        send(immediate)
    for key, core, rd in readies:
        stage(key, core, rd)
    return Turn(readies, bool(immediate))


def end(turn: Turn[K], send: Send, apply: Apply[K], after: Apply[K] | None = None) -> int:
    """Step 3, once the staged batch is durable: send the persisted messages, then apply and
    advance each group. Returns the number of groups handled."""
    readies = turn.readies
    later = _gather(readies, persisted=True)
    if later:
        send(later)
    for key, core, rd in readies:
        apply(key, rd)
        core.advance(rd)
        if after is not None:
            after(key, rd)
    return len(readies)


def run(
    groups: Iterable[tuple[K, RaftNode]],
    send: Send,
    stage: Stage[K],
    persist: Callable[[], None],
    apply: Apply[K],
    after: Apply[K] | None = None,
) -> int:
    """One whole cycle (begin, persist, end) for callers whose persist step cannot fail. Returns
    the number of groups handled."""
    turn = begin(groups, send, stage)
    if turn is None:
        return 0
    persist()
    return end(turn, send, apply, after)


def drain(key: K, core: RaftNode, send: Send, stage: Stage[K], apply: Apply[K]) -> int:
    """Run cycles of one group whose staging is durable at once, until it has no Ready. Returns
    the number of cycles."""
    n = 0
    one = ((key, core),)
    while core.has_ready():
        turn = begin(one, send, stage)
        assert turn is not None
        end(turn, send, apply)  # staging made it durable: nothing to wait for
        n += 1
    return n


def _gather(readies: list[tuple[K, RaftNode, Ready]], persisted: bool) -> list[Message]:
    """All the Readies' messages (`persisted`: those that wait for durability), in order. One
    Ready's own list is handed out as is (the application owns a Ready's contents)."""
    if len(readies) == 1:
        rd = readies[0][2]
        return rd.persisted_messages if persisted else rd.messages
    if persisted:
        return [m for _, _, rd in readies for m in rd.persisted_messages]
    return [m for _, _, rd in readies for m in rd.messages]


def persist_to_memory(storage: MemoryStorage, rd: Ready) -> None:
    """Make `rd` durable in a `MemoryStorage` at once, in the order a real store writes it:
    snapshot, then entries, then hard state."""
    if rd.snapshot is not None:
        storage.apply_snapshot(rd.snapshot)
    if rd.entries:
        storage.append(rd.entries)
    if rd.hard_state is not None:
        storage.set_hard_state(rd.hard_state)

