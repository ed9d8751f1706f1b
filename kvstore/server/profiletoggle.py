"""A benchmark's profiler switch for a running node: off unless `KVSTORE_PROFILE` names a file.

With it set, SIGUSR1 starts a `cProfile` of the event loop's thread (where the gRPC handlers,
the Ready loop shell and the transport run) and the next SIGUSR1 stops it and writes the stats
to that file (`pstats` format), so `bench/hops.py` profiles exactly its measurement window.
Without it nothing is installed and nothing costs anything. `KVSTORE_PROFILE_CLOCK=thread`
profiles by the thread's CPU time (`time.thread_time`) instead of wall time: a function that was
running when the thread lost the GIL, or blocked in a system call, is then not charged the wait.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import signal
import time

ENV = "KVSTORE_PROFILE"
CLOCK_ENV = "KVSTORE_PROFILE_CLOCK"


class ProfileToggle:
    """SIGUSR1: start profiling; SIGUSR1 again: stop and write the stats to `path`."""

    def __init__(self, path: str, thread_clock: bool = False) -> None:
        self.path = path
        self.thread_clock = thread_clock
        self._prof: cProfile.Profile | None = None

    def toggle(self) -> None:
        if self._prof is None:
            self._prof = cProfile.Profile(time.thread_time) if self.thread_clock else cProfile.Profile()
            self._prof.enable()
            return
        prof, self._prof = self._prof, None
        prof.disable()
        prof.dump_stats(self.path)


def install(loop: asyncio.AbstractEventLoop) -> ProfileToggle | None:
    """Install the SIGUSR1 switch on `loop` if `KVSTORE_PROFILE` is set."""
    path = os.environ.get(ENV)
    if not path:
        return None
    clock = os.environ.get(CLOCK_ENV, "wall")
    if clock not in ("wall", "thread"):
        raise ValueError(f"{CLOCK_ENV} must be 'wall' or 'thread', not {clock!r}")
    toggle = ProfileToggle(path, thread_clock=clock == "thread")
    loop.add_signal_handler(signal.SIGUSR1, toggle.toggle)
    return toggle
