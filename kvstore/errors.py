"""The error hierarchy shared by the server and the client.

Every error says whether the operation it reports *definitely did not happen* (``indeterminate``
is False) or *may have happened* (``indeterminate`` is True). A client that gets an indeterminate
error for a write must not assume the write was lost: it may have been applied, and retrying it
with the same session (client id + sequence number) is the only safe way to find out.

On the wire, errors travel in the ``error`` field of every response (``kv_pb2.Error``), never only
in the gRPC status; :func:`to_proto` and :func:`from_proto` convert between the two.

Standard library and generated protobuf code only.
"""

from __future__ import annotations

from typing import ClassVar

from kvstore.v1 import kv_pb2

__all__ = [
    "REFUSALS",
    "AuthNotEnabled",
    "ClientClosed",
    "ClusterVersionTooLow",
    "FutureRevision",
    "InternalError",
    "InvalidArgument",
    "KVError",
    "KeyTooLarge",
    "LeadershipLost",
    "LeaseExists",
    "LeaseNotFound",
    "NoLeader",
    "NoSpace",
    "NotLeader",
    "PermissionDenied",
    "PermissionNotGranted",
    "ProposalDropped",
    "Refused",
    "RequestTooLarge",
    "ResourceExhausted",
    "RoleExists",
    "RoleNotFound",
    "RoleNotGranted",
    "RootUserMissing",
    "SessionExpired",
    "ShuttingDown",
    "StaleReplica",
    "StorageFull",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UserExists",
    "UserNotFound",
    "ValueTooLarge",
    "WrongShard",
    "error_class",
    "from_proto",
    "to_proto",
]

_INDETERMINATE_NOTE = "indeterminate: the operation may have been applied"
_DEFINITE_NOTE = "definite: the operation was not applied"


class KVError(Exception):
    """Base class of every kvstore error.

    Attributes:
        message: the human-readable description, without the definite/indeterminate note.
        indeterminate: True if the operation may have taken effect (only ever True for writes);
            False if it definitely did not.
        code: the ``kv_pb2.ErrorCode`` this error travels as on the wire.
        code_name: the symbolic name of that code (``"NOT_LEADER"``; ``"UNAVAILABLE"`` for the
            client-only :class:`Unavailable`).

    ``str(err)`` is the message followed by ``(definite: ...)`` or ``(indeterminate: ...)``.
    """

    code: ClassVar[int] = kv_pb2.INTERNAL
    code_name: ClassVar[str] = "INTERNAL"
    #: Whether this kind of error, reported for a write, means the write may have been applied.
    write_may_have_applied: ClassVar[bool] = False
    default_message: ClassVar[str] = "kvstore error"

    def __init__(self, message: str = "", *, indeterminate: bool | None = None) -> None:
        self.message = message or self.default_message
        self.indeterminate = self.write_may_have_applied if indeterminate is None else indeterminate
        super().__init__(self.message)

    def __str__(self) -> str:
        note = _INDETERMINATE_NOTE if self.indeterminate else _DEFINITE_NOTE
        return f"{self.message} ({note})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, indeterminate={self.indeterminate})"

    @property
    def definite(self) -> bool:
        """True if the operation definitely did not take effect."""
        return not self.indeterminate


class NotLeader(KVError):
    """Definite: the node is not the leader; retry at ``leader_address`` (node ``leader_id``).

    ``NotLeader(leader_id, leader_address)``; either may be unknown (0 / ""). ``leader_client_address``
    is the leader's client-only port (`--client-listen`), if it has one and the node knows it:
    a client connected to client ports follows that one instead.
    """

    code = kv_pb2.NOT_LEADER
    code_name = "NOT_LEADER"
    default_message = "not the leader"

    def __init__(
        self,
        leader_id: int = 0,
        leader_address: str = "",
        *,
        message: str = "",
        indeterminate: bool | None = None,
        leader_client_address: str = "",
    ) -> None:
        self.leader_id = leader_id
        self.leader_address = leader_address
        self.leader_client_address = leader_client_address
        if not message:
            if leader_address or leader_id:
                message = f"not the leader; the leader is node {leader_id or '?'} at {leader_address or '?'}"
            else:
                message = "not the leader"
        super().__init__(message, indeterminate=indeterminate)


