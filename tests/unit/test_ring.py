"""kvstore.shard: the key hash, hash-interval sets, the consistent-hash ring and the shard map."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.shard.ranges import HASH_MAX, IntervalSet, key_hash
from kvstore.shard.ring import Ring, ring_diff, vnode_point
from kvstore.shard.shardmap import MoveState, ShardMap, ShardMapError

ROOT = Path(__file__).resolve().parents[2]
SPACE = HASH_MAX + 1
N_KEYS = 1_000_000


def to_set(s: IntervalSet) -> set[int]:
    return {h for lo, hi in s for h in range(lo, hi + 1)}


def assert_canonical(s: IntervalSet) -> None:
    """Sorted, disjoint, non-adjacent, inside the hash space."""
    for lo, hi in s:
        assert 0 <= lo <= hi <= HASH_MAX
    for (_, hi), (lo, _) in zip(s.intervals, s.intervals[1:], strict=False):
        assert hi + 1 < lo, s


@pytest.fixture(scope="module")
def hashes() -> list[int]:
    return [key_hash(b"key%07d" % i) for i in range(N_KEYS)]


# =================================================================================================
# key_hash: stable everywhere
# =================================================================================================
DETERMINISM_CHILD = """
import json
from kvstore.shard.ranges import key_hash
from kvstore.shard.ring import Ring
from kvstore.shard.shardmap import ShardMap
keys = [b"", b"a", b"key0000001", bytes(range(256)), "\u00e9t\u00e9".encode()] + [b"k%d" % i for i in range(200)]
ring = Ring.build(list(range(1, 9)), 128)
smap = ShardMap.initial([3, 1, 2], 8)
print(json.dumps({
    "hashes": [key_hash(k) for k in keys],
    "owners": [ring.group_for_key(k) for k in keys],
    "map_owners": [smap.group_for_key(k) for k in keys],
    "points": list(ring.points),
    "ring_owners": list(ring.owners),
    "map": smap.encode().hex(),
}))
"""


def _in_process() -> dict[str, object]:
    keys = [b"", b"a", b"key0000001", bytes(range(256)), "\u00e9t\u00e9".encode()]
    keys += [b"k%d" % i for i in range(200)]
    ring = Ring.build(list(range(1, 9)), 128)
    smap = ShardMap.initial([1, 2, 3], 8)
    return {
        "hashes": [key_hash(k) for k in keys],
        "owners": [ring.group_for_key(k) for k in keys],
        "map_owners": [smap.group_for_key(k) for k in keys],
        "points": list(ring.points),
        "ring_owners": list(ring.owners),
        "map": smap.encode().hex(),
    }


def test_key_hash_and_ring_are_identical_across_processes() -> None:
    want = _in_process()
    for seed in ("0", "1", "4242", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", DETERMINISM_CHILD],
            capture_output=True, text=True, check=True, cwd=ROOT, env=env, timeout=60,
        )
        assert json.loads(out.stdout) == want, f"PYTHONHASHSEED={seed}"


def test_key_hash_golden_values() -> None:
    """BLAKE2b-64, big-endian. Changing these re-shards every existing cluster."""
    assert key_hash(b"") == 0xE4A6A0577479B2B4
    assert key_hash(b"hello") == 0xA7B6EDA801E5347D
    assert vnode_point(1, 0) == 0xA9BE14DD68B8C3CD
    assert all(0 <= key_hash(b"%d" % i) <= HASH_MAX for i in range(1000))


# =================================================================================================
# Balance and stability over 1,000,000 keys
# =================================================================================================
BALANCE_BOUND = 0.25
"""Every group's key count within +-25% of the mean (measured: 8.2%, 128 vnodes, 8 groups)."""


