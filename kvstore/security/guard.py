"""The auth guard: every RPC is authenticated once (per call; once per stream for streams) and
admitted by its method's rule before its handler runs; key permissions are checked per operation.

Rules (`RULES`, by method path; registering a method without a rule is an error, so a new RPC
cannot be forgotten):
- PUBLIC: anyone (health checks, `Auth.Authenticate`);
- INTERNAL: node-to-node RPCs; governed by node certificates and cluster membership in their
  handlers (`tls.PeerVerifier`, `transport/service.py`, `server/shards.py`), never by users;
- USER: any authenticated principal while auth is enabled; the handler checks each key
  (`check_key` / `check_range`) or what the request asks (`Auth.Change`);
- ADMIN: the admin permission (user `root`, holders of role `admin`, and nodes).
While auth is disabled every USER and ADMIN call on the peer port is admitted (as before auth
existed; with TLS the handshake still demands a client certificate of the cluster's CA).

Refusals are definite: UNAUTHENTICATED (no valid credentials) or PERMISSION_DENIED, as gRPC
status for a whole call and as the operation's error inside a stream.

A long-lived call (a stream) must not outlive its token: `admit` records the call's `Credential`
(the token's expiry, the token key its MAC verified under, the auth state version it was checked
at) and `recheck` is called per operation (KV.Stream) or per response (server streaming). It
costs a clock read and a version compare; only when the auth state changed since the last check
does it look at the user's revision and the token key again (never the HMAC: the MAC verified
under a key that is still the key).

The client-only port (`--client-listen`, `kvstore/server/clientport.py`) has a guard of its own
(`AuthGuard.for_client_port`: same tracker, no certificates): INTERNAL methods are not even
registered there, and a USER or ADMIN call needs a valid token, always. While auth is disabled
it refuses them all (UNAUTHENTICATED, definite): TLS without authentication is not secure mode,
and on that port nothing else vouches for the caller.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc

from kvstore import errors
from kvstore.node.metakey import MetaKeyTracker, MetaStore

from .authstate import AUTH_KEY, AuthError, AuthState
from .identity import ANONYMOUS, Principal, PrincipalKind, identity_of_call, set_identity, token_of
from .rbac import Grants, PermKind
from .tls import PeerVerifier
from .tokens import TokenError, validate

log = logging.getLogger("kvstore.auth")

META_GROUP = 0


CLIENT_PORT_NEEDS_TOKEN = (
    "this is a client-only port: log in (a token: --user/--password) or use a client certificate "
    "on the node's peer port"
)
CLIENT_PORT_NEEDS_AUTH = (
    "this is a client-only port, which serves logged-in users only, and auth is not enabled on this "
    "cluster (TLS without authentication is not secure mode): enable auth (`kvctl auth enable`) or "
    "use a client certificate on the node's peer port"
)


class Rule(enum.Enum):
    PUBLIC = "public"
    INTERNAL = "internal"
    USER = "user"
    ADMIN = "admin"


RULES: dict[str, Rule] = {
    "/grpc.health.v1.Health": Rule.PUBLIC,
    "/kvstore.v1.Raft/Send": Rule.INTERNAL,
    "/kvstore.v1.Raft/SendSnapshot": Rule.INTERNAL,
    "/kvstore.v1.Shard/GroupPropose": Rule.INTERNAL,
    "/kvstore.v1.Shard/ExportRange": Rule.INTERNAL,
    "/kvstore.v1.Shard/GetShardMap": Rule.USER,
    "/kvstore.v1.Shard/ShardOp": Rule.ADMIN,
    "/kvstore.v1.KV/Stream": Rule.USER,
    "/kvstore.v1.KV/Get": Rule.USER,
    "/kvstore.v1.KV/Put": Rule.USER,
    "/kvstore.v1.KV/Delete": Rule.USER,
    "/kvstore.v1.KV/Cas": Rule.USER,
    "/kvstore.v1.KV/Txn": Rule.USER,
    "/kvstore.v1.KV/Scan": Rule.USER,
    "/kvstore.v1.KV/Watch": Rule.USER,
    "/kvstore.v1.KV/Compact": Rule.ADMIN,
    "/kvstore.v1.KV/LeaseGrant": Rule.USER,
    "/kvstore.v1.KV/LeaseRevoke": Rule.USER,
    "/kvstore.v1.KV/LeaseKeepAlive": Rule.USER,
    "/kvstore.v1.KV/LeaseTimeToLive": Rule.USER,
    "/kvstore.v1.KV/LeaseLeases": Rule.USER,
    "/kvstore.v1.KV/LeasePut": Rule.USER,
    # etcd's v3 API (kvstore/server/etcd/): the rules of the kvstore RPCs each one runs as.
    "/etcdserverpb.KV/Range": Rule.USER,
    "/etcdserverpb.KV/Put": Rule.USER,
    "/etcdserverpb.KV/DeleteRange": Rule.USER,
    "/etcdserverpb.KV/Txn": Rule.USER,
    "/etcdserverpb.KV/Compact": Rule.ADMIN,
    "/etcdserverpb.Watch/Watch": Rule.USER,
    "/etcdserverpb.Lease/LeaseGrant": Rule.USER,
    "/etcdserverpb.Lease/LeaseRevoke": Rule.USER,
    "/etcdserverpb.Lease/LeaseKeepAlive": Rule.USER,
    "/etcdserverpb.Lease/LeaseTimeToLive": Rule.USER,
    "/etcdserverpb.Lease/LeaseLeases": Rule.USER,
    "/etcdserverpb.Cluster/MemberList": Rule.USER,
    "/etcdserverpb.Cluster/MemberAdd": Rule.ADMIN,
    "/etcdserverpb.Cluster/MemberRemove": Rule.ADMIN,
    "/etcdserverpb.Cluster/MemberUpdate": Rule.ADMIN,
    "/etcdserverpb.Cluster/MemberPromote": Rule.ADMIN,
    "/etcdserverpb.Maintenance/Status": Rule.USER,
    "/etcdserverpb.Maintenance/Alarm": Rule.ADMIN,
    "/etcdserverpb.Maintenance/Defragment": Rule.ADMIN,
    "/etcdserverpb.Maintenance/Hash": Rule.ADMIN,
    "/etcdserverpb.Maintenance/HashKV": Rule.ADMIN,
    "/etcdserverpb.Maintenance/Snapshot": Rule.ADMIN,
    "/etcdserverpb.Maintenance/MoveLeader": Rule.ADMIN,
    "/etcdserverpb.Auth/Authenticate": Rule.PUBLIC,
    **{f"/etcdserverpb.Auth/{m}": Rule.ADMIN for m in (
        "AuthEnable", "AuthDisable", "UserAdd", "UserList", "UserDelete", "UserChangePassword",
        "UserGrantRole", "UserRevokeRole", "RoleAdd", "RoleList", "RoleDelete", "RoleGrantPermission",
        "RoleRevokePermission")},
    # as etcd 3.4: any user may read itself and the roles it holds (the handler checks the rest)
    "/etcdserverpb.Auth/UserGet": Rule.USER,
    "/etcdserverpb.Auth/RoleGet": Rule.USER,
    # etcd's lock and election services: the caller's own reads and writes of the lock keys
    "/v3lockpb.Lock/Lock": Rule.USER,
    "/v3lockpb.Lock/Unlock": Rule.USER,
    "/v3electionpb.Election/Campaign": Rule.USER,
    "/v3electionpb.Election/Proclaim": Rule.USER,
    "/v3electionpb.Election/Leader": Rule.USER,
    "/v3electionpb.Election/Observe": Rule.USER,
    "/v3electionpb.Election/Resign": Rule.USER,
    "/kvstore.v1.Admin/Status": Rule.USER,
    "/kvstore.v1.Admin/AddMember": Rule.ADMIN,
    "/kvstore.v1.Admin/PromoteMember": Rule.ADMIN,
    "/kvstore.v1.Admin/RemoveMember": Rule.ADMIN,
    "/kvstore.v1.Admin/TransferLeader": Rule.ADMIN,
    "/kvstore.v1.Admin/Snapshot": Rule.ADMIN,
    "/kvstore.v1.Admin/AlarmList": Rule.ADMIN,
    "/kvstore.v1.Admin/AlarmDisarm": Rule.ADMIN,
    "/kvstore.v1.Admin/HashKV": Rule.ADMIN,
    "/kvstore.v1.Auth/Authenticate": Rule.PUBLIC,
    "/kvstore.v1.Auth/Change": Rule.USER,
    "/kvstore.v1.Auth/Status": Rule.USER,
}


ETCD_PACKAGES = ("/etcdserverpb.", "/v3lockpb.", "/v3electionpb.")
ETCD_INVALID_TOKEN = "etcdserver: invalid auth token"
"""etcd clients match this exact message to log in again (clientv3's `ErrInvalidAuthToken`)."""


ETCD_PERMISSION_DENIED = "etcdserver: permission denied"

ETCD_USER_EMPTY = "etcdserver: user name is empty"
"""etcd's answer (INVALID_ARGUMENT, rpctypes.ErrGRPCUserEmpty) to a call with neither a token nor
a client certificate while auth is enabled."""


def admin_refusal(path: str, p: Principal) -> str:
    """The message of a call refused for want of the admin permission: etcd's exact text on
    etcd's services (as etcd's `IsAdminPermitted`), kvstore's reason elsewhere."""
    if path.startswith(ETCD_PACKAGES):
        return ETCD_PERMISSION_DENIED
    return f"{path} needs the admin permission, which {p.describe()} does not have"


def token_refusal(path: str, reason: str) -> str:
    """The message of a call refused for its token (expired, revoked, malformed): etcd's exact
    text on etcd's services, so etcd clients fetch a new token; kvstore's reason elsewhere."""
    return ETCD_INVALID_TOKEN if path.startswith(ETCD_PACKAGES) else f"{path}: {reason}"


def rule_of(path: str) -> Rule:
    """The rule of method `path` (`/package.Service/Method`); KeyError if it has none."""
    rule = RULES.get(path)
    if rule is None:
        rule = RULES[path.rsplit("/", 1)[0]]
    return rule


@dataclass(slots=True)
class Credential:
    """What a call was authenticated with, kept for the call's lifetime so that a stream can be
    re-checked cheaply (`AuthGuard.recheck`). Invariant: `key` is non-empty iff the principal was
    established by a token, whose MAC verified under `key`; `expires` is the token's expiry (unix
    seconds; infinity for a certificate or no credentials); `version` is the auth state version
    the credential was last found valid at."""

    principal: Principal
    expires: float = math.inf
    key: bytes = b""
    version: int = -1


_credential: contextvars.ContextVar[Credential | None] = contextvars.ContextVar("kvstore_credential", default=None)


def credential_of_call() -> Credential | None:
    """The credential the guard admitted the call being served with (None outside a guarded call)."""
    return _credential.get()


class AuthTracker(MetaKeyTracker[AuthState]):
    """The auth state as of the metadata group's applied state on this node (like the shard
    tracker: it may lag the committed state by a little; `raw`: its encoding, b"" before the
    first, what a CAS of the state expects). A stored state that does not decode is logged and
    ignored."""

    __slots__ = ()

    def __init__(self, store: MetaStore) -> None:
        super().__init__(store, AUTH_KEY, "auth state", AuthState.decode, AuthState(), errors=(AuthError,))

    @property
    def state(self) -> AuthState:
        return self.value

    @state.setter
    def state(self, st: AuthState) -> None:
        self.value = st

    @property
    def raw(self) -> bytes:
        return self.stored or b""


class AuthGuard:
    """Authenticates calls and checks permissions against the tracker's current state."""

    def __init__(self, tracker: AuthTracker, verifier: PeerVerifier | None,
                 clock: Callable[[], float] = time.time, *, client_port: bool = False) -> None:
        self.tracker = tracker
        self.verifier = verifier
        self.clock = clock
        self.client_port = client_port
        """The client-only port's guard: USER and ADMIN calls need a token (and auth enabled)."""
        self._grants: dict[tuple[str, int], Grants] = {}
        self._grants_version = -1

    # --- authentication ---------------------------------------------------------------------
    def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller's principal; raises errors.Unauthenticated for a token that is not valid
        (a bad token never falls back to a weaker identity)."""
        return self.credential(context).principal

    def credential(self, context: grpc.aio.ServicerContext) -> Credential:
        """The caller's credential (see `authenticate`)."""
        state = self.tracker.state
        if state.enabled:
            try:
                token = token_of(context.invocation_metadata())
            except ValueError as err:
                raise errors.Unauthenticated(str(err)) from None
            if token is not None:
                try:
                    claims = validate(token, state, self.clock())
                except TokenError as err:
                    raise errors.Unauthenticated(str(err)) from None
                p = Principal(PrincipalKind.USER, claims.user, "token", claims.revision, _peer(context))
                return Credential(p, float(claims.expires), state.token_key, state.version)
        return Credential(self.transport_principal(context), version=state.version)

    def transport_principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """Who the connection says the caller is, tokens aside: the verified client certificate's
        user (or node), else anonymous. Raises errors.Unauthenticated for an unreadable
        certificate."""
        peer = _peer(context)
        if self.verifier is not None:
            try:
                ident = self.verifier.identity(context)
            except ValueError:
                raise errors.Unauthenticated("unreadable client certificate") from None
            if ident is not None:
                if ident.is_node:
                    ids = ",".join(str(n) for n in sorted(ident.node_ids)) or ident.common_name
                    return Principal(PrincipalKind.NODE, f"node:{ids}", "certificate", 0, peer)
                return Principal(PrincipalKind.USER, ident.common_name, "certificate", 0, peer)
        return Principal(PrincipalKind.ANONYMOUS, "", "none", 0, peer)

    def for_client_port(self) -> AuthGuard:
        """The guard of the client-only port: this guard's tracker and clock, no certificates
        (none is asked for there), tokens required."""
        return AuthGuard(self.tracker, None, self.clock, client_port=True)

    def recheck(self, c: Credential) -> None:
        """Raise errors.Unauthenticated (definite) if credential `c`, valid when its call was
        admitted, is no longer: its token expired, or (only looked at when the auth state changed
        since the last check) its user was deleted or changed password, or auth was enabled
        again (a new token key). A certificate's or an anonymous caller's credential does not
        expire (permission changes are checked per operation by `check_key`)."""
        if not c.key:
            return
        if self.clock() >= c.expires:
            raise errors.Unauthenticated("token expired: log in again")
        state = self.tracker.state
        if state.version == c.version:
            return
        if state.enabled:
            if state.token_key != c.key:
                raise errors.Unauthenticated("token void: auth was enabled again since it was issued; log in again")
            u = state.users.get(c.principal.name)
            if u is None or u.revision != c.principal.revision:
                raise errors.Unauthenticated(
                    "token revoked (the user's password changed or the user was deleted): log in again")
        c.version = state.version

    async def admit(self, path: str, rule: Rule, context: grpc.aio.ServicerContext,
                    before_refusal: Callable[[], Awaitable[None]] | None = None) -> Credential:
        """Authenticate the call and apply `rule`; aborts the call (definite) on refusal, after
        awaiting `before_refusal()` if given (a streaming-request call waits there for the
        caller's first message: see `wire.first_request`). The call's principal
        (`identity_of_call`) and credential (`credential_of_call`) are recorded for its handler;
        the credential is returned."""

        async def refuse(code: grpc.StatusCode, details: str) -> NoReturn:
            if before_refusal is not None:
                await before_refusal()
            await context.abort(code, details)
            raise AssertionError("context.abort returned")  # it raises (grpc.aio's AbortError)

        if self.client_port and rule in (Rule.USER, Rule.ADMIN) and not self.tracker.state.enabled:
            await refuse(grpc.StatusCode.UNAUTHENTICATED, f"{path}: {CLIENT_PORT_NEEDS_AUTH}")
        try:
            c = self.credential(context)
        except errors.Unauthenticated as err:
            if rule not in (Rule.PUBLIC, Rule.INTERNAL):
                await refuse(grpc.StatusCode.UNAUTHENTICATED, token_refusal(path, err.message))
            c = Credential(Principal(PrincipalKind.ANONYMOUS, "", "none", 0, _peer(context)))
        p = c.principal
        set_identity(p)
        _credential.set(c)
        if rule in (Rule.PUBLIC, Rule.INTERNAL) or not self.tracker.state.enabled:
            return c
        if p.kind is PrincipalKind.ANONYMOUS:
            if path.startswith(ETCD_PACKAGES):
                # etcd's exact refusal (clientv3 matches its text, and it is definite as ours is)
                await refuse(grpc.StatusCode.INVALID_ARGUMENT, ETCD_USER_EMPTY)
            await refuse(grpc.StatusCode.UNAUTHENTICATED, f"{path}: " + (
                CLIENT_PORT_NEEDS_TOKEN if self.client_port
                else "auth is enabled: log in (a token) or present a client certificate"))
        if rule is Rule.ADMIN and not self.grants(p).admin:
            await refuse(grpc.StatusCode.PERMISSION_DENIED, admin_refusal(path, p))
        return c

    # --- authorization ----------------------------------------------------------------------
    def enabled(self) -> bool:
        return self.tracker.state.enabled

    def grants(self, p: Principal) -> Grants:
        """`p`'s grants at the current state (cached per state version). A node has every
        permission; a token whose user was deleted or changed password since has none."""
        state = self.tracker.state
        if state.version != self._grants_version:
            self._grants.clear()
            self._grants_version = state.version
        key = (p.name if p.kind is not PrincipalKind.NODE else "\x00node", p.revision)
        g = self._grants.get(key)
        if g is None:
            if p.kind is PrincipalKind.NODE:
                g = Grants.of(AuthState(state.version), "")
                g = Grants(g.version, True, g.read, g.write)
            else:
                u = state.users.get(p.name)
                revoked = u is None or (p.via == "token" and u.revision != p.revision)
                g = Grants.of(AuthState(state.version) if revoked else state, p.name)
            if len(self._grants) >= 4096:
                self._grants.clear()
            self._grants[key] = g
        return g

    def check_admin(self, p: Principal | None = None) -> None:
        p = p or identity_of_call()
        if self.enabled() and not self.grants(p).admin:
            raise errors.PermissionDenied(f"needs the admin permission, which {p.describe()} does not have")

    def check_key(self, key: bytes, access: PermKind, p: Principal | None = None) -> None:
        """Raise a definite PermissionDenied unless the call's principal may `access` `key`."""
        if not self.tracker.state.enabled:
            return
        p = p or identity_of_call()
        if not self.grants(p).allows(key, access):
            raise errors.PermissionDenied(f"{p.describe()} may not {access.name.lower()} key {key[:64]!r}")

    def check_range(self, lo: bytes, hi: bytes | None, access: PermKind, p: Principal | None = None) -> None:
        if not self.tracker.state.enabled:
            return
        p = p or identity_of_call()
        if not self.grants(p).allows_range(lo, hi, access):
            raise errors.PermissionDenied(
                f"{p.describe()} may not {access.name.lower()} the range [{lo[:64]!r}, {hi[:64] if hi else 'end'!r})"
            )


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # a context without a transport (tests); never fails a call
        return ""


__all__ = ["ANONYMOUS", "CLIENT_PORT_NEEDS_AUTH", "CLIENT_PORT_NEEDS_TOKEN", "RULES", "AuthGuard", "AuthTracker",
           "Credential", "Rule", "credential_of_call", "rule_of"]
