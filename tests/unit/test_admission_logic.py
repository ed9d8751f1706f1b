"""Admission control's synchronous logic: token buckets, load shedding, the alarm set and the quota
watch (kvstore/node/ratelimit.py, shedding.py, alarms.py), on an injected clock; the client's
backoff floor; the metadata group's check of alarm proposals."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import errors
from kvstore.client.failures import classify, is_retryable
from kvstore.client.retry import Backoff
from kvstore.node.alarms import (
    ALARMS_KEY,
    Alarm,
    AlarmTracker,
    AlarmType,
    QuotaWatch,
    decode_alarms,
    encode_alarms,
    with_alarm,
    without_alarms,
)
from kvstore.node.host import Host, RaftSettings
from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.ratelimit import RateLimit, RateLimiter, TokenBucket, parse_rate_limit
from kvstore.node.shedding import LoadShedder, ShedSettings
from kvstore.node.store import ApplyBatch, GroupWrite
from kvstore.raft import ConfState, Entry, EntryType, HardState
from kvstore.server.admission import Admission, AdmissionSettings, peer_host, rate_key
from kvstore.server.shards import check_group_request
from kvstore.shard.shardmap import SHARD_MAP_KEY
from kvstore.storage import commands
from kvstore.storage.store import LmdbNodeStore
from kvstore.v1 import kv_pb2, shard_pb2

# --- token bucket ------------------------------------------------------------------------------


def test_bucket_starts_full_then_refills_at_rate() -> None:
    b = TokenBucket(rate=10, burst=5, tokens=5, at=0.0)
    assert b.take_upto(5, 0.0) == (5, 0.0)
    k, after = b.take_upto(1, 0.0)
    assert k == 0 and after == pytest.approx(0.1)
    assert b.take_upto(1, 0.05)[0] == 0  # half a token
    assert b.take_upto(1, 0.1)[0] == 1
    assert b.take_upto(100, 100.0)[0] == 5  # never more than the burst, however long it waited


def test_partial_batch_admits_what_the_bucket_covers() -> None:
    b = TokenBucket(rate=2, burst=3, tokens=3, at=0.0)
    k, after = b.take_upto(10, 0.0)
    assert k == 3 and after == pytest.approx(0.5)


def test_clock_going_backwards_refills_nothing() -> None:
    b = TokenBucket(rate=100, burst=1, tokens=1, at=10.0)
    assert b.take_upto(1, 10.0)[0] == 1
    assert b.take_upto(1, 5.0)[0] == 0
    assert b.take_upto(1, 9.99)[0] == 0


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.integers(1, 200),
    steps=st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 50)), min_size=1, max_size=120),
)
def test_never_more_than_rate_times_window_plus_burst(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    """In every window [t_i, t_j] of the requests' times, admitted <= rate * (t_j - t_i) + burst."""
    b = TokenBucket(rate, burst, burst, 0.0)
    t = 0.0
    log: list[tuple[float, int]] = []
    for dt, n in steps:
        t += dt
        k, after = b.take_upto(n, t)
        assert 0 <= k <= n
        assert (after > 0) == (k < n)
        log.append((t, k))
    for i in range(len(log)):
        total = 0
        for j in range(i, len(log)):
            total += log[j][1]
            assert total <= rate * (log[j][0] - log[i][0]) + burst + 1e-6


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(1, 500), burst=st.integers(1, 50), n=st.integers(1, 40))
def test_waiting_the_retry_after_admits_the_next_operation(rate: float, burst: int, n: int) -> None:
    b = TokenBucket(rate, burst, burst, 0.0)
    t = 0.0
    for _ in range(n):
        k, after = b.take_upto(burst + 1, t)
        assert k <= burst
        t += after
        assert b.take_upto(1, t + 1e-9)[0] == 1