def test_balance_of_one_million_keys(hashes: list[int]) -> None:
    t0 = time.perf_counter()
    m = ShardMap.initial([1, 2, 3], 8)
    counts = collections.Counter(m.group_for_hash(h) for h in hashes)
    mean = len(hashes) / 8
    dev = {g: (c - mean) / mean for g, c in counts.items()}
    worst = max(abs(d) for d in dev.values())
    print(
        f"\nbalance: {len(hashes)} keys over 8 groups x {m.vnodes} vnodes: max deviation {worst:.2%} "
        f"(counts {dict(sorted(counts.items()))}, {time.perf_counter() - t0:.2f}s)"
    )
    assert sorted(counts) == list(range(1, 9))
    assert worst <= BALANCE_BOUND, dev
    # The shares of the hash space agree with the key counts (a sanity check of share()).
    for g in counts:
        assert abs(m.share(g) - counts[g] / len(hashes)) < 0.005
    assert sum(m.share(g) for g in m.groups) == pytest.approx(1.0)


def test_adding_a_group_moves_about_one_nth_of_keys_all_to_the_new_group(hashes: list[int]) -> None:
    old = ShardMap.initial([1, 2, 3], 8)
    new = old.plan_add_group([1, 2, 3])
    gid = 9
    assert gid in new.groups and new.next_group == 10 and new.version == old.version + 1
    assert new.moves and all(mv.target == gid and mv.state == MoveState.PENDING for mv in new.moves)
    planned = IntervalSet()
    for mv in new.moves:
        assert not planned.overlaps(mv.ranges)
        planned = planned.union(mv.ranges)
        assert mv.ranges.issubset(old.routes[mv.source])
    assert planned == new.ring.ranges_of(gid)
    for h in hashes[:100_000]:
        assert new.group_for_hash(h) == old.group_for_hash(h)  # routes change only when a move flips
    moved = 0
    for h in hashes:
        o = old.group_for_hash(h)
        n = new.ring.owner(h)
        if o != n:
            moved += 1
            assert n == gid and h in planned
        else:
            assert h not in planned
    frac = moved / len(hashes)
    n_groups = 9
    print(f"\nadd group: {frac:.4f} of keys move (1/N = {1 / n_groups:.4f})")
    assert 0.5 / n_groups <= frac <= 1.5 / n_groups
    # After every move flipped, routing is the new ring's.
    done = drive_moves(new)
    for h in hashes[:100_000]:
        assert done.group_for_hash(h) == new.ring.owner(h)


def test_removing_a_group_moves_only_its_keys_spread_over_heirs(hashes: list[int]) -> None:
    old = ShardMap.initial([1, 2, 3], 8)
    new = old.plan_remove_group(3)
    assert {mv.source for mv in new.moves} == {3}
    assert 3 not in new.ring.owners and 3 in new.groups
    heirs: collections.Counter[int] = collections.Counter()
    mine = 0
    for h in hashes:
        o = old.group_for_hash(h)
        n = new.ring.owner(h)
        if o == 3:
            mine += 1
            assert n != 3
            heirs[n] += 1
        else:
            assert n == o
    print(f"\nremove group 3: {mine} keys to heirs {dict(sorted(heirs.items()))}")
    assert set(heirs) == {1, 2, 4, 5, 6, 7, 8}
    assert max(heirs.values()) <= 0.4 * mine
    assert {mv.target for mv in new.moves} == set(heirs)


# =================================================================================================
# IntervalSet against a brute-force model
# =================================================================================================
SMALL = 200
interval = st.tuples(st.integers(0, SMALL), st.integers(0, SMALL)).map(lambda p: (min(p), max(p)))
interval_lists = st.lists(interval, max_size=6)
bases = st.sampled_from([0, 1, HASH_MAX - SMALL])


