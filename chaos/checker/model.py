"""Sequential specifications the checker linearizes against.

A model describes ONE key (the checker partitions a history by key: P-compositionality /
locality), so a state is the key's current value, hashable, with ``None`` meaning absent.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .history import Operation, Status

__all__ = ["KVModel", "Model"]


class Model(Protocol):
    """A sequential specification of one object (one key).

    ``step`` must be pure, and the states hashable (the search caches (ops linearized, state)).
    An INFO operation's output is unknown, so its step must be legal from every state.
    """

    def init(self) -> Hashable: ...

    def step(self, state: Any, op: Operation) -> tuple[bool, Any]: ...

    def read_only(self, op: Operation) -> bool:
        """True if ``op`` never changes the state, from any state (the search linearizes such
        operations greedily as soon as they are legal). False is always safe."""
        ...


@dataclass(frozen=True, slots=True)
class KVModel:
    """One key of a key-value store with get / put / delete / cas / append.

    ``missing`` is what an absent key holds: ``None`` for kvstore and etcd (a get of an absent
    key returns None), ``""`` for porcupine's kv model (a missing key reads as the empty
    string). A get's ``None`` output and a cas's ``None`` expected value both mean "absent".
    """

    missing: Hashable = None

    def init(self) -> Hashable:
        return self.missing

    def _norm(self, v: Any) -> Any:
        return self.missing if v is None else v

    def read_only(self, op: Operation) -> bool:
        if op.status is Status.FAIL or op.f == "get":
            return True
        return op.f == "cas" and op.status is Status.OK and op.output is False

    def cut_states(self, dropped: Sequence[Operation], kept: Sequence[Operation]) -> list[Any] | None:
        """States that represent every value the key can hold after the ``dropped`` operations
        (and any of the ``kept`` ones linearized among them), as far as the ``kept`` operations
        can tell; None if this model cannot say (histories with append).

        The value after them is the initial one or one some operation wrote. The kept operations
        only compare it for equality (get outputs, cas expected values) until it is overwritten,
        so every written value they never compare with behaves alike: one stands for all.
        """
        if any(op.f == "append" for op in (*dropped, *kept)):
            return None
        written: list[Any] = [self.missing]
        for op in (*dropped, *kept):
            if op.f == "put":
                written.append(op.value)
            elif op.f == "cas":
                written.append(self._norm(op.value[1]))
        compared: set[Any] = {self.missing}
        for op in kept:
            if op.f == "get" and op.status is Status.OK:
                compared.add(self._norm(op.output))
            elif op.f == "cas":
                compared.add(self._norm(op.value[0]))
        states: list[Any] = []
        other: list[Any] = []
        seen: set[Any] = set()
        for v in written:
            if v not in seen:
                seen.add(v)
                (states if v in compared else other).append(v)
        return states + other[:1]

    def step(self, state: Any, op: Operation) -> tuple[bool, Any]:
        f = op.f
        status = op.status
        if f == "get":
            if status is not Status.OK:
                return True, state
            out = op.output
            return (state == (self.missing if out is None else out)), state
        if f == "put":
            return True, op.value
        if f == "append":
            base = state if state is not None else ""
            return True, base + op.value
        if f == "delete":
            return True, self.missing
        if f == "cas":
            expected, new = op.value
            if expected is None:
                expected = self.missing
            if status is not Status.OK:
                # indeterminate: legal from any state; swaps iff the compare holds
                return True, (new if state == expected else state)
            if op.output is False:
                return state != expected, state
            if state == expected:
                return True, new
            return False, state
        raise ValueError(f"KVModel: unknown function {f!r}")
