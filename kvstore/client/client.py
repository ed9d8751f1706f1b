"""The kvstore client: :class:`AsyncClient` on grpc.aio and a synchronous :class:`Client` over it.

Semantics every caller can rely on:

- Every operation has one total deadline (``timeout``, default 10 s) covering all attempts,
  redirects and backoff. Each RPC attempt is further bounded by ``attempt_timeout`` so one hung
  node cannot consume the whole deadline.
- Writes (put, delete, cas) carry a session ``(client_id, seq, ack)``: ``seq`` is fresh per write
  and reused unchanged on every retry of that write, so the server applies it at most once.
  ``ack`` is the lowest seq still in flight ("replies for every seq < ack were received").
- Retried without hesitation: NOT_LEADER (at the hinted leader), NO_LEADER, PROPOSAL_DROPPED,
  SHUTTING_DOWN, connection failures before the request was sent. Outcomes that leave a write
  indeterminate (TIMEOUT, LEADERSHIP_LOST, INTERNAL, a connection lost after sending) are retried
  too: the session makes that safe. Reads are always safe to retry.
- When the deadline passes: if any attempt of a write was indeterminate, :class:`Timeout` with
  ``indeterminate=True``; if every attempt definitely failed, a definite error (the class of the
  last failure, or :class:`Unavailable` when no endpoint could be reached).
- Errors that retrying cannot fix (too large, invalid argument, storage full) are raised at once.
- Reads take a consistency level (``linearizable``, ``bounded`` with a ``max_staleness``, or
  ``stale``) and a read preference (``leader``, ``nearest``, ``replica``: see
  :mod:`kvstore.client.readpref`); :meth:`AsyncClient.read` also says which node served the read,
  at which applied index and how stale it may be. Writes always go to the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio

from kvstore.client.mux import OpMux, StreamError
from kvstore.client.readpref import READ_PREFERENCES, ReplicaRouter, parse_duration
from kvstore.client.retry import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_BREAKER_COOLDOWN,
    DEFAULT_BREAKER_THRESHOLD,
    DEFAULT_TIMEOUT,
    Backoff,
    Deadline,
    RetryPolicy,
)
from kvstore.client.routing import DEFAULT_GROUP, Router
from kvstore.errors import (
    InternalError,
    InvalidArgument,
    KeyTooLarge,
    KVError,
    LeadershipLost,
    NoLeader,
    NotLeader,
    ProposalDropped,
    RequestTooLarge,
    ShuttingDown,
    StaleReplica,
    StorageFull,
    Timeout,
    Unavailable,
    ValueTooLarge,
    WrongShard,
    from_proto,
)
from kvstore.shard.ranges import HASH_MAX, IntervalSet
from kvstore.shard.shardmap import ShardMap, ShardMapError
from kvstore.storage.commands import MAX_KEY_SIZE, U64_MAX
from kvstore.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc, shard_pb2, shard_pb2_grpc

__all__ = [
    "DEFAULT_MAX_KEY_SIZE",
    "DEFAULT_MAX_VALUE_SIZE",
    "AsyncClient",
    "Client",
    "Consistency",
    "NodeStatus",
    "ReadPreference",
    "ReadResult",
]

DEFAULT_MAX_KEY_SIZE = MAX_KEY_SIZE
"""The server's key-size limit (one limit: `kvstore.storage.commands.MAX_KEY_SIZE`)."""
DEFAULT_MAX_VALUE_SIZE = 1024 * 1024

#: Follow this many NOT_LEADER redirects in a row without sleeping, then back off.
_FREE_REDIRECTS = 3
#: A scan with a limit up to this asks each group for its part in one message on the node's
#: operation stream (no gRPC call per part; a node's chunks hold 512 pairs), falling back to a
#: `KV.Scan` stream for a part that does not fit.
ONE_MESSAGE_SCAN = 512
#: Don't ask every endpoint for Admin.Status more often than this when the leader is unknown.
_DISCOVERY_INTERVAL = 0.5
#: Upper bound of one discovery round.
_DISCOVERY_TIMEOUT = 1.0

Consistency = Literal["linearizable", "bounded", "stale", "serializable"]
_CONSISTENCY = {
    "linearizable": kv_pb2.LINEARIZABLE,
    "bounded": kv_pb2.BOUNDED,
    "stale": kv_pb2.STALE,
    "serializable": kv_pb2.STALE,  # the older name of `stale`
}
ReadPreference = Literal["leader", "nearest", "replica"]

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Reconnect quickly to a node that comes back (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),
]

# Substrings of gRPC UNAVAILABLE details that mean the request never left this process.
_NOT_SENT_MARKERS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution failed",
    "name resolution",
    "no route to host",
    "network is unreachable",
    "failed to pick subchannel",
    "empty address list",
    "no address",
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class ReadResult:
    """A read and where it was served."""

    value: bytes | None  # None: no such key
    index: int  # the applied index of the node that served it
    staleness: float | None  # seconds it may be behind the leader (0.0: linearizable; None: unknown)
    node_id: int  # the node that served it
    consistency: str

    @property
    def found(self) -> bool:
        return self.value is not None


@dataclass(slots=True)
class NodeStatus:
    """One node's answer to Admin.Status (or why it did not answer)."""

    address: str
    status: admin_pb2.StatusResponse | None = None
    error: KVError | None = None


