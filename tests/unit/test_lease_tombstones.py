"""Lease tombstones are forgotten (issue 17, `kvstore/storage/leases.py` "Tombstones are
forgotten"): LEASE_PUT's `checked` field (codec round trips, hostile bytes), the apply rules on
`DictState` (a put checked more than LEASE_PUT_MAX_AGE before the group's last revision refused
outside the home; a tombstone kept within its life, forgotten after it, a bounded batch per
apply), the safety argument as a property (an accepted put always meets the tombstone), and the
same rows and snapshots on the LMDB store and the simulator's store."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.node.memstore import MemoryNodeStore
from kvstore.raft.types import ConfState, Entry, EntryType
from kvstore.storage import leases, mvcc
from kvstore.storage.commands import Command, decode_command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd
from kvstore.storage.machine import DictState
from kvstore.storage.snapfile import TAG_LEASES, SnapshotDecoder
from kvstore.storage.store import ApplyBatch, GroupWrite, NodeStore

HOME = 3
G = 5  # a data group other than the lease's home
LID = leases.make_id(HOME, 12345)
OTHER = leases.make_id(HOME, 777)
MS = 1 << mvcc.PHYSICAL_SHIFT
"""One millisecond of HLC time, in revision units."""
CONF = ConfState((1, 2, 3))


def at(ms: int) -> int:
    """A revision-valued time `ms` after the revisions' epoch."""
    return mvcc.make_revision(mvcc.EPOCH_MS + ms, 0, 0)


def lcmd(c: LeaseCmd, key: bytes = b"", value: bytes = b"", revision: int = 0) -> bytes:
    return encode_command(Command.lease_command(c, key, value, revision=revision))


def last(s: DictState) -> int:
    return mvcc.rev_state(s.rows).last


def advance(s: DictState, rev: int) -> None:
    """A plain write proposed at `rev`: the group's last revision becomes at least `rev`."""
    res = s.apply(encode_command(Command.put(b"clock", b"x", revision=rev)))
    assert res.error is None and last(s) >= rev


def lput(s: DictState, key: bytes, checked: int, lid: int = LID) -> Any:
    return s.apply(lcmd(LeaseCmd(Kind.PUT, lid, checked=checked), key, b"v", revision=last(s)))


def tick(s: DictState) -> None:
    """A lease command that applies (a put attached to another, live lease): it runs the GC."""
    assert lput(s, b"tick", last(s), OTHER).error is None


def tomb(s: DictState, lid: int = LID) -> int | None:
    return leases.tomb_expiry(s.rows, lid)


def age_rows(s: DictState) -> list[bytes]:
    return [bytes(k) for k, _ in s.rows.iter(leases.T_LEASES, b"x", b"y")]


# --- codec -------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**51 - 1), st.integers(0, leases.MAX_CHECKED), st.binary(max_size=64), st.binary(max_size=64))
def test_lease_put_with_checked_round_trips(high: int, checked: int, key: bytes, value: bytes) -> None:
    lid = high << leases.ID_GROUP_BITS | 7
    c = Command.lease_command(LeaseCmd(Kind.PUT, lid, checked=checked), key, value, revision=5)
    assert decode_command(encode_command(c)) == c
    body = leases.encode_body(c.lease) if c.lease is not None else b""
    assert len(body) == leases.PUT_BODY.size and leases.decode_body(int(Kind.PUT), body) == c.lease


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(leases.KINDS)), st.binary(max_size=48))
def test_lease_body_decoder_is_total(kind: int, raw: bytes) -> None:
    try:
        c = leases.decode_body(kind, raw)
    except ValueError:
        return
    assert leases.encode_body(c) == raw  # accepted: exactly what the encoder writes


