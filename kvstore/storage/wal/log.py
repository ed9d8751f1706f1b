"""`Wal`: an append-only, segmented, checksummed write-ahead log over an injected `FileSystem`.
STANDARD LIBRARY ONLY (plus the checksum): no `os`, no clock; every byte goes through the `fs.py`
interface, so the same code runs on the real disk (`OsFileSystem`) and in the simulator
(`SimFileSystem`, whose crashes drop whatever no `fdatasync` covered).

Records are opaque payloads with consecutive sequence numbers (`record.py` has the format).

The write path, and its one flush: `append(payloads)` writes the records into the current
segment (the OS's page cache: visible, NOT durable); `sync()` makes every record appended so far
durable with ONE `fdatasync` of the current segment. Nothing may be acknowledged on the strength
of a record before the `sync()` after its `append` returned. A cycle that fills a segment pays
more: the full segment is `fdatasync`ed before the next one is created (header written,
preallocated to `segment_bytes` with zeros, `fdatasync`ed, renamed from a temporary name into
place, directory `fsync`ed), so a segment that is not the last is always complete and durable.

Invariants (on disk, after every returned call and after any crash + `Wal.open`):
1. The segments' first sequence numbers (in their names and headers) increase; each segment but
   the last ends cleanly exactly where the next one starts (contiguous sequence numbers).
2. Only the LAST segment can end in a torn or corrupt record, and only after its last `sync()`:
   `open` cuts it off there (and nothing after it is ever used, even a record that checks out).
3. Every record `sync()` made durable is returned by `open` (unless a truncation removed it),
   in order; `open` makes what it returns durable (an `fdatasync` of the last segment) before
   returning, so a record that survived a process crash only in the page cache can be relied
   upon from then on.
4. `truncate_suffix(seq)` is durable when it returns: later segments are unlinked newest first,
   each followed by a directory `fsync`, then the segment holding `seq + 1` is cut and
   `fdatasync`ed. A crash in between leaves a prefix of the old log (never a gap).
5. `truncate_prefix(seq)` unlinks whole segments whose records are all below `seq`, oldest first,
   then `fsync`s the directory. Records below `seq` in the first kept segment stay (a caller
   filters them). A crash can leave some of the old segments (possibly with a gap between them
   and the rest if the OS persisted the unlinks out of order): `open` drops every segment before
   the last gap, which can only be such leftovers (a leftover was sealed whole, so a gap after a
   segment that does not end cleanly is damage: `WalCorruptError`).

A hostile or corrupt directory: unknown file names are ignored, `*.tmp` leftovers of a segment
creation are removed; a segment with a bad header, one larger than any segment the log writes, a
non-last segment that does not end cleanly where the next begins, or an overlap raises
`WalCorruptError` naming the file and offset (the log refuses to guess; nothing is deleted).

Failures: an `OSError` from the file system makes the call raise `StorageFullError` (ENOSPC,
EDQUOT) or `StorageIOError`, and poisons the log: every later call raises until it is reopened
(after a failed `fdatasync`, what reached the disk is unknown; recovery by `open` decides).

Use from one thread.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass, field

from ..errors import StorageClosedError, StorageError, StorageFullError, StorageIOError
from .fs import FileSystem, WalFile
from .record import (
    MAX_SEQ,
    RECORD_HEADER,
    SEGMENT_HEADER,
    TEMP_SUFFIX,
    decode_segment_header,
    encode_record,
    encode_segment_header,
    parse_segment_name,
    scan_records,
    segment_name,
)


class WalCorruptError(StorageError):
    """The log's files are damaged beyond a torn tail (see `log.py`); nothing was changed."""


@dataclass(slots=True)
class WalOptions:
    """`segment_bytes`: a segment's preallocated size (a segment holds records until the next one
    would cross it; a single larger record gets a segment of its own). `max_record_bytes`: the
    largest payload accepted (and believed by recovery)."""

    segment_bytes: int = 64 << 20
    max_record_bytes: int = 16 << 20
    preallocate: bool = True

    def __post_init__(self) -> None:
        if self.segment_bytes < SEGMENT_HEADER.size + RECORD_HEADER.size:
            raise ValueError(f"segment_bytes {self.segment_bytes} is too small")
        if not 0 < self.max_record_bytes < 1 << 32:
            raise ValueError(f"max_record_bytes {self.max_record_bytes} out of range")

    @property
    def max_file_bytes(self) -> int:
        """No segment the log writes is larger than this (recovery refuses larger files)."""
        return max(self.segment_bytes, SEGMENT_HEADER.size + RECORD_HEADER.size + self.max_record_bytes)


