"""The KV state machine's apply logic, over an abstract view of one group's state. STANDARD LIBRARY ONLY.

`kvstate.py` runs this logic on LMDB inside the node's write transaction; the deterministic
simulator (or a test) can run exactly the same logic on `DictState`. A test walks this module's
imports.

Semantics (deterministic: every replica computes the same result and the same new state):
- PUT sets the key. DELETE removes it (result `existed`). CAS with `expect_absent` swaps iff the
  key is absent; otherwise iff the key is present and equal to `expected`; the result says
  `swapped`, `found`, and carries the `current` value when not swapped and found.
- Malformed command bytes change nothing and give a result with `error` set.
- Exactly-once (client_id != 0): each client has an ack *floor* (the highest `ack` seen, capped by
  the seq that carried it). A command with seq < floor is a stale retry of a request whose reply
  the client already received: it changes nothing (error result). A command whose (client_id, seq)
  has a cached result returns that result and changes nothing. Otherwise it is applied, its result
  cached, and if the floor rises, the client's cached results with seq < new floor are forgotten.
- Ownership (multi-raft): after the session checks, a KV command whose key the group does not
  serve (`StateView.owns`) changes nothing and gives a `wrong_shard` result, which is NOT cached:
  its retry, at the group that serves the key, applies it. Shard commands (`shardcmd`) change
  which ranges the group serves; see that module for their rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from ..shard.ranges import IntervalSet, key_hash
from .commands import ApplyResult, Command, Op, decode_command, decode_result, encode_result
from .shardcmd import (
    REC_DATA,
    REC_FLOOR,
    REC_RESULT,
    U64,
    U64_PAIR,
    ShardOp,
    ShardState,
    decode_shard_command,
    is_shard_command,
    iter_records,
)

STALE_REQUEST = "stale request: the client already acknowledged the reply for this sequence number"


class StateView(Protocol):
    """One group's state, as the apply logic sees it. All changes belong to one atomic batch."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> bool:
        """Remove `key`; True if it existed."""
        ...

    def session_floor(self, client_id: int) -> int:
        """The client's ack floor (0 if the client has no session yet)."""
        ...

    def session_result(self, client_id: int, seq: int) -> bytes | None:
        """The cached encoded result of (client_id, seq), if any."""
        ...

    def record_session(self, client_id: int, seq: int, result: bytes, old_floor: int, new_floor: int) -> None:
        """Cache `result` for (client_id, seq); if new_floor > old_floor, store the new floor and
        forget the client's cached results with seq < new_floor."""
        ...

    @property
    def shards(self) -> ShardState | None:
        """The ranges the group serves and has frozen; None: an unsharded group (serves all)."""
        ...

    def set_shards(self, st: ShardState) -> None: ...

    def raise_floor(self, client_id: int, old_floor: int, new_floor: int) -> None:
        """Store new_floor (> old_floor) and forget the client's cached results below it."""
        ...

    def delete_hashes(self, ranges: IntervalSet) -> int:
        """Delete every data key whose hash is in `ranges`; returns how many."""
        ...


def execute(view: StateView, cmd: Command) -> ApplyResult:
    """Apply `cmd` without any session handling."""
    op = cmd.op
    if op == Op.PUT:
        view.put(cmd.key, cmd.value)
        return ApplyResult()
    if op == Op.DELETE:
        return ApplyResult(existed=view.delete(cmd.key))
    if op == Op.CAS:
        current = view.get(cmd.key)
        swap = current is None if cmd.expect_absent else current is not None and current == cmd.expected
        if swap:
            view.put(cmd.key, cmd.value)
            return ApplyResult(swapped=True, found=current is not None)
        return ApplyResult(found=current is not None, current=current)
    return ApplyResult(error=f"unknown command op {op!r}")


def apply_command(view: StateView, cmd: Command) -> ApplyResult:
    """Apply `cmd` with exactly-once session handling (see the module docstring)."""
    cid = cmd.client_id
    if cid == 0:
        st = view.shards
        if st is not None and key_hash(cmd.key) not in st.active:
            return ApplyResult(wrong_shard=True, error="the key is not served by this group")
        return execute(view, cmd)
    floor = view.session_floor(cid)
    if cmd.seq < floor:
        return ApplyResult(error=STALE_REQUEST)
    cached = view.session_result(cid, cmd.seq)
    if cached is not None:
        return decode_result(cached)
    st = view.shards
    if st is not None and key_hash(cmd.key) not in st.active:
        return ApplyResult(wrong_shard=True, error="the key is not served by this group")
    result = execute(view, cmd)
    new_floor = max(floor, min(cmd.ack, cmd.seq))
    view.record_session(cid, cmd.seq, encode_result(result), floor, new_floor)
    return result


def _keep(view: StateView, st: ShardState) -> None:
    """Store `st` (e.g. a newer move id) if it differs from the view's."""
    if view.shards != st:
        view.set_shards(st)


