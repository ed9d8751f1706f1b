"""The WAL's on-disk format: segment headers and checksummed records, with TOTAL decoders.

A segment file `NNNNNNNNNNNNNNNNNNNN.wal` (its first sequence number, 20 decimal digits) is:

    header  = MAGIC (8 bytes) | first_seq (u64) | crc32c(MAGIC | first_seq) (u32)     20 bytes
    record* = crc32c(length | seq | payload) (u32) | length (u32) | seq (u64) | payload
    then zeros (preallocated space) or, after a crash, garbage

(all integers little-endian). Records carry consecutive sequence numbers starting at the
header's `first_seq`; the checksum covers the length and the sequence number, so a record from a
previous life of the same bytes (another sequence) or a header of zeros never passes.

`scan_records` is total: any bytes at all give the valid records of a prefix and the offset where
validity ended (a bad checksum, a length beyond the segment or `max_record`, a sequence number out
of order, a partial header); it never raises and never allocates more than the record it checks.
The checksum is CRC-32C (Castagnoli), from the `crc32c` package (hardware-accelerated).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crc32c import crc32c

MAGIC = b"KVWAL\x00\x01\n"
SEGMENT_HEADER = struct.Struct("<8sQI")
RECORD_HEADER = struct.Struct("<IIQ")
_LEN_SEQ = struct.Struct("<IQ")
SEGMENT_SUFFIX = ".wal"
TEMP_SUFFIX = ".tmp"
_NAME_DIGITS = 20
MAX_SEQ = (1 << 64) - 1


def segment_name(first_seq: int) -> str:
    return f"{first_seq:0{_NAME_DIGITS}d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first sequence number a segment file's name states, or None if it is not one."""
    stem = name[: -len(SEGMENT_SUFFIX)]
    if not name.endswith(SEGMENT_SUFFIX) or len(stem) != _NAME_DIGITS or not stem.isdigit():
        return None
    value = int(stem)
    return value if 1 <= value <= MAX_SEQ else None


def encode_segment_header(first_seq: int) -> bytes:
    head = MAGIC + first_seq.to_bytes(8, "little")
    return SEGMENT_HEADER.pack(MAGIC, first_seq, crc32c(head))


def decode_segment_header(data: bytes) -> int | None:
    """The first sequence number of a valid segment header, or None (total)."""
    if len(data) < SEGMENT_HEADER.size:
        return None
    magic, first_seq, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != MAGIC or crc != crc32c(data[:16]) or not 1 <= first_seq <= MAX_SEQ:
        return None
    return int(first_seq)


def encode_record(seq: int, payload: bytes | memoryview) -> bytes:
    head = _LEN_SEQ.pack(len(payload), seq)
    return RECORD_HEADER.pack(crc32c(payload, crc32c(head)), len(payload), seq) + payload


@dataclass(slots=True, frozen=True)
class ScanEnd:
    """Where a scan stopped: `offset` is the end of the last valid record (where the next one
    goes), `next_seq` the sequence number it must carry, `clean` False if bytes there are not
    zeros (a torn or corrupt record, as opposed to the preallocated or unwritten end)."""

    offset: int
    next_seq: int
    clean: bool
    reason: str


def scan_records(
    data: bytes | memoryview, start: int, first_seq: int, max_record: int, out: list[tuple[int, bytes]] | None
) -> ScanEnd:
    """Walk the records of `data` from `start` (just after the segment header), appending
    (seq, payload) of each valid one to `out` (if given), until the first invalid one. Total."""
    view = memoryview(data)
    end = len(view)
    pos = start
    seq = first_seq
    hsize = RECORD_HEADER.size
    while True:
        if end - pos < hsize:
            return ScanEnd(pos, seq, all_zero(view, pos, end), "end of segment")
        crc, length, rseq = RECORD_HEADER.unpack_from(view, pos)
        if crc == 0 and length == 0 and rseq == 0:
            clean = all_zero(view, pos, end)
            return ScanEnd(pos, seq, clean, "end of records" if clean else "zero header before data")
        if length > max_record or length > end - pos - hsize:
            return ScanEnd(pos, seq, False, f"record length {length} beyond the segment or the record limit")
        body = view[pos + hsize : pos + hsize + length]
        if crc32c(body, crc32c(view[pos + 4 : pos + hsize])) != crc:
            return ScanEnd(pos, seq, False, f"checksum mismatch in the record at offset {pos}")
        if rseq != seq:
            return ScanEnd(pos, seq, False, f"record at offset {pos} has sequence {rseq}, expected {seq}")
        if out is not None:
            out.append((seq, bytes(body)))
        pos += hsize + length
        seq += 1


_ZEROS = bytes(1 << 16)


def all_zero(view: memoryview, pos: int, end: int) -> bool:
    """Whether view[pos:end] is all zero bytes (in bounded chunks: no copy of the whole range)."""
    step = len(_ZEROS)
    while pos < end:
        n = min(step, end - pos)
        if view[pos : pos + n] != _ZEROS[:n]:
            return False
        pos += n
    return True