@settings(max_examples=300, deadline=None)
@given(interval_lists, interval_lists, bases)
def test_interval_set_matches_a_set_of_ints(a_ivs: list[tuple[int, int]], b_ivs: list[tuple[int, int]], base: int) -> None:
    a = IntervalSet((lo + base, hi + base) for lo, hi in a_ivs)
    b = IntervalSet((lo + base, hi + base) for lo, hi in b_ivs)
    sa = {h + base for lo, hi in a_ivs for h in range(lo, hi + 1)}
    sb = {h + base for lo, hi in b_ivs for h in range(lo, hi + 1)}
    for s in (a, b):
        assert_canonical(s)
    assert to_set(a) == sa and to_set(b) == sb
    assert a.size() == len(sa) and bool(a) == bool(sa)
    for op, want in (
        (a.union(b), sa | sb),
        (a.difference(b), sa - sb),
        (b.difference(a), sb - sa),
        (a.intersection(b), sa & sb),
    ):
        assert_canonical(op)
        assert to_set(op) == want
    assert a.issubset(b) == (sa <= sb)
    assert a.overlaps(b) == bool(sa & sb)
    assert (a == b) == (sa == sb)
    for h in range(base, base + SMALL + 1):
        assert (h in a) == (h in sa)
    enc = a.encode()
    assert IntervalSet.decode(enc) == a
    assert IntervalSet.decode_from(b"xy" + enc + b"z", 2) == (a, 2 + len(enc))


def test_interval_set_edges() -> None:
    full = IntervalSet.full()
    assert full.size() == SPACE and 0 in full and HASH_MAX in full and SPACE not in full
    assert full.intervals == ((0, HASH_MAX),)
    assert full.difference(IntervalSet([(0, 0)])).intervals == ((1, HASH_MAX),)
    assert full.difference(IntervalSet([(HASH_MAX, HASH_MAX)])).intervals == ((0, HASH_MAX - 1),)
    mid = full.difference(IntervalSet([(5, 9)]))
    assert mid.intervals == ((0, 4), (10, HASH_MAX)) and mid.size() == SPACE - 5
    assert not full.difference(full) and full.intersection(full) == full
    assert mid.union(IntervalSet([(5, 9)])) == full
    top = IntervalSet([(HASH_MAX, HASH_MAX)])
    assert top.size() == 1 and HASH_MAX in top and HASH_MAX - 1 not in top
    assert top.issubset(full) and not full.issubset(top) and top.overlaps(full)
    assert IntervalSet([(0, 3), (4, 7)]).intervals == ((0, 7),)  # adjacent intervals merge
    assert IntervalSet([(4, 7), (0, 9)]).intervals == ((0, 9),)
    empty = IntervalSet()
    assert not empty and empty.size() == 0 and empty.issubset(empty) and empty.issubset(top)
    assert not empty.overlaps(full) and 0 not in empty
    assert IntervalSet.decode(empty.encode()) == empty and empty.encode() == b"\x00\x00\x00\x00"
    assert IntervalSet.decode(full.encode()) == full and IntervalSet.decode(mid.encode()) == mid
    for bad in ((-1, 3), (4, 3), (0, SPACE), (SPACE, SPACE)):
        with pytest.raises(ValueError):
            IntervalSet([bad])


def test_interval_set_decode_errors() -> None:
    good = IntervalSet([(1, 2), (10, 20)]).encode()
    cases = {
        b"": "truncated in its count",
        b"\x00\x00": "truncated in its count",
        good[:-1]: "truncated",
        b"\x00\x00\x00\x01" + b"\x00" * 15: "truncated",
        good + b"x": "trailing",
        b"\x00\x00\x00\x01" + (5).to_bytes(8, "big") + (4).to_bytes(8, "big"): "bad hash interval",
    }
    for data, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            IntervalSet.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=70))
def test_interval_set_decoding_garbage_raises_value_error_only(data: bytes) -> None:
    try:
        s = IntervalSet.decode(data)
    except ValueError:
        return
    assert_canonical(s)


# =================================================================================================
# Ring
# =================================================================================================
def _random_ring(seed: int, n: int, groups: int) -> Ring:
    rng = random.Random(seed)
    pts = rng.sample(range(0, SPACE, 1 << 40), n)  # sample() over a huge range() is fine
    return Ring((p, rng.randint(1, groups)) for p in pts)


