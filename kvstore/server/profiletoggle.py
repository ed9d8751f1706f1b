"""A benchmark's profiler switch for a running node: off unless `KVSTORE_PROFILE` names a file.

With it set, SIGUSR1 starts a `cProfile` of the event loop's thread (where the gRPC handlers,
the Ready loop shell and the transport run) and the next SIGUSR1 stops it and writes the stats
to that file (`pstats` format), so `bench/hops.py` profiles exactly its measurement window.
Without it nothing is installed and nothing costs anything.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import signal

ENV = "KVSTORE_PROFILE"


class ProfileToggle:
    """SIGUSR1: start profiling; SIGUSR1 again: stop and write the stats to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._prof: cProfile.Profile | None = None

    def toggle(self) -> None:
        if self._prof is None:
            self._prof = cProfile.Profile()
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
    toggle = ProfileToggle(path)
    loop.add_signal_handler(signal.SIGUSR1, toggle.toggle)
    return toggle
