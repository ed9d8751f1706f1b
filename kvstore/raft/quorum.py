"""Majority quorums over one voter configuration.

kvstore changes membership one server at a time (see `core.py` for the safety argument), so a
configuration is a single majority: any two majorities of configurations that differ by one voter
intersect, which is what election safety and commitment need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def majority(n: int) -> int:
    return n // 2 + 1


def committed_index(voters: Iterable[int], acked: Callable[[int], int]) -> int:
    """Largest index acknowledged by a majority of `voters` (0 with no voters)."""
    idx = sorted((acked(v) for v in voters), reverse=True)
    if not idx:
        return 0
    return idx[majority(len(idx)) - 1]


def vote_result(voters: Iterable[int], votes: dict[int, bool]) -> bool | None:
    """True if a majority granted, False if a majority can no longer be reached, else None."""
    vs = list(voters)
    q = majority(len(vs))
    granted = sum(1 for v in vs if votes.get(v) is True)
    missing = sum(1 for v in vs if v not in votes)
    if granted >= q:
        return True
    if granted + missing >= q:
        return None
    return False
