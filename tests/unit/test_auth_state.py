"""The auth state machine, password hashes, tokens and RBAC grants (pure parts), with hypothesis
fuzzing of the state decoder, token parsing and the authorization metadata."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.security import passwords, tokens
from kvstore.security.authstate import (
    MAX_USERS,
    AuthCommand,
    AuthError,
    AuthOp,
    AuthState,
    Permission,
    PermKind,
)
from kvstore.security.identity import token_of
from kvstore.security.rbac import READ, READWRITE, WRITE, Grants

KEY = b"k" * 32


def build() -> AuthState:
    s = AuthState()
    for cmd in [
        AuthCommand(AuthOp.USER_ADD, user="root", password=b"h-root"),
        AuthCommand(AuthOp.USER_ADD, user="alice", password=b"h-alice"),
        AuthCommand(AuthOp.ROLE_ADD, role="rw"),
        AuthCommand(AuthOp.ROLE_GRANT, role="rw", perm=Permission(b"a/", b"a0", PermKind.READWRITE)),
        AuthCommand(AuthOp.ROLE_GRANT, role="rw", perm=Permission(b"one", b"", PermKind.READ)),
        AuthCommand(AuthOp.USER_GRANT, user="alice", role="rw"),
        AuthCommand(AuthOp.ENABLE, token_key=KEY),
    ]:
        s = s.apply(cmd)
    return s


def test_commands_build_a_state_that_round_trips_one_version_per_change() -> None:
    s = build()
    assert s.version == 7 and s.enabled and s.token_key == KEY
    assert AuthState.decode(s.encode()) == s
    assert s.users["alice"].roles == ("rw",) and s.is_admin("root") and not s.is_admin("alice")


def test_invalid_commands_are_refused_and_change_nothing() -> None:
    s = build()
    bad = [
        AuthCommand(AuthOp.USER_ADD, user="alice"),  # exists
        AuthCommand(AuthOp.USER_ADD, user="no spaces"),
        AuthCommand(AuthOp.USER_DELETE, user="root"),  # root while enabled
        AuthCommand(AuthOp.USER_GRANT, user="alice", role="nope"),
        AuthCommand(AuthOp.ROLE_GRANT, role="rw", perm=Permission(b"b", b"a", PermKind.READ)),  # end before key
        AuthCommand(AuthOp.ROLE_REVOKE, role="rw", perm=Permission(b"zz", b"", PermKind.READ)),
        AuthCommand(AuthOp.ENABLE, token_key=b"short"),
    ]
    for cmd in bad:
        with pytest.raises(AuthError):
            s.apply(cmd)
    with pytest.raises(AuthError):
        AuthState().apply(AuthCommand(AuthOp.ENABLE, token_key=KEY))  # no root yet


def test_role_delete_revokes_it_and_password_change_raises_revision() -> None:
    s = build().apply(AuthCommand(AuthOp.ROLE_DELETE, role="rw"))
    assert s.users["alice"].roles == () and "rw" not in s.roles
    rev = s.users["alice"].revision
    s2 = s.apply(AuthCommand(AuthOp.USER_PASSWD, user="alice", password=b"h2"))
    assert s2.users["alice"].revision == rev + 1


def test_user_count_is_bounded() -> None:
    s = AuthState()
    for i in range(MAX_USERS):
        s = s.apply(AuthCommand(AuthOp.USER_ADD, user=f"u{i}"))
    with pytest.raises(AuthError):
        s.apply(AuthCommand(AuthOp.USER_ADD, user="one-too-many"))


def test_passwords_verify_only_the_right_password() -> None:
    h = passwords.hash_password("secret", log2_n=10)
    assert passwords.verify_password("secret", h)
    assert not passwords.verify_password("Secret", h)
    assert not passwords.verify_password("secret", h[:-1])
    assert passwords.hash_password("secret", log2_n=10) != h  # salted
    with pytest.raises(ValueError):
        passwords.check_password("")


def test_tokens_expire_and_die_with_revision_or_key_change() -> None:
    s = build()
    t = tokens.issue(KEY, "alice", s.users["alice"].revision, now=1000.0, ttl=60)
    assert tokens.validate(t, s, 1059.0).user == "alice"
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.validate(t, s, 1060.0)
    s2 = s.apply(AuthCommand(AuthOp.USER_PASSWD, user="alice", password=b"h2"))
    with pytest.raises(tokens.TokenError, match="revoked"):
        tokens.validate(t, s2, 1001.0)
    s3 = s.apply(AuthCommand(AuthOp.DISABLE)).apply(AuthCommand(AuthOp.ENABLE, token_key=b"x" * 32))
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.validate(t, s3, 1001.0)
    forged = t[:-3] + ("AAA" if not t.endswith("AAA") else "BBB")
    with pytest.raises(tokens.TokenError):
        tokens.validate(forged, s, 1001.0)


def test_grants_check_keys_and_ranges() -> None:
    g = Grants.of(build(), "alice")
    assert g.allows(b"a/x", READ) and g.allows(b"a/x", WRITE) and g.allows(b"a/x", READWRITE)
    assert g.allows(b"one", READ) and not g.allows(b"one", WRITE) and not g.allows(b"one1", READ)
    assert not g.allows(b"a0", READ) and not g.allows(b"b", READ)
    assert g.allows_range(b"a/", b"a0", READ) and not g.allows_range(b"a/", None, READ)
    assert not g.allows_range(b"a", b"a/z", READ)
    assert Grants.of(build(), "root").allows(b"anything", WRITE)
    assert not Grants.of(build(), "nobody").allows(b"a/x", READ)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_state_decode_is_total(data: bytes) -> None:
    try:
        s = AuthState.decode(data)
    except AuthError:
        return
    assert AuthState.decode(s.encode()) == s


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255), st.binary(max_size=4))
def test_state_decode_survives_mutations(pos: int, byte: int, extra: bytes) -> None:
    raw = bytearray(build().encode())
    raw[pos % len(raw)] = byte
    for data in (bytes(raw), bytes(raw) + extra, bytes(raw[: pos % len(raw)])):
        with contextlib.suppress(AuthError):
            AuthState.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.builds(lambda b: "kv1." + b, st.text(max_size=200)))
def test_token_parsing_is_total(text: str) -> None:
    try:
        tokens.validate(text, build(), 0.0)
    except tokens.TokenError:
        return
    raise AssertionError("a random text validated as a token")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["authorization", "x", "user-agent"]),
                          st.text(max_size=40) | st.builds(lambda t: "Bearer " + t, st.text(max_size=40))),
                max_size=4))
def test_authorization_metadata_parsing_is_total(md: list[tuple[str, str]]) -> None:
    auth = [v for k, v in md if k == "authorization"]
    try:
        got = token_of(md)
    except ValueError:
        assert len(auth) > 1 or not auth[0].startswith("Bearer ")
        return
    assert (got is None) == (not auth)


def test_a_peer_can_only_cas_the_auth_state_one_valid_version_forward() -> None:
    from kvstore import errors
    from kvstore.node.grouprequests import check_auth_change

    s = build()
    nxt = s.apply(AuthCommand(AuthOp.ROLE_ADD, role="x"))
    check_auth_change(False, s.encode(), nxt.encode())
    check_auth_change(True, b"", AuthState().apply(AuthCommand(AuthOp.USER_ADD, user="root")).encode())
    for expect_absent, old, new in [
        (False, s.encode(), b"garbage"),
        (False, b"garbage", nxt.encode()),
        (False, s.encode(), nxt.apply(AuthCommand(AuthOp.ROLE_ADD, role="y")).encode()),  # skips a version
        (False, nxt.encode(), s.encode()),  # backwards
    ]:
        with pytest.raises(errors.InvalidArgument):
            check_auth_change(expect_absent, old, new)
