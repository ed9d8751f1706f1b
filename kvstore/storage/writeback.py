"""`WritebackPacer`: starts the kernel's writeback of a file's dirty pages every few milliseconds,
so they reach the disk in a steady trickle instead of in bursts.

Why (checkpoint mode, `--state-sync checkpoint`): LMDB's apply transactions are not flushed; their
pages stay dirty in the page cache until the next checkpoint's `fdatasync`, or until the kernel's
own writeback starts on them. LMDB writes every changed page to a new place (copy-on-write, and
the checkpoint's pin keeps freed pages from reuse until the next checkpoint), so a loaded node
dirties tens of MB per second (25-30 KB per put in `bench.compare`'s put load: the data, key and
history rows of 10,000 random keys). Measured on a 2-core VM, 3 nodes, 16 puts in flight: dirty
pages climbed to 550-680 MB, then were written in one burst every 3 to 4 s, and every node's
write-ahead-log `fdatasync` waited 100 to 350 ms behind it at the same moment: those stalls were
the p99.9 and the maximum. Starting the writeback every 50 ms kept dirty pages under ~90 MB and
the slowest put at 19 ms, but cost 5-10 % of the throughput from 16 in flight up (the WAL's
flushes always shared the disk with it); every 200 ms (the default) kept dirty pages under ~175
MB and the slowest put at 32-37 ms, at 0.96-1.00x the throughput of no pacing (bench/README.md, "Steady
writeback of the state machine").

What it does not do: make anything durable. `sync_file_range(SYNC_FILE_RANGE_WRITE)` only starts
writing the dirty pages (no wait, no flush of the disk's cache, no metadata); durability is still
the checkpoint's `fdatasync` and the WAL's. So no invariant depends on the pacer: turning it off,
or a failure of the call (logged once, then the pacer stops), changes timing only.

Python's `os` has no `sync_file_range`; it is called from libc through `ctypes` (the call releases
the GIL). Where libc has none (not Linux), `available()` is False and the store runs without it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("kvstore.storage")

SYNC_FILE_RANGE_WRITE = 2
"""Linux's flag: start writeback of the range's dirty pages that are not already under writeback."""

DEFAULT_INTERVAL_MS = 200
"""The server's default (`--lmdb-writeback-ms`)."""


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's `sync_file_range`, from the symbols the process already has (`CDLL(None)`: no
    library search, which would start `ldconfig` at import), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()


def available() -> bool:
    """True if this platform's libc has `sync_file_range` (Linux)."""
    return _SYNC_FILE_RANGE is not None


def start_writeback(fd: int) -> None:
    """Start the writeback of every dirty page of the file open as `fd` (no wait). Raises OSError."""
    fn = _SYNC_FILE_RANGE
    if fn is None:
        raise OSError(errno.ENOSYS, "sync_file_range is not available on this platform")
    if fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


class WritebackPacer:
    """A daemon thread that calls `flush(fd)` (default: `start_writeback`) every `interval`
    seconds on its own read-only descriptor of `path`, until `close()`.

    Invariants: after `close()` returns, the thread has ended and `flush` is never called again;
    a `flush` that raises OSError is logged once and ends the pacer (the checkpoints' own
    `fdatasync` reports real I/O errors: a failed hint must not take a node down)."""

    def __init__(
        self, path: str | os.PathLike[str], interval: float,
        flush: Callable[[int], None] = start_writeback, name: str = "lmdb-writeback",
    ) -> None:
        if not interval > 0:
            raise ValueError(f"writeback interval must be positive, not {interval!r}")
        self.interval = interval
        self._flush = flush
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._stop = threading.Event()
        self.calls = 0
        """How many times `flush` returned (for tests and diagnostics)."""
        self.failed: OSError | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._flush(self._fd)
            except OSError as err:
                self.failed = err
                log.warning("pacing the state machine's writeback stopped (timing only, nothing is lost): %s", err)
                return
            self.calls += 1

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread, wait for it, close the descriptor (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
