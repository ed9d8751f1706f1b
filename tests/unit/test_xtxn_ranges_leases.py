"""A transaction across groups with BOTH range deletes and leased puts (txndel's ranges beside
xlease's leased puts): the PREPARE's form 4 (a range lock with leases) and its answer, the
COMMIT/RECORD carrying tails 3 and 4, the apply (a range deletion never deletes a key the path
puts with a lease after it; a leased key the range deletes is detached), a resolver committing
it from the record, and the level the combined forms need (7)."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st
from test_xtxn_leases import HOME, LID, OTHER, START, T1, T2, groups, lput, run_txn

from kvstore.node import xtxn as logic
from kvstore.node.version import LEVEL_TXN_RANGES, LEVEL_XTXN_LEASES, command_level
from kvstore.storage import leases, txn, xtxn
from kvstore.storage.commands import Command, decode_command, encode_command
from kvstore.storage.machine import DictState
from kvstore.storage.txn import OpKind, Txn, TxnOp
from kvstore.storage.xtxn import Intent, TxnId, XCmd, XOp

WHERE = {b"h/1": HOME, b"h/2": HOME, b"o/1": OTHER, b"o/2": OTHER, b"o/3": OTHER, b"o/4": OTHER}
T3 = TxnId(3, 3)


def seeded() -> dict[int, DictState]:
    """o/1 attached to LID, o/2 and h/2 plain (all in the range [a, z))."""
    gs = groups()
    run_txn(gs, Txn((), (lput(b"o/1"), TxnOp(OpKind.PUT, b"o/2", b"p"), TxnOp(OpKind.PUT, b"h/2", b"p"))),
            WHERE, T2)
    assert leases.attached_keys(gs[OTHER].rows, LID) == [b"o/1"]
    return gs


# o/4 is put with the lease and then deleted by the range (its final state: absent, no leased
# put); the range deletes o/1 (attached: detached), o/2 and h/2; o/3 and h/1 are put with the
# lease after the range (their final state: put and attached, never deleted by the range).
BOTH = Txn((), (lput(b"h/1"), lput(b"o/4"), TxnOp(OpKind.DELETE_RANGE, b"a", end=b"z"), lput(b"o/3"),
                TxnOp(OpKind.PUT, b"h/1", b"again", lease=LID, checked=START)))


def plan_both(t: Txn) -> logic.Plan:
    return logic.plan_ranges(t, ((k, WHERE[k]) for k, _ in txn.keys_of(t)), sorted(WHERE.values()))


def check_after(gs: dict[int, DictState]) -> None:
    assert gs[OTHER].get(b"o/1") is None and gs[OTHER].get(b"o/2") is None and gs[HOME].get(b"h/2") is None
    assert gs[OTHER].get(b"o/4") is None and leases.lease_of(gs[OTHER].rows, b"o/4") == 0
    assert gs[OTHER].get(b"o/3") == b"v-o/3" and gs[HOME].get(b"h/1") == b"again"
    assert leases.attached_keys(gs[OTHER].rows, LID) == [b"o/3"]
    assert leases.attached_keys(gs[HOME].rows, LID) == [b"h/1"]
    for s in gs.values():
        assert not s.rows.has_locks()


def prepared_and_decided(gs: dict[int, DictState], t: Txn) -> tuple[logic.Plan, logic.Ready]:
    p = plan_both(t)
    assert p.lock == (b"a", b"z") and p.leased == {HOME: ((b"h/1", LID, START),),
                                                   OTHER: ((b"o/4", LID, START), (b"o/3", LID, START))}
    cmds = logic.prepare_commands(p, T1, START, START)
    assert {command_level(c) for c in cmds.values()} == {LEVEL_XTXN_LEASES}  # form 4: range lock + leases
    assert all(decode_command(c).x.lock == (b"a", b"z") for c in cmds.values())  # type: ignore[union-attr]
    r = logic.after_prepare(t, p, {g: gs[g].apply(cmds[g]) for g in sorted(cmds)})
    assert isinstance(r, logic.Ready), r
    assert r.ranges == ((b"a", b"z"),)
    assert r.leased == {HOME: ((b"h/1", LID, START),), OTHER: ((b"o/3", LID, START),)}
    assert dict(r.writes[OTHER]) == {b"o/4": None, b"o/3": b"v-o/3"}  # o/1, o/2: the range's, at COMMIT
    return p, r


def test_a_range_delete_and_leased_puts_commit_together_across_groups() -> None:
    gs = seeded()
    p, r = prepared_and_decided(gs, BOTH)
    record = logic.record_command(T1, START, r)
    assert command_level(record) == LEVEL_XTXN_LEASES  # ranges (6) and leased puts (7): the highest
    assert gs[p.primary].apply(record).error is None
    for g, data in logic.commit_commands(T1, r, sorted(p.keys)).items():
        assert command_level(data) == (LEVEL_XTXN_LEASES if r.leased.get(g) else LEVEL_TXN_RANGES)
        assert gs[g].apply(data).error is None
    check_after(gs)


def test_a_resolver_commits_both_from_the_record() -> None:
    """The coordinator died after its RECORD and the primary's COMMIT: a resolver's COMMIT of the
    other group comes from the record, with its ranges and its leased puts."""
    gs = seeded()
    p, r = prepared_and_decided(gs, BOTH)
    other = next(g for g in p.keys if g != p.primary)
    assert gs[p.primary].apply(logic.record_command(T1, START, r)).error is None
    assert gs[p.primary].apply(logic.commit_commands(T1, r, [p.primary])[p.primary]).error is None
    assert gs[p.primary].apply(logic.finalize_command(T1, p.primary)).error is None
    intent = Intent(T1, p.primary, START, START)
    answer = gs[p.primary].apply(logic.resolve_command(intent))
    rec = logic.committed_record(answer)
    assert rec is not None and rec.ranges == r.ranges and rec.leased == r.leased[other]
    follow = logic.resolution(intent, other, answer)
    assert follow is not None and decode_command(follow).x == XCmd(
        XOp.COMMIT, T1, at=r.at, writes=r.writes[other], leased=r.leased[other], ranges=r.ranges)
    assert gs[other].apply(follow).error is None
    check_after(gs)


def test_the_combined_forms_round_trip_and_refuse_garbage() -> None:
    x = XCmd(XOp.PREPARE, T1, HOME, START, keys=(b"h/1",), lock=(b"a", b"z"), leased=((b"h/1", LID, 5),),
             read_leases=True)
    raw = encode_command(Command.cross(x))
    assert decode_command(raw).x == x
    c = XCmd(XOp.COMMIT, T1, at=START, writes=((b"h/1", b"v"),), leased=((b"h/1", LID, 5),), ranges=((b"a", b"z"),))
    assert decode_command(encode_command(Command.cross(c))).x == c
    found = [b"h/2", b"h/3"]
    both = xtxn.encode_prepared_found_leases(found, (LID,), (xtxn.REFUSAL_NONE,))
    assert xtxn.decode_prepared_found_leases(both) == (found, (LID,), (xtxn.REFUSAL_NONE,))
    for cut in range(len(both)):  # total: a cut answer decodes or raises ValueError, nothing else
        with contextlib.suppress(ValueError):
            xtxn.decode_prepared_found_leases(both[:cut])


@st.composite
def form4_st(draw: st.DrawFn) -> XCmd:
    keys = draw(st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    leased = draw(st.lists(st.tuples(st.sampled_from(keys), st.sampled_from([LID, LID + 1]),
                                     st.integers(0, leases.MAX_CHECKED)), max_size=3, unique=True))
    read = draw(st.booleans()) or not leased
    lo = draw(st.binary(min_size=1, max_size=4))
    hi = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=4).map(lambda b: lo + b)))
    return XCmd(XOp.PREPARE, T1, HOME, START, keys=tuple(keys), lock=(lo, hi), leased=tuple(leased), read_leases=read)


@settings(max_examples=150, deadline=None)
@given(form4_st(), st.data())
def test_form4_round_trips_and_mangled_raises_value_error_only(x: XCmd, data: st.DataObject) -> None:
    raw = encode_command(Command.cross(x))
    assert decode_command(raw).x == x
    b = bytearray(raw)
    b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    for m in (bytes(b), raw[:data.draw(st.integers(0, len(raw)))]):
        with contextlib.suppress(ValueError):
            decode_command(m)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_the_combined_answer_decoder_is_total(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        xtxn.decode_prepared_found_leases(raw)
