"""Which files make up an audit log: `PATH` (the one being written) and its rotated predecessors
`PATH.1` (the newest) ... `PATH.<K-1>` (the oldest kept), and reading their first and last lines.

Rotation renames files one by one, so a crash part-way can leave a gap in the numbering (e.g.
`PATH.3` and `PATH.1` without `PATH.2`): nothing here relies on the numbers being contiguous;
the order of the chain is the order of the sequence numbers inside the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TAIL_BYTES = 64 << 10
"""How far from a file's end `last_line` looks (more than the longest line)."""


def numbered(path: Path) -> dict[int, Path]:
    """The rotated files of the log at `path` that exist: number -> path (`PATH.<n>`, n >= 1)."""
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]{0,5})")
    out: dict[int, Path] = {}
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return out
    for name in names:
        m = pattern.fullmatch(name)
        if m is not None:
            out[int(m.group(1))] = path.parent / name
    return out


def log_files(path: Path) -> list[Path]:
    """Every file of the log at `path` that exists: the oldest rotated one first, `PATH` last."""
    rotated = numbered(path)
    files = [rotated[n] for n in sorted(rotated, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def first_line(path: Path) -> bytes | None:
    """The file's first complete line (without `\\n`), or None (empty, or no complete line)."""
    try:
        with path.open("rb") as f:
            raw = f.readline(TAIL_BYTES)
    except FileNotFoundError:
        return None
    return raw[:-1] if raw.endswith(b"\n") else None


def last_line(path: Path) -> tuple[bytes | None, int]:
    """(the file's last complete line without `\\n` or None, the size of the file up to the end of
    that line): bytes after it are a torn line (a crash while writing it)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - TAIL_BYTES)
            f.seek(start)
            tail = f.read()
    except FileNotFoundError:
        return None, 0
    end = tail.rfind(b"\n")
    if end < 0:
        return None, start
    begin = tail.rfind(b"\n", 0, end) + 1
    if begin == 0 and start > 0:
        return None, start + end + 1  # a line longer than TAIL_BYTES: not one `seal` made
    return tail[begin:end], start + end + 1