def test_identities_have_their_own_buckets_and_the_table_is_bounded() -> None:
    lim = RateLimiter(RateLimit(1, 2), max_identities=3)
    assert lim.admit("a", 5, 0.0) == (2, pytest.approx(1.0))
    assert lim.admit("b", 2, 0.0)[0] == 2  # a's refusals took nothing from b
    for who in ("c", "d", "e"):
        lim.admit(who, 1, 0.0)
    assert len(lim.buckets) == 3
    assert "a" not in lim.buckets  # the longest idle was dropped


def test_parse_rate_limit() -> None:
    assert parse_rate_limit("100") == RateLimit(100, 100)
    assert parse_rate_limit("0.5") == RateLimit(0.5, 1)
    assert parse_rate_limit("100:500") == RateLimit(100, 500)
    for bad in ("", "x", "0", "-1", "10:0", "nan", "inf", "10:x"):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)


# --- load shedding -----------------------------------------------------------------------------


def test_no_limits_never_shed() -> None:
    s = LoadShedder()
    s.observe_memory(1 << 40, 0.0)
    assert s.write_refusal(commit=10**9, applied=0) is None


def test_apply_lag_sheds_with_growing_retry_after() -> None:
    s = LoadShedder(ShedSettings(max_apply_lag=100, retry_after=0.1, max_retry_after=2.0))
    assert s.write_refusal(commit=200, applied=100) is None  # exactly at the limit
    r = s.write_refusal(commit=301, applied=100)
    assert r is not None and "201 entries behind" in r[0] and r[1] == pytest.approx(0.201)
    far = s.write_refusal(commit=10**6, applied=0)
    assert far is not None and far[1] == 2.0  # bounded
    assert s.refused["apply_lag"] == 2


def test_memory_shedding_has_hysteresis() -> None:
    s = LoadShedder(ShedSettings(memory_limit=1000, shed_fraction=0.9, resume_fraction=0.8))
    s.observe_memory(899, 0.0)
    assert s.write_refusal(1, 1) is None
    s.observe_memory(900, 0.5)
    assert s.write_refusal(1, 1) is not None
    s.observe_memory(850, 1.0)  # below the shedding line, above the resume line: still shedding
    assert s.write_refusal(1, 1) is not None
    s.observe_memory(799, 1.5)
    assert s.write_refusal(1, 1) is None


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 10**9),
    samples=st.lists(st.integers(0, 2 * 10**9), min_size=1, max_size=50),
    lag=st.integers(0, 10**6),
    max_lag=st.integers(0, 10**4),
)
def test_shedding_is_decided_by_the_last_sample_and_the_lag(
    limit: int, samples: list[int], lag: int, max_lag: int
) -> None:
    cfg = ShedSettings(max_apply_lag=max_lag, memory_limit=limit)
    s = LoadShedder(cfg)
    for i, rss in enumerate(samples):
        s.observe_memory(rss, float(i))
        r = s.write_refusal(commit=lag, applied=0)
        if rss >= limit * cfg.shed_fraction:
            assert r is not None
        elif rss < limit * cfg.resume_fraction and not (max_lag and lag > max_lag):
            assert r is None
        if r is not None:
            assert 0 < r[1] <= cfg.max_retry_after


def test_shed_settings_validate() -> None:
    ShedSettings().validate()
    for bad in (
        ShedSettings(max_apply_lag=-1), ShedSettings(memory_limit=-1),
        ShedSettings(shed_fraction=0.5, resume_fraction=0.6), ShedSettings(retry_after=0),
    ):
        with pytest.raises(ValueError):
            bad.validate()


# --- alarms and the quota ----------------------------------------------------------------------


