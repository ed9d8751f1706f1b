"""A TXN's put with a lease (`txn.PUT_LEASE`) and compare of a key's lease (`Target.LEASE`): its codec (round trips, truncations, hostile bytes:
ValueError only), its feature level (5: `version.FORM_LEVELS`), its apply (the key attached as a
LEASE_PUT attaches it; a lease that may not attach refuses the whole transaction, nothing
written) and the wire checks of `TxnPut.lease` (`server/txn_wire.py`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from txncodec import encoded_or_refused

from kvstore import errors
from kvstore.node.version import (
    FORM_LEVELS,
    LEVEL_LEASES,
    LEVEL_LEASES_2,
    LEVEL_TRANSACTIONS,
    LEVEL_TXN_RANGES,
    SUPPORTED_LEVEL,
    ClusterVersion,
    CommandGate,
    command_level,
)
from kvstore.server.txn_wire import txn_from_proto
from kvstore.storage import leases
from kvstore.storage.commands import Command, Op, decode_command, encode_command
from kvstore.storage.leases import Kind, LeaseCmd
from kvstore.storage.machine import DictState
from kvstore.storage.txn import (
    PUT_LEASE,
    CmpResult,
    Compare,
    OpKind,
    Target,
    Txn,
    TxnOp,
    decode_txn,
    encode_txn,
    has_lease,
)
from kvstore.v1 import kv_pb2

G = 3
LID = leases.make_id(G, 4242)


def lput(k: bytes, v: bytes, lease: int = LID, checked: int = 0) -> TxnOp:
    return TxnOp(OpKind.PUT, k, v, lease=lease, checked=checked)


def absent(k: bytes) -> Compare:
    return Compare(k, Target.CREATE, CmpResult.EQUAL, b"", 0)


def run(s: DictState, t: Txn) -> object:
    return s.apply(encode_command(Command.transaction(t, 0, 0, 0, False, 0, 0)))


def lease_cmd(s: DictState, c: LeaseCmd) -> object:
    return s.apply(encode_command(Command.lease_command(c)))


# --- codec ---------------------------------------------------------------------------------------
keys = st.sampled_from([b"a", b"b", b"c", b"lock/1", b"lock/2"])
lease_ids = st.one_of(st.just(0), st.integers(1, (1 << 63) - 1))
ops = st.one_of(
    st.builds(lambda k, v, lid, c: TxnOp(OpKind.PUT, k, v, lease=lid, checked=c if lid else 0),
              keys, st.binary(max_size=6), lease_ids, st.integers(0, (1 << 63) - 1)),
    st.builds(lambda k: TxnOp(OpKind.GET, k), keys),
    st.builds(lambda k: TxnOp(OpKind.DELETE, k), keys),
)
cmps = st.one_of(st.builds(absent, keys),
                 st.builds(lambda k, n: Compare(k, Target.LEASE, CmpResult.EQUAL, b"", n), keys, st.integers(0, 9)))
leaf_txns = st.builds(Txn, st.lists(cmps, max_size=2).map(tuple),
                      st.lists(ops, max_size=3).map(tuple), st.lists(ops, max_size=3).map(tuple))
txns = st.one_of(leaf_txns, st.builds(lambda inner, o: Txn((), (TxnOp(OpKind.TXN, txn=inner), *o)),
                                      leaf_txns, st.lists(ops, max_size=2).map(tuple)))


@settings(max_examples=200, deadline=None)
@given(txns)
def test_leased_puts_round_trip_and_every_prefix_is_refused(t: Txn) -> None:
    data = encoded_or_refused(t)
    if data is None:
        return
    assert decode_txn(data) == t
    cmd = Command.transaction(t, 7, 8, 0, False, 0, 99)
    wire = encode_command(cmd)
    assert decode_command(wire) == cmd
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            decode_txn(data[:cut])
    assert command_level(wire) == (LEVEL_LEASES_2 if has_lease(t) else LEVEL_TRANSACTIONS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=160), st.integers(0, 40))
def test_the_decoder_is_total_on_garbage_around_a_leased_put(data: bytes, at: int) -> None:
    good = encode_txn(Txn((absent(b"k"),), (lput(b"k", b"v", checked=5),)))
    for blob in (data, good[:at] + data, good + data[:1]):
        try:
            t = decode_txn(blob)
        except ValueError:
            continue
        assert decode_txn(encode_txn(t)) == t  # what decodes is canonical


def test_invalid_leases_are_refused_both_ways() -> None:
    for bad in (lput(b"k", b"v", lease=leases.make_id(1, 1) & ~leases.ID_GROUP_MASK),  # homed in group 0
                lput(b"k", b"v", checked=-1), TxnOp(OpKind.PUT, b"k", b"v", checked=3),
                TxnOp(OpKind.GET, b"k", lease=LID), TxnOp(OpKind.DELETE, b"k", lease=LID)):
        with pytest.raises(ValueError):
            encode_txn(Txn((), (bad,)))
    # lease 0 in the PUT_LEASE form is not canonical (that is a plain PUT)
    plain = encode_txn(Txn((), (TxnOp(OpKind.PUT, b"k", b"v"),)))
    forged = plain[:6] + bytes([PUT_LEASE]) + plain[7:] + bytes(16)
    with pytest.raises(ValueError):
        decode_txn(forged)


def test_the_gate_refuses_a_leased_txn_below_level_5() -> None:
    assert LEVEL_LEASES_2 < FORM_LEVELS[Op.TXN] == LEVEL_TXN_RANGES < SUPPORTED_LEVEL  # TXN's newest form: 6
    assert command_level(encode_command(Command.transaction(Txn((), (lput(b"k", b"v"),))))) == LEVEL_LEASES_2
    leased = encode_command(Command.transaction(Txn((), (lput(b"k", b"v"),))))
    plain = encode_command(Command.transaction(Txn((), (TxnOp(OpKind.PUT, b"k", b"v"),))))
    gate = CommandGate(lambda: ClusterVersion(LEVEL_LEASES, {1: LEVEL_LEASES}), lambda: {1})
    gate.check(plain)
    with pytest.raises(errors.ClusterVersionTooLow) as e:
        gate.check(leased)
    assert e.value.definite and "TXN with a lease needs cluster version 5" in e.value.message
    CommandGate(lambda: ClusterVersion(LEVEL_LEASES_2, {1: LEVEL_LEASES_2}), lambda: {1}).check(leased)


# --- apply ---------------------------------------------------------------------------------------
def test_a_txn_attaches_its_leased_put_and_the_revoke_deletes_it() -> None:
    s = DictState(group=G)
    lease_cmd(s, LeaseCmd(Kind.GRANT, LID, ttl_s=10))
    r = run(s, Txn((absent(b"lock/1"),), (lput(b"lock/1", b""), TxnOp(OpKind.GET, b"lock/1")),
                   (TxnOp(OpKind.GET, b"lock/1"),)))
    assert not r.error and r.txn.succeeded and r.revision  # type: ignore[attr-defined]
    assert leases.lease_of(s.rows, b"lock/1") == LID and leases.attached_count(s.rows, LID) == 1
    # the same compare again takes the failure branch: no write, the key stays attached
    r2 = run(s, Txn((absent(b"lock/1"),), (lput(b"lock/1", b""),), (TxnOp(OpKind.GET, b"lock/1"),)))
    assert not r2.txn.succeeded and r2.txn.responses[0].found and r2.revision == 0  # type: ignore[attr-defined]
    # a plain put in a transaction detaches, as a plain PUT does
    run(s, Txn((), (TxnOp(OpKind.PUT, b"other", b"x"), lput(b"lock/2", b"y"))))
    run(s, Txn((), (TxnOp(OpKind.PUT, b"lock/2", b"z"),)))
    assert leases.lease_of(s.rows, b"lock/2") == 0 and leases.attached_count(s.rows, LID) == 1
    lease_cmd(s, LeaseCmd(Kind.REVOKE, LID))
    assert b"lock/1" not in s.data and s.data[b"lock/2"] == b"z"


def test_a_dead_or_unknown_lease_refuses_the_whole_txn() -> None:
    s = DictState(group=G)
    t = Txn((), (TxnOp(OpKind.PUT, b"plain", b"1"), lput(b"leased", b"2")))
    before = dict(s.data)
    r = run(s, t)  # never granted
    assert r.error == leases.NOT_FOUND and r.revision == 0 and s.data == before  # type: ignore[attr-defined]
    lease_cmd(s, LeaseCmd(Kind.GRANT, LID, ttl_s=10))
    assert not run(s, t).error  # type: ignore[attr-defined]
    lease_cmd(s, LeaseCmd(Kind.REVOKE, LID))
    assert run(s, Txn((), (TxnOp(OpKind.PUT, b"plain", b"3"), lput(b"again", b"4")))).error == leases.NOT_FOUND  # type: ignore[attr-defined]
    assert s.data == {b"plain": b"1"}  # the revoke took `leased`; the refused txn wrote nothing
    # a leased put on the branch not taken does not refuse it (etcd checks the path taken)
    r = run(s, Txn((absent(b"plain"),), (lput(b"never", b"x"),), (TxnOp(OpKind.GET, b"plain"),)))
    assert not r.error and not r.txn.succeeded  # type: ignore[attr-defined]


def test_outside_the_home_a_tombstone_or_a_stale_check_refuses() -> None:
    other = DictState(group=5)
    assert leases.home_group(LID) != 5
    assert not run(other, Txn((), (lput(b"k1", b"v"),))).error  # type: ignore[attr-defined]  # checked 0 on a fresh group
    assert leases.lease_of(other.rows, b"k1") == LID
    lease_cmd(other, LeaseCmd(Kind.DROP, LID))
    assert run(other, Txn((), (lput(b"k2", b"v"),))).error == leases.NOT_FOUND  # type: ignore[attr-defined]
    assert other.data == {}
    # a check older than LEASE_PUT_MAX_AGE behind the group's last revision is refused too
    late = DictState(group=5)
    now = 4 * leases.LEASE_PUT_MAX_AGE
    late.apply(encode_command(Command.transaction(Txn((), (TxnOp(OpKind.PUT, b"x", b"1"),)), revision=now)))
    assert run(late, Txn((), (lput(b"k", b"v", checked=1),))).error == leases.NOT_FOUND  # type: ignore[attr-defined]
    assert not run(late, Txn((), (lput(b"k", b"v", checked=now),))).error  # type: ignore[attr-defined]
    assert leases.lease_of(late.rows, b"k") == LID


def test_the_count_limit_counts_one_txns_attachments_together() -> None:
    s = DictState(group=G)
    lease_cmd(s, LeaseCmd(Kind.GRANT, LID, ttl_s=10))
    for i in range(leases.MAX_KEYS_PER_LEASE - 1):
        leases.attach(s.rows, b"k%d" % i, LID)  # rows only: the count row is what the limit reads
    r = run(s, Txn((), (lput(b"n1", b""), lput(b"n2", b""))))
    assert r.error == leases.TOO_MANY_KEYS and b"n1" not in s.data  # type: ignore[attr-defined]
    assert not run(s, Txn((), (lput(b"n1", b""), lput(b"k0", b"")))).error  # type: ignore[attr-defined]  # k0: attached already


# --- wire ----------------------------------------------------------------------------------------
def _ok(_b: bytes) -> None:
    return None


def test_the_wire_checks_a_puts_lease() -> None:
    body = kv_pb2.TxnBody(success=[kv_pb2.TxnOp(put=kv_pb2.TxnPut(key=b"k", value=b"v", lease=LID, checked=9))])
    t = txn_from_proto(body, _ok, _ok)
    assert t.success[0].lease == LID and t.success[0].checked == 9
    for put in (kv_pb2.TxnPut(key=b"k", lease=-1), kv_pb2.TxnPut(key=b"k", lease=LID & ~leases.ID_GROUP_MASK),
                kv_pb2.TxnPut(key=b"k", lease=LID, checked=-2), kv_pb2.TxnPut(key=b"k", checked=3)):
        with pytest.raises(errors.InvalidArgument):
            txn_from_proto(kv_pb2.TxnBody(success=[kv_pb2.TxnOp(put=put)]), _ok, _ok)


def test_a_lease_compare_reads_the_attachment_and_the_txns_own_put() -> None:
    s = DictState(group=G)
    lease_cmd(s, LeaseCmd(Kind.GRANT, LID, ttl_s=10))
    run(s, Txn((), (lput(b"k", b"v"), TxnOp(OpKind.PUT, b"plain", b"p"))))
    is_lid = Compare(b"k", Target.LEASE, CmpResult.EQUAL, b"", LID)
    r = run(s, Txn((is_lid, Compare(b"plain", Target.LEASE, CmpResult.EQUAL, b"", 0),
                    Compare(b"missing", Target.LEASE, CmpResult.EQUAL, b"", 0)), (TxnOp(OpKind.GET, b"k"),)))
    assert r.txn.succeeded  # type: ignore[attr-defined]
    # inside one transaction a plain put detaches: a nested compare sees lease 0
    r = run(s, Txn((is_lid,), (TxnOp(OpKind.PUT, b"k", b"w"),
                               TxnOp(OpKind.TXN, txn=Txn((Compare(b"k", Target.LEASE, CmpResult.EQUAL, b"", 0),))))))
    assert r.txn.succeeded and r.txn.responses[1].txn.succeeded  # type: ignore[attr-defined]
    assert not run(s, Txn((is_lid,))).txn.succeeded  # type: ignore[attr-defined]
    assert command_level(encode_command(Command.transaction(Txn((is_lid,))))) == LEVEL_LEASES_2


INT64 = st.integers(-(2**63), 2**63 - 1)
wire_puts = st.builds(kv_pb2.TxnPut, key=st.sampled_from([b"", b"k", b"j"]), value=st.binary(max_size=4),
                      lease=st.one_of(INT64, st.just(LID)), checked=st.one_of(INT64, st.just(0)))
wire_cmps = st.builds(kv_pb2.Compare, key=st.sampled_from([b"", b"k"]), target=st.integers(0, 7),
                      result=st.integers(0, 5), number=INT64, value=st.binary(max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(wire_cmps, max_size=3), st.lists(wire_puts, max_size=3))
def test_the_wire_conversion_is_total(cmps: list[kv_pb2.Compare], puts: list[kv_pb2.TxnPut]) -> None:
    """Hostile compares and puts (leases, checked revisions, targets incl. COMPARE_LEASE): a
    transaction or a definite InvalidArgument, nothing else; what converts encodes."""
    body = kv_pb2.TxnBody(compares=cmps, success=[kv_pb2.TxnOp(put=p) for p in puts])

    def key_ok(k: bytes) -> None:
        if not k:
            raise errors.InvalidArgument("empty key")

    try:
        t = txn_from_proto(body, key_ok, _ok)
    except errors.InvalidArgument as err:
        assert err.definite
        return
    assert decode_txn(encode_txn(t)) == t
