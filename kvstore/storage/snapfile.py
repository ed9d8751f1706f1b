"""The snapshot stream format, and the on-disk file a received snapshot is kept in until installed.

A snapshot of one group is a byte stream, cut into chunks of at most `chunk_size` bytes (chunk
boundaries carry no meaning; a record may span chunks):

    header   magic b"KVSS"  version:u8 (=1)  group:u64  index:u64  term:u64
             n_voters:u32  n_learners:u32  ids:u64 * (n_voters + n_learners)
    record   tag:u8  key_len:u32  value_len:u32  key  value      (tag 1 data, 2 session, 3 member,
             4 shard state, 5..8 the MVCC tables of `mvcc.py`: keys, history, changes, state;
             9 the lease table of `leases.py`)
    end      tag:u8 (=0)  0:u32  12:u32  record_count:u64  crc32:u32   (crc32 of every byte before it)

Data keys are user keys; session keys are `client:u64` (the ack floor) or `client:u64 seq:u64`;
member keys are `node:u64`; MVCC keys are the table keys of `mvcc.py`. Records come in key order
per tag. A snapshot of a release before revisions has no MVCC records: its keys install as
LEGACY keys (same format version: an older reader refuses the new tags as unknown).

A received snapshot is stored as a file of frames `length:u32 chunk` (one per chunk received) so a
receiver can write chunks as they arrive without parsing them. Reading a file checks the header,
the record structure, the count and the checksum: any damage raises `SnapshotFormatError`; a
consumer that installs records as it reads them must do so in a transaction it aborts on error.

Memory: encoding and decoding hold at most one chunk plus one record. Decoding is total and
bounded: a configuration of more than `MAX_MEMBERS` ids, a key over `MAX_RECORD_KEY` bytes or a
value over `MAX_RECORD_VALUE` bytes is refused as soon as its lengths are read, before any of
it is buffered, so a forged length cannot make a reader hold gigabytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvstore.raft.types import ConfState, SnapshotMeta

from .errors import SnapshotFormatError

MAGIC = b"KVSS"
VERSION = 1
TAG_END = 0
TAG_DATA = 1
TAG_SESSION = 2
TAG_MEMBER = 3
TAG_SHARDS = 4
TAG_REV_BASE = 5
"""Tags TAG_REV_BASE + t carry the rows of MVCC table t (`mvcc.T_KEYS` .. `mvcc.T_INTENTS`: 9 and
10 carry the records and intents of cross-group transactions; 11 the lease table), except the
history: 6 and 7 carry it in the exchange form (`mvcc.snapshot_history`, `snapshot_changes`: the
rows data format 2 kept), which the receiver turns into its LOG as they come (`mvcc.LogBuilder`)."""
TAG_REV_KEYS, TAG_REV_HIST, TAG_REV_CHANGES, TAG_REV_STATE, TAG_REV_TXN, TAG_REV_INTENTS = 5, 6, 7, 8, 9, 10
TAG_LEASES = 11
"""The rows of the lease table (`leases.py`, table 6 of the group's rows: TAG_REV_BASE + 6)."""
_TAGS = frozenset({TAG_DATA, TAG_SESSION, TAG_MEMBER, TAG_SHARDS, TAG_REV_KEYS, TAG_REV_HIST, TAG_REV_CHANGES,
                   TAG_REV_STATE, TAG_REV_TXN, TAG_REV_INTENTS, TAG_LEASES})

MAX_MEMBERS = 4096
MAX_RECORD_KEY = 4096
MAX_RECORD_VALUE = 64 << 20

_HEAD = struct.Struct(">4sBQQQII")
_REC = struct.Struct(">BII")
_END = struct.Struct(">QI")
_FRAME = struct.Struct(">I")

Record = tuple[int, bytes, bytes]


@dataclass(slots=True, frozen=True)
class SnapshotHeader:
    group: int
    meta: SnapshotMeta


def _header_bytes(group: int, meta: SnapshotMeta) -> bytes:
    cs = meta.conf_state
    ids = (*cs.voters, *cs.learners)
    return _HEAD.pack(
        MAGIC, VERSION, group, meta.index, meta.term, len(cs.voters), len(cs.learners)
    ) + struct.pack(f">{len(ids)}Q", *ids)


def encode_snapshot(
    group: int, meta: SnapshotMeta, records: Iterable[Record], chunk_size: int
) -> Iterator[bytes]:
    """Yield the snapshot stream in chunks of at most `chunk_size` bytes."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    buf = bytearray(_header_bytes(group, meta))
    # The checksum covers every byte before the end record; it is taken over what the buffer
    # holds before each drain (`summed`: the bytes at its front already in it), not per record.
    crc = summed = count = 0
    pack = _REC.pack
    for tag, key, value in records:
        buf += pack(tag, len(key), len(value))
        buf += key
        buf += value
        count += 1
        if len(buf) >= chunk_size:
            with memoryview(buf) as mv:
                crc = zlib.crc32(mv[summed:], crc)
            yield from _drain(buf, chunk_size)
            summed = len(buf)
    with memoryview(buf) as mv:
        crc = zlib.crc32(mv[summed:], crc)
    buf += _REC.pack(TAG_END, 0, _END.size) + _END.pack(count, crc)
    yield from _drain(buf, chunk_size)
    if buf:
        yield bytes(buf)


def _drain(buf: bytearray, chunk_size: int) -> Iterator[bytes]:
    """Yield whole `chunk_size` pieces from the front of `buf` and remove them from it."""
    off = 0
    with memoryview(buf) as mv:
        while len(buf) - off >= chunk_size:
            yield bytes(mv[off : off + chunk_size])
            off += chunk_size
    del buf[:off]


class SnapshotDecoder:
    """Incremental parser of a snapshot stream: `feed()` bytes in order, then `finish()`."""

    __slots__ = ("_buf", "_count", "_crc", "done", "header")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._crc = 0
        self._count = 0
        self.header: SnapshotHeader | None = None
        self.done = False

    def feed(self, data: bytes) -> list[Record]:
        """Parse what `data` completes; returns the complete records, in order."""
        if self.done:
            if data:
                raise SnapshotFormatError("snapshot has data after its end record")
            return []
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        out: list[Record] = []
        with memoryview(buf) as mv:
            if self.header is None:
                if n < _HEAD.size:
                    return out
                magic, version, group, index, term, nv, nl = _HEAD.unpack_from(buf)
                if magic != MAGIC:
                    raise SnapshotFormatError(f"not a kvstore snapshot (magic {bytes(magic)!r})")
                if version != VERSION:
                    raise SnapshotFormatError(f"unknown snapshot format version {version}")
                if nv + nl > MAX_MEMBERS:
                    raise SnapshotFormatError(f"snapshot configuration of {nv + nl} ids (at most {MAX_MEMBERS})")
                end = _HEAD.size + 8 * (nv + nl)
                if n < end:
                    return out
                ids = struct.unpack_from(f">{nv + nl}Q", buf, _HEAD.size)
                self.header = SnapshotHeader(group, SnapshotMeta(index, term, ConfState(ids[:nv], ids[nv:])))
                self._crc = zlib.crc32(mv[:end])
                pos = end
            # One copy of what is buffered: each field is then one slice of it (bytes, no views);
            # none while the next record is not complete (a big one arriving frame by frame).
            waiting = n - pos < _REC.size
            if not waiting:
                _, klen, vlen = _REC.unpack_from(buf, pos)
                waiting = pos + _REC.size + klen + vlen > n and klen <= MAX_RECORD_KEY and vlen <= MAX_RECORD_VALUE
            tail = b"" if waiting else bytes(mv[pos:])
        crc = self._crc
        summed = 0  # the checksum is taken over the records read, at once (not per record)
        base, pos, n = pos, 0, len(tail)
        out_append = out.append
        unpack_from = _REC.unpack_from
        rec, tags = _REC.size, _TAGS
        while n - pos >= rec:
            tag, klen, vlen = unpack_from(tail, pos)
            if klen > MAX_RECORD_KEY or vlen > MAX_RECORD_VALUE:
                raise SnapshotFormatError(f"snapshot record of {klen}+{vlen} bytes exceeds the limits")
            k0 = pos + rec
            end = k0 + klen + vlen
            if end > n:
                break
            if tag == TAG_END:
                if klen != 0 or vlen != _END.size:
                    raise SnapshotFormatError("snapshot end record is malformed")
                count, want = _END.unpack_from(tail, k0)
                with memoryview(tail) as tv:
                    crc = zlib.crc32(tv[summed:pos], crc)
                summed = pos
                if count != self._count + len(out):
                    raise SnapshotFormatError(
                        f"snapshot record count mismatch: end says {count}, read {self._count + len(out)}"
                    )
                if want != crc:
                    raise SnapshotFormatError(f"snapshot checksum mismatch: {crc:#010x} != {want:#010x}")
                self.done = True
                pos = end
                if pos != n:
                    raise SnapshotFormatError("snapshot has data after its end record")
                break
            if tag not in tags:
                raise SnapshotFormatError(f"unknown snapshot record tag {tag}")
            out_append((tag, tail[k0:k0 + klen], tail[k0 + klen:end]))
            pos = end
        if not self.done:
            with memoryview(tail) as tv:
                crc = zlib.crc32(tv[summed:pos], crc)
        self._crc = crc
        pos += base
        del buf[:pos]
        self._count += len(out)
        return out

    def finish(self) -> None:
        if not self.done:
            what = "header" if self.header is None else "end record"
            raise SnapshotFormatError(f"snapshot truncated: its {what} is missing")


# --- files of frames -----------------------------------------------------------------------------
def write_frames(f: BinaryIO, chunks: Iterable[bytes]) -> int:
    """Write chunks as `length:u32 chunk` frames; returns the number of bytes written."""
    total = 0
    for chunk in chunks:
        if not chunk:
            continue
        f.write(_FRAME.pack(len(chunk)))
        f.write(chunk)
        total += _FRAME.size + len(chunk)
    return total


def iter_frames(f: BinaryIO) -> Iterator[bytes]:
    while True:
        head = f.read(_FRAME.size)
        if not head:
            return
        if len(head) < _FRAME.size:
            raise SnapshotFormatError("snapshot file truncated inside a frame header")
        (n,) = _FRAME.unpack(head)
        data = f.read(n)
        if len(data) < n:
            raise SnapshotFormatError(f"snapshot file truncated: frame of {n} bytes has {len(data)}")
        yield data


class SnapshotFile:
    """A received snapshot file. `header` is read on open; `records()` streams and verifies the rest.

    Use as a context manager (closes the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        self._dec = SnapshotDecoder()
        self._pending: list[Record] = []
        self._frames = iter_frames(self._f)
        try:
            while self._dec.header is None:
                frame = next(self._frames, None)
                if frame is None:
                    self._dec.finish()
                self._pending += self._dec.feed(frame or b"")
        except BaseException:
            self._f.close()
            raise
        self.header: SnapshotHeader = self._dec.header

    def records(self) -> Iterator[Record]:
        """All records, in order; raises SnapshotFormatError on any damage (after yielding the
        records before it, so install them in a transaction you abort on error)."""
        pending, self._pending = self._pending, []
        yield from pending
        for frame in self._frames:
            yield from self._dec.feed(frame)
        self._dec.finish()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_snapshot_header(path: str | Path) -> SnapshotHeader:
    """The group and metadata a received snapshot file carries."""
    with SnapshotFile(path) as sf:
        return sf.header