def test_alarm_encoding_round_trips_and_is_canonical() -> None:
    a = frozenset({Alarm(3, AlarmType.NOSPACE), Alarm(1, AlarmType.NOSPACE)})
    raw = encode_alarms(a)
    assert decode_alarms(raw) == a
    assert encode_alarms(reversed(sorted(a))) == raw
    assert decode_alarms(encode_alarms(())) == frozenset()
    assert decode_alarms(with_alarm(frozenset(), Alarm(2, AlarmType.NOSPACE))) == {Alarm(2, AlarmType.NOSPACE)}
    assert decode_alarms(without_alarms(a, node=3)) == {Alarm(1, AlarmType.NOSPACE)}
    assert decode_alarms(without_alarms(a)) == frozenset()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_alarm_decode_is_total(data: bytes) -> None:
    try:
        out = decode_alarms(data)
    except ValueError:
        return
    assert encode_alarms(out) == data  # only canonical encodings decode


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 255)), max_size=5))
def test_alarm_decode_refuses_unknown_types_bad_ids_and_duplicates(entries: list[tuple[int, int]]) -> None:
    import struct

    entries = sorted(entries)
    data = b"KVA1" + struct.pack(">I", len(entries)) + b"".join(struct.pack(">QB", n, k) for n, k in entries)
    valid = (
        all(k == 1 and 1 <= n < 2**63 for n, k in entries) and len({n for n, _ in entries}) == len(entries)
    )
    if valid:
        assert decode_alarms(data) == {Alarm(n, AlarmType.NOSPACE) for n, _ in entries}
    else:
        with pytest.raises(ValueError):
            decode_alarms(data)


def test_tracker_follows_the_metadata_group() -> None:
    store = MemoryNodeStore()
    t = AlarmTracker(store)
    assert not t.refresh() and not t.nospace  # no metadata group yet
    conf = ConfState((1,))
    store.bootstrap(0, conf)
    raw = with_alarm(frozenset(), Alarm(1, AlarmType.NOSPACE))
    _apply_put(store, ALARMS_KEY, raw, conf)
    assert t.refresh() and t.nospace and t.raw == raw
    _apply_put(store, ALARMS_KEY, b"garbage", conf)
    assert not t.refresh() and t.nospace  # the last good set stays in force
    _apply_put(store, ALARMS_KEY, encode_alarms(()), conf)
    assert t.refresh() and not t.nospace and t.alarms == frozenset()


def _apply_put(store: MemoryNodeStore, key: bytes, value: bytes, conf: ConfState) -> None:
    """Append a put to group 0's log and apply everything up to it, as a Ready cycle would."""
    ls = store.log_storage(0)
    e = Entry(1, ls.last_index() + 1, EntryType.NORMAL, commands.encode_put(key, value), 0)
    store.persist_and_apply([GroupWrite(0, [e], HardState(1, 0, e.index))], ())
    lo = store.applied_index(0) + 1
    store.persist_and_apply((), [ApplyBatch(0, ls.entries(lo, e.index + 1), conf)])


def test_quota_watch_raises_once_over_and_not_again_while_raised() -> None:
    q = QuotaWatch(node=2, quota=1000, backoff=1.0)
    none: frozenset[Alarm] = frozenset()
    assert not q.should_raise(1000, none, 0.0)  # at the quota is not over it
    assert q.should_raise(1001, none, 0.0)
    assert not q.should_raise(5000, none, 0.5)  # a raise is in flight
    assert q.should_raise(5000, none, 1.5)  # it did not take: try again
    assert not q.should_raise(5000, frozenset({Alarm(2, AlarmType.NOSPACE)}), 9.0)
    assert q.should_raise(5000, frozenset({Alarm(1, AlarmType.NOSPACE)}), 9.0)  # another node's alarm
    assert not QuotaWatch(node=1, quota=0).should_raise(10**12, none, 0.0)  # no quota


def test_metadata_group_takes_valid_alarm_sets_only() -> None:
    ok = commands.encode_cas(ALARMS_KEY, True, b"", with_alarm(frozenset(), Alarm(1, AlarmType.NOSPACE)))
    assert check_group_request(shard_pb2.GroupProposeRequest(group=0, command=ok), None) is None
    swap = commands.encode_cas(ALARMS_KEY, False, encode_alarms(()), encode_alarms(()))
    assert check_group_request(shard_pb2.GroupProposeRequest(group=0, command=swap), None) is None
    for bad in (
        commands.encode_cas(ALARMS_KEY, True, b"", b"junk"),
        commands.encode_cas(ALARMS_KEY, False, b"junk", encode_alarms(())),
        commands.encode_put(ALARMS_KEY, encode_alarms(())),
        commands.encode_cas(b"\x00kvstore/other", True, b"", encode_alarms(())),
        commands.encode_cas(SHARD_MAP_KEY, True, b"", b"x"),
    ):
        with pytest.raises(errors.InvalidArgument):
            check_group_request(shard_pb2.GroupProposeRequest(group=0, command=bad), None)


