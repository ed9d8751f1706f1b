"""How the client classifies a failed RPC: a gRPC-level failure becomes a kvstore error that says
whether the operation may have happened (indeterminate) and whether retrying can help.

The rules (no behaviour of their own beyond classification):
- a request that provably never left this process (connection refused, name resolution, a
  stream broken before the operation was sent) is definite and retryable;
- a connection lost after sending, a deadline exceeded, a cancelled call or a server-side
  failure leaves a *write* indeterminate (a read is always definite);
- errors retrying cannot fix (too large, invalid argument, unimplemented, NOSPACE,
  unauthenticated, permission denied: all definite) are not retried;
- RESOURCE_EXHAUSTED with a `retry-after-ms` trailer (admission control) is definite and
  retryable after that long.
"""

from __future__ import annotations

import grpc
import grpc.aio

from kvstore.client.mux import STREAM_REFUSALS, StreamError
from kvstore.errors import (
    InternalError,
    InvalidArgument,
    KVError,
    LeadershipLost,
    NoLeader,
    NotLeader,
    PermissionDenied,
    ProposalDropped,
    RequestTooLarge,
    ResourceExhausted,
    ShuttingDown,
    StaleReplica,
    StorageFull,
    Timeout,
    Unauthenticated,
    Unavailable,
    WrongShard,
)

__all__ = ["RpcFailure", "classify", "is_retryable", "with_message"]

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


class RpcFailure(Exception):
    """An attempt failed at the gRPC level, already classified (internal to the client)."""

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


def classify(exc: grpc.aio.AioRpcError, *, endpoint: str, is_write: bool) -> RpcFailure:
    """Turn a gRPC-level failure into a kvstore error, deciding whether it is indeterminate."""
    code = exc.code()
    details = exc.details() or ""
    low = details.lower()
    if isinstance(exc, StreamError) and not exc.sent and code not in STREAM_REFUSALS:
        return RpcFailure(
            Unavailable(f"cannot reach {endpoint}: {details}"), transport=True, retryable=True, reason="stream broke"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        reason = _short_reason(details)
        if any(marker in low for marker in _NOT_SENT_MARKERS):
            return RpcFailure(
                Unavailable(f"cannot reach {endpoint}: {reason}"),
                transport=True,
                retryable=True,
                reason=reason,
            )
        return RpcFailure(
            Unavailable(f"connection to {endpoint} lost: {reason}", indeterminate=is_write),
            transport=True,
            retryable=True,
            reason=reason,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RpcFailure(
            Timeout(f"{endpoint} did not answer in time", indeterminate=is_write),
            transport=True,
            retryable=True,
            reason="timed out",
        )
    if code == grpc.StatusCode.CANCELLED:
        return RpcFailure(
            Unavailable(f"call to {endpoint} cancelled: {details}", indeterminate=is_write),
            transport=True,
            retryable=True,
            reason="cancelled",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in low:
        return RpcFailure(
            RequestTooLarge(message=f"request too large: {details}", indeterminate=False),
            transport=False,
            retryable=False,
            reason=details,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (after := retry_after(exc)) is not None:
        # Admission control refused the call before running it (rate limit): definite.
        return RpcFailure(
            ResourceExhausted(f"{endpoint}: {details}", retry_after=after, indeterminate=False),
            transport=False,
            retryable=True,
            reason=details,
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RpcFailure(
            InternalError(f"{endpoint} does not implement this call: {details}", indeterminate=False),
            transport=False,
            retryable=False,
            reason=details,
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return RpcFailure(
            Unauthenticated(f"{endpoint}: {details}", indeterminate=False),
            transport=False, retryable=False, reason=details,
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return RpcFailure(
            PermissionDenied(f"{endpoint}: {details}", indeterminate=False),
            transport=False, retryable=False, reason=details,
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return RpcFailure(
            InvalidArgument(f"{endpoint} rejected the request: {details}", indeterminate=False),
            transport=False,
            retryable=False,
            reason=details,
        )
    # UNKNOWN (the handler raised), INTERNAL, RESOURCE_EXHAUSTED (overload), ...: the server got the
    # request and failed somewhere; for a write that is indeterminate, and a retry is safe.
    return RpcFailure(
        InternalError(f"{endpoint}: {code.name}: {details}", indeterminate=is_write),
        transport=False,
        retryable=True,
        reason=details,
    )


RETRY_AFTER_KEY = "retry-after-ms"


def retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    """The server's `retry-after-ms` trailing metadata in seconds, or None if absent or garbled."""
    try:
        md = exc.trailing_metadata() or ()
        for key, value in md:
            if key == RETRY_AFTER_KEY:
                ms = int(value if isinstance(value, str) else value.decode())
                return min(3600.0, max(0, ms) / 1000)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    return None


def with_message(err: KVError, message: str, *, indeterminate: bool | None = None) -> KVError:
    out = type(err).__new__(type(err))
    out.__dict__.update(err.__dict__)
    out.message = message
    out.args = (message,)
    if indeterminate is not None:
        out.indeterminate = indeterminate
    return out


def is_retryable(err: KVError) -> bool:
    return isinstance(
        err,
        NotLeader | NoLeader | ProposalDropped | ShuttingDown | WrongShard | Timeout | LeadershipLost
        | InternalError | Unavailable | StorageFull | StaleReplica | ResourceExhausted,
    )
