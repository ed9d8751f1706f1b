"""The node's cyclic garbage collector: fewer collections, none walking what the node built at
start, and every collection's pause measured.

CPython's collector runs a young collection every 700 net container allocations and, now and
then, a full one that walks every tracked object. A node allocates its long-lived objects (code,
the groups' cores and in-memory logs, the services) mostly at start, and under load a node's
full collections paused its event loop for 33 to 52 ms (measured: bench/README.md, "Garbage
collection"), which is what its tail latency is made of at 64 and 256 requests in flight. `tune`
moves every object alive after start into the permanent generation no collection walks
(`gc.freeze`), and raises the thresholds to `gen0` allocations per young collection, 50 young
collections per middle one and 1000 middle ones per full one (CPython 3.11 also skips a full
collection while less than a quarter of the long-lived objects are new). Reference counting
still frees every object that is not in a cycle at once; only cyclic garbage waits longer, at
most `gen0` allocations' worth between collections of the young generation.

Invariant: `tune` returns the function that puts the collector back as it found it (thresholds,
frozen objects, callbacks), so a node run inside another process (a test) leaves no trace.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable
from typing import Any

DEFAULT_GEN0 = 50_000
"""`--gc-threshold`'s default: allocations per young collection (CPython's is 700)."""

MIDDLE, FULL = 50, 1000
"""Young collections per middle one, middle ones per full one (CPython's: 10 and 10)."""


class GcPauses:
    """A `gc.callbacks` hook that notes each collection's (generation, pause in seconds), for
    `drain` to hand out later. The hook takes no lock and calls nothing: a collection may start
    in any thread at any allocation, also inside code holding a metric's lock (a Prometheus
    scrape copying a metric's children), so observing a metric from the hook could deadlock.
    At most `keep` pauses wait between drains (the oldest are dropped beyond)."""

    __slots__ = ("_clock", "_started", "pending")

    def __init__(self, clock: Callable[[], float] = time.perf_counter, keep: int = 4096) -> None:
        self._clock = clock
        self._started = 0.0
        self.pending: deque[tuple[int, float]] = deque(maxlen=keep)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        else:
            self.pending.append((int(info.get("generation", 0)), self._clock() - self._started))

    def drain(self, observe: Callable[[int, float], None]) -> int:
        """`observe(generation, seconds)` for every pause noted since the last drain; returns
        how many."""
        n = 0
        pending = self.pending
        while pending:
            gen, seconds = pending.popleft()
            observe(gen, seconds)
            n += 1
        return n


def tune(gen0: int, pauses: GcPauses | None = None) -> Callable[[], None]:
    """Freeze what exists now and raise the thresholds (`gen0` > 0; 0 keeps CPython's settings),
    and note every collection's pause in `pauses` if given. Returns the undo."""
    before = gc.get_threshold()
    if pauses is not None:
        gc.callbacks.append(pauses)
    froze = gen0 > 0
    if froze:
        gc.freeze()
        gc.set_threshold(gen0, MIDDLE, FULL)

    def undo() -> None:
        if pauses is not None and pauses in gc.callbacks:
            gc.callbacks.remove(pauses)
        if froze:
            gc.set_threshold(*before)
            gc.unfreeze()

    return undo
