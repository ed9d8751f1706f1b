"""The consistent-hash ring: virtual-node points on the 64-bit key-hash space, each owned by a group.

A key belongs to the owner of the first point at or after `key_hash(key)`, wrapping around to the
first point. A point p with predecessor q therefore owns the arc (q, p]; the first point also owns
everything after the last point.

A group's points are `vnode_point(group, i)` for i = 0, 1, ... (a stable hash, so every process
computes the same ring). Adding a group inserts its points, each of which takes over part of one
existing arc: only about 1/N of the keys move. Points can also be handed from one group to another
(`reassign`), which is how `rebalance` evens out load and how a removed group's arcs are spread.

Invariants: points are unique and sorted; every ring with at least one point covers the whole hash
space exactly once (`ownership()` partitions [0, 2**64)).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .ranges import HASH_MAX, IntervalSet, key_hash


def vnode_point(group: int, i: int) -> int:
    return key_hash(b"kvstore-vnode/%d/%d" % (group, i))


@dataclass(frozen=True, slots=True)
class Move:
    """Hash values `ranges` change owner from group `source` to group `target`."""

    source: int
    target: int
    ranges: IntervalSet


class Ring:
    __slots__ = ("owners", "points")

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        items = sorted((int(p), int(g)) for p, g in pairs)
        for a, b in itertools.pairwise(items):
            if a[0] == b[0]:
                raise ValueError(f"ring point {a[0]} is owned twice")
        for p, g in items:
            if not 0 <= p <= HASH_MAX or g <= 0:
                raise ValueError(f"bad ring point {p} -> group {g}")
        self.points: tuple[int, ...] = tuple(p for p, _ in items)
        self.owners: tuple[int, ...] = tuple(g for _, g in items)

    @classmethod
    def build(cls, groups: Sequence[int], vnodes: int) -> Ring:
        return cls(()).with_groups(groups, vnodes)

    def __len__(self) -> int:
        return len(self.points)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and (self.points, self.owners) == (other.points, other.owners)

    def __hash__(self) -> int:
        return hash((self.points, self.owners))

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.points, self.owners, strict=True))

    def groups(self) -> set[int]:
        return set(self.owners)

    # --- lookups ----------------------------------------------------------------------------------
    def owner(self, h: int) -> int:
        """The group owning hash value `h` (0 if the ring is empty)."""
        if not self.points:
            return 0
        i = bisect.bisect_left(self.points, h)
        return self.owners[i if i < len(self.points) else 0]

    def group_for_key(self, key: bytes) -> int:
        return self.owner(key_hash(key))

    def arc(self, i: int) -> IntervalSet:
        """The hash values owned by point i."""
        p = self.points[i]
        if i > 0:
            return IntervalSet([(self.points[i - 1] + 1, p)])
        last = self.points[-1]
        pieces = [(0, p)]
        if last < HASH_MAX and last != p:
            pieces.append((last + 1, HASH_MAX))
        elif last == p:  # a single point owns everything
            pieces = [(0, HASH_MAX)]
        return IntervalSet(pieces)

    def ownership(self) -> dict[int, IntervalSet]:
        """group -> every hash value it owns. The sets partition the hash space."""
        parts: dict[int, list[tuple[int, int]]] = {}
        for i, g in enumerate(self.owners):
            parts.setdefault(g, []).extend(self.arc(i).intervals)
        return {g: IntervalSet(iv) for g, iv in parts.items()}

    def ranges_of(self, group: int) -> IntervalSet:
        return self.ownership().get(group, IntervalSet())

    # --- changes ----------------------------------------------------------------------------------
    def with_groups(self, groups: Sequence[int], vnodes: int) -> Ring:
        """This ring plus `vnodes` points for each of `groups` (which must not own points yet)."""
        taken = set(self.points)
        pairs = self.pairs()
        for g in groups:
            if g in self.owners:
                raise ValueError(f"group {g} is already on the ring")
            i = n = 0
            while n < vnodes:
                p = vnode_point(g, i)
                i += 1
                if p in taken:  # a 64-bit collision: skip the point, deterministically
                    continue
                taken.add(p)
                pairs.append((p, g))
                n += 1
        return Ring(pairs)

    def without_group(self, group: int, heirs: Sequence[int] = ()) -> Ring:
        """The ring without `group`'s points. With `heirs`, its points are handed to them round
        robin instead (the keys then spread over the heirs rather than all going to successors)."""
        if not heirs:
            pairs = [(p, g) for p, g in self.pairs() if g != group]
        else:
            pairs = []
            k = 0
            for p, g in self.pairs():
                if g == group:
                    pairs.append((p, heirs[k % len(heirs)]))
                    k += 1
                else:
                    pairs.append((p, g))
        if not pairs:
            raise ValueError("the ring would be empty")
        return Ring(pairs)

    def reassign(self, points: Iterable[int], group: int) -> Ring:
        move = set(points)
        return Ring((p, group if p in move else g) for p, g in self.pairs())


def ring_diff(old: Ring, new: Ring) -> list[Move]:
    """The hash ranges whose owner differs between `old` and `new`, merged per (source, target).

    Every hash value is in an elementary interval between consecutive points of either ring; all of
    an elementary interval [lo, hi] has the same owner in each ring (the owner of `hi`)."""
    bounds = sorted(set(old.points) | set(new.points))
    if not bounds:
        return []
    elems: list[tuple[int, int]] = []
    prev = -1
    for b in bounds:
        elems.append((prev + 1, b))
        prev = b
    if prev < HASH_MAX:
        elems.append((prev + 1, HASH_MAX))
    acc: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for lo, hi in elems:
        a, b = old.owner(hi), new.owner(hi)
        if a != b:
            acc.setdefault((a, b), []).append((lo, hi))
    return [Move(s, t, IntervalSet(iv)) for (s, t), iv in sorted(acc.items())]
