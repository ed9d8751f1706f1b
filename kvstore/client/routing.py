"""Where to send a request: the endpoint list, the leader cache and the circuit breakers.

Today the cluster is one Raft group (id 1) that owns every key. The shape is already multi-raft:
``key -> group -> leader endpoint``. When the shard map arrives, :meth:`Router.group_for_key`
consults it (and :meth:`Router.invalidate_shard_map` on WRONG_SHARD refreshes it); everything
else already keys leaders by group id.

Plain synchronous code with an injectable clock: the asyncio client drives it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.client.retry import DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_THRESHOLD, CircuitBreaker, Clock

__all__ = ["DEFAULT_GROUP", "GroupRoute", "Router", "normalize_endpoint", "parse_endpoints"]

#: The single Raft group that holds all keys until sharding lands (group 0 is reserved for metadata).
DEFAULT_GROUP = 1


def normalize_endpoint(address: str) -> str:
    """Strip whitespace and a scheme prefix gRPC would not understand (``http://``)."""
    address = address.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
    return address.rstrip("/")


def parse_endpoints(spec: str | Iterable[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> a de-duplicated list, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        addr = normalize_endpoint(item)
        if addr and addr not in out:
            out.append(addr)
    return out


@dataclass(slots=True)
class GroupRoute:
    """What the client believes about one Raft group's leadership."""

    leader: str | None = None  # endpoint address of the leader, if known
    leader_id: int = 0  # node id of the leader, if known
    term: int = 0  # highest term seen in a status report (0 = learned from a reply, no term)


class Router:
    """Leader cache and endpoint rotation.

    - ``pick(group)`` returns the cached leader if its breaker lets requests through, otherwise the
      next endpoint in round-robin order whose breaker does; None if every breaker is open.
    - NOT_LEADER teaches the leader (by node id if we know a reachable address for it, else by the
      hinted address, which is added to the endpoint list if new).
    - NO_LEADER, transport failures and LEADERSHIP_LOST forget the leader and move the rotation on.
    - Admin.Status reports teach node ids, member addresses and each group's leader.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD,
        breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        clock: Clock = time.monotonic,
    ) -> None:
        eps = parse_endpoints(endpoints)
        if not eps:
            raise ValueError("at least one endpoint is required")
        self._clock = clock
        self._breaker_threshold = breaker_threshold
        self._breaker_cooldown = breaker_cooldown
        self._endpoints: list[str] = []
        self._breakers: dict[str, CircuitBreaker] = {}
        self._configured = tuple(eps)
        for ep in eps:
            self.add_endpoint(ep)
        self._groups: dict[int, GroupRoute] = {}
        self._addr_by_id: dict[int, str] = {}
        self._dialed_ids: set[int] = set()  # ids whose address we have dialed ourselves
        self._next = 0
        self.last_discovery = float("-inf")
        #: The last transport failure seen at each endpoint ("connection refused", "timed out").
        self.last_failure: dict[str, str] = {}

    # ----- endpoints -----

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint known: the configured ones first, then learned ones."""
        return tuple(self._endpoints)

    @property
    def configured(self) -> tuple[str, ...]:
        return self._configured

    def add_endpoint(self, address: str) -> str:
        addr = normalize_endpoint(address)
        if addr and addr not in self._breakers:
            self._endpoints.append(addr)
            self._breakers[addr] = CircuitBreaker(
                self._breaker_threshold, self._breaker_cooldown, clock=self._clock
            )
        return addr

    def breaker(self, endpoint: str) -> CircuitBreaker:
        return self._breakers[endpoint]

    def address_of(self, node_id: int) -> str | None:
        return self._addr_by_id.get(node_id)

    def next_retry_at(self) -> float:
        """The earliest clock time at which some endpoint's breaker lets a request through."""
        return min(b.retry_at() for b in self._breakers.values())

    # ----- groups / shards -----

    def group_for_key(self, key: bytes) -> int:
        """The Raft group owning ``key`` (one group today; the shard map plugs in here)."""
        return DEFAULT_GROUP

    def groups_for_range(self, start: bytes, end: bytes | None) -> list[int]:
        """The groups covering ``[start, end)``, in key order (one group today)."""
        return [DEFAULT_GROUP]

    def invalidate_shard_map(self) -> None:
        """Called on WRONG_SHARD: the shard map is stale (nothing to refresh yet)."""
        for route in self._groups.values():
            route.leader = None

    def route(self, group: int) -> GroupRoute:
        r = self._groups.get(group)
        if r is None:
            r = self._groups[group] = GroupRoute()
        return r

    def leader(self, group: int) -> str | None:
        return self.route(group).leader

    # ----- choosing -----

    def pick(self, group: int) -> str | None:
        route = self.route(group)
        if route.leader is not None:
            if self._breakers[route.leader].allow():
                return route.leader
            route.leader = None  # its breaker is open: treat the leader as unknown
        n = len(self._endpoints)
        for i in range(n):
            idx = (self._next + i) % n
            ep = self._endpoints[idx]
            if self._breakers[ep].would_allow():
                self._breakers[ep].allow()
                self._next = (idx + 1) % n
                return ep
        return None

    def rotate_past(self, endpoint: str) -> None:
        """Make the round robin continue after ``endpoint``."""
        if endpoint in self._breakers:
            self._next = (self._endpoints.index(endpoint) + 1) % len(self._endpoints)

    # ----- learning -----

    def on_success(self, group: int, endpoint: str) -> None:
        """A linearizable operation succeeded at ``endpoint``: it is (was) the leader."""
        self._breakers[endpoint].record_success()
        route = self.route(group)
        if route.leader != endpoint:
            route.leader = endpoint

    def on_reply(self, endpoint: str) -> None:
        """The endpoint answered (whatever the answer): the transport is healthy."""
        self._breakers[endpoint].record_success()

    def on_transport_failure(self, group: int | None, endpoint: str, reason: str = "") -> None:
        self._breakers[endpoint].record_failure()
        if reason:
            self.last_failure[endpoint] = reason
        for route in self._groups.values() if group is None else [self.route(group)]:
            if route.leader == endpoint:
                route.leader = None
        self.rotate_past(endpoint)

    def forget_leader(self, group: int, endpoint: str | None = None) -> None:
        route = self.route(group)
        if endpoint is None or route.leader == endpoint:
            route.leader = None
        if endpoint is not None:
            self.rotate_past(endpoint)

    def on_no_leader(self, group: int, endpoint: str) -> None:
        self.forget_leader(group, endpoint)

    def on_redirect(self, group: int, from_endpoint: str, leader_id: int, leader_address: str) -> str | None:
        """NOT_LEADER from ``from_endpoint``. Returns the endpoint to try next if the redirect
        names a leader other than the node that answered, else None (treated like NO_LEADER)."""
        route = self.route(group)
        target: str | None = None
        if leader_id and leader_id in self._dialed_ids:
            target = self._addr_by_id[leader_id]
        elif leader_address:
            target = self.add_endpoint(leader_address)
            if leader_id and leader_id not in self._addr_by_id:
                self._addr_by_id[leader_id] = target
        elif leader_id:
            target = self._addr_by_id.get(leader_id)
        if target is None or target == from_endpoint:
            self.forget_leader(group, from_endpoint)
            return None
        route.leader = target
        if leader_id:
            route.leader_id = leader_id
        return target

    def learn_status(
        self,
        endpoint: str,
        node_id: int,
        members: Iterable[tuple[int, str]],
        groups: Iterable[tuple[int, int, int]],
    ) -> None:
        """An Admin.Status answer from ``endpoint``: node ``node_id``; ``members`` are
        ``(id, advertised address)``; ``groups`` are ``(group, leader_id, term)``.

        The address we dialed wins over a node's advertised address (it is known to be reachable
        from here); advertised addresses of members we have not dialed are added as endpoints.
        """
        self._breakers[endpoint].record_success()
        if node_id:
            self._addr_by_id[node_id] = endpoint
            self._dialed_ids.add(node_id)
        for member_id, address in members:
            if not address or member_id in self._dialed_ids:
                continue
            self._addr_by_id[member_id] = self.add_endpoint(address)
        for group, leader_id, term in groups:
            route = self.route(group)
            if term < route.term:
                continue
            if leader_id:
                route.term = term
                route.leader_id = leader_id
                route.leader = self._addr_by_id.get(leader_id)
            elif term > route.term:
                route.term = term
                route.leader_id = 0
                route.leader = None
