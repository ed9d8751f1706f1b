"""The write path's direct encoders (`encode_put`, `encode_delete`, `encode_cas`) against the
reference `encode_command` of the same `Command`: the same bytes for every accepted input, the
same ValueError (same message) for every refused one, and `decode_command` gives the command back.
Inputs are hostile: session numbers and revisions anywhere around the 64-bit range, keys around
the size limit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.storage import commands
from kvstore.storage.commands import MAX_KEY_SIZE, U64_MAX, Command, decode_command, encode_command

u64ish = st.one_of(
    st.integers(0, U64_MAX),
    st.sampled_from([0, 1, U64_MAX, U64_MAX + 1, -1, 1 << 70, -(1 << 64)]),
    st.integers(-(1 << 66), 1 << 66),
)
keys = st.one_of(st.binary(max_size=16), st.binary(min_size=MAX_KEY_SIZE - 2, max_size=MAX_KEY_SIZE + 2))
values = st.binary(max_size=64)
session = st.tuples(u64ish, u64ish, u64ish, st.booleans(), u64ish, u64ish)


def _outcome(fn: Callable[..., bytes], *args: Any) -> tuple[str, bytes | str]:
    try:
        return "ok", fn(*args)
    except ValueError as err:
        return "refused", str(err)


def _same(fast: Callable[[], bytes], cmd: Command) -> None:
    got, want = _outcome(fast), _outcome(encode_command, cmd)
    assert got == want
    if got[0] == "ok":
        assert isinstance(got[1], bytes)
        assert decode_command(got[1]) == cmd


@settings(max_examples=300, deadline=None)
@given(keys, values, session)
def test_encode_put_is_encode_command(key: bytes, value: bytes, s: tuple[int, int, int, bool, int, int]) -> None:
    _same(lambda: commands.encode_put(key, value, *s), Command.put(key, value, *s))


@settings(max_examples=300, deadline=None)
@given(keys, session)
def test_encode_delete_is_encode_command(key: bytes, s: tuple[int, int, int, bool, int, int]) -> None:
    _same(lambda: commands.encode_delete(key, *s), Command.delete(key, *s))


@settings(max_examples=300, deadline=None)
@given(keys, st.booleans(), values, values, session)
def test_encode_cas_is_encode_command(
    key: bytes, absent: bool, expected: bytes, value: bytes, s: tuple[int, int, int, bool, int, int]
) -> None:
    _same(lambda: commands.encode_cas(key, absent, expected, value, *s), Command.cas(key, absent, expected, value, *s))


@pytest.mark.parametrize(
    ("field", "args"),
    [
        ("client_id", (-1, 0, 0, False, 0, 0)),
        ("seq", (0, U64_MAX + 1, 0, False, 0, 0)),
        ("ack", (0, 0, -5, False, 0, 0)),
        ("horizon", (0, 0, 0, False, 1 << 64, 0)),
        ("revision", (0, 0, 0, False, 0, -1)),
    ],
)
def test_each_field_is_named_when_refused(field: str, args: tuple[int, int, int, bool, int, int]) -> None:
    with pytest.raises(ValueError, match=f"^{field} .* is not a 64-bit unsigned integer"):
        commands.encode_put(b"k", b"v", *args)


def test_key_limit_and_cas_rule() -> None:
    assert decode_command(commands.encode_put(b"k" * MAX_KEY_SIZE, b"v")).key == b"k" * MAX_KEY_SIZE
    with pytest.raises(ValueError, match="exceeds the maximum"):
        commands.encode_delete(b"k" * (MAX_KEY_SIZE + 1))
    with pytest.raises(ValueError, match="expect_absent"):
        commands.encode_cas(b"k", True, b"x", b"v")