# --- wire errors, identity and the client's side -----------------------------------------------


def test_resource_exhausted_travels_with_its_retry_after() -> None:
    e = errors.ResourceExhausted("slow down", retry_after=0.25)
    pb = errors.to_proto(e)
    assert pb.code == kv_pb2.RESOURCE_EXHAUSTED and pb.retry_after_ms == 250 and not pb.indeterminate
    back = errors.from_proto(pb, is_write=True)
    assert isinstance(back, errors.ResourceExhausted) and back.retry_after == 0.25 and back.definite
    assert is_retryable(back)
    nospace = errors.from_proto(errors.to_proto(errors.NoSpace()), is_write=True)
    assert isinstance(nospace, errors.NoSpace) and nospace.definite and not is_retryable(nospace)
    assert errors.retry_after_ms(0.0001) == 1 and errors.retry_after_ms(10**9) == 3_600_000


def test_client_classifies_a_rate_limited_rpc_as_definite_with_retry_after() -> None:
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
        grpc.aio.Metadata(("retry-after-ms", "1500")), "rate limit exceeded",
    )
    f = classify(exc, endpoint="e", is_write=True)
    assert isinstance(f.error, errors.ResourceExhausted) and f.error.definite and f.retryable
    assert f.error.retry_after == 1.5
    # The same status without the trailer (e.g. a message over gRPC's size limit) is not ours.
    other = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "x")
    assert not isinstance(classify(other, endpoint="e", is_write=True).error, errors.ResourceExhausted)


@settings(max_examples=200, deadline=None)
@given(floor=st.floats(0, 30), attempts=st.integers(0, 20), seed=st.integers(0, 2**32))
def test_backoff_never_waits_less_than_the_retry_after(floor: float, attempts: int, seed: int) -> None:
    import random

    b = Backoff(0.02, 1.0, rng=random.Random(seed))
    b.attempt = attempts
    d = b.at_least(floor)
    assert floor <= d <= max(1.0, floor * 1.25)


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(st.text(max_size=12), st.integers().map(str)))
def test_a_garbled_retry_after_trailer_is_never_trusted_blindly(value: str) -> None:
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(("retry-after-ms", value)), "x",
    )
    f = classify(exc, endpoint="e", is_write=True)
    if isinstance(f.error, errors.ResourceExhausted):
        assert 0 <= f.error.retry_after <= 3600 and f.error.definite  # bounded whatever the server says
    else:
        assert f.error.indeterminate  # not recognisably ours: a write may have happened


def test_a_group_whose_apply_lags_its_commit_sheds_writes_until_it_catches_up(tmp_path: Path) -> None:
    """A real host and LMDB store: entries committed but not yet applied (between the cycle that
    made them durable and the one that applies them) count as apply lag; past the limit,
    `Admission.check_write` refuses (RESOURCE_EXHAUSTED, definite, with a retry-after); once the
    group applied them, writes are admitted again. Reads never ask."""
    store = LmdbNodeStore(tmp_path / "n1", sync=False)
    try:
        host = Host(1, store, lambda ms: None, RaftSettings(), random.Random(1))
        host.open_group(1, ConfState((1,)))
        host.groups[1].core.campaign()
        while host.has_work():
            host.run_cycle()
        adm = Admission(1, AdmissionSettings(shed=ShedSettings(max_apply_lag=5)), host, AlarmTracker(store))
        adm.check_write(1, delete=False)
        for i in range(20):
            host.propose(1, commands.encode_put(b"k%d" % i, b"v"), lambda r, e: None)
        cycle = host.begin_cycle()
        assert cycle is not None
        cycle.persist()
        host.end_cycle(cycle)  # durable, hence committed (one voter); applied by the next cycle
        core = host.groups[1].core
        assert core.committed - core.applied == 20
        with pytest.raises(errors.ResourceExhausted) as exc:
            adm.check_write(1, delete=True)
        assert exc.value.definite and exc.value.retry_after > 0 and "20 entries behind" in exc.value.message
        while host.has_work():
            host.run_cycle()
        assert core.committed == core.applied
        adm.check_write(1, delete=False)
    finally:
        store.close()