class NoLeader(KVError):
    """Definite: the group has no known leader right now (an election is probably under way)."""

    code = kv_pb2.NO_LEADER
    code_name = "NO_LEADER"
    default_message = "no leader"


class _SizeError(KVError):
    """Base of the "too large" errors: ``Cls(size, limit)`` or ``Cls(message="...")``."""

    what: ClassVar[str] = "request"

    def __init__(
        self, size: int = 0, limit: int = 0, *, message: str = "", indeterminate: bool | None = None
    ) -> None:
        self.size = size
        self.limit = limit
        if not message:
            message = f"{self.what} too large"
            if size or limit:
                message += f": {size} bytes > {limit}"
        super().__init__(message, indeterminate=indeterminate)


class KeyTooLarge(_SizeError):
    """Definite: the key exceeds the maximum key size; nothing was applied."""

    code = kv_pb2.KEY_TOO_LARGE
    code_name = "KEY_TOO_LARGE"
    what = "key"


class ValueTooLarge(_SizeError):
    """Definite: the value exceeds the maximum value size; nothing was applied."""

    code = kv_pb2.VALUE_TOO_LARGE
    code_name = "VALUE_TOO_LARGE"
    what = "value"


class RequestTooLarge(_SizeError):
    """Definite: the request exceeds the maximum request size; nothing was applied."""

    code = kv_pb2.REQUEST_TOO_LARGE
    code_name = "REQUEST_TOO_LARGE"
    what = "request"


class InvalidArgument(KVError):
    """Definite: the request is malformed; nothing was applied."""

    code = kv_pb2.INVALID_ARGUMENT
    code_name = "INVALID_ARGUMENT"
    default_message = "invalid argument"


class ClusterVersionTooLow(InvalidArgument):
    """Definite: the command's kind needs a higher cluster version than the cluster runs (some
    member's binary does not support it yet; `kvstore.node.version`). Travels as INVALID_ARGUMENT:
    retrying cannot help until every member is upgraded."""

    default_message = "the cluster version does not allow this command yet"


class FutureRevision(InvalidArgument):
    """Definite: the revision asked for (to read or close at) is one this node cannot have yet:
    further ahead of its clock than the uncertainty bound, or beyond every revision. Travels as
    INVALID_ARGUMENT with `Error.future_revision` set (etcd's API answers it with etcd's
    future-revision error)."""

    default_message = "the revision is in the future"


class Refused(InvalidArgument):
    """Definite: a refusal a caller must tell apart from other invalid arguments (etcd's API
    answers each with etcd's own error). Travels as INVALID_ARGUMENT with `Error.refusal` set
    to the subclass's `refusal` (a `kv_pb2.Refusal`); the message stays kvstore's."""

    refusal: ClassVar[int] = kv_pb2.REFUSAL_NONE


class LeaseNotFound(Refused):
    """The lease is not live (expired, revoked, never granted) or its id cannot be a lease's."""

    refusal = kv_pb2.REFUSAL_LEASE_NOT_FOUND
    default_message = "requested lease not found"


class LeaseExists(Refused):
    """A grant of an id that names a live lease."""

    refusal = kv_pb2.REFUSAL_LEASE_EXISTS
    default_message = "lease already exists"


class UserExists(Refused):
    refusal = kv_pb2.REFUSAL_USER_EXISTS


class UserNotFound(Refused):
    refusal = kv_pb2.REFUSAL_USER_NOT_FOUND


class RoleExists(Refused):
    refusal = kv_pb2.REFUSAL_ROLE_EXISTS


class RoleNotFound(Refused):
    refusal = kv_pb2.REFUSAL_ROLE_NOT_FOUND


class RoleNotGranted(Refused):
    """A revoke of a role the user does not hold."""

    refusal = kv_pb2.REFUSAL_ROLE_NOT_GRANTED


