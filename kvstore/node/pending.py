"""A group's writes proposed on this node and not answered yet, and the retries joined to them.

A client that hears nothing from an attempt within its attempt timeout sends the same write
again under the same session (client_id, seq). If the first attempt's entry is still pending at
the leader that proposed it, proposing the retry again only lengthens the log (the state machine
answers the duplicate from its session cache): under overload that feeds on itself. So the leader
*joins* such a retry to the pending entry instead: it appends nothing, and the retry is answered
when the entry is, with the same result or the same failure.

Invariants:
- `by_index` maps an index to the write proposed there (this node, term `PendingWrite.term`);
  `by_session` maps a session (client_id, seq) to an index in `by_index` whose entry carries that
  session; every `by_session` entry goes when its index leaves `by_index` (`pop`, `drain`), so
  `len(by_session) <= len(by_index)`, and each entry holds at most `MAX_JOINED` joined retries:
  the table is bounded by the writes pending in the log. An index this node appends at again in
  a later term (its entry there was cut off by a leader change) displaces the write waiting
  there, session and joined retries included (`add` hands it back; the host leaves it
  unanswered, so its waiters time out, indeterminate, as they did before this table).
- A retry is joined only to an entry proposed by this node in `term`, the term it leads in now
  (`Host.propose` checks it is the leader): an entry of an earlier term may have been overwritten
  by another leader's. The caller passes the current term; entries of other terms never match.
- A retry is joined only if `commands.same_write` holds for it and the pending entry (same op,
  session and body; both valid): then the entry's result is its command's result too. Writes
  without a session (client_id 0) are never joined.
- A retry whose bytes differ from the pending entry's (a client bug reusing a seq, or a forged
  request) is NOT joined and NOT refused: it is proposed as before this table existed, and the
  state machine's session cache decides its answer (it answers the cached result of the seq, or
  refuses a stale one), the same whether or not the first entry is still pending. Refusing it
  here would make its answer depend on timing (pending or not), and the session cache is the one
  authority on duplicates, applied identically on every replica.
- Each joined waiter keeps its own deadline: the table holds callbacks only; a waiter that gave
  up ignores its later answer (`kvstore.server.waiters`).

Which writes: every command with a session, whatever its kind (PUT, DELETE, CAS, TXN, the
LEASE_* ops a client sends under its session, and a two-phase commit's RECORD, the one step
that carries the client's session; PREPARE .. FINALIZE carry none and are never joined), since
the check is on the header and the bytes, in `Host.propose` and `Host.propose_many`, which every
write path goes through (unary, `KV.Stream`, the internal propose RPC, the simulator).

Not covered (as before this table): a write pending at a node whose log then jumps past it by an
installed snapshot is never answered here (its waiter times out, indeterminate); its entry stays
in the table, with its session, until the group closes on this node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvstore import errors
from kvstore.storage import commands

WriteCallback = Callable[[Any, errors.KVError | None], None]

MAX_JOINED = 16
"""Retries joined to one pending entry at most; a further one is proposed as before (bounded
work per entry; a well-behaved client has one attempt in flight per write)."""


@dataclass(slots=True)
class PendingWrite:
    """A write proposed at this node in `term`: `callback` is its own waiter, `joined` the
    waiters of retries joined to it (each answered exactly as `callback`), `data` its command."""

    term: int
    callback: WriteCallback
    data: bytes = b""
    joined: list[WriteCallback] | None = None

    def answer(self, result: Any, err: errors.KVError | None) -> None:
        """Answer the write and every retry joined to it, with the same outcome."""
        self.callback(result, err)
        if self.joined is not None:
            for cb in self.joined:
                cb(result, err)


@dataclass(slots=True)
class PendingWrites:
    """A group's pending writes by index, with the session index retries are joined through."""

    by_index: dict[int, PendingWrite] = field(default_factory=dict)
    by_session: dict[tuple[int, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.by_index)

    def __bool__(self) -> bool:
        return bool(self.by_index)

    def values(self) -> Iterator[PendingWrite]:
        return iter(self.by_index.values())

    def add(self, index: int, term: int, data: bytes, callback: WriteCallback) -> PendingWrite | None:
        """Record the write proposed at `index` in `term`. Its session (if any) points at it
        unless a still joinable entry of the same term already holds that session (the first
        attempt stays the one retries join: a later copy is a duplicate the cache answers).

        Returns the write of an earlier term still waiting at `index`, now removed (with its
        session): this node's log no longer holds its entry there (it was cut off by a leader
        change and this node appended anew at that index); its outcome is unknown here (another
        node may still hold and commit it)."""
        displaced = self.pop(index)
        self.by_index[index] = PendingWrite(term, callback, data)
        s = commands.session_of(data)
        if s is None:
            return displaced
        held = self.by_session.get(s)
        if held is None or self.by_index[held].term != term:
            self.by_session[s] = index
        return displaced

    def join(self, term: int, data: bytes, callback: WriteCallback) -> int | None:
        """Attach `callback` to the pending entry proposed in `term` whose write `data` retries
        (`commands.same_write`); returns its index, or None if there is none (propose `data`)."""
        s = commands.session_of(data)
        if s is None:
            return None
        index = self.by_session.get(s)
        if index is None:
            return None
        w = self.by_index[index]
        if w.term != term or not commands.same_write(w.data, data):
            return None
        if w.joined is None:
            w.joined = [callback]
        elif len(w.joined) < MAX_JOINED:
            w.joined.append(callback)
        else:
            return None
        return index

    def unjoin(self, joined: list[tuple[int, WriteCallback]]) -> None:
        """Undo `join`s: detach each (index, callback) pair `join` attached (the proposal they
        came with was refused as a whole, so none of them may be answered by the entry)."""
        for index, callback in joined:
            w = self.by_index[index]
            assert w.joined is not None
            w.joined.remove(callback)

    def pop(self, index: int) -> PendingWrite | None:
        """Remove and return the write waiting at `index` (None if none), with its session."""
        w = self.by_index.pop(index, None)
        if w is not None:
            s = commands.session_of(w.data)
            if s is not None and self.by_session.get(s) == index:
                del self.by_session[s]
        return w

    def drain(self) -> list[PendingWrite]:
        """Remove and return every pending write (the table is empty afterwards)."""
        out = list(self.by_index.values())
        self.by_index.clear()
        self.by_session.clear()
        return out
