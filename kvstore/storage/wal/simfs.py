"""`SimFileSystem`: the WAL's `FileSystem` in memory, with an honest crash model. STANDARD LIBRARY ONLY.

Deterministic: randomness only from the injected `random.Random`, drawn only by a `crash` that
asks for a random outcome (and by no other call), so a seed replays exactly.

The model (what `fs.py` promises, and no more):
- every file (an inode) has a DURABLE image (its bytes at its last `fdatasync`) and a list of
  PENDING changes since (`write_at`, `truncate`, `allocate`); reads see the live bytes;
- the directory has a durable image (name -> inode at the last `fsync_dir`) and pending changes
  (create, rename, unlink);
- `crash(mode)` ends this file system (every later call on it or its open files raises
  `SimCrashedError`) and returns a new one holding what survived:
  - `CRASH_DROP` (power loss, the strict case): only durable images: every pending change lost;
  - `CRASH_KEEP` (kill -9: the OS page cache survives the process): every change kept. A missing
    `fdatasync` can never be seen this way, which is why the strict modes exist;
  - `CRASH_RANDOM`: for the directory and for each file independently, a prefix (of random length)
    of its pending changes survives, and the last write of that prefix may be torn at a random
    byte (only a prefix of its bytes reached the disk);
  - `CRASH_REORDER`: as a disk's write cache may: each pending change of a file survives or not
    independently (any subset, applied in order), each surviving write maybe torn; the directory
    keeps a prefix of its changes, as in `CRASH_RANDOM`.
- failures: `fail_next_fdatasync()` makes the next `fdatasync` raise `OSError(EIO)` with nothing
  made durable; `fill()` makes every write, allocation and create raise `OSError(ENOSPC)` until
  `free()`.

Counters (`fdatasyncs`, `dir_syncs`) let tests check how many flushes a cycle cost.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field
from typing import Literal

CrashMode = Literal["drop", "keep", "random", "reorder"]
CRASH_DROP: CrashMode = "drop"
CRASH_KEEP: CrashMode = "keep"
CRASH_RANDOM: CrashMode = "random"
CRASH_REORDER: CrashMode = "reorder"

_WRITE, _TRUNCATE = 0, 1
_Change = tuple[int, int, bytes]
"""(_WRITE, offset, data) or (_TRUNCATE, size, b"") (an allocation is a write of zeros past the end)."""


class SimCrashedError(Exception):
    """The simulated machine crashed: this file system (and its open files) is gone."""


@dataclass(slots=True, eq=False)
class _Inode:
    durable: bytes = b""
    live: bytearray = field(default_factory=bytearray)
    pending: list[_Change] = field(default_factory=list)


def _apply(buf: bytearray, change: _Change) -> None:
    kind, pos, data = change
    if kind == _TRUNCATE:
        if pos < len(buf):
            del buf[pos:]
        else:
            buf.extend(bytes(pos - len(buf)))
        return
    if pos > len(buf):
        buf.extend(bytes(pos - len(buf)))
    buf[pos : pos + len(data)] = data


class SimFile:
    """An open file of a `SimFileSystem`."""

    __slots__ = ("_fs", "_inode", "name")

    def __init__(self, fs: SimFileSystem, inode: _Inode, name: str) -> None:
        self._fs = fs
        self._inode = inode
        self.name = name

    def size(self) -> int:
        self._fs._check()
        return len(self._inode.live)

    def read(self, offset: int, size: int) -> bytes:
        self._fs._check()
        return bytes(self._inode.live[offset : offset + size])

    def _change(self, change: _Change) -> None:
        fs = self._fs
        fs._check()
        if fs.is_full and (change[0] == _WRITE and change[2]):
            raise OSError(errno.ENOSPC, "no space left on the simulated device", self.name)
        _apply(self._inode.live, change)
        self._inode.pending.append(change)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        self._change((_WRITE, offset, bytes(data)))

    def truncate(self, size: int) -> None:
        self._change((_TRUNCATE, size, b""))

    def allocate(self, size: int) -> None:
        cur = len(self._inode.live)
        if size > cur:
            self._change((_WRITE, cur, bytes(size - cur)))

    def fdatasync(self) -> None:
        fs = self._fs
        fs._check()
        if fs._fail_fdatasync > 0:
            fs._fail_fdatasync -= 1
            raise OSError(errno.EIO, "simulated fdatasync failure", self.name)
        ino = self._inode
        ino.durable = bytes(ino.live)
        ino.pending.clear()
        fs.fdatasyncs += 1

    def close(self) -> None:
        return


class SimFileSystem:
    """One directory in memory (see the module docstring)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random(0)
        self._live: dict[str, _Inode] = {}
        self._durable: dict[str, _Inode] = {}
        self._dir_pending: list[tuple[str, str, _Inode | None]] = []
        """("create", name, inode) / ("rename", old, new) as (op, a, b) / ("unlink", name)."""
        self._dead = False
        self._fail_fdatasync = 0
        self.is_full = False
        self.fdatasyncs = 0
        self.dir_syncs = 0

    # --- faults ----------------------------------------------------------------------------------
    def fail_next_fdatasync(self, n: int = 1) -> None:
        self._fail_fdatasync += n

    def fill(self) -> None:
        self.is_full = True

    def free(self) -> None:
        self.is_full = False

    def _check(self) -> None:
        if self._dead:
            raise SimCrashedError("the simulated file system crashed; use the one crash() returned")

    # --- FileSystem ------------------------------------------------------------------------------
    def list(self) -> list[str]:
        self._check()
        return sorted(self._live)

    def open(self, name: str, *, create: bool = False) -> SimFile:
        self._check()
        ino = self._live.get(name)
        if ino is None:
            if not create:
                raise FileNotFoundError(errno.ENOENT, "no such simulated file", name)
            if self.is_full:
                raise OSError(errno.ENOSPC, "no space left on the simulated device", name)
            ino = self._live[name] = _Inode()
            self._dir_pending.append(("create", name, ino))
        return SimFile(self, ino, name)

    def rename(self, old: str, new: str) -> None:
        self._check()
        ino = self._live.pop(old, None)
        if ino is None:
            raise FileNotFoundError(errno.ENOENT, "no such simulated file", old)
        self._live[new] = ino
        self._dir_pending.append(("rename", old, None))
        self._dir_pending.append(("rename-to", new, ino))

    def unlink(self, name: str) -> None:
        self._check()
        if self._live.pop(name, None) is None:
            raise FileNotFoundError(errno.ENOENT, "no such simulated file", name)
        self._dir_pending.append(("unlink", name, None))

    def fsync_dir(self) -> None:
        self._check()
        self._durable = dict(self._live)
        self._dir_pending.clear()
        self.dir_syncs += 1

    # --- crashes ---------------------------------------------------------------------------------
    def crash(self, mode: CrashMode = CRASH_DROP) -> SimFileSystem:
        """End this file system and return what a restarted machine finds (module docstring)."""
        self._check()
        self._dead = True
        rng = self.rng
        # The directory: the durable image plus a prefix of the pending changes (a rename is two
        # records that stand or fall together: it is atomic).
        pending = self._dir_pending
        if mode == CRASH_KEEP:
            keep = len(pending)
        elif mode == CRASH_DROP:
            keep = 0
        else:
            keep = rng.randint(0, len(pending))
            if keep and pending[keep - 1][0] == "rename":
                keep += 1
        names = dict(self._durable)
        for op, name, ino in pending[:keep]:
            if op in ("create", "rename-to"):
                assert ino is not None
                names[name] = ino
            else:
                names.pop(name, None)
        out = SimFileSystem(rng)
        images: dict[int, _Inode] = {}
        for name in sorted(names):
            ino = names[name]
            new = images.get(id(ino))
            if new is None:
                data = self._survivor(ino, mode, rng)
                new = images[id(ino)] = _Inode(data, bytearray(data))
            out._live[name] = new
        out._durable = dict(out._live)
        out.is_full = self.is_full
        return out

    @staticmethod
    def _survivor(ino: _Inode, mode: CrashMode, rng: random.Random) -> bytes:
        if mode == CRASH_KEEP:
            return bytes(ino.live)
        buf = bytearray(ino.durable)
        if mode == CRASH_DROP or not ino.pending:
            return bytes(buf)
        if mode == CRASH_REORDER:
            for change in ino.pending:
                if rng.random() < 0.5:
                    continue
                if change[0] == _WRITE and change[2] and rng.random() < 0.3:
                    change = (_WRITE, change[1], change[2][: rng.randint(0, len(change[2]) - 1)])
                _apply(buf, change)
            return bytes(buf)
        keep = rng.randint(0, len(ino.pending))
        for i, change in enumerate(ino.pending[:keep]):
            if i == keep - 1 and change[0] == _WRITE and change[2] and rng.random() < 0.5:
                cut = rng.randint(0, len(change[2]) - 1)  # torn: only a prefix of it reached the disk
                change = (_WRITE, change[1], change[2][:cut])
            _apply(buf, change)
        return bytes(buf)

    def durable_image(self) -> dict[str, bytes]:
        """What `crash(CRASH_DROP)` would keep (for tests), without crashing."""
        return {name: ino.durable for name, ino in sorted(self._durable.items())}
