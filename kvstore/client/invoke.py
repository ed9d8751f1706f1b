"""The retry loop every client operation runs in: route, attempt, classify, back off, redirect,
until success, a failure retrying cannot fix, or the operation's deadline.

Invariants (see the package docstring for the whole contract):
- one total deadline bounds all attempts, redirects and backoff; each attempt is bounded by the
  policy's attempt timeout;
- once any attempt's outcome was indeterminate, the final error is indeterminate too (a write
  that may have applied is never reported as definitely failed);
- a reply's shard map version newer than ours invalidates our map before the next attempt;
- up to `FREE_REDIRECTS` NOT_LEADER redirects in a row are followed without sleeping;
- a RESOURCE_EXHAUSTED refusal (rate limit, load shedding: definite) is retried after at least
  its retry-after, at most `policy.overload_retries` times, and never past the deadline: then
  it is the caller's error (definite unless an earlier attempt was indeterminate);
- with a login (`relogin`), an UNAUTHENTICATED refusal (definite: an expired or revoked token,
  e.g. a stream cut off when its token expired) is retried once with a fresh token; a second
  one is the caller's error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from kvstore.client.cluster_view import ClusterView
from kvstore.client.failures import classify, is_retryable, with_message
from kvstore.client.retry import Backoff, Deadline, RetryPolicy
from kvstore.client.routing import DEFAULT_GROUP
from kvstore.errors import (
    ClientClosed,
    InternalError,
    KVError,
    LeadershipLost,
    NoLeader,
    NotLeader,
    ResourceExhausted,
    ShuttingDown,
    StaleReplica,
    StorageFull,
    Timeout,
    Unauthenticated,
    Unavailable,
    WrongShard,
    from_proto,
)
from kvstore.v1 import kv_pb2

__all__ = ["FREE_REDIRECTS", "LAST_SLIVER", "Invoker"]

#: Follow this many NOT_LEADER redirects in a row without sleeping, then back off.
FREE_REDIRECTS = 3
LAST_SLIVER = 0.25
"""After the first attempt, none is started with less than this share of the attempt timeout
left before the deadline: one the deadline cuts short would make a write that so far failed
definitely (NO_LEADER, say) indeterminate, for a sliver that rarely succeeds."""

R = TypeVar("R")


class Invoker:
    """Runs calls against the cluster with routing, retries and error classification."""

    def __init__(self, view: ClusterView, policy: RetryPolicy, rng: random.Random,
                 relogin: Callable[[float], bool] | None = None) -> None:
        self.relogin = relogin
        """`relogin(started)`: a call started at `started` (monotonic) was refused
        UNAUTHENTICATED; renew the login; True if the call may be retried (once)."""
        self.view = view
        self.router = view.router
        self.replicas = view.replicas
        self.policy = policy
        self._rng = rng

    async def invoke(
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
        overloaded = 0
        last: KVError | None = None
        telling: KVError | None = None  # the last error that was not a redirect followed at once
        indeterminate: KVError | None = None
        only_transport = True
        unreachable: dict[str, str] = {}
        relogged = False
        if endpoint is not None:
            endpoint = self.router.add_endpoint(endpoint)
        while not deadline.expired:
            if key is not None:
                # Routed by key: the map may change between attempts (WRONG_SHARD).
                await self.view.ensure_map(deadline)
                group = self.router.group_for_key(key)
            if endpoint is None:
                await self.view.maybe_discover(group, deadline)
                target = self.router.pick(group)
            else:
                target = endpoint
            if target is None:
                # Every endpoint's breaker is open: wait for the first to go half-open.
                wait = max(0.01, self.router.next_retry_at() - time.monotonic())
                await asyncio.sleep(deadline.bound(max(wait, backoff.next_delay())))
                continue
            attempt_timeout = deadline.bound(self.policy.attempt_timeout)
            if attempt_timeout <= 0 or (attempts and attempt_timeout < self.policy.attempt_timeout * LAST_SLIVER):
                # What is left of the deadline would likely cut the attempt short, and a write cut
                # short is indeterminate: give up with what the earlier attempts said instead.
                break
            attempts += 1
            err: KVError
            if before_attempt is not None:
                before_attempt(group, indeterminate is not None)
            started = time.monotonic()
            try:
                resp = await call(target, attempt_timeout)
            except ClientClosed as e:
                if indeterminate is not None:  # an earlier attempt may have applied
                    raise with_message(
                        e, f"{e.message} (after an earlier attempt: {indeterminate.message})", indeterminate=True
                    ) from None
                raise
            except grpc.aio.AioRpcError as e:
                failure = classify(e, endpoint=target, is_write=is_write)
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
                retryable = is_retryable(err)
            if err.indeterminate:
                indeterminate = err
            last = err
            if (isinstance(err, Unauthenticated) and not relogged and self.relogin is not None
                    and self.relogin(started)):
                relogged = True  # an expired or revoked token: once more, with a fresh one
                continue
            if not retryable or (err.indeterminate and not retry_indeterminate):
                if indeterminate is not None and not err.indeterminate:
                    raise with_message(
                        err, f"{err.message} (after an earlier attempt: {indeterminate.message})", indeterminate=True
                    )
                raise err
            if isinstance(err, ResourceExhausted):
                overloaded += 1
                wait = backoff.at_least(err.retry_after)
                if overloaded > self.policy.overload_retries or wait >= deadline.remaining():
                    raise self._overloaded(err, overloaded, indeterminate)
                await asyncio.sleep(wait)
                continue
            if endpoint is None and self.reroute(group, target, err) and redirects < FREE_REDIRECTS:
                redirects += 1
                continue
            telling = err
            redirects = 0
            await asyncio.sleep(deadline.bound(backoff.next_delay()))
        # A NOT_LEADER whose redirect the deadline cut short says only where to go next: report
        # what the node it pointed at last said (a leader's TIMEOUT, say), if anything.
        told = telling if telling is not None and isinstance(last, NotLeader) else last
        raise self.give_up(op, deadline, attempts, told, indeterminate, only_transport, unreachable, endpoint)

    @staticmethod
    def _overloaded(err: ResourceExhausted, refusals: int, indeterminate: KVError | None) -> KVError:
        """The error for an operation the server kept refusing for overload."""
        note = f"refused {refusals} times for overload; server's retry-after {err.retry_after:.3g}s"
        if indeterminate is not None:
            return with_message(err, f"{err.message} ({note}; after an earlier attempt: {indeterminate.message})",
                                indeterminate=True)
        return with_message(err, f"{err.message} ({note})")

    def give_up(
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
        return with_message(last, f"{last.message} (gave up after {attempts} attempts in {budget})")

    async def replica_invoke(
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
        await self.view.ensure_members(group, deadline)
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
                failure = classify(e, endpoint=ep, is_write=False)
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
            if not is_retryable(err):
                raise err
            if isinstance(err, StaleReplica):
                self.replicas.mark_behind(group, ep)
            last = err
        if deadline.expired:
            if last is None:
                raise Timeout(f"{op} did not complete within {deadline.timeout:g}s")
            raise with_message(last, f"{last.message} (gave up after {len(tried)} replicas in {deadline.timeout:g}s)")
        return await self.invoke(
            op, call, deadline=deadline, is_write=False, group=group, key=key, learns_leader=learns_leader
        )

    def reroute(self, group: int, target: str, err: KVError) -> bool:
        """Update routing after a retryable failure at ``target``; True if a redirect names a
        new leader worth trying at once."""
        if isinstance(err, NotLeader):
            return self.router.on_redirect(
                group, target, err.leader_id, err.leader_address, err.leader_client_address) is not None
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
