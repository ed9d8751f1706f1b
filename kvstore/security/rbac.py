"""Role-based access control: what a user may do with keys, compiled for a per-operation check.

`Grants.of(state, user)` merges the user's permissions (from all its roles) into sorted,
disjoint key intervals, one list for reads and one for writes; `allows(key, access)` is then a
binary search. Intervals are half-open [lo, hi) over byte strings, hi None meaning unbounded;
a single-key permission `k` is [k, k + b"\\x00"). A range (a scan) is allowed iff one merged
interval covers it whole.

The admin permission (membership, shards, leadership, snapshots, users and roles) is separate
from key permissions: `AuthState.is_admin`. Standard library only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .authstate import AuthState, Permission, PermKind

READ = PermKind.READ
WRITE = PermKind.WRITE
READWRITE = PermKind.READWRITE


def _interval(p: Permission) -> tuple[bytes, bytes | None]:
    if p.end == b"":
        return p.key, p.key + b"\x00"
    if p.end == b"\x00":
        return p.key, None
    return p.key, p.end


def _merge(iv: list[tuple[bytes, bytes | None]]) -> tuple[list[bytes], list[bytes | None]]:
    iv.sort(key=lambda x: x[0])
    los: list[bytes] = []
    his: list[bytes | None] = []
    for lo, hi in iv:
        if his and (his[-1] is None or lo <= his[-1]):  # overlaps or touches the last one
            last = his[-1]
            his[-1] = None if last is None or hi is None else max(last, hi)
            continue
        los.append(lo)
        his.append(hi)
    return los, his


@dataclass(frozen=True, slots=True)
class _Intervals:
    los: list[bytes]
    his: list[bytes | None]

    def covers(self, lo: bytes, hi: bytes | None) -> bool:
        i = bisect.bisect_right(self.los, lo) - 1
        if i < 0:
            return False
        end = self.his[i]
        if end is None:
            return True
        return hi is not None and hi <= end and lo < end


@dataclass(frozen=True, slots=True)
class Grants:
    """One user's key permissions at one auth state version."""

    version: int
    admin: bool
    read: _Intervals
    write: _Intervals

    @classmethod
    def of(cls, state: AuthState, user: str) -> Grants:
        perms = state.perms_of(user)
        r = [_interval(p) for p in perms if p.kind.allows(READ)]
        w = [_interval(p) for p in perms if p.kind.allows(WRITE)]
        return cls(state.version, state.is_admin(user), _Intervals(*_merge(r)), _Intervals(*_merge(w)))

    def allows(self, key: bytes, access: PermKind) -> bool:
        if self.admin:
            return True
        hi = key + b"\x00"
        if access == READ:
            return self.read.covers(key, hi)
        if access == WRITE:
            return self.write.covers(key, hi)
        return self.read.covers(key, hi) and self.write.covers(key, hi)

    def allows_range(self, lo: bytes, hi: bytes | None, access: PermKind) -> bool:
        """Every key in [lo, hi) (hi None: to the end)."""
        if self.admin:
            return True
        return (self.read if access == READ else self.write).covers(lo, hi)