def test_checked_only_on_a_put_and_in_range() -> None:
    with pytest.raises(ValueError):
        leases.encode_body(LeaseCmd(Kind.DROP, LID, checked=1))
    for bad in (-1, leases.MAX_CHECKED + 1):
        with pytest.raises(ValueError):
            leases.encode_body(LeaseCmd(Kind.PUT, LID, checked=bad))
    # a DROP's body with a PUT's length, and a PUT's body with a DROP's: refused
    with pytest.raises(ValueError):
        leases.decode_body(int(Kind.DROP), leases.PUT_BODY.pack(LID, 0, 0, 0, 0))
    with pytest.raises(ValueError):
        leases.decode_body(int(Kind.PUT), leases.BODY.pack(LID, 0, 0, 0))
    full = lcmd(LeaseCmd(Kind.PUT, LID, checked=9), b"k", b"v")
    for n in range(len(full) - 2):  # every truncation of the command is refused
        with pytest.raises(ValueError):
            decode_command(full[:n])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([b"X", b"x"]), st.binary(max_size=20), st.binary(max_size=12))
def test_tombstone_rows_checked_like_a_snapshot_brings_them(tag: bytes, rest: bytes, value: bytes) -> None:
    key = tag + rest
    ok = (tag == b"X" and len(key) == 9 and len(value) == 8) or (tag == b"x" and len(key) == 17 and not value)
    if ok:
        leases.check_rows(key, value)
    else:
        with pytest.raises(ValueError):
            leases.check_rows(key, value)


# --- apply rules -------------------------------------------------------------------------------
def test_put_checked_too_long_ago_is_refused_outside_the_home() -> None:
    s = DictState(group=G)
    advance(s, at(10 * 60_000))
    now = last(s)
    res = lput(s, b"a", now - leases.LEASE_PUT_MAX_AGE - 1)
    assert res.error is not None and leases.NOT_FOUND in res.error and s.get(b"a") is None
    assert leases.lease_of(s.rows, b"a") == 0  # nothing changed
    res = lput(s, b"a", 0)  # never checked: refused
    assert res.error is not None and leases.NOT_FOUND in res.error and s.get(b"a") is None
    res = lput(s, b"a", now - leases.LEASE_PUT_MAX_AGE)  # exactly at the bound: accepted
    assert res.error is None and s.get(b"a") == b"v" and leases.lease_of(s.rows, b"a") == LID


def test_the_home_group_decides_by_the_record_not_by_checked() -> None:
    s = DictState(group=HOME)
    assert s.apply(lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10))).error is None
    advance(s, at(10 * 60_000))
    res = lput(s, b"a", 0)
    assert res.error is None and leases.lease_of(s.rows, b"a") == LID


def test_tombstone_kept_within_its_life_and_forgotten_after() -> None:
    s = DictState(group=G)
    advance(s, at(60_000))
    base = at(61_000)
    assert s.apply(lcmd(LeaseCmd(Kind.DROP, LID), revision=base)).error is None
    expiry = tomb(s)
    assert expiry == base + leases.TOMB_LIFE and age_rows(s) == [leases.age_key(expiry, LID)]
    advance(s, expiry - MS)  # within the life: a put checked just now still meets it
    res = lput(s, b"late", last(s))
    assert res.error is not None and leases.NOT_FOUND in res.error and tomb(s) == expiry
    tick(s)  # any lease command that applies runs the GC: the group's last is still below the expiry
    assert last(s) < expiry and tomb(s) == expiry
    advance(s, expiry + MS)
    tick(s)
    assert tomb(s) is None and age_rows(s) == []


def test_home_tombstone_outlives_the_others_and_a_second_drop_extends() -> None:
    s = DictState(group=HOME)
    assert s.apply(lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10))).error is None
    assert s.apply(lcmd(LeaseCmd(Kind.REVOKE, LID), revision=at(1_000))).error is None
    assert s.apply(lcmd(LeaseCmd(Kind.FORGET, LID), revision=at(2_000))).error is None
    assert tomb(s) == at(2_000) + 2 * leases.TOMB_LIFE
    assert s.apply(lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10))).error == "lease already exists"
    o = DictState(group=G)
    o.apply(lcmd(LeaseCmd(Kind.DROP, LID), revision=at(5_000)))
    o.apply(lcmd(LeaseCmd(Kind.DROP, LID), revision=at(9_000)))  # a retried DROP: the later expiry
    assert tomb(o) == at(9_000) + leases.TOMB_LIFE and age_rows(o) == [leases.age_key(at(9_000) + leases.TOMB_LIFE, LID)]