RINGS = {
    "single": Ring([(5, 1)]),
    "single-at-0": Ring([(0, 1)]),
    "single-at-max": Ring([(HASH_MAX, 7)]),
    "0-and-max": Ring([(0, 1), (HASH_MAX, 2)]),
    "max-last": Ring([(HASH_MAX, 2), (10, 1), (1 << 63, 3)]),
    "small": Ring.build([1, 2, 3], 4),
    "8x128": Ring.build(list(range(1, 9)), 128),
    "random": _random_ring(1, 50, 5),
}


def _probes(*rings: Ring, seed: int = 0, n: int = 2000) -> list[int]:
    rng = random.Random(seed)
    out = {0, 1, HASH_MAX - 1, HASH_MAX}
    for r in rings:
        for p in r.points:
            out.update(x for x in (p - 1, p, p + 1) if 0 <= x <= HASH_MAX)
    out.update(rng.randrange(SPACE) for _ in range(n))
    return sorted(out)


@pytest.mark.parametrize("name", sorted(RINGS))
def test_ring_arcs_and_ownership_partition_the_space(name: str) -> None:
    ring = RINGS[name]
    pieces: list[tuple[int, int]] = []
    total = 0
    for i, p in enumerate(ring.points):
        arc = ring.arc(i)
        assert_canonical(arc)
        assert p in arc
        pieces += arc.intervals
        total += arc.size()
        for lo, hi in arc:
            assert ring.owner(lo) == ring.owner(hi) == ring.owners[i]
    # Sizes sum to the space and the union is the whole space: no overlaps, no holes.
    assert total == SPACE and IntervalSet(pieces) == IntervalSet.full()
    own = ring.ownership()
    assert set(own) == ring.groups()
    assert sum(s.size() for s in own.values()) == SPACE
    assert IntervalSet(iv for s in own.values() for iv in s) == IntervalSet.full()
    for h in _probes(ring):
        assert h in own[ring.owner(h)]
    for g in own:
        assert ring.ranges_of(g) == own[g]


def test_ring_lookup_rules() -> None:
    ring = Ring([(100, 1), (200, 2)])
    assert [ring.owner(h) for h in (0, 100, 101, 200, 201, HASH_MAX)] == [1, 1, 2, 2, 1, 1]
    assert Ring().owner(5) == 0 and len(Ring()) == 0
    for bad in ([(1, 1), (1, 2)], [(1, 0)], [(SPACE, 1)], [(-1, 1)]):
        with pytest.raises(ValueError):
            Ring(bad)
    with pytest.raises(ValueError, match="already on the ring"):
        ring.with_groups([2], 3)
    with pytest.raises(ValueError, match="empty"):
        Ring([(5, 1)]).without_group(1)
    assert Ring.build([1, 2], 16) == Ring.build([1], 16).with_groups([2], 16)
    assert len(Ring.build([1, 2, 3], 16)) == 48
    assert ring.reassign([100], 2).owners == (2, 2)


RING_PAIRS = {
    "add": (Ring.build([1, 2, 3], 16), Ring.build([1, 2, 3], 16).with_groups([4], 16)),
    "remove-heirs": (Ring.build([1, 2, 3, 4], 16), Ring.build([1, 2, 3, 4], 16).without_group(2, [1, 3, 4])),
    "remove-successors": (Ring.build([1, 2, 3], 16), Ring.build([1, 2, 3], 16).without_group(3)),
    "reassign": (RINGS["random"], RINGS["random"].reassign(RINGS["random"].points[::3], 9)),
    "unrelated": (RINGS["random"], _random_ring(2, 40, 6)),
    "edges": (Ring([(HASH_MAX, 1)]), Ring([(0, 2)])),
    "edges2": (Ring([(0, 1), (HASH_MAX, 2)]), Ring([(0, 2), (1 << 63, 1)])),
    "same": (RINGS["8x128"], RINGS["8x128"]),
}