class _RpcFailure(Exception):
    """Internal: an attempt failed at the gRPC level, already classified."""

    def __init__(self, error: KVError, *, transport: bool, retryable: bool, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.transport = transport  # counts against the endpoint's circuit breaker
        self.retryable = retryable
        self.reason = reason  # short reason for "cannot reach any endpoint (...): reason"


def _short_reason(details: str) -> str:
    low = details.lower()
    if "connection refused" in low:
        return "connection refused"
    if "deadline" in low:
        return "timed out"
    if "connection reset" in low:
        return "connection reset"
    if "socket closed" in low:
        return "connection closed"
    if "dns resolution failed" in low or "name resolution" in low:
        return "name resolution failed"
    first = details.strip().splitlines()[0] if details.strip() else "unavailable"
    return first[:160]


def _classify(exc: grpc.aio.AioRpcError, *, endpoint: str, is_write: bool) -> _RpcFailure:
    """Turn a gRPC-level failure into a kvstore error, deciding whether it is indeterminate."""
    code = exc.code()
    details = exc.details() or ""
    low = details.lower()
    if isinstance(exc, StreamError) and not exc.sent:
        return _RpcFailure(
            Unavailable(f"cannot reach {endpoint}: {details}"), transport=True, retryable=True, reason="stream broke"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        reason = _short_reason(details)
        if any(marker in low for marker in _NOT_SENT_MARKERS):
            return _RpcFailure(
                Unavailable(f"cannot reach {endpoint}: {reason}"),
                transport=True,
                retryable=True,
                reason=reason,
            )
        return _RpcFailure(
            Unavailable(f"connection to {endpoint} lost: {reason}", indeterminate=is_write),
            transport=True,
            retryable=True,
            reason=reason,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _RpcFailure(
            Timeout(f"{endpoint} did not answer in time", indeterminate=is_write),
            transport=True,
            retryable=True,
            reason="timed out",
        )
    if code == grpc.StatusCode.CANCELLED:
        return _RpcFailure(
            Unavailable(f"call to {endpoint} cancelled: {details}", indeterminate=is_write),
            transport=True,
            retryable=True,
            reason="cancelled",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in low:
        return _RpcFailure(
            RequestTooLarge(message=f"request too large: {details}", indeterminate=False),
            transport=False,
            retryable=False,
            reason=details,
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return _RpcFailure(
            InternalError(f"{endpoint} does not implement this call: {details}", indeterminate=False),
            transport=False,
            retryable=False,
            reason=details,
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return _RpcFailure(
            InvalidArgument(f"{endpoint} rejected the request: {details}", indeterminate=False),
            transport=False,
            retryable=False,
            reason=details,
        )
    # UNKNOWN (the handler raised), INTERNAL, RESOURCE_EXHAUSTED (overload), ...: the server got the
    # request and failed somewhere; for a write that is indeterminate, and a retry is safe.
    return _RpcFailure(
        InternalError(f"{endpoint}: {code.name}: {details}", indeterminate=is_write),
        transport=False,
        retryable=True,
        reason=details,
    )


def _with_message(err: KVError, message: str, *, indeterminate: bool | None = None) -> KVError:
    out = type(err).__new__(type(err))
    out.__dict__.update(err.__dict__)
    out.message = message
    out.args = (message,)
    if indeterminate is not None:
        out.indeterminate = indeterminate
    return out


def _retryable(err: KVError) -> bool:
    return isinstance(
        err,
        NotLeader | NoLeader | ProposalDropped | ShuttingDown | WrongShard | Timeout | LeadershipLost
        | InternalError | Unavailable | StorageFull | StaleReplica,
    )


def _staleness(consistency: str, resp: kv_pb2.GetResponse | kv_pb2.ScanResponse) -> float | None:
    """The staleness bound of a read reply in seconds (None: unknown)."""
    if consistency == "linearizable":
        return 0.0
    if resp.staleness_ms < 0 or not resp.node_id:  # -1, or a server that does not report it
        return None
    return resp.staleness_ms / 1000


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: unbounded)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def scan_range(prefix: bytes, start: bytes | None, end: bytes | None) -> tuple[bytes, bytes | None]:
    """Combine a prefix and optional ``[start, end)`` bounds into one range (end None = open)."""
    lo = max(start or b"", prefix)
    hi = end or None
    if prefix:
        pend = _prefix_end(prefix)
        if pend is not None and (hi is None or pend < hi):
            hi = pend
    return lo, hi


def _check_bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return value


class AsyncClient:
    """Asynchronous kvstore client (grpc.aio). Use it from one event loop.

    ``endpoints``: ``["host:port", ...]`` (or a comma-separated string); any node will do, the
    client discovers the leader and the other members. ``timeout`` is the default total deadline
    of one operation. ``client_id`` identifies the write session (random 63-bit if None).
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        client_id: int | None = None,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD,
        breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        max_key_size: int = DEFAULT_MAX_KEY_SIZE,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        seed: int | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
        read_preference: ReadPreference = "leader",
        load_balancing: str = "least_outstanding",
        max_staleness: float | str | None = None,
    ) -> None:
        self.policy = RetryPolicy(
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
        )
        eps = [e for e in endpoints.split(",")] if isinstance(endpoints, str) else list(endpoints)
        self.router = Router(eps, breaker_threshold=breaker_threshold, breaker_cooldown=breaker_cooldown)
        if client_id is None:
            client_id = secrets.randbits(63) or 1
        if not 0 < client_id < 2**64:
            raise ValueError("client_id must be a positive 64-bit integer")
        self.client_id = client_id
        self.max_key_size = max_key_size
        self.max_value_size = max_value_size
        self._rng = random.Random(seed)
        self._channel_options = [*_CHANNEL_OPTIONS, *channel_options]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._kv_stubs: dict[str, kv_pb2_grpc.KVStub] = {}
        self._muxes: dict[str, OpMux] = {}
        self._admin_stubs: dict[str, admin_pb2_grpc.AdminStub] = {}
        self._shard_stubs: dict[str, shard_pb2_grpc.ShardStub] = {}
        self._map_fetch: asyncio.Task[None] | None = None
        self._next_seq = 1
        self._inflight: dict[int, None] = {}  # seqs of writes in flight, in increasing order
        #: Per group, the highest applied index seen in a write reply (a committed index): a write's
        #: retry sends it as the session's horizon (see :mod:`kvstore.storage.machine`).
        self._seen: dict[int, int] = {}
        self._closed = False
        self._discovery: asyncio.Task[None] | None = None
        if read_preference not in READ_PREFERENCES:
            raise ValueError(f"read_preference must be one of {', '.join(READ_PREFERENCES)}")
        self.read_preference: str = read_preference
        #: Default bound of ``bounded`` reads (seconds), if the call gives none.
        self.max_staleness = None if max_staleness is None else parse_duration(max_staleness)
        self.replicas = ReplicaRouter(self.router, balancing=load_balancing)
        self._members_refresh: asyncio.Task[None] | None = None

    # ----- lifecycle -----

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel. Idempotent."""
        self._closed = True
        for task in (self._discovery, self._members_refresh):
            if task is not None and not task.done():
                task.cancel()
        muxes = list(self._muxes.values())
        self._muxes.clear()
        await asyncio.gather(*(mux.close() for mux in muxes))  # each waits up to mux.CLOSE_GRACE
        channels = list(self._channels.values())
        self._channels.clear()
        self._kv_stubs.clear()
        self._admin_stubs.clear()
        self._shard_stubs.clear()
        if self._map_fetch is not None and not self._map_fetch.done():
            self._map_fetch.cancel()
        for ch in channels:
            await ch.close()

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.router.endpoints

    # ----- channels -----

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        if self._closed:
            raise RuntimeError("client is closed")
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = grpc.aio.insecure_channel(endpoint, options=self._channel_options)
        return ch

    def _kv(self, endpoint: str) -> kv_pb2_grpc.KVStub:
        stub = self._kv_stubs.get(endpoint)
        if stub is None:
            stub = self._kv_stubs[endpoint] = kv_pb2_grpc.KVStub(self._channel(endpoint))
        return stub

    def _mux(self, endpoint: str) -> OpMux:
        """The endpoint's multiplexed KV stream (get, put, delete and cas travel on it)."""
        mux = self._muxes.get(endpoint)
        if mux is None:
            mux = self._muxes[endpoint] = OpMux(self._channel(endpoint), endpoint)
        return mux

    def _admin(self, endpoint: str) -> admin_pb2_grpc.AdminStub:
        stub = self._admin_stubs.get(endpoint)
        if stub is None:
            stub = self._admin_stubs[endpoint] = admin_pb2_grpc.AdminStub(self._channel(endpoint))
        return stub

    def _shard(self, endpoint: str) -> shard_pb2_grpc.ShardStub:
        stub = self._shard_stubs.get(endpoint)
        if stub is None:
            stub = self._shard_stubs[endpoint] = shard_pb2_grpc.ShardStub(self._channel(endpoint))
        return stub

    # ----- the shard map -----

    async def _fetch_map(self, deadline: Deadline) -> None:
        """Ask the endpoints (breakers permitting) for the shard map, one after the other, until
        one has a version we want; keep the newest seen."""
        router = self.router
        unimplemented = 0
        asked = 0
        for ep in list(router.endpoints):
            if not router.needs_map() or deadline.expired:
                return
            if not router.breaker(ep).would_allow():
                continue
            asked += 1
            try:
                resp = await self._shard(ep).GetShardMap(
                    shard_pb2.GetShardMapRequest(), timeout=deadline.bound(self.policy.attempt_timeout)
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    unimplemented += 1
                    continue
                failure = _classify(e, endpoint=ep, is_write=False)
                if failure.transport:
                    router.on_transport_failure(None, ep, failure.reason)
                continue
            router.on_reply(ep)
            if resp.error.code or not resp.map:
                continue
            try:
                router.set_shard_map(ShardMap.decode(resp.map))
            except ShardMapError:
                continue
        if asked and unimplemented == asked and router.shard_map is None:
            router.unsharded = True
        elif router.shard_map is not None:
            router.map_settled()  # nobody has a newer one yet: route with ours, WRONG_SHARD asks again

    async def _ensure_map(self, deadline: Deadline) -> None:
        if not self.router.needs_map():
            return
        if self._map_fetch is None or self._map_fetch.done():
            self._map_fetch = asyncio.ensure_future(self._fetch_map(deadline))
        await asyncio.wait([self._map_fetch], timeout=deadline.remaining())

    async def shard_map(self, *, refresh: bool = False, timeout: float | None = None) -> ShardMap | None:
        """The cached shard map (fetched first if needed); with ``refresh``, the newest map any
        reachable node has (nodes apply map changes at their own pace). None for a server
        without sharding."""
        deadline = self._deadline(timeout)
        if refresh:
            eps = [ep for ep in self.router.endpoints if self.router.breaker(ep).would_allow()]
            t = deadline.bound(self.policy.attempt_timeout)
            answers = await asyncio.gather(
                *(self._shard(ep).GetShardMap(shard_pb2.GetShardMapRequest(), timeout=t) for ep in eps),
                return_exceptions=True,
            )
            for ans in answers:
                if isinstance(ans, shard_pb2.GetShardMapResponse) and not ans.error.code and ans.map:
                    with contextlib.suppress(ShardMapError):
                        self.router.set_shard_map(ShardMap.decode(ans.map))
        await self._ensure_map(deadline)
        return self.router.shard_map

    # ----- sessions and validation -----

    def _begin_write(self) -> kv_pb2.Session:
        seq = self._next_seq
        self._next_seq += 1
        self._inflight[seq] = None
        ack = next(iter(self._inflight))
        return kv_pb2.Session(client_id=self.client_id, seq=seq, ack=ack)

    def _end_write(self, session: kv_pb2.Session) -> None:
        self._inflight.pop(session.seq, None)

    def _check_key(self, key: object) -> bytes:
        k = _check_bytes("key", key)
        if not k:
            raise InvalidArgument("key must not be empty")
        if len(k) > self.max_key_size:
            raise KeyTooLarge(len(k), self.max_key_size)
        return k

    def _check_value(self, value: object) -> bytes:
        v = _check_bytes("value", value)
        if len(v) > self.max_value_size:
            raise ValueTooLarge(len(v), self.max_value_size)
        return v

    def _deadline(self, timeout: float | None) -> Deadline:
        t = self.policy.timeout if timeout is None else timeout
        if t <= 0:
            raise ValueError("timeout must be positive")
        return Deadline(t)

    @staticmethod
    def _consistency(consistency: str) -> kv_pb2.Consistency:
        try:
            return _CONSISTENCY[consistency]
        except KeyError:
            raise InvalidArgument(
                f"consistency must be one of {', '.join(_CONSISTENCY)}, not {consistency!r}"
            ) from None

    def _staleness_ms(self, consistency: str, max_staleness: float | str | None) -> int:
        """The wire's max_staleness_ms of a read (0 unless bounded)."""
        if consistency != "bounded":
            return 0
        bound = self.max_staleness if max_staleness is None else parse_duration(max_staleness)
        if bound is None or not 0 < bound <= U64_MAX / 1000:  # also refuses NaN and infinity
            raise InvalidArgument("bounded reads need a finite max_staleness > 0 (e.g. 0.5 or '500ms')")
        return min(U64_MAX, max(1, round(bound * 1000)))

    # ----- discovery -----

    async def _status_once(self, endpoint: str, timeout: float) -> admin_pb2.StatusResponse:
        """One Admin.Status call; learns from the answer; raises _RpcFailure."""
        try:
            resp: admin_pb2.StatusResponse = await self._admin(endpoint).Status(
                admin_pb2.StatusRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            failure = _classify(e, endpoint=endpoint, is_write=False)
            if failure.transport:
                self.router.on_transport_failure(None, endpoint, failure.reason)
            raise failure from None
        self._learn(endpoint, resp)
        return resp

    def _learn(self, endpoint: str, resp: admin_pb2.StatusResponse) -> None:
        self.router.learn_status(
            endpoint,
            resp.node_id,
            [(m.id, m.address) for m in resp.members],
            [(g.group, g.leader_id, g.term) for g in resp.groups],
        )
        self._learn_members(resp)

    async def _discover(self, group: int, deadline: Deadline) -> None:
        """Ask every endpoint whose breaker allows it for Admin.Status, concurrently; stop at the
        first answer that names a leader for ``group``. Failures are ignored (rotation remains)."""
        timeout = deadline.bound(min(self.policy.attempt_timeout, _DISCOVERY_TIMEOUT))
        if timeout <= 0:
            return
        eps = [ep for ep in self.router.endpoints if self.router.breaker(ep).would_allow()]
        if not eps:
            return
        tasks = [asyncio.ensure_future(self._status_once(ep, timeout)) for ep in eps]
        try:
            for fut in asyncio.as_completed(tasks, timeout=timeout + 0.05):
                try:
                    await fut
                except (_RpcFailure, TimeoutError, grpc.aio.AioRpcError):
                    continue
                if self.router.leader(group) is not None:
                    return
        except TimeoutError:
            return
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _maybe_discover(self, group: int, deadline: Deadline) -> None:
        if self.router.leader(group) is not None:
            return
        # Concurrent operations share one discovery round.
        if self._discovery is not None and not self._discovery.done():
            await asyncio.wait([self._discovery], timeout=deadline.remaining())
            return
        now = time.monotonic()
        if now - self.router.last_discovery < _DISCOVERY_INTERVAL:
            return
        self.router.last_discovery = now
        self._discovery = asyncio.ensure_future(self._discover(group, deadline))
        await asyncio.wait([self._discovery], timeout=deadline.remaining())

    # ----- the retry loop -----

    async def _invoke(
        self,
        op: str,
        call: Callable[[str, float], Awaitable[R]],
        *,
        deadline: Deadline,
        is_write: bool,
        group: int = DEFAULT_GROUP,
        key: bytes | None = None,
        endpoint: str | None = None,
        retry_indeterminate: bool = True,
        error_of: Callable[[R], kv_pb2.Error | None] = lambda r: r.error,  # type: ignore[attr-defined]
        learns_leader: bool = True,
        before_attempt: Callable[[int, bool], None] | None = None,
    ) -> R:
        """Run ``call(endpoint, attempt_timeout)`` until it succeeds, fails for good, or the
        deadline passes. ``endpoint`` pins every attempt to one node (no routing).
        ``before_attempt(group, retry)`` runs before each attempt, ``retry`` saying whether an
        earlier attempt's outcome was indeterminate."""
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
        attempts = 0
        redirects = 0
        last: KVError | None = None
        indeterminate: KVError | None = None
        only_transport = True
        unreachable: dict[str, str] = {}
        if endpoint is not None:
            endpoint = self.router.add_endpoint(endpoint)
        while not deadline.expired:
            if key is not None:
                # Routed by key: the map may change between attempts (WRONG_SHARD).
                await self._ensure_map(deadline)
                group = self.router.group_for_key(key)
            if endpoint is None:
                await self._maybe_discover(group, deadline)
                target = self.router.pick(group)
            else:
                target = endpoint
            if target is None:
                # Every endpoint's breaker is open: wait for the first to go half-open.
                wait = max(0.01, self.router.next_retry_at() - time.monotonic())
                await asyncio.sleep(deadline.bound(max(wait, backoff.next_delay())))
                continue
            attempt_timeout = deadline.bound(self.policy.attempt_timeout)
            if attempt_timeout <= 0:
                break
            attempts += 1
            err: KVError
            if before_attempt is not None:
                before_attempt(group, indeterminate is not None)
            try:
                resp = await call(target, attempt_timeout)
            except grpc.aio.AioRpcError as e:
                failure = _classify(e, endpoint=target, is_write=is_write)
                err = failure.error
                if failure.transport:
                    self.router.on_transport_failure(group, target, failure.reason)
                    unreachable[target] = failure.reason
                else:
                    only_transport = False
                    self.router.on_reply(target)
                retryable = failure.retryable
            else:
                proto_err = error_of(resp)
                if proto_err is not None and proto_err.shard_version:
                    have = self.router.shard_map.version if self.router.shard_map is not None else 0
                    if proto_err.shard_version > have:  # e.g. a NOT_LEADER from a node with a newer map
                        self.router.invalidate_shard_map(proto_err.shard_version)
                maybe = from_proto(proto_err, is_write=is_write) if proto_err is not None else None
                if maybe is None:
                    if learns_leader and endpoint is None:
                        self.router.on_success(group, target)
                    else:
                        self.router.on_reply(target)
                    return resp
                err = maybe
                only_transport = False
                self.router.on_reply(target)
                retryable = _retryable(err)
            if err.indeterminate:
                indeterminate = err
            last = err
            if not retryable or (err.indeterminate and not retry_indeterminate):
                if indeterminate is not None and not err.indeterminate:
                    raise _with_message(
                        err, f"{err.message} (after an earlier attempt: {indeterminate.message})", indeterminate=True
                    )
                raise err
            if endpoint is None and self._reroute(group, target, err) and redirects < _FREE_REDIRECTS:
                redirects += 1
                continue
            redirects = 0
            await asyncio.sleep(deadline.bound(backoff.next_delay()))
        raise self._give_up(op, deadline, attempts, last, indeterminate, only_transport, unreachable, endpoint)

    def _give_up(
        self,
        op: str,
        deadline: Deadline,
        attempts: int,
        last: KVError | None,
        indeterminate: KVError | None,
        only_transport: bool,
        unreachable: dict[str, str],
        endpoint: str | None,
    ) -> KVError:
        budget = f"{deadline.timeout:g}s"
        if indeterminate is not None:
            assert last is not None
            return Timeout(
                f"{op} did not complete within {budget} ({attempts} attempts; last error: {last.message})",
                indeterminate=True,
            )
        if last is None or (only_transport and isinstance(last, Unavailable)):
            eps_list = [endpoint] if endpoint is not None else list(self.router.endpoints)
            eps = ", ".join(eps_list)
            known = unreachable or {ep: self.router.last_failure[ep] for ep in eps_list if ep in self.router.last_failure}
            reasons = sorted(set(known.values()))
            reason = "; ".join(reasons) if reasons else "every endpoint's circuit breaker is open"
            return Unavailable(f"cannot reach any endpoint ({eps}): {reason}")
        if only_transport:
            # No attempt may have applied (that would have set `indeterminate`): definite.
            return Timeout(
                f"{op} did not complete within {budget} ({attempts} attempts; {last.message})", indeterminate=False
            )
        return _with_message(last, f"{last.message} (gave up after {attempts} attempts in {budget})")

    # ----- KV -----

    async def get(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
    ) -> bytes | None:
        """The value of ``key``, or None if it does not exist (see :meth:`read`)."""
        res = await self.read(
            key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
            read_preference=read_preference,
        )
        return res.value

    async def read(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
    ) -> ReadResult:
        """Read ``key`` and say where: the value (None: no such key), the node that served it, its
        applied index and how stale the answer may be.

        ``consistency``: ``linearizable`` (default; any member may serve it after confirming a
        read index with the leader), ``bounded`` (a member that can show it is at most
        ``max_staleness`` behind, in seconds or ``"500ms"``), ``stale`` (any member's local state
        at once). ``read_preference`` (default: the client's): ``leader``, ``nearest`` or
        ``replica`` (see :mod:`kvstore.client.readpref`).
        """
        k = self._check_key(key)
        req = kv_pb2.GetRequest(
            key=k, consistency=self._consistency(consistency),
            max_staleness_ms=self._staleness_ms(consistency, max_staleness),
        )

        def call(ep: str, t: float) -> Awaitable[kv_pb2.GetResponse]:
            return self._mux(ep).call("get", req, t)

        deadline = self._deadline(timeout)
        pref = read_preference or self.read_preference
        learns = consistency == "linearizable"
        if pref == "leader":
            resp = await self._invoke("get", call, deadline=deadline, is_write=False, key=k, learns_leader=learns)
        else:
            await self._ensure_map(deadline)
            resp = await self._replica_invoke("get", call, deadline=deadline, group=self.router.group_for_key(k),
                                              key=k, preference=pref, learns_leader=learns)
        return ReadResult(
            resp.value if resp.found else None, resp.index, _staleness(consistency, resp), resp.node_id, consistency
        )

    # ----- replica reads -----

    def _learn_members(self, resp: admin_pb2.StatusResponse) -> None:
        self.replicas.learn(
            (g.group, g.role, g.leader_id, g.term, list(g.voters), list(g.learners)) for g in resp.groups
        )

    async def _refresh_members(self, timeout: float) -> None:
        """Admin.Status of every endpoint whose breaker allows it, concurrently (learns members,
        their addresses and roles)."""
        eps = [ep for ep in self.router.endpoints if self.router.breaker(ep).would_allow()]
        await asyncio.gather(*(self._status_once(ep, timeout) for ep in eps), return_exceptions=True)

    async def _ensure_members(self, group: int, deadline: Deadline) -> None:
        """Keep the membership fresh: wait for it the first time, refresh it in the background."""
        if not self.replicas.needs_refresh(group):
            return
        if self._members_refresh is None or self._members_refresh.done():
            self.replicas.last_refresh = time.monotonic()
            timeout = max(0.05, deadline.bound(min(self.policy.attempt_timeout, _DISCOVERY_TIMEOUT)))
            self._members_refresh = asyncio.ensure_future(self._refresh_members(timeout))
        if not self.replicas.knows(group):
            await asyncio.wait([self._members_refresh], timeout=deadline.remaining())

    async def _replica_invoke(
        self,
        op: str,
        call: Callable[[str, float], Awaitable[R]],
        *,
        deadline: Deadline,
        group: int,
        preference: str,
        learns_leader: bool,
        key: bytes | None = None,
    ) -> R:
        """One attempt at each eligible endpoint in order of ``preference`` (see readpref); if
        none could serve the read, the leader path (retried until the deadline)."""
        await self._ensure_members(group, deadline)
        tried: list[str] = []
        last: KVError | None = None
        while not deadline.expired:
            ep = self.replicas.pick(group, preference, exclude=tried)
            if ep is None:
                break
            tried.append(ep)
            t = deadline.bound(self.policy.attempt_timeout)
            if t <= 0:
                break
            self.replicas.begin(ep)
            try:
                resp = await call(ep, t)
            except grpc.aio.AioRpcError as e:
                failure = _classify(e, endpoint=ep, is_write=False)
                if failure.transport:
                    self.router.on_transport_failure(group, ep, failure.reason)
                else:
                    self.router.on_reply(ep)
                if not failure.retryable:
                    raise failure.error from None
                last = failure.error
                continue
            finally:
                self.replicas.end(ep)
            err = from_proto(resp.error, is_write=False)  # type: ignore[attr-defined]
            self.router.on_reply(ep)
            if err is None:
                self.replicas.record_served(ep)
                return resp
            if not _retryable(err):
                raise err
            if isinstance(err, StaleReplica):
                self.replicas.mark_behind(group, ep)
            last = err
        if deadline.expired:
            if last is None:
                raise Timeout(f"{op} did not complete within {deadline.timeout:g}s")
            raise _with_message(last, f"{last.message} (gave up after {len(tried)} replicas in {deadline.timeout:g}s)")
        return await self._invoke(
            op, call, deadline=deadline, is_write=False, group=group, key=key, learns_leader=learns_leader
        )

    async def _write(
        self, op: str, key: bytes, make_request: Callable[[kv_pb2.Session], Any], timeout: float | None
    ) -> Any:
        """Run one write (`op`: put, delete or cas, the operation's name on the stream) under a
        fresh session; every retry reuses that session (exactly-once).

        Until an attempt's outcome is indeterminate, each attempt records its group and the
        highest index this client has seen from that group (the horizon). Once one is, every
        later attempt carries ``retry`` and, if it goes to the recorded group, that horizon (0
        otherwise): a group that evicted the session since then refuses it (SESSION_EXPIRED,
        indeterminate) rather than applying it a second time."""
        session = self._begin_write()
        seen = self._seen
        # The group and horizon of the first attempt that may have applied, and the latest group.
        first = [0, 0, 0]

        try:
            req = make_request(session)
            s = req.session

            def before_attempt(group: int, retry: bool) -> None:
                if not retry:
                    first[0] = group
                    first[1] = seen.get(group, 0)
                else:
                    s.retry = True
                    s.horizon = first[1] if group == first[0] else 0
                first[2] = group

            def call(ep: str, t: float) -> Awaitable[Any]:
                return self._mux(ep).call(op, req, t)

            resp = await self._invoke(
                op, call, deadline=self._deadline(timeout), is_write=True, key=key, before_attempt=before_attempt
            )
            group = first[2]
            if resp.index > seen.get(group, 0):
                seen[group] = resp.index
            return resp
        finally:
            self._end_write(session)

    async def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> None:
        """Set ``key`` to ``value``."""
        k, v = self._check_key(key), self._check_value(value)
        await self._write("put", k, lambda s: kv_pb2.PutRequest(key=k, value=v, session=s), timeout)

    async def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        k = self._check_key(key)
        resp = await self._write("delete", k, lambda s: kv_pb2.DeleteRequest(key=k, session=s), timeout)
        return bool(resp.existed)

    async def cas(
        self, key: bytes, expected: bytes | None, new: bytes, *, timeout: float | None = None
    ) -> bool:
        """Set ``key`` to ``new`` if its current value is ``expected`` (None: if it does not
        exist). True if swapped."""
        k, v = self._check_key(key), self._check_value(new)
        exp = b"" if expected is None else self._check_value(expected)
        resp = await self._write(
            "cas",
            k,
            lambda s: kv_pb2.CasRequest(key=k, expect_absent=expected is None, expected=exp, value=v, session=s),
            timeout,
        )
        return bool(resp.swapped)

    async def scan(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
    ) -> AsyncIterator[tuple[bytes, bytes]]:
        """Stream ``(key, value)`` pairs in key order: keys starting with ``prefix`` and within
        ``[start, end)`` (both optional), at most ``limit`` (0 = all).

        Use as ``async for key, value in client.scan(b"user/"):``. Keys are spread over every
        data group by hashing, so the scan asks every group (concurrently) for its part and merges
        them. Each part is read at its group's leader (linearizable per group), and the parts must
        cover the hash space exactly once (otherwise a range was moving: the scan is retried with
        a fresh shard map). The scan as a whole is not one atomic snapshot across groups.
        ``timeout`` bounds the whole scan, retries included.
        """
        async for chunk in self.scan_chunks(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference,
        ):
            for item in chunk:
                yield item

    async def scan_chunks(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
    ) -> AsyncGenerator[list[tuple[bytes, bytes]], None]:
        """Like :meth:`scan`, in lists of pairs."""
        prefix = _check_bytes("prefix", prefix)
        start = None if start is None else _check_bytes("start", start)
        end = None if end is None else _check_bytes("end", end)
        if not 0 <= limit <= U64_MAX:
            raise InvalidArgument(f"limit must be in 0..{U64_MAX}")
        level = self._consistency(consistency)
        staleness_ms = self._staleness_ms(consistency, max_staleness)
        pref = read_preference or self.read_preference
        lo, hi = scan_range(prefix, start, end)
        if hi is not None and lo >= hi:
            return
        deadline = self._deadline(timeout)
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
        learns_leader = consistency == "linearizable" and pref == "leader"
        while True:
            await self._ensure_map(deadline)
            groups = self.router.scan_groups()
            sharded = self.router.shard_map is not None
            parts = [_ScanPart(g, lo, hi, level, staleness_ms, pref, 0 < limit <= ONE_MESSAGE_SCAN) for g in groups]
            try:
                await asyncio.gather(*(self._scan_open(p, limit, level, deadline, learns_leader) for p in parts))
            except BaseException:
                for p in parts:
                    p.close()
                raise
            if not sharded or _covers_once([p.owned or IntervalSet() for p in parts]):
                break
            for p in parts:
                p.close()
            # A range moved between the parts' read points: try again with a newer map.
            self.router.invalidate_shard_map()
            if deadline.expired:
                raise Timeout(f"scan did not get a consistent set of parts within {deadline.timeout:g}s "
                              "(ranges kept moving between groups)")
            await asyncio.sleep(deadline.bound(backoff.next_delay()))
        try:
            remaining = limit
            heap: list[tuple[bytes, int]] = []
            for i, p in enumerate(parts):
                if await self._scan_fill(p, limit, level, timeout, learns_leader):
                    heap.append((p.buf[0][0], i))
            heapq.heapify(heap)
            out: list[tuple[bytes, bytes]] = []
            while heap:
                _, i = heapq.heappop(heap)
                p = parts[i]
                out.append(p.buf.popleft())
                if remaining:
                    remaining -= 1
                    if remaining == 0:
                        break
                if not p.buf and not p.done:
                    if out:  # hand over what we have before waiting for the network
                        yield out
                        out = []
                    await self._scan_fill(p, limit, level, timeout, learns_leader)
                if p.buf:
                    heapq.heappush(heap, (p.buf[0][0], i))
                if len(out) >= 512:
                    yield out
                    out = []
            if out:
                yield out
        finally:
            for p in parts:
                p.close()

    async def _scan_open(
        self, part: _ScanPart, limit: int, level: kv_pb2.Consistency, deadline: Deadline, learns_leader: bool
    ) -> None:
        """Open ``part``'s stream at its group's leader (retrying as any read) and read its first
        message, which carries the hash ranges the group serves at its read point."""
        group = part.group
        backoff = Backoff(self.policy.backoff_base, self.policy.backoff_cap, rng=self._rng)
        attempts = redirects = 0
        last: KVError | None = None
        only_transport = True
        unreachable: dict[str, str] = {}
        while True:
            if deadline.expired:
                raise self._give_up("scan", deadline, attempts, last, None, only_transport, unreachable, None)
            target = None
            if part.pref != "leader":  # each eligible replica once, then the leader path
                await self._ensure_members(group, deadline)
                target = self.replicas.pick(group, part.pref, exclude=part.replicas_tried)
                if target is not None:
                    part.replicas_tried.append(target)
            if target is None:
                await self._maybe_discover(group, deadline)
                target = self.router.pick(group)
            if target is None:
                wait = max(0.01, self.router.next_retry_at() - time.monotonic())
                await asyncio.sleep(deadline.bound(max(wait, backoff.next_delay())))
                continue
            attempts += 1
            want = max(0, limit - part.received) if limit else 0
            req = kv_pb2.ScanRequest(
                start=part.lo, end=part.hi or b"", limit=want, consistency=level, group=group,
                max_staleness_ms=part.staleness_ms,
            )
            # A small part is asked for in one message on the node's operation stream; others
            # get a KV.Scan stream, with no gRPC deadline: every message must arrive within the
            # attempt timeout and the deadline instead.
            stream = None if part.one_message else self._kv(target).Scan(req)
            err: KVError
            retryable = True
            try:
                wait = deadline.bound(self.policy.attempt_timeout)
                try:
                    if stream is None:
                        resp = await self._mux(target).call("scan", req, wait if wait > 0 else 0.001)
                    else:
                        resp = await asyncio.wait_for(stream.read(), wait if wait > 0 else 0.001)
                except TimeoutError:
                    err = Timeout(f"{target} did not answer in time")
                    self.router.on_transport_failure(group, target, "timed out")
                    unreachable[target] = "timed out"
                else:
                    if resp is grpc.aio.EOF:
                        err = Unavailable(f"{target} ended the scan stream early")
                    elif (maybe := from_proto(resp.error, is_write=False)) is not None:
                        err = maybe
                        only_transport = False
                        retryable = _retryable(err)
                        self.router.on_reply(target)
                    elif stream is None and resp.more:
                        part.one_message = False  # it does not fit in one message: stream it
                        continue
                    else:
                        self._scan_reply(group, target, learns_leader)
                        if target in part.replicas_tried:
                            self.replicas.record_served(target)
                        owned = IntervalSet(zip(resp.owned_lo, resp.owned_hi, strict=True))
                        if part.owned is not None and owned != part.owned:
                            if stream is not None:
                                stream.cancel()
                            raise Unavailable(
                                f"scan interrupted: group {group}'s ranges changed while it was resumed; retry the scan"
                            )
                        part.owned = owned
                        part.stream, part.target = stream, target
                        part.take(resp)
                        return
            except grpc.aio.AioRpcError as e:
                if stream is None and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    part.one_message = False  # a node that cannot scan on its operation stream
                    continue
                failure = _classify(e, endpoint=target, is_write=False)
                err = failure.error
                retryable = failure.retryable
                if failure.transport:
                    self.router.on_transport_failure(group, target, failure.reason)
                    unreachable[target] = failure.reason
                else:
                    only_transport = False
                    self.router.on_reply(target)
            if stream is not None:
                stream.cancel()
            last = err
            if not retryable:
                raise err
            if self._reroute(group, target, err) and redirects < _FREE_REDIRECTS:
                redirects += 1
                continue
            redirects = 0
            await asyncio.sleep(deadline.bound(backoff.next_delay()))

    async def _scan_fill(
        self, part: _ScanPart, limit: int, level: kv_pb2.Consistency, timeout: float | None, learns_leader: bool
    ) -> bool:
        """Read until ``part`` has buffered items or is done; a broken stream is resumed after
        the last key received. True if items are buffered."""
        while not part.buf and not part.done:
            deadline = self._deadline(timeout)  # each chunk gets a fresh deadline
            if part.stream is None:
                await self._scan_open(part, limit, level, deadline, learns_leader)
                continue
            target = part.target
            try:
                wait = deadline.bound(self.policy.attempt_timeout)
                resp = await asyncio.wait_for(part.stream.read(), wait if wait > 0 else 0.001)
            except TimeoutError:
                self.router.on_transport_failure(part.group, target, "timed out")
                part.close()
                continue
            except grpc.aio.AioRpcError as e:
                failure = _classify(e, endpoint=target, is_write=False)
                if failure.transport:
                    self.router.on_transport_failure(part.group, target, failure.reason)
                if not failure.retryable:
                    raise failure.error from None
                part.close()
                continue
            if resp is grpc.aio.EOF:
                part.close()
                continue
            maybe = from_proto(resp.error, is_write=False)
            if maybe is not None:
                part.close()
                if not _retryable(maybe):
                    raise maybe
                self._reroute(part.group, target, maybe)
                continue
            part.take(resp)
        return bool(part.buf)

    def _scan_reply(self, group: int, target: str, learns_leader: bool) -> None:
        if learns_leader:
            self.router.on_success(group, target)
        else:
            self.router.on_reply(target)

    def _reroute(self, group: int, target: str, err: KVError) -> bool:
        """Update routing after a retryable failure at ``target``; True if a redirect names a
        new leader worth trying at once."""
        if isinstance(err, NotLeader):
            return self.router.on_redirect(group, target, err.leader_id, err.leader_address) is not None
        # A node whose disk is full stops: another node will lead once it notices.
        if isinstance(err, NoLeader | LeadershipLost | ShuttingDown | Timeout | InternalError | StorageFull):
            self.router.forget_leader(group, target)
        elif isinstance(err, WrongShard):
            # Either our map is stale (fetch a newer one at once), or the range is moving
            # between groups right now (back off, then ask again).
            self.router.forget_leader(group, target)
            have = self.router.shard_map.version if self.router.shard_map is not None else 0
            self.router.invalidate_shard_map(err.shard_version)
            return err.shard_version > have
        elif isinstance(err, StaleReplica):
            self.replicas.mark_behind(group, target)
            self.router.rotate_past(target)
        return False

    # ----- admin -----

    async def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> admin_pb2.StatusResponse:
        """Admin.Status of ``endpoint``, or of whichever node answers first (the leader if known)."""

        async def call(ep: str, t: float) -> admin_pb2.StatusResponse:
            resp: admin_pb2.StatusResponse = await self._admin(ep).Status(admin_pb2.StatusRequest(), timeout=t)
            self._learn(ep, resp)
            return resp

        return await self._invoke(
            "status",
            call,
            deadline=self._deadline(timeout),
            is_write=False,
            endpoint=endpoint,
            error_of=lambda r: None,
            learns_leader=False,
        )

    async def cluster_status(self, *, timeout: float | None = None) -> list[NodeStatus]:
        """Admin.Status of every known endpoint and every member they report, concurrently.

        One attempt per node, each bounded by the attempt timeout. Nodes that cannot be reached
        are listed with their error. Ordered by node id (unreachable ones last, by address).
        Raises :class:`Unavailable` if no node answers.
        """
        deadline = self._deadline(timeout)
        results: dict[str, NodeStatus] = {}
        reasons: set[str] = set()
        seen_ids: set[int] = set()
        while True:
            todo = [ep for ep in self.router.endpoints if ep not in results]
            if not todo or deadline.expired:
                break
            t = deadline.bound(self.policy.attempt_timeout)
            answers = await asyncio.gather(*(self._status_once(ep, t) for ep in todo), return_exceptions=True)
            for ep, ans in zip(todo, answers, strict=True):
                if isinstance(ans, admin_pb2.StatusResponse):
                    results[ep] = NodeStatus(ep, status=ans)
                elif isinstance(ans, _RpcFailure):
                    results[ep] = NodeStatus(ep, error=ans.error)
                    reasons.add(ans.reason)
                elif isinstance(ans, BaseException) and not isinstance(ans, Exception):
                    raise ans
                else:
                    results[ep] = NodeStatus(ep, error=InternalError(str(ans), indeterminate=False))
        if not any(ns.status is not None for ns in results.values()):
            eps = ", ".join(self.router.endpoints)
            raise Unavailable(f"cannot reach any endpoint ({eps}): {'; '.join(sorted(reasons)) or 'timed out'}")
        # An advertised address and a dialed one may name the same node: keep the first answer.
        out: list[NodeStatus] = []
        for ns in results.values():
            if ns.status is not None:
                if ns.status.node_id in seen_ids:
                    continue
                seen_ids.add(ns.status.node_id)
            out.append(ns)
        out.sort(key=lambda ns: (ns.status is None, ns.status.node_id if ns.status else 0, ns.address))
        return out

    async def _admin_call(
        self,
        op: str,
        call: Callable[[admin_pb2_grpc.AdminStub, float], Awaitable[admin_pb2.AdminResponse]],
        *,
        endpoint: str | None = None,
        timeout: float | None = None,
    ) -> admin_pb2.AdminResponse:
        # Admin operations carry no session, so an indeterminate outcome is not retried. A
        # membership change or transfer runs group after group on the server: each attempt may
        # use the whole budget rather than the per-attempt timeout of a single read or write.
        # Default budget: 3x a read's or write's (a change commits in every group, one by one).
        deadline = self._deadline(timeout if timeout is not None else 3 * self.policy.timeout)
        return await self._invoke(
            op,
            lambda ep, t: call(self._admin(ep), max(t, deadline.remaining())),
            deadline=deadline,
            is_write=True,
            endpoint=endpoint,
            retry_indeterminate=False,
        )

    async def add_member(
        self, id: int, address: str, learner: bool = True, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        """Add node ``id`` at ``address``, as a learner by default (promote it once caught up), to
        the metadata group and every data group, or only to the data ``groups`` given."""
        req = admin_pb2.AddMemberRequest(id=id, address=address, learner=learner, groups=list(groups))
        return await self._admin_call("add member", lambda s, t: s.AddMember(req, timeout=t), timeout=timeout)

    async def promote_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        """Promote learner ``id`` to voter (everywhere, or in the data ``groups`` given)."""
        req = admin_pb2.PromoteMemberRequest(id=id, groups=list(groups))
        return await self._admin_call(
            "promote member", lambda s, t: s.PromoteMember(req, timeout=t), timeout=timeout
        )

    async def remove_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        """Remove node ``id`` from the cluster (or only from the data ``groups`` given)."""
        req = admin_pb2.RemoveMemberRequest(id=id, groups=list(groups))
        return await self._admin_call(
            "remove member", lambda s, t: s.RemoveMember(req, timeout=t), timeout=timeout
        )

    async def transfer_leader(
        self, to: int = 0, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        """Hand leadership of every group (or of ``groups``) to node ``to`` (0: each group's
        most up-to-date other voter)."""
        req = admin_pb2.TransferLeaderRequest(to=to, groups=list(groups))
        resp = await self._admin_call(
            "transfer leader", lambda s, t: s.TransferLeader(req, timeout=t), timeout=timeout
        )
        for g in [DEFAULT_GROUP, 0, *self.router.scan_groups()]:
            self.router.forget_leader(g)
        return resp

    # ----- shards -----

    async def _shard_op(
        self, op: str, req: shard_pb2.ShardOpRequest, timeout: float | None, *, write: bool
    ) -> shard_pb2.ShardOpResponse:
        resp: shard_pb2.ShardOpResponse = await self._invoke(
            op,
            # With `wait`, the server answers once every move is done: the attempt may take as
            # long as the request's own timeout.
            lambda ep, t: self._shard(ep).ShardOp(req, timeout=max(t, req.timeout + 5.0) if req.wait else t),
            deadline=self._deadline(timeout),
            is_write=write,
            retry_indeterminate=False,
            learns_leader=False,
        )
        return resp

    async def shards(self, *, timeout: float | None = None) -> shard_pb2.ShardOpResponse:
        """The shard map's groups: replicas, leader, key count, share of the hash space."""
        return await self._shard_op("shards", shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.INFO), timeout,
                                    write=False)

    async def add_group(self, *, wait: bool = True, timeout: float = 300.0) -> shard_pb2.ShardOpResponse:
        """Add a data group; with ``wait``, return once its ranges have moved in."""
        req = shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.ADD_GROUP, wait=wait, timeout=timeout)
        return await self._shard_op("add group", req, timeout + 10, write=True)

    async def remove_group(self, group: int, *, wait: bool = True, timeout: float = 300.0) -> shard_pb2.ShardOpResponse:
        """Move every range of ``group`` to the other groups, then drop it."""
        req = shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.REMOVE_GROUP, group=group, wait=wait,
                                       timeout=timeout)
        return await self._shard_op("remove group", req, timeout + 10, write=True)

    async def rebalance(self, *, wait: bool = True, timeout: float = 300.0) -> shard_pb2.ShardOpResponse:
        """Return every group to its even share of the ring, moving ranges as needed."""
        req = shard_pb2.ShardOpRequest(op=shard_pb2.ShardOpRequest.REBALANCE, wait=wait, timeout=timeout)
        return await self._shard_op("rebalance", req, timeout + 10, write=True)

    async def snapshot(
        self, endpoint: str | None = None, *, timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        """Trigger a snapshot (and log compaction) at ``endpoint``, or at the leader."""
        req = admin_pb2.SnapshotRequest()
        return await self._admin_call(
            "snapshot", lambda s, t: s.Snapshot(req, timeout=t), endpoint=endpoint, timeout=timeout
        )


class _ScanPart:
    """One group's stream of a fanned-out scan."""

    __slots__ = (
        "buf", "done", "group", "hi", "level", "lo", "one_message", "owned", "pref", "received",
        "replicas_tried", "staleness_ms", "stream", "target",
    )

    def __init__(
        self, group: int, lo: bytes, hi: bytes | None, level: kv_pb2.Consistency, staleness_ms: int, pref: str,
        one_message: bool = False,
    ) -> None:
        self.group = group
        self.one_message = one_message
        """Ask for the part in one message on the operation stream (until it turns out not to fit)."""
        self.level = level
        self.staleness_ms = staleness_ms
        self.pref = pref
        self.replicas_tried: list[str] = []
        self.lo = lo  # where to resume: after the last key received
        self.hi = hi
        self.owned: IntervalSet | None = None
        self.buf: deque[tuple[bytes, bytes]] = deque()
        self.done = False
        self.received = 0
        self.stream: Any = None
        self.target = ""

    def take(self, resp: kv_pb2.ScanResponse) -> None:
        items = [(kv.key, kv.value) for kv in resp.items]
        if items:
            self.buf.extend(items)
            self.received += len(items)
            self.lo = items[-1][0] + b"\x00"
        if not resp.more:
            self.done = True
            self.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None


def group_status(st: admin_pb2.StatusResponse, group: int = DEFAULT_GROUP) -> admin_pb2.GroupStatus | None:
    """The status of ``group`` in a node's Admin.Status answer (None if the node lacks it)."""
    for g in st.groups:
        if g.group == group:
            return g
    return None


def _covers_once(parts: list[IntervalSet]) -> bool:
    """True if the sets are disjoint and together cover the whole hash space."""
    total = sum(p.size() for p in parts)
    if total != HASH_MAX + 1:
        return False
    union = IntervalSet()
    for p in parts:
        union = union.union(p)
    return union.size() == total


class Client:
    """Synchronous kvstore client: the same methods as :class:`AsyncClient`, run on a private
    event loop in a background daemon thread. Safe to call from any thread (but not from a
    callback running on its own loop). ``scan`` returns a plain iterator.

    Accepts the same arguments as :class:`AsyncClient`.
    """

    def __init__(self, endpoints: Sequence[str] | str, **kwargs: Any) -> None:
        self._async = AsyncClient(endpoints, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run_loop, name="kvstore-client", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the synchronous Client cannot be called from its own event loop")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    @property
    def async_client(self) -> AsyncClient:
        return self._async

    @property
    def client_id(self) -> int:
        return self._async.client_id

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._async.endpoints

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and stop the background thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            if threading.current_thread() is self._thread:
                raise RuntimeError("the synchronous Client cannot be closed from its own event loop")
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._async.close(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def get(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
    ) -> bytes | None:
        return self._run(
            self._async.get(
                key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
                read_preference=read_preference,
            )
        )

    def read(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
    ) -> ReadResult:
        return self._run(
            self._async.read(
                key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
                read_preference=read_preference,
            )
        )

    def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> None:
        return self._run(self._async.put(key, value, timeout=timeout))

    def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        return self._run(self._async.delete(key, timeout=timeout))

    def cas(self, key: bytes, expected: bytes | None, new: bytes, *, timeout: float | None = None) -> bool:
        return self._run(self._async.cas(key, expected, new, timeout=timeout))

    def scan(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int = 0,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Iterate ``(key, value)`` pairs; fetched chunk by chunk as the iteration proceeds."""
        agen = self._async.scan_chunks(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference,
        )

        async def next_chunk() -> list[tuple[bytes, bytes]] | None:
            try:
                return await anext(agen)
            except StopAsyncIteration:
                return None

        try:
            while (chunk := self._run(next_chunk())) is not None:
                yield from chunk
        finally:
            if not self._closed:
                self._run(agen.aclose())

    def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> admin_pb2.StatusResponse:
        return self._run(self._async.status(endpoint, timeout=timeout))

    def cluster_status(self, *, timeout: float | None = None) -> list[NodeStatus]:
        return self._run(self._async.cluster_status(timeout=timeout))

    def add_member(
        self, id: int, address: str, learner: bool = True, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        return self._run(self._async.add_member(id, address, learner, groups=groups, timeout=timeout))

    def promote_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        return self._run(self._async.promote_member(id, groups=groups, timeout=timeout))

    def remove_member(
        self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        return self._run(self._async.remove_member(id, groups=groups, timeout=timeout))

    def transfer_leader(
        self, to: int = 0, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> admin_pb2.AdminResponse:
        return self._run(self._async.transfer_leader(to, groups=groups, timeout=timeout))

    def snapshot(self, endpoint: str | None = None, *, timeout: float | None = None) -> admin_pb2.AdminResponse:
        return self._run(self._async.snapshot(endpoint, timeout=timeout))

    def shard_map(self, *, refresh: bool = False, timeout: float | None = None) -> ShardMap | None:
        return self._run(self._async.shard_map(refresh=refresh, timeout=timeout))

    def shards(self, *, timeout: float | None = None) -> shard_pb2.ShardOpResponse:
        return self._run(self._async.shards(timeout=timeout))

    def add_group(self, *, wait: bool = True, timeout: float = 300.0) -> shard_pb2.ShardOpResponse:
        return self._run(self._async.add_group(wait=wait, timeout=timeout))

    def remove_group(self, group: int, *, wait: bool = True, timeout: float = 300.0) -> shard_pb2.ShardOpResponse:
        return self._run(self._async.remove_group(group, wait=wait, timeout=timeout))

    def rebalance(self, *, wait: bool = True, timeout: float = 300.0) -> shard_pb2.ShardOpResponse:
        return self._run(self._async.rebalance(wait=wait, timeout=timeout))
