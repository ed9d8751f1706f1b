"""The pure conversions of etcd's Cluster and Maintenance services
(`kvstore/server/etcd/ops.py`): peer URLs to member addresses (total: fuzzed from arbitrary
text, anything not http(s)://HOST:PORT is the one request error), kvstore members as etcd's,
member ids, alarm types both ways, and the node hash."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.security.authstate import AuthCommand, AuthOp
from kvstore.server.etcd.convert import EtcdRequestError
from kvstore.server.etcd.ops import (
    NEW_MEMBER_IDS,
    etcd_alarms,
    hash32,
    kvstore_alarm,
    member_of,
    new_member_id,
    one_peer_address,
    peer_address,
)
from kvstore.v1 import admin_pb2


@pytest.mark.parametrize("url, address", [
    ("http://127.0.0.1:2380", "127.0.0.1:2380"),
    ("https://node-a.example:7", "node-a.example:7"),
    ("10.0.0.1:5", "10.0.0.1:5"),
    ("http://[::1]:2380/", "[::1]:2380"),
])
def test_peer_urls(url: str, address: str) -> None:
    assert peer_address(url) == address


@pytest.mark.parametrize("url", ["", "http://host", "ftp://h:1", "http://h:0", "http://h:99999", "http://u:p@h:1",
                                 "http://h:1/path", "http://h:1?q", "http://:1", "x" * 2000, "http://h :1"])
def test_bad_peer_urls_are_refused(url: str) -> None:
    with pytest.raises(EtcdRequestError) as e:
        peer_address(url)
    assert e.value.code == "INVALID_ARGUMENT"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"(https?://)?[a-z0-9.\[\]:]{0,20}(:[0-9]{0,6})?/?", fullmatch=True))
def test_peer_address_is_total(url: str) -> None:
    """Any text: an address HOST:PORT (a valid port, and a peer URL again) or the one error."""
    try:
        a = peer_address(url)
    except EtcdRequestError as err:
        assert err.code == "INVALID_ARGUMENT"
        return
    host, port = a.rsplit(":", 1)
    assert host and 0 < int(port) < 65536
    assert peer_address(f"http://{a}") == a


def test_one_peer_url_per_member() -> None:
    assert one_peer_address(["http://h:1"]) == "h:1"
    for urls in ([], ["http://h:1", "http://h:2"]):
        with pytest.raises(EtcdRequestError):
            one_peer_address(urls)


def test_members_as_etcd_shows_them() -> None:
    m = member_of(admin_pb2.Member(id=3, address="127.0.0.1:5", learner=True, client_address="127.0.0.1:6"))
    assert (m.ID, m.name, list(m.peerURLs), list(m.clientURLs), m.isLearner) == (
        3, "kvstore-3", ["http://127.0.0.1:5"], ["http://127.0.0.1:5", "http://127.0.0.1:6"], True)
    unknown = member_of(admin_pb2.Member(id=4))  # a member whose address this node does not know
    assert (unknown.name, list(unknown.peerURLs), list(unknown.clientURLs)) == ("", [], [])


def test_new_member_ids_are_drawn_unused_and_above_hand_numbered_ids() -> None:
    """As etcd's server: a random id, never a member's; drawn above the ids operators number
    nodes with (1, 2, 3, ...), so the highest + 1 (a just-removed node's id) is never chosen
    the way it was on main."""
    low, high = NEW_MEMBER_IDS
    assert 3 < low < high <= 10**15
    draws = iter([low + 7, low + 7, low + 9])
    assert new_member_id([1, 2, 3, low + 7], lambda lo, hi: next(draws)) == low + 9
    import random

    rng = random.Random(18)
    ids = {new_member_id([1, 2, 3], lambda lo, hi: rng.randrange(lo, hi)) for _ in range(200)}
    assert len(ids) == 200 and all(low <= i < high for i in ids) and 4 not in ids
    with pytest.raises(EtcdRequestError):
        new_member_id([low], lambda lo, hi: lo)
    with pytest.raises(ValueError):
        new_member_id([], lambda lo, hi: 4)


@given(st.integers(-(2**31), 2**31 - 1))
def test_alarm_types_are_total(t: int) -> None:
    try:
        k = kvstore_alarm(t)
    except EtcdRequestError as err:
        assert err.code == "INVALID_ARGUMENT" and t not in (0, 1, 2)
        return
    assert k == {rpc_pb2.NONE: admin_pb2.ALARM_NONE, rpc_pb2.NOSPACE: admin_pb2.ALARM_NOSPACE,
                 rpc_pb2.CORRUPT: None}[t]


def test_alarms_as_etcd() -> None:
    got = etcd_alarms([admin_pb2.Alarm(node_id=2, type=admin_pb2.ALARM_NOSPACE), admin_pb2.Alarm(node_id=3)])
    assert [(a.memberID, a.alarm) for a in got] == [(2, rpc_pb2.NOSPACE)]


@given(st.dictionaries(st.integers(1, 4095), st.binary(min_size=32, max_size=32), max_size=6))
def test_node_hash_is_order_free_and_sees_every_group(parts: dict[int, bytes]) -> None:
    h = hash32(parts.items())
    assert 0 <= h < 2**32
    assert h == hash32(reversed(list(parts.items())))
    for gid, digest in parts.items():
        changed = {**parts, gid: bytes([digest[0] ^ 1]) + digest[1:]}
        assert hash32(changed.items()) != h


def test_etcd_root_role_is_kvstores_admin_role_both_ways() -> None:
    from kvstore.server.etcd.ops import role_to_etcd, role_to_kvstore

    assert role_to_kvstore("root") == "admin" and role_to_etcd("admin") == "root"
    assert role_to_kvstore("admin") == "root" and role_to_kvstore("r1") == "r1"


@given(st.text(max_size=20))
def test_role_names_map_one_to_one(name: str) -> None:
    from kvstore.server.etcd.ops import role_to_etcd, role_to_kvstore

    assert role_to_etcd(role_to_kvstore(name)) == name


@given(st.integers(-(2**31), 2**31 - 1))
def test_permission_types_are_total(t: int) -> None:
    from kvstore.server.etcd.ops import perm_kind, perm_type

    try:
        k = perm_kind(t)
    except EtcdRequestError as err:
        assert err.code == "INVALID_ARGUMENT" and t not in (0, 1, 2)
        return
    assert perm_type(k) == t


@pytest.mark.parametrize("op, code, etcd", [
    (lambda st: st.apply(AuthCommand(AuthOp.USER_ADD, user="alice")), "FAILED_PRECONDITION",
     "etcdserver: user name already exists"),
    (lambda st: st.apply(AuthCommand(AuthOp.USER_DELETE, user="bob")), "FAILED_PRECONDITION",
     "etcdserver: user name not found"),
    (lambda st: st.apply(AuthCommand(AuthOp.USER_GRANT, user="alice", role="r")), "FAILED_PRECONDITION",
     "etcdserver: role name not found"),
    (lambda st: st.apply(AuthCommand(AuthOp.ROLE_ADD, role="r")).apply(AuthCommand(AuthOp.ROLE_ADD, role="r")),
     "FAILED_PRECONDITION",
     "etcdserver: role name already exists"),
    (lambda st: st.apply(AuthCommand(AuthOp.ROLE_ADD, role="r")).apply(
        AuthCommand(AuthOp.USER_REVOKE, user="alice", role="r")), "FAILED_PRECONDITION",
     "etcdserver: role is not granted to the user"),
    (lambda st: st.apply(AuthCommand(AuthOp.ENABLE, token_key=b"k" * 32)), "FAILED_PRECONDITION",
     "etcdserver: root user does not exist"),
])
def test_auth_refusals_as_etcds_by_their_error_class(op: Any, code: str, etcd: str) -> None:
    """A refusal of kvstore's auth state machine, through the wire (`Error.refusal`), is etcd's
    error by its class, whatever its text."""
    from kvstore.security.authstate import AuthError, AuthState
    from kvstore.server.etcd.ops import auth_error

    st = AuthState().apply(AuthCommand(AuthOp.USER_ADD, user="alice"))
    with pytest.raises(AuthError) as e:
        op(st)
    err = errors.from_proto(errors.to_proto(e.value.as_kv_error()), is_write=True)
    assert isinstance(err, errors.Refused)
    assert auth_error(err) == (code, etcd)
    err.message = "some other words"
    assert auth_error(err) == (code, etcd)


@given(st.text(max_size=200), st.sampled_from([errors.InvalidArgument, *errors.REFUSALS.values()]))
def test_auth_error_mapping_is_total(message: str, cls: type[errors.InvalidArgument]) -> None:
    from kvstore.server.etcd.ops import auth_error

    code, text = auth_error(cls(message))
    assert code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT") and text.startswith("etcdserver: ")
    assert (code == "FAILED_PRECONDITION") == (cls not in (errors.InvalidArgument, errors.LeaseNotFound,
                                                           errors.LeaseExists))


@given(st.text(max_size=100), st.integers(-(2**31), 2**31 - 1))
def test_refusals_travel_the_wire_and_unknown_ones_stay_invalid_arguments(message: str, refusal: int) -> None:
    """`Error.refusal` decodes totally: a known one to its class, anything else to a plain
    InvalidArgument (never an exception); each class encodes to its own code."""
    from kvstore.v1 import kv_pb2

    e = kv_pb2.Error(code=kv_pb2.INVALID_ARGUMENT, message=message)
    e.refusal = refusal  # type: ignore[assignment]
    err = errors.from_proto(e, is_write=True)
    assert type(err) is errors.REFUSALS.get(refusal, errors.InvalidArgument) and err.definite
    for cls in errors.REFUSALS.values():
        back = errors.from_proto(errors.to_proto(cls(message or "x")), is_write=False)
        assert type(back) is cls and back.message == (message or "x")


@given(st.binary(max_size=20), st.integers(-(2**63), 2**63 - 1))
def test_lock_names_and_leases_are_checked_totally(name: bytes, lease: int) -> None:
    """A lock / election name and the caller's lease: accepted, or one definite refusal each."""
    import grpc

    from kvstore.server.etcd.recipes import recipe_lease, recipe_name
    from kvstore.server.etcd.status import EtcdStatus

    try:
        assert recipe_name(name) == name and name.rstrip(b"/")
    except EtcdRequestError as err:
        assert err.code == "INVALID_ARGUMENT" and not name.rstrip(b"/")
    try:
        assert recipe_lease(lease) == lease > 0
    except EtcdStatus as err:
        assert err.code == grpc.StatusCode.NOT_FOUND and err.message == "etcdserver: requested lease not found"


def test_lease_errors_map_by_class_not_by_text() -> None:
    """etcd's lease errors come from kvstore's error classes (`errors.LeaseNotFound`,
    `errors.LeaseExists`, which the server raises for the state machine's named refusals), not
    from words in a message."""
    import grpc

    from kvstore.server.etcd.status import LEASE_EXISTS, LEASE_NOT_FOUND, of_kv_error
    from kvstore.server.requests import _REFUSALS
    from kvstore.storage import leases

    got = of_kv_error(errors.LeaseNotFound("lease 7 is gone"))
    assert (got.code, got.message) == (grpc.StatusCode.NOT_FOUND, LEASE_NOT_FOUND)
    got = of_kv_error(errors.LeaseExists("taken"))
    assert (got.code, got.message) == (grpc.StatusCode.FAILED_PRECONDITION, LEASE_EXISTS)
    got = of_kv_error(errors.InvalidArgument("requested lease not found, says this text"))
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {leases.NOT_FOUND: errors.LeaseNotFound, leases.EXISTS: errors.LeaseExists} == _REFUSALS