@pytest.mark.parametrize("name", sorted(RING_PAIRS))
def test_ring_diff_is_exactly_the_changed_owners(name: str) -> None:
    old, new = RING_PAIRS[name]
    moves = ring_diff(old, new)
    old_own, new_own = old.ownership(), new.ownership()
    assert len({(m.source, m.target) for m in moves}) == len(moves)
    covered = IntervalSet()
    for m in moves:
        assert m.source != m.target and m.ranges
        assert not covered.overlaps(m.ranges)
        covered = covered.union(m.ranges)
        # Exact: the move is everything `source` owned in old and `target` owns in new.
        assert m.ranges == old_own[m.source].intersection(new_own[m.target])
    changed = sum(
        old_own[s].intersection(new_own[t]).size() for s in old_own for t in new_own if s != t
    )
    assert covered.size() == changed
    by_hash = {(m.source, m.target): m.ranges for m in moves}
    for h in _probes(old, new, seed=3):
        a, b = old.owner(h), new.owner(h)
        assert (h in covered) == (a != b), (name, h)
        if a != b:
            assert h in by_hash[(a, b)]
    if name == "same":
        assert moves == []


# =================================================================================================
# ShardMap
# =================================================================================================
def drive_moves(m: ShardMap) -> ShardMap:
    """Take every pending move through FROZEN, FLIPPED and finish, checking invariants at each step."""
    for mv in list(m.moves):
        v = m.version
        m = m.set_move_state(mv.id, MoveState.FROZEN)
        m.check()
        assert m.version == v + 1
        assert next(x for x in m.moves if x.id == mv.id).state == MoveState.FROZEN
        lo, _ = mv.ranges.intervals[0]
        assert m.group_for_hash(lo) == mv.source  # frozen: still routed to the source
        m = m.set_move_state(mv.id, MoveState.FLIPPED)
        m.check()
        assert m.group_for_hash(lo) == mv.target
        assert mv.ranges.issubset(m.routes[mv.target])
        assert not mv.ranges.overlaps(m.routes.get(mv.source, IntervalSet()))
        _assert_round_trip(m)
        m = m.finish_move(mv.id)
        m.check()
        assert m.version == v + 3 and all(x.id != mv.id for x in m.moves)
    return m


def _assert_round_trip(m: ShardMap) -> None:
    d = ShardMap.decode(m.encode())
    assert d.encode() == m.encode()
    for f in dataclasses.fields(ShardMap):
        if f.name != "_table":
            assert getattr(d, f.name) == getattr(m, f.name), f.name
    d.check()


def _steady(m: ShardMap) -> None:
    assert not m.moves
    assert m.routes == m.ring.ownership()
    for i in range(5000):
        k = b"probe%d" % i
        assert m.group_for_key(k) == m.ring.group_for_key(k)


def test_shardmap_initial_is_deterministic() -> None:
    a = ShardMap.initial([1, 2, 3], 8, addresses={1: "h1:1", 2: "h2:1", 3: "h3:1"})
    b = ShardMap.initial([3, 2, 1], 8, addresses={3: "h3:1", 1: "h1:1", 2: "h2:1"})
    assert a.encode() == b.encode()
    assert ShardMap.initial([1, 2, 3], 8).encode() != ShardMap.initial([1, 2, 3], 9).encode()
    assert a.version == 1 and a.data_groups() == list(range(1, 9)) and a.next_group == 9
    a.check()
    _steady(a)
    _assert_round_trip(a)
    assert a.nodes == {1: "h1:1", 2: "h2:1", 3: "h3:1"}
    bad: dict[str, Any]
    for bad in ({"groups": 0}, {"nodes": []}, {"vnodes": 0}, {"vnodes": 4097}):
        kw: dict[str, Any] = {"nodes": [1], "groups": 1, **bad}
        with pytest.raises(ShardMapError):
            ShardMap.initial(**kw)


def test_shardmap_equality_ignores_the_lookup_cache() -> None:
    """A decoded map equals the map it was encoded from (the route lookup cache is not state)."""
    m = ShardMap.initial([1, 2, 3], 8)
    d = ShardMap.decode(m.encode())  # encode() filled m's lookup cache; d's is empty
    assert d == m