class PermissionNotGranted(Refused):
    """A revoke of a permission the role does not hold."""

    refusal = kv_pb2.REFUSAL_PERMISSION_NOT_GRANTED


class RootUserMissing(Refused):
    """Enabling auth without user root."""

    refusal = kv_pb2.REFUSAL_ROOT_USER_MISSING


class AuthNotEnabled(Refused):
    """A login while auth is disabled."""

    refusal = kv_pb2.REFUSAL_AUTH_NOT_ENABLED


REFUSALS: dict[int, type[Refused]] = {c.refusal: c for c in (
    LeaseNotFound, LeaseExists, UserExists, UserNotFound, RoleExists, RoleNotFound, RoleNotGranted,
    PermissionNotGranted, RootUserMissing, AuthNotEnabled)}
"""Each `kv_pb2.Refusal` but REFUSAL_NONE: its error class."""


class Timeout(KVError):
    """The operation did not complete in time.

    Indeterminate for writes (the write may have been applied); definite for reads.
    """

    code = kv_pb2.TIMEOUT
    code_name = "TIMEOUT"
    write_may_have_applied = True
    default_message = "timed out"


class LeadershipLost(KVError):
    """Indeterminate (for writes): the write was proposed, then the leader stepped down before it
    was known to commit; it may yet be applied by the new leader."""

    code = kv_pb2.LEADERSHIP_LOST
    code_name = "LEADERSHIP_LOST"
    write_may_have_applied = True
    default_message = "leadership lost"


class ProposalDropped(KVError):
    """Definite: the leader refused the proposal (e.g. a leadership transfer is in progress)."""

    code = kv_pb2.PROPOSAL_DROPPED
    code_name = "PROPOSAL_DROPPED"
    default_message = "proposal dropped"


class StorageFull(KVError):
    """Definite: the node refuses writes until disk space is freed; nothing was applied."""

    code = kv_pb2.STORAGE_FULL
    code_name = "STORAGE_FULL"
    default_message = "storage full"


class WrongShard(KVError):
    """Definite: the key lives in another Raft group (or its group is not on the node asked);
    refresh the shard map (to at least ``shard_version``) and retry."""

    code = kv_pb2.WRONG_SHARD
    code_name = "WRONG_SHARD"
    default_message = "wrong shard"

    def __init__(self, message: str = "", *, shard_version: int = 0, indeterminate: bool | None = None) -> None:
        self.shard_version = shard_version
        super().__init__(message, indeterminate=indeterminate)


class ShuttingDown(KVError):
    """Definite: the node is shutting down and did not accept the operation."""

    code = kv_pb2.SHUTTING_DOWN
    code_name = "SHUTTING_DOWN"
    default_message = "shutting down"


class StaleReplica(KVError):
    """Definite (reads only): the replica that was asked cannot serve the read at the requested
    consistency right now: it is cut off from the leader (linearizable), or it cannot show that
    it is within the requested staleness (bounded). Another replica or the leader can."""

    code = kv_pb2.STALE_REPLICA
    code_name = "STALE_REPLICA"
    default_message = "replica cannot serve this read now"


class SessionExpired(KVError):
    """Indeterminate: a retried write reached its group after the client's session there had
    expired (groups keep a bounded number of sessions, evicting the least recently used and idle
    ones). The retry was not applied, but an earlier attempt of the write may have been; retrying
    again cannot tell, so the client reports it to the caller."""

    code = kv_pb2.SESSION_EXPIRED
    code_name = "SESSION_EXPIRED"
    write_may_have_applied = True
    default_message = "session expired"


class ResourceExhausted(KVError):
    """Definite: admission control refused the operation before it reached a Raft group (the
    caller's rate limit, or the node sheds writes because a group's apply fell far behind its
    commit or its memory is near the configured ceiling). ``retry_after`` (seconds) is how long
    the server asks the caller to wait before trying again; the client library backs off at
    least that long, a bounded number of times, then reports this error."""

    code = kv_pb2.RESOURCE_EXHAUSTED
    code_name = "RESOURCE_EXHAUSTED"
    default_message = "resource exhausted"

    def __init__(self, message: str = "", *, retry_after: float = 0.0, indeterminate: bool | None = None) -> None:
        self.retry_after = max(0.0, retry_after)
        super().__init__(message, indeterminate=indeterminate)