def test_nospace_refuses_puts_but_not_deletes(tmp_path: Path) -> None:
    store = MemoryNodeStore()
    conf = ConfState((1,))
    store.bootstrap(0, conf)
    host = Host(1, store, lambda ms: None, RaftSettings(), random.Random(1))
    tracker = AlarmTracker(store)
    adm = Admission(1, AdmissionSettings(), host, tracker)
    adm.check_write(1, delete=False)
    _apply_put(store, ALARMS_KEY, with_alarm(frozenset(), Alarm(3, AlarmType.NOSPACE)), conf)
    tracker.refresh()
    with pytest.raises(errors.NoSpace) as exc:
        adm.check_write(1, delete=False)
    assert exc.value.definite
    adm.check_write(1, delete=True)


def test_serve_flags_for_limits_parse_and_bad_ones_are_usage_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvstore.cli.server import cli, parse_bytes

    assert parse_bytes("1048576") == 1 << 20 and parse_bytes("512K") == 512 << 10
    assert parse_bytes("64m") == 64 << 20 and parse_bytes("2GB") == 2 << 30
    for bad in ("", "G", "1.5G", "-1", "12Q"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    base = ["serve", "--id", "1", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:1",
            "--peers", "1=127.0.0.1:1"]
    for flags, needle in ((["--rate-limit", "fast"], "bad rate limit"), (["--quota-bytes", "lots"], "bad size"),
                          (["--memory-limit", "-5"], "bad size"), (["--rate-limit", "10:0"], "burst")):
        r = CliRunner().invoke(cli, [*base, *flags])
        assert r.exit_code == 2 and needle in r.output, (flags, r.output)


def test_peer_identity_strings_and_rate_keys_of_principals() -> None:
    from kvstore.security.identity import Principal, PrincipalKind

    assert peer_host("ipv4:127.0.0.1:5000") == "ip:127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "ip:::1"
    assert peer_host("ipv6:%5B::1%5D:5000") == "ip:::1"
    assert peer_host("unix:/tmp/s") == "peer:unix:/tmp/s"
    # A user has one bucket whether it came by token or certificate, from any address.
    by_token = Principal(PrincipalKind.USER, "alice", "token", 3, "ipv4:10.0.0.1:1")
    by_cert = Principal(PrincipalKind.USER, "alice", "certificate", 0, "ipv4:10.0.0.2:2")
    assert rate_key(by_token) == rate_key(by_cert) == "user:alice"
    assert rate_key(Principal(PrincipalKind.USER, "bob", "token", 1, "ipv4:10.0.0.1:1")) == "user:bob"
    assert rate_key(Principal(PrincipalKind.NODE, "node:2", "certificate", 0, "ipv4:10.0.0.3:9")) is None
    assert rate_key(Principal(PrincipalKind.ANONYMOUS, peer="ipv4:10.0.0.1:7")) == "ip:10.0.0.1"


def test_the_rate_limit_wraps_client_rpcs_and_never_node_traffic() -> None:
    """Registered through `wire.add_services`, every unary-request client RPC of every service
    (generated from the descriptors) is admitted by the call limit after the guard, with the
    principal the guard established; traffic between nodes, health checks and request-streaming
    methods (KV.Stream is limited per operation inside) never reach it."""
    import asyncio
    from typing import Any

    from google.protobuf import message_factory
    from grpc_health.v1 import health_pb2

    from kvstore.security.guard import AuthGuard, AuthTracker
    from kvstore.security.identity import Principal, PrincipalKind, identity_of_call
    from kvstore.server import wire
    from kvstore.v1 import admin_pb2, auth_pb2, raft_pb2

    store = MemoryNodeStore()
    host = Host(1, store, lambda ms: None, RaftSettings(), random.Random(1))
    adm = Admission(1, AdmissionSettings(rate_limit=RateLimit(1, 1)), host, AlarmTracker(store))
    assert adm.call_limit() is adm
    assert Admission(1, AdmissionSettings(), host, AlarmTracker(store)).call_limit() is None

    seen: list[tuple[str, Principal]] = []
    ran: list[tuple[str, int]] = []

    class Recording:
        def limits(self, path: str) -> bool:
            return adm.limits(path)

        async def admit_call(self, p: Principal, context: object) -> None:
            seen.append((current, p))

    class Servicer:
        def __getattr__(self, name: str) -> Any:
            async def unary(request: object, context: object) -> object:
                ran.append((current, len(seen)))
                return identity_of_call()

            async def streaming(request: object, context: object) -> Any:
                ran.append((current, len(seen)))
                yield identity_of_call()

            return streaming if name in streaming_names else unary

    class Context:
        def peer(self) -> str:
            return "ipv4:10.1.2.3:4567"

        def invocation_metadata(self) -> tuple[()]:
            return ()

        def auth_context(self) -> dict[str, list[bytes]]:
            return {}

        async def abort(self, code: object, details: str = "", trailing_metadata: object = ()) -> None:
            raise AssertionError(f"aborted: {code} {details}")

    class Server:
        def __init__(self) -> None:
            self.generic: list[Any] = []

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.generic.extend(handlers)

    services = [d.services_by_name[n] for d, n in ((kv_pb2.DESCRIPTOR, "KV"), (admin_pb2.DESCRIPTOR, "Admin"),
                                                    (shard_pb2.DESCRIPTOR, "Shard"), (raft_pb2.DESCRIPTOR, "Raft"),
                                                    (auth_pb2.DESCRIPTOR, "Auth"))]
    streaming_names = {m.name for svc in services for m in svc.methods if m.server_streaming}
    server = Server()
    guard = AuthGuard(AuthTracker(store), None)
    paths = wire.add_services(server, [(Servicer(), svc) for svc in services], guard, limit=Recording())  # type: ignore[arg-type]
    methods = {f"/{svc.full_name}/{m.name}": m for svc in services for m in svc.methods}
    assert set(paths) == set(methods)

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    limited = set()
    for path, m in methods.items():
        current = path
        handler = next(h for g in server.generic if (h := g.service(Details(path))) is not None)
        if m.client_streaming:
            continue
        request = message_factory.GetMessageClass(m.input_type)()
        before = len(seen)
        if m.server_streaming:
            async def drain(h: Any, req: object) -> list[Any]:
                return [r async for r in h.unary_stream(req, Context())]

            asyncio.run(drain(handler, request))
        else:
            asyncio.run(handler.unary_unary(request, Context()))
        assert ran[-1][0] == path
        if len(seen) > before:
            limited.add(path)
            assert ran[-1][1] == len(seen) and seen[-1][0] == path  # the limit ran before the handler
            assert seen[-1][1].kind is PrincipalKind.ANONYMOUS and seen[-1][1].peer == "ipv4:10.1.2.3:4567"
            assert rate_key(seen[-1][1]) == "ip:10.1.2.3"
    internal = {"/kvstore.v1.Raft/Send", "/kvstore.v1.Raft/SendSnapshot", "/kvstore.v1.Shard/GroupPropose",
                "/kvstore.v1.Shard/ExportRange"}
    expected = {p for p, m in methods.items() if not m.client_streaming and p not in internal}
    assert limited == expected
    assert {"/kvstore.v1.KV/Put", "/kvstore.v1.KV/Scan", "/kvstore.v1.Admin/AlarmDisarm",
            "/kvstore.v1.Auth/Authenticate"} <= limited
    assert not adm.limits("/grpc.health.v1.Health/Check") and health_pb2 is not None

