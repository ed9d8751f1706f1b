"""The simulator's KV state machine: what a committed entry does to the data.

Commands are small JSON documents (the simulator is not a hot path). The state machine and the
index it has applied through change together, so a simulated crash never loses or repeats an apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def encode_command(op: str, key: str, value: str | None = None, expected: str | None = None) -> bytes:
    return json.dumps({"op": op, "k": key, "v": value, "e": expected}, separators=(",", ":")).encode()


@dataclass(slots=True)
class KVStateMachine:
    data: dict[str, str] = field(default_factory=dict)
    applied: int = 0

    def apply(self, index: int, payload: bytes) -> Any:
        """Apply one committed entry; returns the command's result (cas: swapped)."""
        if index <= self.applied:
            raise AssertionError(f"entry {index} applied twice (applied {self.applied})")
        self.applied = index
        if not payload:
            return None
        cmd = json.loads(payload)
        op, key = cmd["op"], cmd["k"]
        if op == "put":
            self.data[key] = cmd["v"]
            return None
        if op == "delete":
            self.data.pop(key, None)
            return None
        if op == "cas":
            if self.data.get(key) == cmd["e"]:
                self.data[key] = cmd["v"]
                return True
            return False
        raise AssertionError(f"unknown command {op!r}")

    def skip(self, index: int) -> None:
        """Advance past a non-data entry (empty or membership change)."""
        if index <= self.applied:
            raise AssertionError(f"entry {index} applied twice (applied {self.applied})")
        self.applied = index

    def snapshot(self) -> bytes:
        return json.dumps(self.data, sort_keys=True, separators=(",", ":")).encode()

    def restore(self, index: int, data: bytes) -> None:
        self.data = json.loads(data) if data else {}
        self.applied = index
