"""The 64-bit key hash and sets of hash intervals. STANDARD LIBRARY ONLY.

The state machine (`kvstore.storage.machine`) decides ownership with this module, so it must stay
free of I/O and third-party imports (tests/unit/test_purity.py walks it).

Hash space: integers in [0, 2**64). `key_hash` is BLAKE2b with an 8-byte digest, read big-endian:
stable across processes, machines and Python versions (never Python's salted `hash()`).

An `IntervalSet` is a sorted tuple of disjoint, non-adjacent, inclusive intervals (lo, hi) with
0 <= lo <= hi <= HASH_MAX. Inclusive bounds keep every interval inside 64 bits (a half-open
interval ending at 2**64 would not fit a u64).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator
from hashlib import blake2b

HASH_MAX = (1 << 64) - 1

_PAIR = struct.Struct(">QQ")
_COUNT = struct.Struct(">I")

Interval = tuple[int, int]


def key_hash(key: bytes) -> int:
    """The key's position on the ring, in [0, 2**64)."""
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "big")


class IntervalSet:
    """An immutable set of hash values, as sorted disjoint inclusive intervals."""

    __slots__ = ("_his", "_los", "intervals")

    def __init__(self, intervals: Iterable[Interval] = ()) -> None:
        merged: list[list[int]] = []
        for lo, hi in sorted((int(a), int(b)) for a, b in intervals):
            if not 0 <= lo <= hi <= HASH_MAX:
                raise ValueError(f"bad hash interval [{lo}, {hi}]")
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.intervals: tuple[Interval, ...] = tuple((a, b) for a, b in merged)
        self._los = [a for a, _ in self.intervals]
        self._his = [b for _, b in self.intervals]

    @classmethod
    def full(cls) -> IntervalSet:
        return cls([(0, HASH_MAX)])

    def is_full(self) -> bool:
        """Does the set hold every hash value?"""
        return self.intervals == ((0, HASH_MAX),)

    def __contains__(self, h: int) -> bool:
        i = bisect.bisect_right(self._los, h) - 1
        return i >= 0 and h <= self._his[i]

    def owns_key(self, key: bytes) -> bool:
        return key_hash(key) in self

    def __iter__(self) -> Iterator[Interval]:
        return iter(self.intervals)

    def __len__(self) -> int:
        return len(self.intervals)

    def __bool__(self) -> bool:
        return bool(self.intervals)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and self.intervals == other.intervals

    def __hash__(self) -> int:
        return hash(self.intervals)

    def __repr__(self) -> str:
        return f"IntervalSet({list(self.intervals)!r})"

    def size(self) -> int:
        """How many hash values the set holds."""
        return sum(hi - lo + 1 for lo, hi in self.intervals)

    def union(self, other: IntervalSet) -> IntervalSet:
        return IntervalSet((*self.intervals, *other.intervals))

    def difference(self, other: IntervalSet) -> IntervalSet:
        out: list[Interval] = []
        theirs = other.intervals
        j = 0
        for lo, hi in self.intervals:
            while j < len(theirs) and theirs[j][1] < lo:
                j += 1
            cur = lo
            k = j
            while k < len(theirs) and theirs[k][0] <= hi:
                olo, ohi = theirs[k]
                if olo > cur:
                    out.append((cur, olo - 1))
                cur = max(cur, ohi + 1)
                if cur > hi:
                    break
                k += 1
            if cur <= hi:
                out.append((cur, hi))
        return IntervalSet(out)

    def intersection(self, other: IntervalSet) -> IntervalSet:
        return self.difference(self.difference(other))

    def issubset(self, other: IntervalSet) -> bool:
        return not self.difference(other)

    def overlaps(self, other: IntervalSet) -> bool:
        return bool(self.intersection(other))

    # --- wire -----------------------------------------------------------------------------------
    def encode(self) -> bytes:
        return _COUNT.pack(len(self.intervals)) + b"".join(_PAIR.pack(a, b) for a, b in self.intervals)

    @classmethod
    def decode_from(cls, data: bytes, pos: int = 0) -> tuple[IntervalSet, int]:
        """Decode at `pos`; returns the set and the position after it. ValueError if malformed."""
        if len(data) < pos + _COUNT.size:
            raise ValueError("interval set truncated in its count")
        (n,) = _COUNT.unpack_from(data, pos)
        pos += _COUNT.size
        end = pos + n * _PAIR.size
        if len(data) < end:
            raise ValueError(f"interval set truncated: {n} intervals need {end - pos} bytes")
        pairs = [_PAIR.unpack_from(data, pos + i * _PAIR.size) for i in range(n)]
        return cls(pairs), end

    @classmethod
    def decode(cls, data: bytes) -> IntervalSet:
        s, end = cls.decode_from(data)
        if end != len(data):
            raise ValueError(f"interval set has {len(data) - end} trailing bytes")
        return s


def covers_once(parts: Iterable[IntervalSet]) -> bool:
    """True if the sets are disjoint and together cover the whole hash space (the owned ranges
    of a scan's group parts: every key read exactly once)."""
    parts = list(parts)
    total = sum(p.size() for p in parts)
    if total != HASH_MAX + 1:
        return False
    union = IntervalSet()
    for p in parts:
        union = union.union(p)
    return union.size() == total
