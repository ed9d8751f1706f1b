"""The data directory's format version: a record written when the directory is created, checked
before anything else is opened, and raised by migrations (run by `store.LmdbNodeStore` at open).

The record is the file `<db>/FORMAT`: the line `kvstore data format N` and a CRC-32 of it,
`kvstore data format N crc=XXXXXXXX\\n`. It is replaced atomically (a temporary file, `fsync`,
rename, directory `fsync`), so a crash leaves the old or the new record, never a torn one.

Invariants:
- `read` is total: a missing file is None; anything but a well-formed record raises
  `FormatError` (a `StorageError`) saying what is wrong, so a damaged record never counts as a
  version;
- `check` refuses (FormatError) a directory whose format is newer than `FORMAT_VERSION`, before
  anything in it is opened or changed: a binary never touches data it does not understand;
- a directory without the record is new (empty: it gets `FORMAT_VERSION`) or was written by a
  release before the record (`FORMAT_NO_RECORD`, the oldest format: every migration from it runs,
  and each is idempotent, so running one on data that already had it changes nothing);
- migrations run in order, version v -> v + 1, each crash-safe (a crash during one leaves the
  record at v, and the migration runs again: idempotent), and the record is raised to v + 1 only
  after migration v made its work durable.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from .errors import StorageError
from .fsutil import fsync_dir

__all__ = ["FORMATS", "FORMAT_FILE", "FORMAT_NO_RECORD", "FORMAT_VERSION", "FormatError", "check", "read", "write"]

FORMATS: dict[int, str] = {
    1: "the Raft logs in LMDB (before the write-ahead log)",
    2: "the Raft logs in the write-ahead log (<db>/wal), LMDB holds the state machines",
    3: "each group's history in revision order (one LOG row per version, `mvcc.py`)",
}
"""Every format version and what it is."""

FORMAT_VERSION = 3
"""The format this binary writes; it migrates every older one up to it."""

FORMAT_NO_RECORD = 1
"""The format of a non-empty directory without a record (written before the record existed)."""

FORMAT_FILE = "FORMAT"
_PREFIX = "kvstore data format "
_MAX_RECORD = 128


class FormatError(StorageError):
    """The data directory's format record is unreadable, or newer than this binary knows."""


def _line(version: int) -> str:
    body = f"{_PREFIX}{version}"
    return f"{body} crc={zlib.crc32(body.encode()):08x}\n"


def read(path: Path) -> int | None:
    """The format version recorded in directory `path`, None if it has no record."""
    f = path / FORMAT_FILE
    try:
        with open(f, "rb") as fh:
            raw = fh.read(_MAX_RECORD + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise FormatError(f"cannot read the data format record {f}: {err}") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"the data format record {f} is not a format record (not ASCII)") from None
    if len(raw) > _MAX_RECORD or not text.startswith(_PREFIX) or not text.endswith("\n"):
        raise FormatError(f"the data format record {f} is not a format record")
    head = text[:-1].rpartition(" crc=")[0]
    digits = head[len(_PREFIX):]
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 9 or _line(int(digits)) != text:
        raise FormatError(f"the data format record {f} is damaged (its checksum or its number does not hold)")
    return int(digits)


def write(path: Path, version: int) -> None:
    """Record `version` in directory `path`, atomically and durably. An OS error (a full disk, a
    read-only directory) raises FormatError naming the directory; the old record, if any, stays."""
    if version not in FORMATS:
        raise ValueError(f"unknown data format {version}")
    tmp = path / (FORMAT_FILE + ".tmp")
    data = _line(version).encode("ascii")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked (a full disk part way)
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path / FORMAT_FILE)
        fsync_dir(path)
    except OSError as err:
        raise FormatError(f"cannot write the data format record in {path}: {err}") from None


def check(path: Path) -> int:
    """The format of directory `path` as it is now, before anything opens it: a new (empty)
    directory is recorded as `FORMAT_VERSION` here; one without a record is
    `FORMAT_NO_RECORD`. Raises FormatError for a record this binary cannot use."""
    found = read(path)
    if found is None:
        if not any(p.name != FORMAT_FILE + ".tmp" for p in path.iterdir()):
            write(path, FORMAT_VERSION)
            return FORMAT_VERSION
        return FORMAT_NO_RECORD
    if found > FORMAT_VERSION:
        raise FormatError(
            f"the data directory {path} has data format {found}, newer than this binary knows (up to "
            f"{FORMAT_VERSION}): it was written by a newer release. Run that release (or newer); a "
            f"format cannot be downgraded"
        )
    if found < 1:
        raise FormatError(f"the data format record in {path} names format {found}, which never existed")
    return found
