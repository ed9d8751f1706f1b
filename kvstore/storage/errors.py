"""Errors of the storage layer.

Every error raised by a write (`LmdbEnv.write`, `NodeStore.persist` / `apply` / `compact` / ...)
means the write did NOT happen: LMDB write transactions are atomic, the failed transaction was
aborted, and the store's in-memory caches were left untouched. The store stays usable and
reopenable; the caller may retry the same call.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of storage failures. The failed write (if any) left no trace."""


class StorageFullError(StorageError):
    """The disk (or the configured maximum map size) is full; nothing of the write was stored.

    After this, `NodeStore.full` is True until a later write succeeds with enough free disk space.
    """


class StorageIOError(StorageError):
    """LMDB or the operating system reported an I/O error other than a full disk."""


class StorageClosedError(StorageError):
    """The store was used after `close()`."""


class ReadInvalidatedError(StorageError):
    """A long-lived read (a streamed scan or snapshot) was cut off because the LMDB map had to
    grow while it was open (growing the map invalidates every open read transaction of the process).
    The data read so far was consistent; restart the read to get a new consistent view."""


class SnapshotFormatError(StorageError, ValueError):
    """A snapshot stream or file is malformed, truncated, fails its checksum, or does not match the
    snapshot metadata it is installed with. Nothing of it was installed."""
