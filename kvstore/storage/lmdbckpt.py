"""The LMDB checkpoint record: what a start after an unclean stop needs to put the state machine
back to its last checkpoint (issue 20, step 3; docs/ARCHITECTURE.md, "The LMDB checkpointer").

In `--state-sync checkpoint` mode the apply transactions commit WITHOUT a flush. A checkpoint
(`env.sync(True)`, then this record, then the pinned reader moves: `store.LmdbNodeStore`) makes an
image no later unsynced commit can damage: every page of the checkpointed tree is on disk and
pinned (LMDB never reuses a page a live reader can reach); only LMDB's two meta pages (pages 0
and 1 of `data.mdb`) are overwritten in place by later commits, so the record keeps a copy.

The record (`<db>/checkpoint`, replaced atomically: `checkpoint.new` written, `fdatasync`ed,
renamed, directory `fsync`ed):

    MAGIC (8) | page size u32 | meta txnid u64 | groups u32 | (group u64, applied u64) * groups
    | meta pages (2 * page size) | crc32c u32 of everything before

all big-endian but the meta pages (LMDB's own bytes). `decode` is total: any byte string either
decodes to a `Checkpoint` whose every field was checked (magic, sizes, the checksum, page size a
power of two in 512..65536, pages 0 and 1 tagged as LMDB meta pages with LMDB's magic and data
version, the newer one's transaction id equal to the record's, groups strictly increasing) or
raises `CheckpointCorruptError`. A torn record cannot be installed (the rename is atomic); a
damaged or forged one is refused, never guessed at: the node does not start.

`restore(path, ckpt)` writes the saved meta pages back into `data.mdb` (and `fdatasync`s it)
before LMDB opens it, unless they are already there byte for byte (a clean stop ends with a
checkpoint, so there is nothing to restore and nothing is written: that comparison is the
clean-stop marker). LMDB then opens at the checkpoint's transaction; the cores replay the WAL's
committed entries from the checkpoint's applied indexes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from .errors import StorageError, StorageFullError, StorageIOError
from .fsutil import fsync_dir

STATE_SYNC_MODES = ("checkpoint", "commit")
"""How the state machine becomes durable (`--state-sync`): `commit`, every apply transaction is
synced (LMDB's two ordered flushes per cycle that applies); `checkpoint`, none is, and the
checkpointer makes them durable between cycles (`store.LmdbNodeStore.checkpoint`)."""
CHECKPOINT_FILE = "checkpoint"
MAGIC = b"KVLMCKP1"
_HEAD = struct.Struct(">8sIQI")
_PAIR = struct.Struct(">QQ")
_CRC = struct.Struct(">I")
MAX_GROUPS = 1 << 20
"""More groups than a record may name (a forged count cannot make `decode` allocate much)."""

# LMDB's meta page (lmdb/mdb.c, 64-bit): page header (pgno u64, pad u16, flags u16, ...), MDB_meta
# at offset 16: magic u32, version u32, ..., txnid u64 at offset 144. Native byte order.
P_META = 0x08
MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
_PAGE_HEAD = struct.Struct("=QHH")
_META_MAGIC = struct.Struct("=II")
_META_TXNID = struct.Struct("=Q")
META_MAGIC_OFFSET = 16
META_TXNID_OFFSET = 144


class CheckpointCorruptError(StorageError):
    """The checkpoint record is not exactly what `encode` writes: the store refuses to open."""


class CheckpointSpaceError(StorageFullError):
    """No room for the new record: nothing was replaced (the temporary file is removed), the
    previous record still holds, and the checkpoint may be tried again later."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint: LMDB's two meta pages as they were on disk right after `env.sync(True)`,
    the transaction id of the newer one, and every group's applied index in that snapshot.
    Invariant (checked by `decode`): `metas` is two pages of `psize` bytes, the meta pages 0 and
    1 of an LMDB file whose newer transaction is `txnid`; `applied` is sorted by group."""

    psize: int
    txnid: int
    applied: tuple[tuple[int, int], ...]
    metas: bytes

    def applied_map(self) -> dict[int, int]:
        return dict(self.applied)


def meta_txnid(metas: bytes, psize: int) -> int:
    """The newer transaction id of two LMDB meta pages; CheckpointCorruptError if they are not."""
    if len(metas) != 2 * psize:
        raise CheckpointCorruptError(f"meta pages: {len(metas)} bytes, expected {2 * psize}")
    best = -1
    for pgno in (0, 1):
        off = pgno * psize
        got_pgno, _pad, flags = _PAGE_HEAD.unpack_from(metas, off)
        magic, version = _META_MAGIC.unpack_from(metas, off + META_MAGIC_OFFSET)
        if got_pgno != pgno or not flags & P_META or magic != MDB_MAGIC or version != MDB_DATA_VERSION:
            raise CheckpointCorruptError(f"page {pgno} of the record is not an LMDB meta page")
        best = max(best, _META_TXNID.unpack_from(metas, off + META_TXNID_OFFSET)[0])
    return best


def encode(ckpt: Checkpoint) -> bytes:
    body = bytearray(_HEAD.pack(MAGIC, ckpt.psize, ckpt.txnid, len(ckpt.applied)))
    for g, a in ckpt.applied:
        body += _PAIR.pack(g, a)
    body += ckpt.metas
    body += _CRC.pack(crc32c(bytes(body)))
    return bytes(body)


def decode(raw: bytes) -> Checkpoint:
    """The record `encode` wrote, or CheckpointCorruptError (total: see the module docstring)."""
    if len(raw) < _HEAD.size + _CRC.size:
        raise CheckpointCorruptError(f"checkpoint record of {len(raw)} bytes is too short")
    magic, psize, txnid, n = _HEAD.unpack_from(raw, 0)
    if magic != MAGIC:
        raise CheckpointCorruptError("checkpoint record: bad magic")
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise CheckpointCorruptError(f"checkpoint record: bad page size {psize}")
    if n > MAX_GROUPS:
        raise CheckpointCorruptError(f"checkpoint record: {n} groups")
    size = _HEAD.size + n * _PAIR.size + 2 * psize + _CRC.size
    if len(raw) != size:
        raise CheckpointCorruptError(f"checkpoint record of {len(raw)} bytes, expected {size}")
    (crc,) = _CRC.unpack_from(raw, size - _CRC.size)
    if crc != crc32c(raw[: size - _CRC.size]):
        raise CheckpointCorruptError("checkpoint record: bad checksum")
    applied: list[tuple[int, int]] = []
    off = _HEAD.size
    prev = -1
    for _ in range(n):
        g, a = _PAIR.unpack_from(raw, off)
        off += _PAIR.size
        if g <= prev:
            raise CheckpointCorruptError("checkpoint record: groups not strictly increasing")
        prev = g
        applied.append((g, a))
    metas = bytes(raw[off : off + 2 * psize])
    if meta_txnid(metas, psize) != txnid:
        raise CheckpointCorruptError("checkpoint record: its meta pages are not at its transaction")
    return Checkpoint(psize, txnid, tuple(applied), metas)


def read(directory: Path) -> Checkpoint | None:
    """The record in `directory` (None if there is none); CheckpointCorruptError if damaged."""
    path = directory / CHECKPOINT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageIOError(f"reading the LMDB checkpoint record {path}: {err}") from err
    return decode(raw)


def write(directory: Path, ckpt: Checkpoint) -> None:
    """Replace the record durably and atomically (temporary file, `fdatasync`, rename, directory
    `fsync`): after a crash the directory holds the old record or the new one, whole."""
    tmp = directory / (CHECKPOINT_FILE + ".new")
    data = encode(ckpt)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CheckpointSpaceError(
                f"storage full: no room for the LMDB checkpoint record in {directory}: {err}"
            ) from err
        raise StorageIOError(f"writing the LMDB checkpoint record in {directory}: {err}") from err
    try:
        os.replace(tmp, directory / CHECKPOINT_FILE)
        fsync_dir(directory)
    except OSError as err:
        raise StorageIOError(f"installing the LMDB checkpoint record in {directory}: {err}") from err


def remove(directory: Path) -> None:
    """Delete the record durably (nothing if there is none)."""
    try:
        (directory / CHECKPOINT_FILE).unlink()
    except FileNotFoundError:
        return
    except OSError as err:
        raise StorageIOError(f"removing the LMDB checkpoint record in {directory}: {err}") from err
    fsync_dir(directory)


LOCK_FILE = "checkpoint.lock"


def lock(directory: Path) -> int:
    """An exclusive lock on the store's directory for this process (the descriptor; `os.close`
    releases it): restoring meta pages under an LMDB another process has open would corrupt it,
    so a second opener is refused with StorageError."""
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise StorageIOError(f"opening {path}: {err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise StorageError(f"the store at {directory} is open in another process (or twice in this one): {err}") from err
    return fd


def read_metas(data_file: Path, psize: int) -> bytes:
    """Pages 0 and 1 of `data_file` as the OS has them now (the page cache)."""
    with open(data_file, "rb") as f:
        raw = f.read(2 * psize)
    if len(raw) != 2 * psize:
        raise StorageIOError(f"{data_file}: {len(raw)} bytes, shorter than its two meta pages")
    return raw


def restore(directory: Path, ckpt: Checkpoint) -> bool:
    """Put the checkpoint's meta pages back into `<directory>/data.mdb` (durably) before LMDB
    opens it. Returns False (writing nothing) if they are already there: a clean stop."""
    data_file = directory / "data.mdb"
    try:
        fd = os.open(data_file, os.O_RDWR)
    except OSError as err:
        raise StorageError(f"the LMDB checkpoint record names {data_file}, which cannot be opened: {err}") from err
    try:
        if os.pread(fd, 2 * ckpt.psize, 0) == ckpt.metas:
            return False
        if os.fstat(fd).st_size < 2 * ckpt.psize:
            raise StorageError(f"{data_file} is shorter than its meta pages: not the checkpointed file")
        if os.pwrite(fd, ckpt.metas, 0) != len(ckpt.metas):
            raise StorageIOError(f"short write restoring the meta pages of {data_file}")
        os.fdatasync(fd)
    except OSError as err:
        raise StorageIOError(f"restoring the meta pages of {data_file}: {err}") from err
    finally:
        os.close(fd)
    return True
