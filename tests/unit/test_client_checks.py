"""The client's one check of read options (`RequestChecks.read_options`), fuzzed: it returns
options the wire accepts, or refuses with a definite error; nothing else escapes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.client.checks import RequestChecks
from kvstore.client.readpref import READ_PREFERENCES
from kvstore.storage.commands import U64_MAX
from kvstore.v1 import kv_pb2

LEVELS = {"linearizable": kv_pb2.LINEARIZABLE, "bounded": kv_pb2.BOUNDED, "stale": kv_pb2.STALE,
          "serializable": kv_pb2.STALE}

staleness = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["500ms", "2s", "1m", "0ms", "-1s", "soon", ""]),
    st.text(max_size=8),
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.sampled_from(sorted(LEVELS)), st.text(max_size=12)),
    staleness,
    st.one_of(st.none(), st.sampled_from(READ_PREFERENCES), st.text(max_size=8)),
    st.one_of(st.none(), st.floats(allow_nan=False, min_value=-5, max_value=100)),
    st.sampled_from([None, 0.25]),
)
def test_read_options_are_checked_in_one_place(
    consistency: str, bound: float | str | None, pref: str | None, timeout: float | None, default_bound: float | None
) -> None:
    checks = RequestChecks(timeout=3.0, read_preference="nearest", max_staleness=default_bound)
    try:
        opts = checks.read_options(consistency, bound, pref, timeout)
    except (errors.InvalidArgument, ValueError) as err:
        if isinstance(err, errors.KVError):
            assert err.definite
        return
    assert consistency in LEVELS and opts.level == LEVELS[consistency] and opts.consistency == consistency
    assert opts.preference in READ_PREFERENCES
    assert opts.preference == (pref or "nearest")
    assert opts.learns_leader == (consistency == "linearizable")
    if consistency == "bounded":
        assert 1 <= opts.staleness_ms <= U64_MAX
        assert bound is not None or default_bound is not None
    else:
        assert opts.staleness_ms == 0
    assert opts.deadline.timeout == (3.0 if timeout is None else timeout) and opts.deadline.timeout > 0


def test_read_options_defaults_and_refusals() -> None:
    checks = RequestChecks(timeout=2.0, max_staleness="500ms")
    opts = checks.read_options("bounded", None, None, None)
    assert (opts.level, opts.staleness_ms, opts.preference, opts.deadline.timeout) == (kv_pb2.BOUNDED, 500, "leader", 2.0)
    assert checks.read_options("stale", math.inf, "replica", 1).staleness_ms == 0  # a bound only counts when bounded
    with pytest.raises(errors.InvalidArgument, match="read_preference"):
        checks.read_options("linearizable", None, "closest", None)
    with pytest.raises(errors.InvalidArgument, match="max_staleness"):
        checks.read_options("bounded", math.inf, None, None)
    with pytest.raises(ValueError, match="timeout"):
        checks.read_options("linearizable", None, None, -1)


def test_the_default_read_preference_is_checked_when_set() -> None:
    checks = RequestChecks(timeout=1.0)
    checks.read_preference = "replica"
    assert checks.read_options("stale", None, None, None).preference == "replica"
    with pytest.raises(ValueError, match="read_preference"):
        checks.read_preference = "closest"
    with pytest.raises(ValueError, match="read_preference"):
        RequestChecks(timeout=1.0, read_preference="closest")
    assert checks.read_preference == "replica"