def test_gc_forgets_a_bounded_batch_per_apply_oldest_first() -> None:
    s = DictState(group=G)
    ids = [leases.make_id(HOME, 100 + i) for i in range(leases.GC_PER_ENTRY + 2)]
    for i, lid in enumerate(ids):
        s.apply(lcmd(LeaseCmd(Kind.DROP, lid), revision=at(1_000 + i)))
    advance(s, at(1_000 + len(ids)) + leases.TOMB_LIFE + MS)
    tick(s)
    left = [lid for lid in ids if tomb(s, lid) is not None]
    assert left == ids[leases.GC_PER_ENTRY:] and len(age_rows(s)) == len(left)
    tick(s)
    assert all(tomb(s, lid) is None for lid in ids) and age_rows(s) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10 * 60_000), st.integers(-leases.TOMB_MARGIN // MS, 0), st.integers(0, 10**9),
       st.integers(0, leases.LEASE_PUT_MAX_AGE // MS))
def test_an_accepted_late_put_always_meets_the_tombstone(base_ms: int, skew_ms: int, before: int, delay_ms: int) -> None:
    """The module's argument: checked at c <= b + TOMB_MARGIN (the death's base b, skew allowed),
    applied when the group's last revision is at most c + LEASE_PUT_MAX_AGE: still refused, by
    the tombstone (not only by age), however the group's revisions moved in between."""
    s = DictState(group=G)
    b = at(60_000 + base_ms)
    s.apply(lcmd(LeaseCmd(Kind.DROP, LID), revision=b))
    c = max(1, b + leases.TOMB_MARGIN + skew_ms * MS - before)  # any c up to b + TOMB_MARGIN
    target = c + delay_ms * MS
    if target > last(s):
        advance(s, target)  # the group moved on, up to the put's bound (or just past it)
    tick(s)  # and ran its GC
    if leases.too_old(s.rows, c):
        return
    assert tomb(s) is not None
    res = lput(s, b"late", c)
    assert res.error is not None and leases.NOT_FOUND in res.error and s.get(b"late") is None


# --- hostile proposals --------------------------------------------------------------------------
def _rows(s: DictState) -> tuple[list[dict[bytes, bytes]], dict[bytes, bytes]]:
    return [dict(t) for t in s.rows.tables], dict(s.data)


def _revoked_home() -> DictState:
    """The lease's home group with its record REVOKED (a FORGET would make it a tombstone)."""
    s = DictState(group=HOME)
    assert s.apply(lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10))).error is None
    assert s.apply(lcmd(LeaseCmd(Kind.REVOKE, LID), revision=at(1_000))).error is None
    return s


@pytest.mark.parametrize("proposal", [mvcc.PROPOSAL_MAX + 1, mvcc.REVISION_MAX, 2**64 - 1])
def test_a_keyless_drop_or_forget_with_an_absurd_proposal_is_refused(proposal: int) -> None:
    """A forged DROP with no key attached here, or FORGET (or REVOKE), proposed beyond
    `mvcc.PROPOSAL_MAX`: refused (definite error, nothing written) like the DROP that deletes a
    key, not a tombstone kept until past the end of the revisions (never forgotten)."""
    s = DictState(group=G)
    advance(s, at(60_000))
    before = _rows(s)
    res = s.apply(lcmd(LeaseCmd(Kind.DROP, LID), revision=proposal))
    assert res.error is not None and "revision refused" in res.error
    assert tomb(s) is None and _rows(s) == before
    # the keyed form, refused by the same rule (before this change too)
    assert lput(s, b"a", last(s)).error is None
    before = _rows(s)
    res = s.apply(lcmd(LeaseCmd(Kind.DROP, LID), revision=proposal))
    assert res.error is not None and "revision refused" in res.error and _rows(s) == before
    # FORGET of a revoked lease in its home group
    h = _revoked_home()
    before = _rows(h)
    res = h.apply(lcmd(LeaseCmd(Kind.FORGET, LID), revision=proposal))
    assert res.error is not None and "revision refused" in res.error
    assert tomb(h) is None and _rows(h) == before
    rec = leases.get_record(h.rows, LID)
    assert rec is not None and rec.state == leases.REVOKED
    # REVOKE runs the same deletion (`drop_attached`): refused too, the record left LIVE
    live = DictState(group=HOME)
    assert live.apply(lcmd(LeaseCmd(Kind.GRANT, LID, ttl_s=10))).error is None
    before = _rows(live)
    res = live.apply(lcmd(LeaseCmd(Kind.REVOKE, LID), revision=proposal))
    assert res.error is not None and "revision refused" in res.error and _rows(live) == before
    # at the bound: accepted, and its tombstone can still be forgotten (an expiry below the last
    # revision the group can reach, though its life would end past it)
    assert h.apply(lcmd(LeaseCmd(Kind.FORGET, LID), revision=mvcc.PROPOSAL_MAX)).error is None
    assert tomb(h) == leases.TOMB_EXPIRY_MAX < mvcc.PROPOSAL_MAX + 2 * leases.TOMB_LIFE


