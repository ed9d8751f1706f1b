"""`RaftWal`: every Raft group's log of a node in one write-ahead log directory, with its
checkpoint file (the durable `from_seq`) and the WAL half of a checkpoint.

The directory holds the `Wal`'s segments and one more file, `CHECKPOINT_NAME`
(`MAGIC | from_seq u64 | crc32c u32`, replaced atomically: written as `CHECKPOINT_NAME + ".new"`,
`fdatasync`ed, renamed, directory `fsync`ed; the `Wal` ignores names it does not own). Recovery
(`open`): read `from_seq` (1 if there is no file), `Wal.open`, `WalGroups.recover(records,
from_seq)`, and the pieces of a rewrite a crash cut short are truncated off the log's tail. A checkpoint file that is not exactly what `_encode_checkpoint` writes raises
`WalCorruptError` (the log refuses to guess).

The write path: `write(records)` (unsynced), then ONE `sync()` per Ready cycle for all groups.

`checkpoint()` frees old segments, in this order (each step is safe to crash after):
1. every group anchored below the last segment is restated (`WalGroups.rewrite`: a RESET that
   announces its entries, dropped whole by recovery if a crash cuts it);
2. `sync()`: the rewrites are durable;
3. `from_seq = needed_seq()` is written durably to the checkpoint file: from now on recovery
   skips everything below it (every live group's anchor is at or above it);
4. `wal.truncate_prefix(from_seq)`: the segments wholly below it go.
A crash before 3 recovers from the old `from_seq` (old anchors still complete); after 3, from
the new one (leftover segments below it are skipped or removed by `Wal.open`).

What a checkpoint of the STATE MACHINE needs on top (LMDB `env.sync(True)`, meta pages, applied
indexes, the pinned reader: docs/ARCHITECTURE.md) is the caller's: it must not let `from_seq`
pass an entry some group has not applied durably. `checkpoint(keep_from)` takes that bound.

Use from one thread.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

from .errors import StorageIOError
from .wal import FileSystem, Wal, WalCorruptError, WalOptions
from .wal.record import parse_segment_name
from .walgroups import GroupLog, WalGroups
from .walrec import GroupRecord

CHECKPOINT_NAME = "checkpoint"
_CHECKPOINT_MAGIC = b"KVWALCP1"
_CHECKPOINT = struct.Struct(">8sQI")


def _encode_checkpoint(from_seq: int) -> bytes:
    head = _CHECKPOINT_MAGIC + from_seq.to_bytes(8, "big")
    return _CHECKPOINT.pack(_CHECKPOINT_MAGIC, from_seq, crc32c(head))


def _decode_checkpoint(raw: bytes) -> int:
    if len(raw) != _CHECKPOINT.size:
        raise WalCorruptError(f"{CHECKPOINT_NAME}: {len(raw)} bytes, expected {_CHECKPOINT.size}")
    magic, from_seq, crc = _CHECKPOINT.unpack(raw)
    if magic != _CHECKPOINT_MAGIC or crc != crc32c(raw[:16]) or from_seq == 0:
        raise WalCorruptError(f"{CHECKPOINT_NAME}: bad magic, checksum or sequence number")
    return int(from_seq)


class RaftWal:
    """See the module docstring. Build it with `RaftWal.open`."""

    __slots__ = ("_fs", "from_seq", "groups", "wal")

    def __init__(self, fs: FileSystem, wal: Wal, groups: WalGroups, from_seq: int) -> None:
        self._fs = fs
        self.wal = wal
        self.groups = groups
        self.from_seq = from_seq

    @classmethod
    def open(cls, fs: FileSystem, opts: WalOptions | None = None) -> RaftWal:
        opts = opts or WalOptions()
        from_seq = 1
        if CHECKPOINT_NAME in fs.list():
            try:
                f = fs.open(CHECKPOINT_NAME)
                try:
                    raw = f.read(0, _CHECKPOINT.size + 1)
                finally:
                    f.close()
            except OSError as err:
                raise StorageIOError(f"reading the write-ahead log checkpoint: {err}") from err
            from_seq = _decode_checkpoint(raw)
        records: list[tuple[int, bytes]] = []
        wal = Wal.open(fs, opts, records, start_seq=from_seq)
        groups = WalGroups.recover(records, from_seq, opts.max_record_bytes)
        if groups.cut_rewrite is not None:
            wal.truncate_suffix(groups.cut_rewrite - 1)  # the cut rewrite's pieces: gone for good
            groups.cut_rewrite = None
        return cls(fs, wal, groups, from_seq)

    def log(self, group: int) -> GroupLog | None:
        return self.groups.groups.get(group)

    def write(self, records: list[GroupRecord]) -> None:
        """Append (NOT durable until `sync`) and apply `records` (`WalGroups.write`)."""
        self.groups.write(self.wal, records)

    def sync(self) -> None:
        """ONE `fdatasync`: everything written so far is durable."""
        self.wal.sync()

    def checkpoint(self, keep_from: int | None = None) -> int:
        """Free the segments no live group needs (module docstring); never pass `keep_from`.
        Returns how many segments were removed."""
        wal = self.wal
        segs = wal.segments()
        horizon = parse_segment_name(segs[-1]) or wal.next_seq
        groups = self.groups
        for gid in sorted(groups.groups):
            if groups.groups[gid].anchor < horizon:
                groups.write(wal, groups.rewrite(gid))
        wal.sync()
        from_seq = groups.needed_seq(wal.next_seq)
        if keep_from is not None:
            from_seq = min(from_seq, keep_from)
        if from_seq > self.from_seq:
            self._save_checkpoint(from_seq)
            self.from_seq = from_seq
        return wal.truncate_prefix(self.from_seq)

    def _save_checkpoint(self, from_seq: int) -> None:
        tmp = CHECKPOINT_NAME + ".new"
        try:
            f = self._fs.open(tmp, create=True)
            try:
                f.truncate(0)
                f.write_at(0, _encode_checkpoint(from_seq))
                f.fdatasync()
            finally:
                f.close()
            self._fs.rename(tmp, CHECKPOINT_NAME)
            self._fs.fsync_dir()
        except OSError as err:
            raise StorageIOError(f"writing the write-ahead log checkpoint: {err}") from err

    def close(self) -> None:
        self.wal.close()