def test_shardmap_decode_garbage() -> None:
    e = ShardMap.initial([1, 2, 3], 4).encode()
    for bad in (e[:-3], b"\xff", b"\x0a\x05ab"):
        with pytest.raises(ShardMapError, match="corrupt"):
            ShardMap.decode(bad)


def test_shardmap_add_group_lifecycle() -> None:
    m = ShardMap.initial([1, 2, 3], 4, vnodes=32)
    added = m.plan_add_group([1, 2, 3])
    added.check()
    _assert_round_trip(added)
    assert added.routes == m.routes  # nothing routes differently until a move flips
    assert [mv.id for mv in added.moves] == list(range(1, len(added.moves) + 1))
    assert added.next_move == len(added.moves) + 1
    for plan in (lambda x: x.plan_add_group([1]), lambda x: x.plan_remove_group(1), ShardMap.plan_rebalance):
        with pytest.raises(ShardMapError, match="in progress"):
            plan(added)
    done = drive_moves(added)
    _steady(done)
    assert done.routes == added.ring.ownership() and done.share(5) > 0
    _assert_round_trip(done)
    # The ring is canonical already: rebalancing plans nothing.
    reb = done.plan_rebalance()
    assert reb.moves == [] and reb.routes == done.routes
    # Move ids keep increasing across plans.
    again = done.plan_add_group([1, 2, 3])
    assert min(mv.id for mv in again.moves) == added.next_move


def test_shardmap_remove_and_drop_group() -> None:
    m = ShardMap.initial([1, 2, 3], 5, vnodes=32)
    with pytest.raises(ShardMapError, match="still owns"):
        m.drop_group(2)
    with pytest.raises(ShardMapError, match="no data group"):
        m.plan_remove_group(42)
    rem = m.plan_remove_group(2)
    rem.check()
    assert {mv.source for mv in rem.moves} == {2} and len({mv.target for mv in rem.moves}) == 4
    with pytest.raises(ShardMapError, match="still owns"):
        rem.drop_group(2)
    # All flipped but not finished: the group is still part of moves.
    flipped = rem
    for mv in rem.moves:
        flipped = flipped.set_move_state(mv.id, MoveState.FLIPPED)
    flipped.check()
    assert 2 not in flipped.routes
    with pytest.raises(ShardMapError, match="move in progress"):
        flipped.drop_group(2)
    done = drive_moves(rem)
    _steady(done)
    assert 2 not in done.routes and 2 in done.groups and done.share(2) == 0.0
    dropped = done.drop_group(2)
    dropped.check()
    _steady(dropped)
    assert dropped.data_groups() == [1, 3, 4, 5] and dropped.version == done.version + 1
    _assert_round_trip(dropped)
    # Rebalancing returns to the canonical ring of the remaining groups.
    reb = dropped.plan_rebalance()
    reb.check()
    assert reb.ring == Ring.build([1, 3, 4, 5], 32) and reb.moves
    final = drive_moves(reb)
    _steady(final)
    assert final.ring == Ring.build([1, 3, 4, 5], 32)
    # The last data group cannot be removed.
    one = ShardMap.initial([1], 1)
    with pytest.raises(ShardMapError, match="last data group"):
        one.plan_remove_group(1)


def test_shardmap_lookup_of_unrouted_hash_is_an_error() -> None:
    m = ShardMap.initial([1], 2, vnodes=4)
    broken = m._next(routes={1: m.routes[1]})
    with pytest.raises(ShardMapError):
        broken.check()
    holes = m.routes[2]
    with pytest.raises(ShardMapError, match="not routed"):
        broken.group_for_hash(holes.intervals[0][0])
    with pytest.raises(ShardMapError, match="not in the map"):
        m._next(routes={**m.routes, 7: IntervalSet()}).check()


