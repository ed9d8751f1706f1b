"""kvstore.storage.wal: a segmented, checksummed write-ahead log over an injected file system.

- `log.py`: `Wal` (append, one `fdatasync` per `sync`, rotation, suffix and prefix truncation,
  recovery that cuts a torn tail) and its invariants;
- `record.py`: the segment and record format, with total decoders;
- `fs.py`: the `FileSystem` interface and its durability contract;
- `osfs.py`: `OsFileSystem`, the real one; `simfs.py`: `SimFileSystem`, in memory, whose crashes
  drop (or tear) whatever no `fdatasync` / directory `fsync` covered.
"""

from __future__ import annotations

from .fs import FileSystem, WalFile
from .log import Wal, WalCorruptError, WalOptions, WalStats
from .osfs import OsFileSystem
from .simfs import (
    CRASH_DROP,
    CRASH_KEEP,
    CRASH_RANDOM,
    CRASH_REORDER,
    CrashMode,
    SimCrashedError,
    SimFileSystem,
)

__all__ = [
    "CRASH_DROP",
    "CRASH_KEEP",
    "CRASH_RANDOM",
    "CRASH_REORDER",
    "CrashMode",
    "FileSystem",
    "OsFileSystem",
    "SimCrashedError",
    "SimFileSystem",
    "Wal",
    "WalCorruptError",
    "WalFile",
    "WalOptions",
    "WalStats",
]
