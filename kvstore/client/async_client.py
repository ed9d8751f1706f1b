"""`AsyncClient`: the asynchronous kvstore client, a facade over the modules that do the work.

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
- Errors that retrying cannot fix (too large, invalid argument, storage full, NOSPACE) are raised at once.
- RESOURCE_EXHAUSTED (rate limit, load shedding; definite) is retried after at least the server's
  retry-after, at most `overload_retries` times (default 5), then raised (definite).
- Reads take a consistency level (``linearizable``, ``bounded`` with a ``max_staleness``, or
  ``stale``) and a read preference (``leader``, ``nearest``, ``replica``: see
  :mod:`kvstore.client.readpref`); :meth:`AsyncClient.read` also says which node served the read,
  at which applied index and how stale it may be. Writes always go to the leader.

The parts, one job each: `channels` (connections), `cluster_view` (shard map, leaders,
members), `invoke` (the retry loop), `writes` (sessions), `reads`, `scans`, `admin`
(status, membership, shards); `checks` validates requests before anything is sent and
`failures` classifies failed RPCs. The synchronous `Client` (`client.py`) runs this one on a
private event loop.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from kvstore import errors
from kvstore.client.admin import Admin
from kvstore.client.auth import FixedToken, TokenSource, interceptors
from kvstore.client.channels import CHANNEL_OPTIONS, Channels, close_all_streams
from kvstore.client.checks import DEFAULT_MAX_KEY_SIZE, DEFAULT_MAX_VALUE_SIZE, RequestChecks
from kvstore.client.cluster_view import ClusterView
from kvstore.client.failures import classify
from kvstore.client.invoke import Invoker
from kvstore.client.leases import Leases
from kvstore.client.readpref import ReplicaRouter
from kvstore.client.reads import Reads
from kvstore.client.retry import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_BREAKER_COOLDOWN,
    DEFAULT_BREAKER_THRESHOLD,
    DEFAULT_OVERLOAD_RETRIES,
    DEFAULT_TIMEOUT,
    Deadline,
    RetryPolicy,
)
from kvstore.client.routing import Router
from kvstore.client.scans import Scans
from kvstore.client.txns import leased_ids, txn_body
from kvstore.client.types import (
    AdminResult,
    Alarm,
    Compare,
    Consistency,
    GroupHash,
    KeyValue,
    NodeStatus,
    Op,
    ReadPreference,
    ReadResult,
    ShardOpResult,
    Status,
    TxnResponse,
)
from kvstore.client.watches import WatchBatch, Watches, WatchEvent
from kvstore.client.writes import Writes
from kvstore.errors import KVError, Timeout
from kvstore.shard.shardmap import ShardMap
from kvstore.storage import leases

__all__ = ["AsyncClient"]



def _left(deadline: Deadline) -> float:
    """What is left of `deadline` for the next call; spent: `Timeout`, definite (the lease
    lookups before a transaction are reads: nothing was written)."""
    left = deadline.remaining()
    if left <= 0:
        raise Timeout("the transaction's lease lookups used up its timeout", indeterminate=False)
    return left

class AsyncClient:
    """Asynchronous kvstore client (grpc.aio). Use it from one event loop.

    ``endpoints``: ``["host:port", ...]`` (or a comma-separated string); any node will do, the
    client discovers the leader and the other members. ``timeout`` is the default total deadline
    of one operation. ``client_id`` identifies the write session (random 63-bit if None).

    TLS: ``certs_dir`` (a directory with ``ca.crt`` and ``client.<user>.crt/.key``, see
    ``kvstore cert``) connects with the client certificate of ``user``; ``cacert`` (the cluster's
    ``ca.crt`` only) connects without a client certificate, to nodes' client-only ports
    (`kvstore serve --client-listen`), and then needs ``password``; ``credentials`` gives
    ready-made ``grpc.ChannelCredentials`` instead. None of them: plaintext.

    ``token``: a token obtained elsewhere, sent with every call as is (never renewed; instead
    of ``password``).

    ``client_port``: the endpoints are client-only ports, so the client follows nodes' client
    addresses (shard map, members, redirects) and never their peer addresses. Default: True with
    ``cacert`` (nothing else could connect), False otherwise.
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
        overload_retries: int = DEFAULT_OVERLOAD_RETRIES,
        max_key_size: int = DEFAULT_MAX_KEY_SIZE,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        seed: int | None = None,
        channel_options: Iterable[tuple[str, Any]] = (),
        read_preference: ReadPreference = "leader",
        load_balancing: str = "least_outstanding",
        max_staleness: float | str | None = None,
        certs_dir: str | Path | None = None,
        user: str = "root",
        credentials: grpc.ChannelCredentials | None = None,
        password: str | None = None,
        cacert: str | Path | None = None,
        client_port: bool | None = None,
        token: str | None = None,
    ) -> None:
        if sum(x is not None for x in (certs_dir, credentials, cacert)) > 1:
            raise ValueError("give one of certs_dir, cacert and credentials")
        if certs_dir is not None:
            from kvstore.security.tls import client_credentials

            credentials = client_credentials(certs_dir, user)
        if cacert is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(cacert).read_bytes())
            if password is None:
                raise ValueError("cacert (no client certificate) needs a password: the client-only port serves "
                                 "logged-in users only")
        if client_port is None:
            client_port = cacert is not None
        self.policy = RetryPolicy(
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            overload_retries=overload_retries,
        )
        eps = [e for e in endpoints.split(",")] if isinstance(endpoints, str) else list(endpoints)
        self.router = Router(eps, breaker_threshold=breaker_threshold, breaker_cooldown=breaker_cooldown,
                             client_port=client_port)
        if client_id is None:
            client_id = secrets.randbits(63) or 1
        if not 0 < client_id < 2**64:
            raise ValueError("client_id must be a positive 64-bit integer")
        self.client_id = client_id
        rng = random.Random(seed)
        self.token_source: TokenSource | None = None
        """With `password`: logs `user` in and sends its token with every call."""
        if token is not None:
            if password is not None:
                raise ValueError("give a password or a token, not both")
            self.token_source = FixedToken(token)
        elif password is not None:
            self.token_source = TokenSource(user, password, lambda: self.router.endpoints, credentials,
                                            [*CHANNEL_OPTIONS, *channel_options])
        self.channels = Channels(channel_options, credentials,
                                 interceptors(self.token_source) if self.token_source is not None else None)
        self.checks = RequestChecks(
            timeout=timeout, max_key_size=max_key_size, max_value_size=max_value_size,
            read_preference=read_preference, max_staleness=max_staleness,
        )
        self.replicas = ReplicaRouter(self.router, balancing=load_balancing)
        self.view = ClusterView(self.router, self.replicas, self.channels, self.policy)
        invoker = Invoker(self.view, self.policy, rng,
                          relogin=self.token_source.stale_since if self.token_source is not None else None)
        self._writes = Writes(client_id, self.checks, self.channels, invoker)
        self._reads = Reads(self.checks, self.channels, self.view, invoker)
        self._reads.observe = self._writes.observe
        self._scans = Scans(self.checks, self.channels, self.view, invoker, self.policy, rng)
        self._scans.observe = self._writes.observe
        self._admin = Admin(self.checks, self.channels, self.view, invoker, self.policy)
        self._watches = Watches(self.checks, self.channels, self.view, self.policy, rng)
        self.leases = Leases(self.checks, self.channels, self.view, invoker, self._writes, rng)
        """Leases (TTL): grant, revoke, keep_alive_once, time_to_live, list, put (`client/leases.py`)."""

    # ----- settings -----

    @property
    def read_preference(self) -> str:
        """The default read preference of reads and scans."""
        return self.checks.read_preference

    @read_preference.setter
    def read_preference(self, value: str) -> None:
        self.checks.read_preference = value

    @property
    def max_staleness(self) -> float | None:
        """The default bound of ``bounded`` reads (seconds)."""
        return self.checks.max_staleness

    @property
    def max_key_size(self) -> int:
        return self.checks.max_key_size

    @property
    def max_value_size(self) -> int:
        return self.checks.max_value_size

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.router.endpoints

    # ----- auth -----

    async def auth_call(self, method: str, request: Any) -> Any:
        """Call `Auth.<method>` (Change, Status) at the first endpoint that answers; the reply's
        error raised as a KVError (definite: auth changes are compare-and-swaps that either
        applied or not; an indeterminate transport failure says so)."""
        last: KVError | None = None
        for ep in self.router.endpoints:
            try:
                resp = await getattr(self.channels.auth(ep), method)(request, timeout=self.policy.timeout)
            except grpc.aio.AioRpcError as e:
                failure = classify(e, endpoint=ep, is_write=method == "Change")
                if not failure.retryable:
                    raise failure.error from None
                last = failure.error
                continue
            err = errors.from_proto(resp.error, is_write=method == "Change")
            if err is not None:
                raise err
            return resp
        raise last or errors.Unavailable("no endpoint")

    # ----- lifecycle -----

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel. Idempotent."""
        self.view.cancel_background()
        streams = self.channels.close_streams()
        await close_all_streams(streams)
        self.view.cancel_map_fetch()
        await self.channels.close_channels()

    # ----- KV -----

    async def get(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> bytes | None:
        """The value of ``key``, or None if it does not exist (see :meth:`read`)."""
        return await self._reads.get(
            key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
            read_preference=read_preference, revision=revision,
        )

    async def read(
        self,
        key: bytes,
        *,
        consistency: Consistency = "linearizable",
        timeout: float | None = None,
        max_staleness: float | str | None = None,
        read_preference: ReadPreference | None = None,
        revision: int = 0,
    ) -> ReadResult:
        """Read ``key`` and say where: the value (None: no such key), the node that served it, its
        applied index and how stale the answer may be.

        ``consistency``: ``linearizable`` (default; any member may serve it after confirming a
        read index with the leader), ``bounded`` (a member that can show it is at most
        ``max_staleness`` behind, in seconds or ``"500ms"``), ``stale`` (any member's local state
        at once). ``read_preference`` (default: the client's): ``leader``, ``nearest`` or
        ``replica`` (see :mod:`kvstore.client.readpref`). ``revision`` (> 0): the key as it was at
        that revision; the result carries the key's ``create_revision``, ``mod_revision``,
        ``version`` and the ``revision`` it was served at.
        """
        return await self._reads.read(
            key, consistency=consistency, timeout=timeout, max_staleness=max_staleness,
            read_preference=read_preference, revision=revision,
        )

    @property
    def revision(self) -> int:
        """The highest revision this client has observed (its last write's, or a read's); every
        write carries it, so it gets a higher revision."""
        return self._writes.revision

    async def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> int:
        """Set ``key`` to ``value``; returns the write's revision."""
        return await self._writes.put(key, value, timeout=timeout)

    async def compact(self, revision: int, *, timeout: float | None = None) -> int:
        """Drop history at or below ``revision`` in every group (admin permission); reads below it
        then fail with :class:`~kvstore.errors.Compacted`. Returns the revision compacted at."""
        return await self._admin.compact(revision, timeout=timeout)

    async def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        """Delete ``key``; True if it existed."""
        return await self._writes.delete(key, timeout=timeout)

    async def delete_prefix(self, prefix: bytes, *, timeout: float | None = None) -> int:
        """Delete every key starting with ``prefix`` (not empty), in every group, atomically at
        one revision (a two-phase commit: docs/REVISIONS.md); returns how many it deleted."""
        return (await self._writes.delete_range(b"", prefix=prefix, timeout=timeout))[0]

    async def delete_range(self, start: bytes, end: bytes, *, timeout: float | None = None) -> int:
        """Delete every key in ``[start, end)`` (``end`` ``b"\\x00"``: every key from ``start``),
        atomically at one revision across the groups; returns how many it deleted."""
        return (await self._writes.delete_range(start, end, timeout=timeout))[0]

    async def cas(self, key: bytes, expected: bytes | None, new: bytes, *, timeout: float | None = None) -> bool:
        """Set ``key`` to ``new`` if its current value is ``expected`` (None: if it does not
        exist). True if swapped."""
        return await self._writes.cas(key, expected, new, timeout=timeout)

    async def txn(
        self,
        compares: Sequence[Compare] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResponse:
        """A transaction (etcd's Txn): if every compare holds, run the ``success`` operations,
        else the ``failure`` ones, atomically at one revision. Keys in one group take one Raft
        proposal; keys in several groups a two-phase commit run by the server that receives it
        (docs/REVISIONS.md), with the same guarantees. Exactly-once like a put: a retried
        transaction is not applied twice, and a timeout after sending is indeterminate.
        ``Op.scan`` reads a range of every group at the transaction's revision (a write after
        it into its range is refused, definite). Example::

            await c.txn([Compare.value(b"k", "=", b"old")], [Op.put(b"k", b"new"), Op.get(b"j")])

        A put with ``lease=`` attaches its key to that lease (in any group, as ``leases.put``):
        each such lease is first checked live at its home (one LeaseTimeToLive per lease, all
        at once, within the transaction's one ``timeout``); a lease not live there refuses the
        transaction (definite ``LeaseNotFound``) only if a put with it is on the path taken, as
        etcd does. The transaction is checked whole first: a malformed one is refused
        (``InvalidArgument``) before anything is sent.
        """
        txn_body(self.checks, compares, success, failure)  # refused here first: nothing sent
        ids = sorted(set(leased_ids((*success, *failure))))  # valid lease ids (checked above)
        if not ids:
            return await self._writes.txn(compares, success, failure, timeout=timeout)
        deadline = self.checks.deadline(timeout)

        async def stamp(lid: int) -> tuple[int, int]:
            try:
                info = await self.leases.time_to_live(lid, timeout=_left(deadline))
            except KVError as err:
                if leases.NOT_FOUND in err.message:
                    return lid, 0
                raise
            return lid, info.checked if info.ttl >= 0 else 0

        checked = dict(await asyncio.gather(*map(stamp, ids)))
        return await self._writes.txn(compares, success, failure, timeout=_left(deadline), checked=checked)

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
        revision: int = 0,
    ) -> AsyncIterator[tuple[bytes, bytes]]:
        """Stream ``(key, value)`` pairs in key order: keys starting with ``prefix`` and within
        ``[start, end)`` (both optional), at most ``limit`` (0 = all), at ``revision`` (0: now). See
        :meth:`kvstore.client.scans.Scans.scan`."""
        return self._scans.scan(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference, revision=revision,
        )

    def scan_kvs(
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
        revision: int = 0,
    ) -> AsyncGenerator[list[KeyValue], None]:
        """Like :meth:`scan`, in lists of :class:`KeyValue` (key, value and metadata)."""
        return self._scans.scan_kvs(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference, revision=revision,
        )

    def scan_chunks(
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
        revision: int = 0,
    ) -> AsyncGenerator[list[tuple[bytes, bytes]], None]:
        """Like :meth:`scan`, in lists of pairs."""
        return self._scans.scan_chunks(
            prefix, start=start, end=end, limit=limit, consistency=consistency, timeout=timeout,
            max_staleness=max_staleness, read_preference=read_preference, revision=revision,
        )

    # ----- watch -----

    async def watch(
        self,
        key: bytes = b"",
        *,
        prefix: bytes = b"",
        range_end: bytes = b"",
        start_revision: int = 0,
        prev_kv: bool = False,
    ) -> AsyncIterator[WatchEvent]:
        """Follow the changes of ``key`` (with ``range_end``: the keys in [key, range_end);
        ``b"\\0"``: every key >= key) or of every key starting with ``prefix``, from
        ``start_revision`` (0: from now): ``async for ev in client.watch(prefix=b"app/")``.
        Events in revision order, each once, resumed transparently after failures, range moves
        and server cancels; :class:`~kvstore.errors.Compacted` (definite) when the start revision
        is compacted. See :mod:`kvstore.client.watches`."""
        async for batch in self._watches.watch_batches(
            key, prefix=prefix, range_end=range_end, start_revision=start_revision, prev_kv=prev_kv,
        ):
            for ev in batch.events:
                yield ev

    @property
    def watch_breaches(self) -> int:
        """How many times a node serving part of a merged watch broke the watch contract (the
        client restarted the watch; see `Watches.breaches`)."""
        return self._watches.breaches

    @property
    def watch_resumes(self) -> int:
        """How many times this client's watches were resumed on a new stream (after a failure, a
        range move or a server cancel) once started."""
        return self._watches.resumes

    def watch_batches(
        self,
        key: bytes = b"",
        *,
        prefix: bytes = b"",
        range_end: bytes = b"",
        start_revision: int = 0,
        prev_kv: bool = False,
        progress: bool = False,
    ) -> AsyncIterator[WatchBatch]:
        """Like :meth:`watch`, by response: each :class:`WatchBatch` says up to which revision
        everything has been delivered (with ``progress``, also when nothing changed)."""
        return self._watches.watch_batches(
            key, prefix=prefix, range_end=range_end, start_revision=start_revision, prev_kv=prev_kv,
            progress=progress,
        )

    # ----- the shard map -----

    async def shard_map(self, *, refresh: bool = False, timeout: float | None = None) -> ShardMap | None:
        """The cached shard map (fetched first if needed); with ``refresh``, the newest map any
        reachable node has (nodes apply map changes at their own pace). None for a server
        without sharding."""
        return await self.view.shard_map(self.checks.deadline(timeout), refresh=refresh)

    # ----- admin -----

    async def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> Status:
        """Admin.Status of ``endpoint``, or of whichever node answers first (the leader if known)."""
        return await self._admin.status(endpoint, timeout=timeout)

    async def cluster_status(self, *, timeout: float | None = None) -> list[NodeStatus]:
        """Admin.Status of every known endpoint and every member they report (see
        :meth:`kvstore.client.admin.Admin.cluster_status`)."""
        return await self._admin.cluster_status(timeout=timeout)

    async def add_member(
        self, id: int, address: str, learner: bool = True, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        """Add node ``id`` at ``address``, as a learner by default (promote it once caught up), to
        the metadata group and every data group, or only to the data ``groups`` given."""
        return await self._admin.add_member(id, address, learner, groups=groups, timeout=timeout)

    async def promote_member(self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None) -> AdminResult:
        """Promote learner ``id`` to voter (everywhere, or in the data ``groups`` given)."""
        return await self._admin.promote_member(id, groups=groups, timeout=timeout)

    async def remove_member(self, id: int, *, groups: Sequence[int] = (), timeout: float | None = None) -> AdminResult:
        """Remove node ``id`` from the cluster (or only from the data ``groups`` given)."""
        return await self._admin.remove_member(id, groups=groups, timeout=timeout)

    async def transfer_leader(
        self, to: int = 0, *, groups: Sequence[int] = (), timeout: float | None = None
    ) -> AdminResult:
        """Hand leadership of every group (or of ``groups``) to node ``to`` (0: each group's
        most up-to-date other voter)."""
        return await self._admin.transfer_leader(to, groups=groups, timeout=timeout)

    async def alarms(self, *, timeout: float | None = None) -> list[Alarm]:
        """The cluster's alarms (NOSPACE: a node's store exceeded its --quota-bytes)."""
        return await self._admin.alarms(timeout=timeout)

    async def disarm_alarms(
        self, node_id: int = 0, type: str | None = None, *, timeout: float | None = None
    ) -> list[Alarm]:
        """Disarm the matching alarms (default: all); returns the alarms still raised."""
        return await self._admin.disarm_alarms(node_id, type, timeout=timeout)

    async def hash_kv(
        self, endpoint: str, group: int, revision: int = 0, *, exact: bool = False, timeout: float | None = None
    ) -> GroupHash:
        """The hash of ``group``'s key space at ``revision`` on the node at ``endpoint`` (0 without
        ``exact``: at its leader's last revision; see `kvstore.client.admin.Admin.hash_kv`)."""
        return await self._admin.hash_kv(endpoint, group, revision, exact=exact, timeout=timeout)

    async def snapshot(self, endpoint: str | None = None, *, timeout: float | None = None) -> AdminResult:
        """Trigger a snapshot (and log compaction) at ``endpoint``, or at the leader."""
        return await self._admin.snapshot(endpoint, timeout=timeout)

    async def shards(self, *, timeout: float | None = None) -> ShardOpResult:
        """The shard map's groups: replicas, leader, key count, share of the hash space."""
        return await self._admin.shards(timeout=timeout)

    async def add_group(self, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        """Add a data group; with ``wait``, return once its ranges have moved in."""
        return await self._admin.add_group(wait=wait, timeout=timeout)

    async def remove_group(self, group: int, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        """Move every range of ``group`` to the other groups, then drop it."""
        return await self._admin.remove_group(group, wait=wait, timeout=timeout)

    async def rebalance(self, *, wait: bool = True, timeout: float = 300.0) -> ShardOpResult:
        """Return every group to its even share of the ring, moving ranges as needed."""
        return await self._admin.rebalance(wait=wait, timeout=timeout)
