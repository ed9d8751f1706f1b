"""The values the client API returns: small frozen dataclasses, never raw protobuf messages.

Each `from_proto` copies every field callers may use from the wire message (repeated fields
become tuples), so the public API does not change when the wire schema grows, and callers need
no `kvstore.v1` import. Field names are the wire names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

from kvstore.client.routing import DEFAULT_GROUP
from kvstore.errors import InternalError, KVError
from kvstore.v1 import admin_pb2, kv_pb2, shard_pb2

__all__ = [
    "AdminResult",
    "Alarm",
    "Compare",
    "Consistency",
    "GroupHash",
    "GroupInfo",
    "GroupStatus",
    "KeyValue",
    "Member",
    "NodeStatus",
    "Op",
    "OpResponse",
    "Progress",
    "ReadPreference",
    "ReadResult",
    "ShardOpResult",
    "Status",
    "TxnResponse",
    "group_status",
]

Consistency = Literal["linearizable", "bounded", "stale", "serializable"]
ReadPreference = Literal["leader", "nearest", "replica"]


@dataclass(slots=True)
class ReadResult:
    """A read and where it was served."""

    value: bytes | None  # None: no such key
    index: int  # the applied index of the node that served it
    staleness: float | None  # seconds it may be behind the leader (0.0: linearizable; None: unknown)
    node_id: int  # the node that served it
    consistency: str
    revision: int = 0  # the revision it was served at
    create_revision: int = 0  # found: the revision that created the key (since it was last absent)
    mod_revision: int = 0  # found: the revision of the key's last change
    version: int = 0  # found: changes since its creation (1 = just created)

    @property
    def found(self) -> bool:
        return self.value is not None


@dataclass(slots=True)
class KeyValue:
    """A key, its value and its metadata (etcd's meanings), as a scan returns it."""

    key: bytes
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0


CompareTarget = Literal["value", "version", "create", "mod", "lease"]
CompareOp = Literal["=", "!=", ">", "<"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One compare of a transaction (etcd's): ``target(key) op operand``. ``value`` compares
    bytes (false whatever ``op`` for a missing key); ``version``, ``create`` and ``mod`` compare
    the key's version, create revision and mod revision (all 0 for a missing key, so
    ``Compare.create(k, "=", 0)`` tests that ``k`` does not exist); ``lease`` the id of the lease
    the key is attached to (0: none). Build with the class methods."""

    key: bytes
    target: CompareTarget
    op: CompareOp
    operand: bytes | int

    @classmethod
    def value(cls, key: bytes, op: CompareOp, value: bytes) -> Compare:
        return cls(key, "value", op, value)

    @classmethod
    def version(cls, key: bytes, op: CompareOp, n: int) -> Compare:
        return cls(key, "version", op, n)

    @classmethod
    def create(cls, key: bytes, op: CompareOp, revision: int) -> Compare:
        return cls(key, "create", op, revision)

    @classmethod
    def mod(cls, key: bytes, op: CompareOp, revision: int) -> Compare:
        return cls(key, "mod", op, revision)

    @classmethod
    def lease(cls, key: bytes, op: CompareOp, lease_id: int) -> Compare:
        return cls(key, "lease", op, lease_id)


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a transaction: ``Op.put(k, v)`` (``lease=``: attach the key to that
    lease, as ``leases.put`` does), ``Op.delete(k)``, ``Op.get(k)``,
    ``Op.scan(start, end, prefix=, limit=)`` (the keys of a range in every group, at the
    transaction's revision), ``Op.delete_range(start, end, prefix=...)`` or a nested
    ``Op.txn(compares, success, failure)``."""

    kind: Literal["put", "delete", "get", "txn", "scan", "delete_range"]
    key: bytes = b""
    value: bytes = b""
    compares: tuple[Compare, ...] = ()
    success: tuple[Op, ...] = ()
    failure: tuple[Op, ...] = ()
    end: bytes = b""
    prefix: bytes = b""
    limit: int = 0
    lease: int = 0

    @classmethod
    def put(cls, key: bytes, value: bytes, lease: int = 0) -> Op:
        return cls("put", key, value, lease=lease)

    @classmethod
    def delete(cls, key: bytes) -> Op:
        return cls("delete", key)

    @classmethod
    def get(cls, key: bytes) -> Op:
        return cls("get", key)

    @classmethod
    def txn(cls, compares: Sequence[Compare] = (), success: Sequence[Op] = (), failure: Sequence[Op] = ()) -> Op:
        return cls("txn", compares=tuple(compares), success=tuple(success), failure=tuple(failure))

    @classmethod
    def scan(cls, start: bytes = b"", end: bytes = b"", *, prefix: bytes = b"", limit: int = 0) -> Op:
        """The keys of [start, end) (end b"": no upper bound), or with ``prefix`` (it overrides
        both), at most ``limit`` of them (0: all), in key order, as they are at the scan's place
        in the transaction (etcd's sequential semantics: the transaction's writes before it
        show, those after it do not); ``revision`` of its response: the transaction's."""
        return cls("scan", start, end=end, prefix=prefix, limit=limit)

    @classmethod
    def delete_range(cls, start: bytes, end: bytes = b"", *, prefix: bytes = b"") -> Op:
        """Delete every key of [start, end) (end b"": no upper bound), or with ``prefix`` every
        key starting with it, at the transaction's revision; its response's ``count`` says how
        many. The transaction then runs across every data group (cluster version 6); a key in
        the range read after it in the transaction is absent, one put after it survives."""
        return cls("delete_range", start, end=end, prefix=prefix)


@dataclass(frozen=True, slots=True)
class OpResponse:
    """What one operation of a transaction did: ``put`` (its ``revision``), ``delete``
    (``deleted``: the key existed), ``get`` (``kv``: the key, None if absent), ``scan``
    (``items`` in key order; ``more``: its limit, or the reply's size budget, cut it;
    ``revision``: the transaction's revision, or the one it was read at if it wrote nothing), ``delete_range`` (``count``: how many keys it
    deleted) or ``txn`` (``txn``: the nested transaction's response)."""

    kind: Literal["put", "delete", "get", "txn", "scan", "delete_range"]
    revision: int = 0
    deleted: bool = False
    kv: KeyValue | None = None
    txn: TxnResponse | None = None
    items: tuple[KeyValue, ...] = ()
    more: bool = False
    count: int = 0


@dataclass(frozen=True, slots=True)
class TxnResponse:
    """A transaction's outcome: ``succeeded`` (every compare held: the success operations ran,
    else the failure ones), one response per operation that ran, and the ``revision`` of its
    writes (0: it wrote nothing)."""

    succeeded: bool
    responses: tuple[OpResponse, ...]
    revision: int = 0

    @classmethod
    def from_proto(cls, r: kv_pb2.TxnResult, revision: int) -> TxnResponse:
        out = []
        for o in r.responses:
            which = o.WhichOneof("op")
            if which == "put":
                out.append(OpResponse("put", revision=o.put))
            elif which == "delete":
                out.append(OpResponse("delete", deleted=o.delete))
            elif which == "get":
                g = o.get
                kv = KeyValue(g.key, g.value, g.create_revision, g.mod_revision, g.version) if g.key else None
                out.append(OpResponse("get", kv=kv))
            elif which == "txn":
                out.append(OpResponse("txn", txn=cls.from_proto(o.txn, revision)))
            elif which == "scan":
                items = tuple(KeyValue(i.key, i.value, i.create_revision, i.mod_revision, i.version)
                              for i in o.scan.items)
                out.append(OpResponse("scan", revision=o.scan.revision, items=items, more=o.scan.more))
            elif which == "delete_range":
                out.append(OpResponse("delete_range", count=o.delete_range))
            else:
                raise InternalError(
                    f"malformed transaction response: an operation response of kind {which!r}", indeterminate=True
                )
        return cls(r.succeeded, tuple(out), revision)


@dataclass(frozen=True, slots=True)
class Member:
    """A member of the cluster: its node id, advertised address, whether it is a learner, and
    its client-only address (`--client-listen`; "" if it has none or has not published it)."""

    id: int
    address: str
    learner: bool = False
    client_address: str = ""

    @classmethod
    def from_proto(cls, m: admin_pb2.Member) -> Member:
        return cls(m.id, m.address, m.learner, m.client_address)


@dataclass(frozen=True, slots=True)
class Progress:
    """The leader's view of one member's replication (only in the leader's status)."""

    id: int
    match: int
    next: int
    state: str

    @classmethod
    def from_proto(cls, p: admin_pb2.GroupStatus.Progress) -> Progress:
        return cls(p.id, p.match, p.next, p.state)


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """One Raft group as one node sees it (an entry of `Status.groups`).

    staleness_ms: an upper bound on how far this replica's applied state is behind the leader
    (-1: no evidence yet); leader_contact_ms: since this node last heard from the leader (0 on
    the leader, -1: no leader)."""

    group: int
    role: str = ""
    term: int = 0
    leader_id: int = 0
    commit: int = 0
    applied: int = 0
    last_index: int = 0
    first_index: int = 0
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    progress: tuple[Progress, ...] = ()
    staleness_ms: int = 0
    leader_contact_ms: int = 0
    sessions: int = 0
    sessions_evicted: int = 0

    @classmethod
    def from_proto(cls, g: admin_pb2.GroupStatus) -> GroupStatus:
        return cls(
            group=g.group, role=g.role, term=g.term, leader_id=g.leader_id, commit=g.commit, applied=g.applied,
            last_index=g.last_index, first_index=g.first_index, voters=tuple(g.voters), learners=tuple(g.learners),
            progress=tuple(Progress.from_proto(p) for p in g.progress), staleness_ms=g.staleness_ms,
            leader_contact_ms=g.leader_contact_ms, sessions=g.sessions, sessions_evicted=g.sessions_evicted,
        )


@dataclass(frozen=True, slots=True)
class Status:
    """One node's Admin.Status: who it is, the members it knows, and every group it hosts."""

    node_id: int
    cluster_id: str = ""
    address: str = ""
    members: tuple[Member, ...] = ()
    groups: tuple[GroupStatus, ...] = ()
    storage_full: bool = False
    client_address: str = ""
    """The node's client-only address (`--client-listen`), "" without one."""
    cluster_version: int = 0
    """The cluster version as this node applied it (0: a node that does not report it)."""
    supported_level: int = 0
    """The highest feature level this node's binary supports (0: not reported)."""
    member_levels: tuple[tuple[int, int], ...] = ()
    """(node id, advertised feature level) of every node that advertised one, by node id."""

    @classmethod
    def from_proto(cls, st: admin_pb2.StatusResponse) -> Status:
        return cls(
            node_id=st.node_id, cluster_id=st.cluster_id, address=st.address, client_address=st.client_address,
            members=tuple(Member.from_proto(m) for m in st.members),
            groups=tuple(GroupStatus.from_proto(g) for g in st.groups), storage_full=st.storage_full,
            cluster_version=st.cluster_version, supported_level=st.supported_level,
            member_levels=tuple(sorted(st.member_levels.items())),
        )


@dataclass(slots=True)
class NodeStatus:
    """One node's answer to Admin.Status (or why it did not answer)."""

    address: str
    status: Status | None = None
    error: KVError | None = None


@dataclass(frozen=True, slots=True)
class Alarm:
    """A cluster alarm (replicated in the metadata group): `type` is "NOSPACE"; `node_id` the
    node that raised it."""

    node_id: int
    type: str


@dataclass(frozen=True, slots=True)
class AdminResult:
    """The outcome of a membership change, leadership transfer or snapshot: the server's message
    and, for membership changes, the members afterwards."""

    message: str = ""
    members: tuple[Member, ...] = ()

    @classmethod
    def from_proto(cls, r: admin_pb2.AdminResponse) -> AdminResult:
        return cls(r.message, tuple(Member.from_proto(m) for m in r.members))


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A data group in the shard map: replicas, leader, keys, ranges and share of the hash space."""

    id: int
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    leader_id: int = 0
    keys: int = 0
    ranges: int = 0
    share: float = 0.0  # fraction of the hash space routed to the group
    applied: int = 0

    @classmethod
    def from_proto(cls, g: shard_pb2.GroupInfo) -> GroupInfo:
        return cls(g.id, tuple(g.voters), tuple(g.learners), g.leader_id, g.keys, g.ranges, g.share, g.applied)


@dataclass(frozen=True, slots=True)
class ShardOpResult:
    """The answer to a shard operation (info, add/remove group, rebalance): the shard map version,
    its groups and the range moves still pending."""

    message: str = ""
    version: int = 0
    groups: tuple[GroupInfo, ...] = ()
    moves_pending: int = 0

    @classmethod
    def from_proto(cls, r: shard_pb2.ShardOpResponse) -> ShardOpResult:
        return cls(r.message, r.version, tuple(GroupInfo.from_proto(g) for g in r.groups), r.moves_pending)


@overload
def group_status(st: admin_pb2.StatusResponse, group: int = ...) -> admin_pb2.GroupStatus | None: ...


@overload
def group_status(st: Status, group: int = ...) -> GroupStatus | None: ...


def group_status(
    st: Status | admin_pb2.StatusResponse, group: int = DEFAULT_GROUP
) -> GroupStatus | admin_pb2.GroupStatus | None:
    """The status of ``group`` in a node's status (None if the node lacks it). Takes a `Status`
    or the wire's Admin.Status answer (for callers that talk to a node's Admin service directly)."""
    for g in st.groups:
        if g.group == group:
            return g
    return None


@dataclass(frozen=True, slots=True)
class GroupHash:
    """One replica's hash of a group's key space at a revision (`Admin.HashKV`, `kvctl check`):
    BLAKE2b-256 over every key present at `revision` with its value and metadata (see
    `kvstore/node/kvhash.py`); `applied` is the group's applied index there when it was taken."""

    node_id: int
    group: int
    revision: int
    hash: bytes
    keys: int
    applied: int
    compact_revision: int

    @classmethod
    def from_proto(cls, r: admin_pb2.HashKVResponse) -> GroupHash:
        return cls(r.node_id, r.group, r.revision, r.hash, r.keys, r.applied, r.compact_revision)
