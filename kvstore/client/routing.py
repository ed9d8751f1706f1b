"""Where to send a request: the shard map, the leader cache and the circuit breakers.

``key -> group -> leader endpoint``: the cached shard map (fetched from any node with
Shard.GetShardMap) names the group of a key and the nodes that replicate it; the leader cache
names the group's leader. WRONG_SHARD marks the map stale (:meth:`Router.invalidate_shard_map`),
and the client fetches a newer one before its next attempt. A server without the Shard service
(or before the map is known) is treated as one group, id 1, that owns every key.

Plain synchronous code with an injectable clock: the asyncio client drives it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.client.retry import DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_THRESHOLD, CircuitBreaker, Clock
from kvstore.shard.endpoints import check_address
from kvstore.shard.shardmap import ShardMap

__all__ = ["DEFAULT_GROUP", "GroupRoute", "Router", "normalize_endpoint", "parse_endpoints"]

#: The group of every key when no shard map is known (group 0 is the metadata group).
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
    rotation: int = 0  # which of the group's replicas to try first when the leader is unknown


class Router:
    """Leader cache and endpoint rotation.

    - ``pick(group)`` returns the cached leader if its breaker lets requests through, otherwise the
      next endpoint in round-robin order whose breaker does; None if every breaker is open.
    - NOT_LEADER teaches the leader (by node id if we know a reachable address for it, else by the
      hinted address, which is added to the endpoint list if new).
    - NO_LEADER, transport failures and LEADERSHIP_LOST forget the leader and move the rotation on.
    - Admin.Status reports teach node ids, member addresses and each group's leader.

    With ``client_port`` (the client talks to nodes' client-only ports, `--client-listen`: a
    client with a CA and a token but no client certificate) every address it learns is a client
    address: the shard map's ``clients``, the members' ``client_address``, NOT_LEADER's
    ``leader_client_hint``; peer addresses are never dialled (their TLS would refuse it). Learned
    addresses are hostile input: one that is not ``HOST:PORT`` (`shard.endpoints`) is ignored.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD,
        breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        clock: Clock = time.monotonic,
        client_port: bool = False,
    ) -> None:
        self.client_port = client_port
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
        self.shard_map: ShardMap | None = None
        #: Fetch a map of at least this version before the next routed attempt (0: no need).
        self.want_map_version = 1
        #: The servers do not offer shard maps (an unsharded fake or old server): stop asking.
        self.unsharded = False

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

    def add_learned(self, address: str) -> str | None:
        """Add an address a node told us (``add_endpoint``) if it is a valid ``HOST:PORT``;
        None (nothing added) otherwise."""
        try:
            check_address(address)
        except ValueError:
            return None
        return self.add_endpoint(address)

    def breaker(self, endpoint: str) -> CircuitBreaker:
        return self._breakers[endpoint]

    def address_of(self, node_id: int) -> str | None:
        return self._addr_by_id.get(node_id)

    def next_retry_at(self) -> float:
        """The earliest clock time at which some endpoint's breaker lets a request through."""
        return min(b.retry_at() for b in self._breakers.values())

    # ----- groups / shards -----

    def group_for_key(self, key: bytes) -> int:
        """The Raft group serving ``key`` according to the cached map."""
        if self.shard_map is None:
            return DEFAULT_GROUP
        return self.shard_map.group_for_key(key)

    def scan_groups(self) -> list[int]:
        """Every data group (a scan's keys are spread over all of them by hashing)."""
        if self.shard_map is None:
            return [DEFAULT_GROUP]
        return self.shard_map.data_groups()

    def needs_map(self) -> bool:
        if self.unsharded:
            return False
        have = self.shard_map.version if self.shard_map is not None else 0
        return have < self.want_map_version

    def invalidate_shard_map(self, version: int = 0) -> None:
        """WRONG_SHARD: fetch a map newer than ours (and at least ``version``) before retrying."""
        have = self.shard_map.version if self.shard_map is not None else 0
        self.want_map_version = max(self.want_map_version, version, have + 1)

    def set_shard_map(self, m: ShardMap) -> None:
        if self.shard_map is not None and m.version < self.shard_map.version:
            return
        self.shard_map = m
        if m.version >= self.want_map_version:
            self.want_map_version = 0
        for node, address in (m.clients if self.client_port else m.nodes).items():
            if (address and node not in self._dialed_ids and node not in self._addr_by_id
                    and (ep := self.add_learned(address)) is not None):
                self._addr_by_id[node] = ep

    def map_settled(self) -> None:
        """A fetch found no newer map: stop asking until the next WRONG_SHARD."""
        self.want_map_version = 0

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
        m = self.shard_map
        if m is not None and group in m.groups:
            # The group's replicas, its preferred leader first, rotating past failed ones.
            reps = [self._addr_by_id.get(n) for n in m.groups[group].voters]
            cands = [ep for ep in reps if ep is not None and ep in self._breakers]
            if cands:
                k = route.rotation % len(cands)
                for ep in cands[k:] + cands[:k]:
                    if self._breakers[ep].would_allow():
                        self._breakers[ep].allow()
                        return ep
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
        if group is not None:
            self.route(group).rotation += 1
        self.rotate_past(endpoint)

    def forget_leader(self, group: int, endpoint: str | None = None) -> None:
        route = self.route(group)
        if endpoint is None or route.leader == endpoint:
            route.leader = None
        route.rotation += 1
        if endpoint is not None:
            self.rotate_past(endpoint)

    def on_no_leader(self, group: int, endpoint: str) -> None:
        self.forget_leader(group, endpoint)

    def on_redirect(self, group: int, from_endpoint: str, leader_id: int, leader_address: str,
                    leader_client_address: str = "") -> str | None:
        """NOT_LEADER from ``from_endpoint``. Returns the endpoint to try next if the redirect
        names a leader other than the node that answered, else None (treated like NO_LEADER).
        With ``client_port`` the hint followed is ``leader_client_address``."""
        route = self.route(group)
        target: str | None = None
        hint = leader_client_address if self.client_port else leader_address
        if leader_id and leader_id in self._dialed_ids:
            target = self._addr_by_id[leader_id]
        elif hint and (target := self.add_learned(hint)) is not None:
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
        ``(id, advertised address)`` (client addresses with ``client_port``); ``groups`` are
        ``(group, leader_id, term)``.

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
            if (ep := self.add_learned(address)) is not None:
                self._addr_by_id[member_id] = ep
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
