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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .commands import ApplyResult, Command, Op, decode_command, decode_result, encode_result

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
        return execute(view, cmd)
    floor = view.session_floor(cid)
    if cmd.seq < floor:
        return ApplyResult(error=STALE_REQUEST)
    cached = view.session_result(cid, cmd.seq)
    if cached is not None:
        return decode_result(cached)
    result = execute(view, cmd)
    new_floor = max(floor, min(cmd.ack, cmd.seq))
    view.record_session(cid, cmd.seq, encode_result(result), floor, new_floor)
    return result


def apply_data(view: StateView, data: bytes) -> ApplyResult:
    """Apply the data of a NORMAL entry. Garbage yields an error result and changes nothing."""
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
        if new_floor > old_floor:
            self.floors[client_id] = new_floor
            for k in [k for k in self.sessions if k[0] == client_id and k[1] < new_floor]:
                del self.sessions[k]
