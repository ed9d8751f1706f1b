"""Who is calling: the authenticated identity of an RPC (`Principal`), in one place.

`identity_of_call(context)` is THE way for any service (KV, Admin, Shard, Auth, the audit log,
admission control) to learn the identity behind the call it is serving. The auth guard
(`kvstore/security/guard.py`) authenticates every call once, before its handler runs (once per
stream for streaming calls), and records the principal for the call; handlers and anything
they call within the call's task see it.

Sources, in order: a bearer token in the call's metadata (`authorization: Bearer <token>`, only
while auth is enabled), then a verified client certificate (its common name is the user; a node
certificate makes the caller that node), else anonymous.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass

import grpc

__all__ = ["ANONYMOUS", "Principal", "PrincipalKind", "identity_of_call", "set_identity", "token_of"]

METADATA_KEY = "authorization"
ETCD_METADATA_KEY = "token"
"""etcd's token metadata (its clients send `token: <token>`; kvstore's: `authorization: Bearer`)."""
BEARER = "Bearer "


class PrincipalKind(enum.Enum):
    ANONYMOUS = "anonymous"
    USER = "user"
    NODE = "node"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated identity. `name` is the user name (USER), `node:<id>` (NODE) or ""
    (ANONYMOUS); `via` says how it was established ("token", "certificate", "none");
    `revision` is the user revision a token was issued at (0 otherwise); `peer` is the
    transport address of the caller (as gRPC reports it)."""

    kind: PrincipalKind
    name: str = ""
    via: str = "none"
    revision: int = 0
    peer: str = ""

    @property
    def is_user(self) -> bool:
        return self.kind is PrincipalKind.USER

    def describe(self) -> str:
        if self.kind is PrincipalKind.ANONYMOUS:
            return "anonymous"
        return f"{self.kind.value} {self.name!r} (by {self.via})"


ANONYMOUS = Principal(PrincipalKind.ANONYMOUS)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("kvstore_principal", default=ANONYMOUS)


def identity_of_call(context: grpc.aio.ServicerContext | None = None) -> Principal:
    """The principal of the RPC being served (ANONYMOUS outside a guarded call). `context` is
    accepted for clarity at call sites; the guard records the identity in the call's task."""
    return _current.get()


def set_identity(p: Principal) -> contextvars.Token[Principal]:
    return _current.set(p)


def token_of(metadata: object) -> str | None:
    """The bearer token in invocation metadata, None if there is none; ValueError if the
    authorization metadata is malformed (repeated, not a bearer token, not text). etcd clients
    send theirs as `token: <token>` (`ETCD_METADATA_KEY`): read the same way; a call carries
    at most one token, in one of the two forms."""
    found: str | None = None
    if not metadata:
        return None
    try:
        items = list(metadata)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError("unreadable call metadata") from None
    for item in items:
        try:
            k, v = item
        except (TypeError, ValueError):
            raise ValueError("unreadable call metadata") from None
        if k != METADATA_KEY and k != ETCD_METADATA_KEY:
            continue
        if found is not None:
            raise ValueError("more than one authorization header")
        if k == ETCD_METADATA_KEY:
            if not isinstance(v, str) or not v.strip():
                raise ValueError("token metadata must be a token")
            found = v.strip()
            continue
        if not isinstance(v, str) or not v.startswith(BEARER):
            raise ValueError("authorization metadata must be 'Bearer <token>'")
        found = v[len(BEARER):].strip()
    return found