_HEAD = struct.Struct(">BBQQQBQQ")
"""A command's version-3 header (`commands.py`): version op client seq ack flags horizon revision."""


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([Kind.DROP, Kind.FORGET]), st.integers(0, 2**64 - 1),
       st.one_of(st.builds(leases.BODY.pack, st.sampled_from([LID, OTHER, 0, 2**64 - 1]), st.just(0),
                           st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                 st.binary(max_size=40)),
       st.booleans())
def test_drop_and_forget_commands_are_decoded_totally_and_never_keep_a_tombstone_forever(
        kind: Kind, revision: int, body: bytes, home: bool) -> None:
    """Hostile DROP / FORGET entries (any proposal, any body): decoding raises ValueError only;
    applied, each is either refused with nothing changed, or keeps a tombstone whose expiry the
    group's revisions can pass (at most `leases.TOMB_EXPIRY_MAX`)."""
    data = _HEAD.pack(3, int(kind), 0, 0, 0, 0, 0, revision) + body
    try:
        c = decode_command(data)
    except ValueError:
        pass
    else:  # accepted: exactly what the encoder writes
        assert encode_command(c) == data and c.lease is not None and c.lease.kind == kind
    s = _revoked_home() if home else DictState(group=G)
    if not home:
        assert lput(s, b"a", last(s)).error is None
    before = _rows(s)
    res = s.apply(data)
    if res.error is not None:
        assert _rows(s) == before
        return
    for lid in (LID, OTHER):
        expiry = tomb(s, lid)
        assert expiry is None or expiry <= leases.TOMB_EXPIRY_MAX


# --- stores ------------------------------------------------------------------------------------
def _apply(store: Any, g: int, datas: list[bytes]) -> list[Any]:
    start = store.applied_index(g) + 1
    es = [Entry(1, start + i, EntryType.NORMAL, d) for i, d in enumerate(datas)]
    store.persist([GroupWrite(g, es)])
    return list(store.apply([ApplyBatch(g, es, CONF)])[0])


def _cmds() -> list[bytes]:
    ids = [leases.make_id(HOME, 200 + i) for i in range(6)]
    out = [lcmd(LeaseCmd(Kind.DROP, lid), revision=at(1_000 * (i + 1))) for i, lid in enumerate(ids)]
    out.append(encode_command(Command.put(b"clock", b"x", revision=at(3_500) + leases.TOMB_LIFE)))
    out.append(lcmd(LeaseCmd(Kind.PUT, ids[5], checked=at(3_600) + leases.TOMB_LIFE), b"k", b"v"))
    out.append(lcmd(LeaseCmd(Kind.PUT, OTHER, checked=at(3_600) + leases.TOMB_LIFE), b"j", b"w"))
    out.append(lcmd(LeaseCmd(Kind.PUT, OTHER, checked=at(1)), b"old", b"w"))
    return out