@pytest.mark.parametrize("n_groups", [4, 5, 8, 10, 16])
def test_placement_over_five_nodes(n_groups: int) -> None:
    """Replication 3 over 5 nodes: 3 distinct voters per group, every node holds 3/5 of the
    groups' replicas (+-1) and is the preferred leader of 1/5 of them (+-1)."""
    nodes = [1, 2, 3, 4, 5]
    m = ShardMap.initial(nodes, n_groups, replication=3)
    for p in m.groups.values():
        assert len(p.voters) == 3 == len(set(p.voters)) and set(p.voters) <= set(nodes)
        assert p.learners == ()
    held = collections.Counter(n for p in m.groups.values() for n in p.voters)
    lead = collections.Counter(p.voters[0] for p in m.groups.values())
    want_held = 3 * n_groups / 5
    want_lead = n_groups / 5
    assert all(abs(held[n] - want_held) <= 1 for n in nodes), (dict(held), want_held)
    assert all(abs(lead[n] - want_lead) <= 1 for n in nodes), (dict(lead), want_lead)
    for n in nodes:
        assert m.groups_of_node(n) == sorted(g for g, p in m.groups.items() if n in p.voters)


def test_add_group_places_on_least_loaded_nodes() -> None:
    nodes = [1, 2, 3, 4, 5]
    m = ShardMap.initial(nodes, 8, replication=3, vnodes=16)
    for _ in range(4):
        load = collections.Counter(n for p in m.groups.values() for n in p.members())
        lead = collections.Counter(p.voters[0] for p in m.groups.values())
        m2 = m.plan_add_group(nodes)
        new = m2.groups[m.next_group]
        assert len(set(new.voters)) == 3
        assert max(load[n] for n in new.voters) <= min(load[n] for n in nodes if n not in new.voters)
        assert lead[new.voters[0]] == min(lead[n] for n in new.voters)
        m = drive_moves(m2)
    held = collections.Counter(n for p in m.groups.values() for n in p.voters)
    assert max(held.values()) - min(held.values()) <= 2
    # A new, empty node is chosen first and becomes the preferred leader.
    m3 = m.plan_add_group([4, 5, 6])
    new = m3.groups[m.next_group]
    assert 6 in new.voters and new.voters[0] == 6
    # Fewer nodes than the replication factor: all of them.
    m4 = ShardMap.initial([1, 2], 2, replication=3)
    assert all(len(p.voters) == 2 for p in m4.groups.values())
    assert m4.plan_add_group([1, 2]).groups[3].voters in ((1, 2), (2, 1))
    with pytest.raises(ShardMapError):
        m4.plan_add_group([])


def test_group_members_keep_the_preferred_leader_first() -> None:
    m = ShardMap.initial([1, 2, 3, 4], 2, replication=3)
    before = m.groups[1].voters
    m2 = m.with_group_members(1, [before[2], 4, before[0]], [before[1]])
    p = m2.groups[1]
    assert (p.id, p.voters, p.learners) == (1, (before[0], before[2], 4), (before[1],))
    assert p.bootstrap == m.groups[1].bootstrap == before  # the creation voters never change
    assert m2.groups_of_node(before[1]) == m.groups_of_node(before[1])
    _assert_round_trip(m2)


def test_bootstrap_ranges_and_voters() -> None:
    m = ShardMap.initial([1, 2, 3, 4], 4, replication=3, vnodes=16)
    first = m.ring.ownership()
    for g in m.data_groups():
        assert m.bootstrap_ranges(g) == first[g]
        assert m.groups[g].bootstrap == m.groups[g].voters
    assert m.bootstrap_ranges(0) == IntervalSet() and m.bootstrap_ranges(5) == IntervalSet()
    added = drive_moves(m.plan_add_group([1, 2, 3, 4]))
    removed = drive_moves(added.plan_remove_group(2)).drop_group(2)
    for mm in (added, removed, ShardMap.decode(removed.encode())):
        assert mm.initial_groups == 4
        for g in (1, 3, 4):
            assert mm.bootstrap_ranges(g) == first[g]  # what the group was created with, forever
        assert mm.bootstrap_ranges(5) == IntervalSet()  # added later: receives ranges by moves
        assert mm.groups[5].bootstrap == added.groups[5].voters
