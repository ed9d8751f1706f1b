"""An asyncio event loop on virtual time: no I/O, no real sleeps, fully deterministic.

`VirtualLoop.time()` is a number the loop advances itself: whenever nothing is ready to run, it
jumps straight to the earliest scheduled timer. Everything else is the standard `BaseEventLoop`
(ready queue in FIFO order, timers in a heap), so the interleaving of tasks depends only on the
program and its seeded random choices, never on the wall clock or the OS.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
from typing import Any


class SimulationDeadlock(RuntimeError):
    """Nothing is ready and nothing is scheduled, but the main coroutine has not finished."""


class _NoSelector:
    """Stands in for the selector: 'waiting' for I/O just advances the virtual clock."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        loop = self._loop
        if timeout is None:
            raise SimulationDeadlock(f"nothing left to run at virtual time {loop.now:.3f}s")
        if timeout > 0:
            scheduled = loop._scheduled  # type: ignore[attr-defined]
            when = scheduled[0]._when if scheduled else loop.now + timeout
            loop.now = max(loop.now, when)
        return []

    def close(self) -> None:
        pass


class VirtualLoop(asyncio.base_events.BaseEventLoop):
    """A single-threaded event loop whose clock only moves when every task is waiting."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self.now = float(start)
        self._selector = _NoSelector(self)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.now

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass


def run(main: Any, start: float = 0.0) -> Any:
    """Run the coroutine `main` to completion on a fresh `VirtualLoop`; close the loop after."""
    loop = VirtualLoop(start)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