class NoSpace(KVError):
    """Definite: the cluster's space quota alarm (NOSPACE) is raised; writes other than deletes
    are refused until an operator disarms it once space is back under the quota (`kvctl alarm
    list | disarm`). Reads and deletes are served. Retrying does not help until then."""

    code = kv_pb2.NOSPACE
    code_name = "NOSPACE"
    default_message = "space quota exceeded (NOSPACE alarm)"


class Compacted(KVError):
    """Definite: a read (or compaction) at a revision below the compact revision: that history
    was dropped. ``compact_revision`` names it: reads at or above it work."""

    code = kv_pb2.COMPACTED
    code_name = "COMPACTED"
    default_message = "revision compacted"

    def __init__(self, message: str = "", *, compact_revision: int = 0, indeterminate: bool | None = None) -> None:
        self.compact_revision = compact_revision
        super().__init__(message or f"revision compacted: the compact revision is {compact_revision}",
                         indeterminate=indeterminate)


class Unauthenticated(KVError):
    """Definite: auth is enabled and the caller presented no valid credentials (no token, or one
    that expired or was revoked by a password change): nothing was applied. Log in again."""

    code = kv_pb2.UNAUTHENTICATED
    code_name = "UNAUTHENTICATED"
    default_message = "not authenticated"


class PermissionDenied(KVError):
    """Definite: the caller's identity has no permission for this operation; nothing was applied."""

    code = kv_pb2.PERMISSION_DENIED
    code_name = "PERMISSION_DENIED"
    default_message = "permission denied"


class InternalError(KVError):
    """Indeterminate (for writes): an unexpected server failure; the write may have been applied."""

    code = kv_pb2.INTERNAL
    code_name = "INTERNAL"
    write_may_have_applied = True
    default_message = "internal error"


class ClientClosed(KVError, RuntimeError):
    """The client was closed (by this program) while the operation waited or retried, or the
    operation was started on a closed client. Definite unless an earlier attempt of a write may
    have applied (then indeterminate). Client-side only; also a RuntimeError, which a closed
    client raised before."""

    code = kv_pb2.INTERNAL
    code_name = "CLIENT_CLOSED"
    default_message = "client is closed"


class Unavailable(KVError):
    """Definite: no endpoint could be reached, so the operation was never delivered.

    (The client also uses it, with ``indeterminate=True``, for a connection that broke after a
    write was sent; when it gives up it reports that case as an indeterminate :class:`Timeout`.)

    Client-side only: there is no UNAVAILABLE on the wire; :func:`to_proto` sends it as NO_LEADER
    (also "not applied; try again later").
    """

    code = kv_pb2.NO_LEADER
    code_name = "UNAVAILABLE"
    default_message = "cannot reach any endpoint"


_BY_CODE: dict[int, type[KVError]] = {
    kv_pb2.NOT_LEADER: NotLeader,
    kv_pb2.NO_LEADER: NoLeader,
    kv_pb2.KEY_TOO_LARGE: KeyTooLarge,
    kv_pb2.VALUE_TOO_LARGE: ValueTooLarge,
    kv_pb2.REQUEST_TOO_LARGE: RequestTooLarge,
    kv_pb2.INVALID_ARGUMENT: InvalidArgument,
    kv_pb2.TIMEOUT: Timeout,
    kv_pb2.LEADERSHIP_LOST: LeadershipLost,
    kv_pb2.PROPOSAL_DROPPED: ProposalDropped,
    kv_pb2.STORAGE_FULL: StorageFull,
    kv_pb2.WRONG_SHARD: WrongShard,
    kv_pb2.SHUTTING_DOWN: ShuttingDown,
    kv_pb2.INTERNAL: InternalError,
    kv_pb2.STALE_REPLICA: StaleReplica,
    kv_pb2.SESSION_EXPIRED: SessionExpired,
    kv_pb2.RESOURCE_EXHAUSTED: ResourceExhausted,
    kv_pb2.NOSPACE: NoSpace,
    kv_pb2.COMPACTED: Compacted,
    kv_pb2.UNAUTHENTICATED: Unauthenticated,
    kv_pb2.PERMISSION_DENIED: PermissionDenied,
}