@dataclass(slots=True)
class _Segment:
    first_seq: int
    name: str


@dataclass(slots=True)
class WalStats:
    appended: int = 0
    syncs: int = 0
    rotations: int = 0
    torn_tail_bytes: int = 0
    """Bytes cut off the last segment by the last `open` (0: it ended cleanly)."""
    leftovers: list[str] = field(default_factory=list)
    """Segments `open` removed as leftovers of an interrupted prefix truncation."""


class Wal:
    """The log (see the module docstring). Build it with `Wal.open`."""

    __slots__ = (
        "_closed",
        "_failed",
        "_file",
        "_fs",
        "_offset",
        "_opts",
        "_segments",
        "_synced",
        "next_seq",
        "stats",
    )

    def __init__(self, fs: FileSystem, opts: WalOptions) -> None:
        self._fs = fs
        self._opts = opts
        self._segments: list[_Segment] = []
        self._file: WalFile | None = None
        self._offset = 0
        self.next_seq = 1
        self._synced = 0
        self._failed: StorageError | None = None
        self._closed = False
        self.stats = WalStats()

    # --- recovery ------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        fs: FileSystem,
        opts: WalOptions | None = None,
        records: list[tuple[int, bytes]] | None = None,
        *,
        start_seq: int = 1,
    ) -> Wal:
        """Recover the log in `fs` (module docstring), appending every (seq, payload) it holds to
        `records` (if given), and return it ready to append. An empty directory starts a log whose
        first record will be `start_seq`."""
        wal = cls(fs, opts or WalOptions())
        try:
            wal._recover(records, start_seq)
        except OSError as err:
            raise _translate(err, "recovering the write-ahead log") from err
        return wal

    def _recover(self, records: list[tuple[int, bytes]] | None, start_seq: int) -> None:
        fs, opts = self._fs, self._opts
        if not 1 <= start_seq <= MAX_SEQ:
            raise ValueError(f"start_seq {start_seq} out of range")
        found: list[_Segment] = []
        dirty_dir = False
        for name in fs.list():
            if name.endswith(TEMP_SUFFIX) and parse_segment_name(name[: -len(TEMP_SUFFIX)]) is not None:
                fs.unlink(name)  # an interrupted segment creation: never renamed into place
                dirty_dir = True
                continue
            first = parse_segment_name(name)
            if first is not None:
                found.append(_Segment(first, name))
        found.sort(key=lambda s: s.first_seq)
        # Keep only the segments after the last gap (the rest are leftovers of a prefix truncation
        # whose unlinks the OS persisted out of order); a gap is known only once a segment's end
        # is, so scan every segment (no record is handed out before the set is settled).
        scanned: list[tuple[_Segment, list[tuple[int, bytes]], int, bool, str]] = []
        for seg in found:
            data = self._read_segment(seg)
            first = decode_segment_header(data)
            if first != seg.first_seq:
                raise WalCorruptError(f"write-ahead log segment {seg.name}: bad header")
            recs: list[tuple[int, bytes]] = []
            end = scan_records(data, SEGMENT_HEADER.size, first, opts.max_record_bytes, recs)
            scanned.append((seg, recs, end.offset, end.clean, end.reason))
        keep_from = 0
        for i in range(1, len(scanned)):
            prev_seg, prev_recs, prev_end, prev_clean, prev_reason = scanned[i - 1]
            prev_next = prev_seg.first_seq + len(prev_recs)
            if scanned[i][0].first_seq > prev_next:
                if not prev_clean:  # a leftover was sealed whole: this is damage, not a leftover
                    raise WalCorruptError(
                        f"write-ahead log segment {prev_seg.name} is corrupt at offset {prev_end} "
                        f"({prev_reason}) and is not the last segment: refusing to drop the records after it"
                    )
                keep_from = i
            elif scanned[i][0].first_seq < prev_next:
                raise WalCorruptError(
                    f"write-ahead log segment {scanned[i][0].name} overlaps {prev_seg.name} (which reaches {prev_next - 1})"
                )
        for seg, _, _, _, _ in scanned[:keep_from]:
            fs.unlink(seg.name)
            self.stats.leftovers.append(seg.name)
            dirty_dir = True
        scanned = scanned[keep_from:]
        for seg, _, offset, clean, reason in scanned[:-1]:
            if not clean:
                raise WalCorruptError(
                    f"write-ahead log segment {seg.name} is corrupt at offset {offset} ({reason}) "
                    "and is not the last segment: refusing to drop the records after it"
                )
        if dirty_dir:
            fs.fsync_dir()
        if not scanned:
            self.next_seq = start_seq
            self._new_segment(start_seq)
            return
        for seg, recs, _, _, _ in scanned:
            self._segments.append(seg)
            if records is not None:
                records.extend(recs)
        last, recs, offset, clean, _ = scanned[-1]
        self.next_seq = last.first_seq + len(recs)
        f = self._file = fs.open(last.name)
        if not clean:
            self.stats.torn_tail_bytes = f.size() - offset
            f.truncate(offset)  # the torn tail is cut, never used
        if opts.preallocate:
            f.allocate(opts.segment_bytes)
        f.fdatasync()  # what open returns is durable from now on (invariant 3)
        self._offset = offset
        self._synced = self.next_seq - 1

    def _read_segment(self, seg: _Segment) -> bytes:
        f = self._fs.open(seg.name)
        try:
            size = f.size()
            if size > self._opts.max_file_bytes:
                raise WalCorruptError(
                    f"write-ahead log segment {seg.name} is {size} bytes, larger than any segment "
                    f"this log writes ({self._opts.max_file_bytes})"
                )
            return f.read(0, size)
        finally:
            f.close()

    # --- the write path ------------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def first_seq(self) -> int:
        """The first sequence number the oldest segment holds (records below a `truncate_prefix`
        point may still be there)."""
        return self._segments[0].first_seq

    @property
    def synced_seq(self) -> int:
        """The last sequence number made durable by `sync` (or by `open`)."""
        return self._synced

    def append(self, payloads: list[bytes]) -> int:
        """Write one record per payload (NOT durable until `sync`); returns the last sequence
        number. A payload larger than `max_record_bytes` raises ValueError (nothing written)."""
        self._check()
        limit = self._opts.max_record_bytes
        for p in payloads:
            if len(p) > limit:
                raise ValueError(f"a write-ahead log record of {len(p)} bytes exceeds the limit of {limit}")
        try:
            self._append(payloads)
        except OSError as err:
            raise self._fail(err, "appending to the write-ahead log") from err
        return self.next_seq - 1

    def _append(self, payloads: list[bytes]) -> None:
        seg_bytes = self._opts.segment_bytes
        buf: list[bytes] = []
        size = 0
        seq = self.next_seq
        for p in payloads:
            rec = encode_record(seq, p)
            if self._offset + size + len(rec) > seg_bytes and (size or self._offset > SEGMENT_HEADER.size):
                self._flush(buf, size, seq)
                self._rotate(seq)
                buf, size = [], 0
            buf.append(rec)
            size += len(rec)
            seq += 1
        self._flush(buf, size, seq)

    def _flush(self, buf: list[bytes], size: int, next_seq: int) -> None:
        if not buf:
            return
        assert self._file is not None
        self._file.write_at(self._offset, b"".join(buf) if len(buf) > 1 else buf[0])
        self._offset += size
        self.stats.appended += len(buf)
        self.next_seq = next_seq

    def sync(self) -> None:
        """Make every record appended so far durable: ONE `fdatasync` (none if nothing is new)."""
        self._check()
        if self._synced == self.next_seq - 1:
            return
        assert self._file is not None
        try:
            self._file.fdatasync()
        except OSError as err:
            raise self._fail(err, "syncing the write-ahead log") from err
        self._synced = self.next_seq - 1
        self.stats.syncs += 1

    def _rotate(self, first_seq: int) -> None:
        """Seal the current segment (durable whole) and start a new one at `first_seq`."""
        assert self._file is not None
        self._file.fdatasync()
        self._synced = first_seq - 1
        self._file.close()
        self._file = None
        self._new_segment(first_seq)
        self.stats.rotations += 1

    def _new_segment(self, first_seq: int) -> None:
        fs, opts = self._fs, self._opts
        name = segment_name(first_seq)
        tmp = name + TEMP_SUFFIX
        f = fs.open(tmp, create=True)
        f.truncate(0)
        f.write_at(0, encode_segment_header(first_seq))
        if opts.preallocate:
            f.allocate(opts.segment_bytes)
        f.fdatasync()
        fs.rename(tmp, name)
        fs.fsync_dir()
        self._segments.append(_Segment(first_seq, name))
        self._file = f
        self._offset = SEGMENT_HEADER.size

    # --- truncation ------------------------------------------------------------------------------------
    def truncate_suffix(self, last_kept: int) -> None:
        """Drop every record after `last_kept`, durable on return (invariant 4); a no-op if
        nothing is after it. ValueError below `first_seq - 1` (`truncate_prefix` removed those
        segments' names already)."""
        self._check()
        if last_kept >= self.next_seq - 1:
            return
        if last_kept < self._segments[0].first_seq - 1:
            raise ValueError(
                f"cannot truncate the write-ahead log after {last_kept}: its oldest segment starts at "
                f"{self._segments[0].first_seq}"
            )
        try:
            self._truncate_suffix(last_kept)
        except OSError as err:
            raise self._fail(err, "truncating the write-ahead log") from err

    def _truncate_suffix(self, last_kept: int) -> None:
        fs, opts = self._fs, self._opts
        drop = last_kept + 1
        segs = self._segments
        while len(segs) > 1 and segs[-1].first_seq >= drop:
            seg = segs.pop()
            if self._file is not None:
                self._file.close()
                self._file = None
            fs.unlink(seg.name)
            fs.fsync_dir()  # one at a time, newest first: a crash leaves a prefix, never a gap
        seg = segs[-1]
        if self._file is None:
            self._file = fs.open(seg.name)
        f = self._file
        recs: list[tuple[int, bytes]] = []
        scan_records(f.read(0, f.size()), SEGMENT_HEADER.size, seg.first_seq, opts.max_record_bytes, recs)
        keep = drop - seg.first_seq
        if keep > len(recs):
            raise WalCorruptError(
                f"write-ahead log segment {seg.name} ends at {seg.first_seq + len(recs) - 1}, before {last_kept}"
            )
        offset = SEGMENT_HEADER.size + sum(RECORD_HEADER.size + len(p) for _, p in recs[:keep])
        f.truncate(offset)
        if opts.preallocate:
            f.allocate(opts.segment_bytes)
        f.fdatasync()  # covers every record kept (earlier segments were sealed durable)
        self._offset = offset
        self.next_seq = drop
        self._synced = last_kept

    def truncate_prefix(self, first_needed: int) -> int:
        """Unlink every segment whose records are all below `first_needed` (never the last one);
        returns how many were removed (invariant 5)."""
        self._check()
        segs = self._segments
        n = 0
        while n + 1 < len(segs) and segs[n + 1].first_seq <= first_needed:
            n += 1
        if not n:
            return 0
        try:
            for seg in segs[:n]:
                self._fs.unlink(seg.name)
            self._fs.fsync_dir()
        except OSError as err:
            raise self._fail(err, "removing old write-ahead log segments") from err
        del segs[:n]
        return n

    # --- lifecycle -------------------------------------------------------------------------------------
    def segments(self) -> list[str]:
        return [s.name for s in self._segments]

    def _check(self) -> None:
        if self._closed:
            raise StorageClosedError("the write-ahead log is closed")
        if self._failed is not None:
            raise StorageIOError(f"the write-ahead log failed earlier and must be reopened: {self._failed}")

    def _fail(self, err: OSError, what: str) -> StorageError:
        e = _translate(err, what)
        self._failed = e
        return e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            f, self._file = self._file, None
            with contextlib.suppress(OSError):
                f.close()


def _translate(err: OSError, what: str) -> StorageError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"storage full while {what}: {err}")
    return StorageIOError(f"storage I/O error while {what}: {err}")