def test_lmdb_and_memory_stores_forget_the_same_tombstones(tmp_path: Path) -> None:
    lm = NodeStore(tmp_path / "a", sync=False)
    mem = MemoryNodeStore(rng=random.Random(1))
    ref = DictState(group=G)
    want = [ref.apply(d) for d in _cmds()]
    assert _apply(lm, G, _cmds()) == want == _apply(mem, G, _cmds())
    assert [w.error is None for w in want[-3:]] == [False, True, False]  # tombstone; accepted; too old
    _, c1 = lm.snapshot_chunks(G)
    _, c2 = mem.snapshot_chunks(G)
    img = b"".join(c1)
    assert img == b"".join(c2)
    dec = SnapshotDecoder()
    recs = dec.feed(img)
    dec.finish()
    rows = sorted((bytes(k), bytes(v)) for t, k, v in recs if t == TAG_LEASES and k[:1] in (b"X", b"x"))
    # the three oldest are gone (expired before the clock write, forgotten by the next applies,
    # at most GC_PER_ENTRY each); the other three stay, each with its age row
    assert len(rows) == 6 and all(leases.check_rows(k, v) is None for k, v in rows)
    assert sorted(k for k, _ in ref.rows.iter(leases.T_LEASES, b"X", b"Y")) == sorted(k for k, _ in rows if k[:1] == b"X")
    lm.close()


def _tombs(store: Any, g: int) -> list[tuple[bytes, bytes]]:
    return store.revisions.read_rows(g, lambda rows: [(bytes(k), bytes(v)) for k, v in rows.iter(leases.T_LEASES, b"X", b"y")])


def test_the_per_batch_tombstone_flag_follows_the_rows_across_batches(tmp_path: Path) -> None:
    """`mvcc.Rows.has_tombstones` (read once per LMDB batch, kept by its puts and deletes): a batch
    that starts with tombstones forgets them as the reference does, one that forgets the last,
    finds none, then writes one and forgets it agrees with the reference too, and the flag ends
    False."""
    lm = NodeStore(tmp_path / "a", sync=False)
    mem = MemoryNodeStore(rng=random.Random(1))
    ref = DictState(group=G)
    a, b, c = (leases.make_id(HOME, 300 + i) for i in range(3))
    batches = [
        [lcmd(LeaseCmd(Kind.DROP, a), revision=at(1_000))],
        [lcmd(LeaseCmd(Kind.GRANT, leases.make_id(G, 5), ttl_s=10))],  # a plain command: nothing to forget yet
        [encode_command(Command.put(b"clock", b"x", revision=at(2_000) + leases.TOMB_LIFE)),
         lcmd(LeaseCmd(Kind.RENEW, leases.make_id(G, 5))),  # forgets a: the batch read the flag
         lcmd(LeaseCmd(Kind.DROP, b), revision=at(3_000) + leases.TOMB_LIFE),
         lcmd(LeaseCmd(Kind.RENEW, leases.make_id(G, 5)))],  # b is kept (not expired)
        [encode_command(Command.put(b"clock", b"x", revision=at(4_000) + 2 * leases.TOMB_LIFE)),
         lcmd(LeaseCmd(Kind.RENEW, leases.make_id(G, 5))),  # forgets b: none left
         lcmd(LeaseCmd(Kind.RENEW, leases.make_id(G, 5))),  # the flag says none (read again)
         lcmd(LeaseCmd(Kind.DROP, c), revision=at(5_000) + 2 * leases.TOMB_LIFE),  # the flag follows the put
         encode_command(Command.put(b"clock", b"x", revision=at(6_000) + 3 * leases.TOMB_LIFE)),
         lcmd(LeaseCmd(Kind.RENEW, leases.make_id(G, 5)))],  # forgets c in the same batch
    ]
    for cmds in batches:
        want = [ref.apply(d) for d in cmds]
        assert _apply(lm, G, cmds) == want == _apply(mem, G, cmds)
        assert _tombs(lm, G) == _tombs(mem, G) == sorted(
            (bytes(k), bytes(v)) for k, v in ref.rows.iter(leases.T_LEASES, b"X", b"y"))
        if len(cmds) == 4:
            assert tomb(ref, a) is None and tomb(ref, b) == at(3_000) + 2 * leases.TOMB_LIFE
            assert lm.revisions.read_rows(G, lambda r: r.has_tombstones())
    assert _tombs(lm, G) == [] and not lm.revisions.read_rows(G, lambda r: r.has_tombstones())
    lm.close()