def apply_shard_command(view: StateView, data: bytes) -> ApplyResult:
    """Apply a shard command (see `shardcmd`). Refusals change nothing and carry an error."""
    try:
        cmd = decode_shard_command(data)
    except ValueError as err:
        return ApplyResult(error=f"malformed shard command: {err}")
    st = view.shards
    empty = IntervalSet()
    if cmd.op == ShardOp.SET:
        if st is not None and (st.active or st.frozen):
            return ApplyResult(error="the group already has ranges")
        view.set_shards(ShardState(cmd.ranges, empty))
        return ApplyResult()
    if st is None:
        st = ShardState(IntervalSet.full(), empty)  # an unsharded group serves every key
    if cmd.move < st.move:
        return ApplyResult(error=f"stale request of move {cmd.move}: the group has seen move {st.move}")
    if cmd.move > st.move:  # recorded with the command's effect (refusals below change nothing)
        st = replace(st, move=cmd.move)
    r = cmd.ranges
    if cmd.op == ShardOp.FREEZE:
        if r.issubset(st.frozen):
            _keep(view, st)
            return ApplyResult()
        if not r.difference(st.frozen).issubset(st.active):
            return ApplyResult(error="cannot freeze ranges the group does not serve")
        view.set_shards(replace(st, active=st.active.difference(r), frozen=st.frozen.union(r)))
        return ApplyResult()
    if cmd.op == ShardOp.BEGIN:
        if r.issubset(st.active):
            _keep(view, st)
            return ApplyResult(existed=True)
        if r.overlaps(st.active) or r.overlaps(st.frozen):
            return ApplyResult(error="ranges to receive overlap ranges the group serves or froze")
        view.delete_hashes(r.union(st.installing))
        view.set_shards(replace(st, installing=r, token=cmd.token))
        return ApplyResult()
    if cmd.op == ShardOp.INSTALL:
        if cmd.token != st.token:
            return ApplyResult(error="install superseded by another installation (token mismatch)")
        records = list(iter_records(cmd.records))
        for tag, key, _ in records:  # all checks first: a refused INSTALL changes nothing
            if tag == REC_DATA:
                h = key_hash(key)
                if h in st.active or h in st.frozen:
                    return ApplyResult(error="install would overwrite a served key (or a frozen one)")
                if h not in st.installing:
                    return ApplyResult(error="install of a key outside the ranges being installed")
        for tag, key, value in records:
            if tag == REC_DATA:
                view.put(key, value)
            elif tag == REC_FLOOR:
                (cid,) = U64.unpack(key)
                (floor,) = U64.unpack(value)
                old = view.session_floor(cid)
                if floor > old:
                    view.raise_floor(cid, old, floor)
            elif tag == REC_RESULT:
                cid, seq = U64_PAIR.unpack(key)
                if seq >= view.session_floor(cid) and view.session_result(cid, seq) is None:
                    view.record_session(cid, seq, value, 0, 0)
        return ApplyResult()
    if cmd.op == ShardOp.ACTIVATE:
        if r.issubset(st.active):
            _keep(view, st)
            return ApplyResult()
        if r.overlaps(st.frozen):
            return ApplyResult(error="cannot activate ranges the group froze")
        if cmd.token != st.token or r != st.installing:
            return ApplyResult(error="activate of an installation that is not the current one")
        view.set_shards(replace(st, active=st.active.union(r), installing=IntervalSet(), token=0))
        return ApplyResult()
    if cmd.op == ShardOp.DROP:
        if r.overlaps(st.active) or r.overlaps(st.installing):
            return ApplyResult(error="cannot drop ranges the group serves or is installing")
        view.delete_hashes(r.intersection(st.frozen))
        view.set_shards(replace(st, frozen=st.frozen.difference(r)))
        return ApplyResult()
    return ApplyResult(error=f"unknown shard op {cmd.op!r}")


def apply_data(view: StateView, data: bytes) -> ApplyResult:
    """Apply the data of a NORMAL entry. Garbage yields an error result and changes nothing."""
    if is_shard_command(data):
        return apply_shard_command(view, data)
    try:
        cmd = decode_command(data)
    except ValueError as err:
        return ApplyResult(error=f"malformed command: {err}")
    return apply_command(view, cmd)


@dataclass(slots=True)
class DictState:
    """An in-memory `StateView` (for the simulator and tests)."""

    data: dict[bytes, bytes] = field(default_factory=dict)
    sessions: dict[tuple[int, int], bytes] = field(default_factory=dict)
    floors: dict[int, int] = field(default_factory=dict)
    shard_state: ShardState | None = None

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def session_floor(self, client_id: int) -> int:
        return self.floors.get(client_id, 0)

    def session_result(self, client_id: int, seq: int) -> bytes | None:
        return self.sessions.get((client_id, seq))

    def record_session(self, client_id: int, seq: int, result: bytes, old_floor: int, new_floor: int) -> None:
        self.sessions[(client_id, seq)] = result
        self.raise_floor(client_id, old_floor, new_floor)

    def raise_floor(self, client_id: int, old_floor: int, new_floor: int) -> None:
        if new_floor > old_floor:
            self.floors[client_id] = new_floor
            for k in [k for k in self.sessions if k[0] == client_id and k[1] < new_floor]:
                del self.sessions[k]

    @property
    def shards(self) -> ShardState | None:
        return self.shard_state

    def set_shards(self, st: ShardState) -> None:
        self.shard_state = st

    def delete_hashes(self, ranges: IntervalSet) -> int:
        gone = [k for k in self.data if key_hash(k) in ranges]
        for k in gone:
            del self.data[k]
        return len(gone)
