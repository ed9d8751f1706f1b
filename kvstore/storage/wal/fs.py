"""The file-system interface the write-ahead log does ALL its file access through. STANDARD LIBRARY ONLY.

Two implementations: `osfs.OsFileSystem` (the real one: one directory of the OS file system) and
`simfs.SimFileSystem` (in memory, for tests and the simulator: a crash keeps only what an
`fdatasync` / `fsync_dir` covered, plus at most a prefix of what was not, possibly torn).

One `FileSystem` is one directory; names are plain file names (no separators). The durability
contract every implementation keeps (and the WAL relies on, nothing more):

- `WalFile.write_at`, `truncate` and `allocate` change the file's content at once for every
  later read, but are durable only after the file's next `fdatasync` returns;
- `fdatasync` makes everything written to that file so far durable (content and size), not its
  directory entry;
- `create`, `rename` and `unlink` change the directory at once, but are durable only after the
  next `fsync_dir` returns; a rename is atomic (after a crash the file is under one name or
  the other);
- a crash may keep any prefix of a file's (or the directory's) changes not yet made durable, and
  the last change of that prefix may be torn (a write cut at any byte).

Errors: an implementation raises `OSError` (with its errno) for a failure of the device or the
OS; the WAL turns it into a `StorageError`.
"""

from __future__ import annotations

from typing import Protocol


class WalFile(Protocol):
    """An open file of a `FileSystem`."""

    @property
    def name(self) -> str: ...

    def size(self) -> int:
        """Its current length in bytes (preallocated bytes included)."""
        ...

    def read(self, offset: int, size: int) -> bytes:
        """At most `size` bytes from `offset` (fewer at the end of the file)."""
        ...

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset` (extending the file if needed). Not durable until `fdatasync`."""
        ...

    def truncate(self, size: int) -> None:
        """Cut the file to `size` bytes. Not durable until `fdatasync`."""
        ...

    def allocate(self, size: int) -> None:
        """Make the file at least `size` bytes long, the new bytes zero (preallocation: later
        writes inside it need no size change). Not durable until `fdatasync`."""
        ...

    def fdatasync(self) -> None:
        """Make every change to this file so far durable."""
        ...

    def close(self) -> None: ...


class FileSystem(Protocol):
    """One directory (see the module docstring for the durability contract)."""

    def list(self) -> list[str]:
        """The names in the directory, sorted."""
        ...

    def open(self, name: str, *, create: bool = False) -> WalFile:
        """Open `name` for reading and writing; with `create`, create it (empty) if absent.
        FileNotFoundError if it does not exist and `create` is False."""
        ...

    def rename(self, old: str, new: str) -> None:
        """Atomically rename `old` to `new` (replacing `new`)."""
        ...

    def unlink(self, name: str) -> None:
        """Remove `name` (FileNotFoundError if absent)."""
        ...

    def fsync_dir(self) -> None:
        """Make every change to the directory so far (creates, renames, unlinks) durable."""
        ...