def error_class(code: int) -> type[KVError]:
    """The class for a wire error code (unknown codes map to :class:`InternalError`)."""
    return _BY_CODE.get(code, InternalError)


def from_proto(error: kv_pb2.Error | None, *, is_write: bool) -> KVError | None:
    """Convert a response's ``error`` field to an exception, or None if it reports success.

    For a write, the result is indeterminate if the server said so *or* if the code is one that
    may have applied (TIMEOUT, LEADERSHIP_LOST, INTERNAL, unknown codes): when in doubt we err on
    the safe side. For a read nothing can have been applied, so the result is always definite.

    ``NOT_LEADER`` with neither a leader id nor an address means nobody knows the leader and
    becomes :class:`NoLeader`.
    """
    if error is None or error.code == kv_pb2.OK:
        return None
    cls = error_class(error.code)
    indeterminate = is_write and (error.indeterminate or cls.write_may_have_applied)
    message = error.message
    if cls is InternalError and error.code not in _BY_CODE:
        message = f"unknown error code {error.code}: {message}" if message else f"unknown error code {error.code}"
    if cls is NotLeader:
        if not error.leader_hint and not error.leader_id:
            return NoLeader(message or "no leader known", indeterminate=indeterminate)
        return NotLeader(
            error.leader_id, error.leader_hint, message=message, indeterminate=indeterminate,
            leader_client_address=error.leader_client_hint,
        )
    if issubclass(cls, _SizeError):
        return cls(message=message, indeterminate=indeterminate)
    if cls is WrongShard:
        return WrongShard(message, shard_version=error.shard_version, indeterminate=indeterminate)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, retry_after=error.retry_after_ms / 1000, indeterminate=indeterminate)
    if cls is Compacted:
        return Compacted(message, compact_revision=max(0, error.compact_revision), indeterminate=indeterminate)
    if cls is InvalidArgument and error.future_revision:
        return FutureRevision(message, indeterminate=indeterminate)
    if cls is InvalidArgument and error.refusal in REFUSALS:
        return REFUSALS[error.refusal](message, indeterminate=indeterminate)
    return cls(message, indeterminate=indeterminate)


def to_proto(exc: BaseException) -> kv_pb2.Error:
    """Convert an exception to a wire error. Anything that is not a :class:`KVError` becomes an
    indeterminate INTERNAL error (the server cannot know how far the operation got)."""
    if not isinstance(exc, KVError):
        return kv_pb2.Error(code=kv_pb2.INTERNAL, message=f"{type(exc).__name__}: {exc}", indeterminate=True)
    err = kv_pb2.Error(code=exc.code, message=exc.message, indeterminate=exc.indeterminate)  # type: ignore[arg-type]
    if isinstance(exc, NotLeader):
        err.leader_id = exc.leader_id
        err.leader_hint = exc.leader_address
        err.leader_client_hint = exc.leader_client_address
    elif isinstance(exc, WrongShard):
        err.shard_version = exc.shard_version
    elif isinstance(exc, ResourceExhausted):
        err.retry_after_ms = retry_after_ms(exc.retry_after)
    elif isinstance(exc, Compacted):
        err.compact_revision = exc.compact_revision
    elif isinstance(exc, FutureRevision):
        err.future_revision = True
    elif isinstance(exc, Refused):
        err.refusal = exc.refusal  # type: ignore[assignment]
    return err


def retry_after_ms(seconds: float) -> int:
    """A retry-after in whole milliseconds for the wire: rounded up, at least 1, at most an hour."""
    return max(1, min(3_600_000, int(seconds * 1000 + 0.999)))
