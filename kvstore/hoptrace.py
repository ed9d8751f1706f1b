"""Per-hop timestamps of the write and read paths, for `bench/hops.py`. Off unless asked for.

When the environment variable `KVSTORE_HOPTRACE` names a directory at import (or a benchmark
calls `enable` in its own process), `ON` is True and every `mark(name)` appends
`(monotonic ns, name)` to an in-memory list; at process exit the list is written to
`<dir>/<pid>.hops` (one `ns name` line each). Instrumented code checks the flag before anything
else (`if hoptrace.ON: hoptrace.mark(...)`), so the cost when off is one attribute load and a
branch per mark point, and nothing is allocated or written.

Invariants:
- the clock is `time.perf_counter_ns`, CLOCK_MONOTONIC on Linux: one clock for every process of
  the machine, so marks of the client, the leader and the followers can be put on one time line;
- `mark` is safe from any thread (a list append under the GIL);
- the list is bounded (`MAX_EVENTS`): a traced process that runs for long stops recording
  instead of growing without bound (`dropped` counts what was not recorded).
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

ENV = "KVSTORE_HOPTRACE"
MAX_EVENTS = 2_000_000

ON = False
"""Recording? Checked by every mark point before calling `mark`."""
_dir: Path | None = None
_events: list[tuple[int, str]] = []
dropped = 0
_now = time.perf_counter_ns


def mark(name: str) -> None:
    """Record that this process reached point `name` now (call only when `ON`)."""
    global dropped
    if len(_events) >= MAX_EVENTS:
        dropped += 1
        return
    _events.append((_now(), name))


def events() -> list[tuple[int, str]]:
    """The marks recorded so far in this process, in order."""
    return list(_events)


def clear() -> None:
    """Forget the marks recorded so far (a benchmark's warm-up)."""
    _events.clear()


def dump() -> Path | None:
    """Write this process's marks to `<dir>/<pid>.hops`; returns the path (None: not enabled)."""
    if _dir is None:
        return None
    path = _dir / f"{os.getpid()}.hops"
    with open(path, "w") as f:
        f.writelines(f"{t} {name}\n" for t, name in _events)
    return path


def enable(directory: Path | None) -> None:
    """Start recording in this process; with `directory`, write the marks there at exit."""
    global ON, _dir
    ON = True
    if directory is not None and _dir is None:
        _dir = directory
        atexit.register(dump)


def read_dump(path: Path) -> list[tuple[int, str]]:
    """The marks of one dump file (lines that do not parse are skipped)."""
    out: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        t, _, name = line.partition(" ")
        if t.isascii() and t.isdigit() and name:
            out.append((int(t), name))
    return out


if os.environ.get(ENV):
    enable(Path(os.environ[ENV]))
