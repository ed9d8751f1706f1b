"""The `Auth` service: login (tokens), user / role / permission changes, auth status.

Changes are compare-and-swaps of the whole auth state in the metadata group (see
`kvstore/security/authstate.py`), run at that group's leader through `GroupCaller` from any node;
a CAS that lost a race is recomputed from the state it lost to, so concurrent changes from
different nodes all apply, one version after another. Once a change committed, the reply waits
(bounded) until this node applied it, so a caller that goes on through the same node sees it.

Who may change what: while auth is disabled, any caller that reached the service (with TLS: any
holder of a certificate of the cluster's CA); once it is enabled, the admin permission, except
that a user may change its own password. Passwords are hashed (scrypt) here, off the event
loop, at most `HASHERS` at once, with at most `MAX_WAITING` more queued (beyond: refused, definite).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import grpc

from kvstore import errors
from kvstore.security import passwords, tokens
from kvstore.security.authstate import (
    AUTH_KEY,
    AuthCommand,
    AuthError,
    AuthOp,
    AuthState,
    Permission,
    PermKind,
    check_name,
    check_perm,
)
from kvstore.security.guard import AuthGuard, AuthTracker
from kvstore.security.identity import PrincipalKind, identity_of_call
from kvstore.shard.shardmap import META_GROUP
from kvstore.storage import commands
from kvstore.v1 import auth_pb2, auth_pb2_grpc

from .shards import GroupCaller

HASHERS = 2
MAX_WAITING = 32
APPLY_WAIT = 5.0
"""How long a reply waits for this node to apply a committed change (then it answers anyway)."""

_OPS = {
    auth_pb2.AuthChangeRequest.ENABLE: AuthOp.ENABLE,
    auth_pb2.AuthChangeRequest.DISABLE: AuthOp.DISABLE,
    auth_pb2.AuthChangeRequest.USER_ADD: AuthOp.USER_ADD,
    auth_pb2.AuthChangeRequest.USER_DELETE: AuthOp.USER_DELETE,
    auth_pb2.AuthChangeRequest.USER_PASSWD: AuthOp.USER_PASSWD,
    auth_pb2.AuthChangeRequest.USER_GRANT_ROLE: AuthOp.USER_GRANT,
    auth_pb2.AuthChangeRequest.USER_REVOKE_ROLE: AuthOp.USER_REVOKE,
    auth_pb2.AuthChangeRequest.ROLE_ADD: AuthOp.ROLE_ADD,
    auth_pb2.AuthChangeRequest.ROLE_DELETE: AuthOp.ROLE_DELETE,
    auth_pb2.AuthChangeRequest.ROLE_GRANT: AuthOp.ROLE_GRANT,
    auth_pb2.AuthChangeRequest.ROLE_REVOKE: AuthOp.ROLE_REVOKE,
}
_USER_OPS = {AuthOp.USER_ADD, AuthOp.USER_DELETE, AuthOp.USER_PASSWD, AuthOp.USER_GRANT, AuthOp.USER_REVOKE}
_ROLE_OPS = {AuthOp.USER_GRANT, AuthOp.USER_REVOKE, AuthOp.ROLE_ADD, AuthOp.ROLE_DELETE, AuthOp.ROLE_GRANT,
             AuthOp.ROLE_REVOKE}


def permission_of(p: auth_pb2.Permission) -> Permission:
    """The checked permission of a request; errors.InvalidArgument (definite) otherwise."""
    if p.kind not in (1, 2, 3):
        raise errors.InvalidArgument("permission kind must be read, write or readwrite")
    perm = Permission(bytes(p.key), bytes(p.range_end), PermKind(p.kind))
    try:
        check_perm(perm)
    except AuthError as err:
        raise errors.InvalidArgument(str(err)) from None
    return perm


def permission_pb(p: Permission) -> auth_pb2.Permission:
    return auth_pb2.Permission(kind=int(p.kind), key=p.key, range_end=p.end)  # type: ignore[arg-type]


def command_shape(request: auth_pb2.AuthChangeRequest) -> tuple[AuthOp, Permission | None]:
    """Check what a change request names (op, names, permission, password length) before any
    work is done for it; errors.InvalidArgument (definite) for anything malformed."""
    op = _OPS.get(request.op)
    if op is None:
        raise errors.InvalidArgument(f"unknown auth change {request.op}")
    try:
        if op in _USER_OPS:
            check_name("user", request.user)
        if op in _ROLE_OPS:
            check_name("role", request.role)
    except AuthError as err:
        raise errors.InvalidArgument(str(err)) from None
    if op == AuthOp.USER_PASSWD or (op == AuthOp.USER_ADD and request.password):
        try:
            passwords.check_password(request.password)
        except ValueError as err:
            raise errors.InvalidArgument(str(err)) from None
    perm = permission_of(request.permission) if op in (AuthOp.ROLE_GRANT, AuthOp.ROLE_REVOKE) else None
    return op, perm


class AuthService(auth_pb2_grpc.AuthServicer):
    def __init__(self, tracker: AuthTracker, guard: AuthGuard, caller: GroupCaller, request_timeout: float) -> None:
        self.tracker = tracker
        self.guard = guard
        self.caller = caller
        self.request_timeout = request_timeout
        self._hashers = asyncio.Semaphore(HASHERS)
        self._waiting = 0
        self._applied = asyncio.Event()
        tracker.on_change.append(self._changed)
        self._dummy = passwords.hash_password("kvstore-no-such-user")

    def _changed(self) -> None:
        self._applied.set()
        self._applied = asyncio.Event()

    async def _hash_work(self, fn: Any, *args: Any) -> Any:
        if self._waiting >= MAX_WAITING:
            raise errors.Unavailable("too many password checks in progress; retry shortly")
        self._waiting += 1
        try:
            async with self._hashers:
                return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        finally:
            self._waiting -= 1

    # --- login --------------------------------------------------------------------------------
    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthenticateResponse:
        try:
            state = self.tracker.state
            if not state.enabled:
                raise errors.AuthNotEnabled("auth is not enabled: there is nothing to log in to")
            if request.ttl_seconds > tokens.MAX_TTL:
                raise errors.InvalidArgument(f"ttl_seconds must be at most {tokens.MAX_TTL}")
            u = state.users.get(request.user) if len(request.user) <= 64 else None
            stored = u.password if u is not None and u.password else self._dummy
            ok = await self._hash_work(passwords.verify_password, request.password, stored)
            if not ok or u is None or not u.password:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong user name or password")
            assert u is not None
            ttl = request.ttl_seconds or tokens.DEFAULT_TTL
            state = self.tracker.state  # the key may have changed while hashing
            cur = state.users.get(u.name)
            if not state.enabled or cur is None or cur.revision != u.revision:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the user changed while logging in; retry")
            token = tokens.issue(state.token_key, u.name, u.revision, time.time(), ttl)
            return auth_pb2.AuthenticateResponse(token=token, ttl_seconds=ttl)
        except errors.KVError as err:
            return auth_pb2.AuthenticateResponse(error=errors.to_proto(err))

    # --- changes ------------------------------------------------------------------------------
    async def Change(
        self, request: auth_pb2.AuthChangeRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthChangeResponse:
        try:
            op, perm = command_shape(request)
            p = identity_of_call(context)
            own_password = op == AuthOp.USER_PASSWD and p.kind is PrincipalKind.USER and p.name == request.user
            if not own_password:
                self.guard.check_admin(p)
            pw = b""
            if request.password and op in (AuthOp.USER_ADD, AuthOp.USER_PASSWD):
                pw = await self._hash_work(passwords.hash_password, request.password)
            key = secrets.token_bytes(32) if op == AuthOp.ENABLE else b""
            cmd = AuthCommand(op, request.user, request.role, pw, perm, key)
            version = await self.apply(cmd)
            return auth_pb2.AuthChangeResponse(revision=version)
        except errors.KVError as err:
            return auth_pb2.AuthChangeResponse(error=errors.to_proto(err))

    async def apply(self, cmd: AuthCommand) -> int:
        """Apply `cmd` to the replicated state (CAS at the metadata leader, recomputed on a lost
        race); the new version. errors.InvalidArgument (definite) if the command is not allowed."""
        raw = self.tracker.raw
        loop = asyncio.get_running_loop()
        end = loop.time() + 4 * self.request_timeout
        while True:
            try:
                state = AuthState.decode(raw) if raw else AuthState()
                new = state.apply(cmd)
            except AuthError as err:
                raise err.as_kv_error() from None
            value = new.encode()
            res = await self.caller.propose(META_GROUP, commands.encode_cas(AUTH_KEY, not raw, raw, value))
            if res.error:
                raise errors.InternalError(f"auth change failed to apply: {res.error}")
            current = res.current or b""
            if res.swapped or current == value:  # (the second: our own earlier attempt applied)
                await self._wait_applied(new.version)
                return new.version
            if loop.time() > end:
                raise errors.Timeout("auth change kept losing races with other changes", indeterminate=False)
            raw = current

    async def _wait_applied(self, version: int) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + APPLY_WAIT
        while self.tracker.state.version < version and loop.time() < end:
            ev = self._applied
            try:
                await asyncio.wait_for(ev.wait(), end - loop.time())
            except TimeoutError:
                return

    # --- status -------------------------------------------------------------------------------
    async def Status(
        self, request: auth_pb2.AuthStatusRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthStatusResponse:
        state = self.tracker.state
        p = identity_of_call(context)
        admin = (not state.enabled) or self.guard.grants(p).admin
        resp = auth_pb2.AuthStatusResponse(
            enabled=state.enabled, revision=state.version, identity=p.describe(), admin=admin,
        )
        if admin:
            for u in state.users.values():
                resp.users.add(name=u.name, roles=list(u.roles), has_password=bool(u.password))
            for r in state.roles.values():
                resp.roles.add(name=r.name, permissions=[permission_pb(x) for x in r.perms])
            if request.export_state:
                resp.state = state.encode()
        return resp

    def own_status(self, context: grpc.aio.ServicerContext) -> auth_pb2.AuthStatusResponse:
        """What the caller may read of the auth state without the admin permission (etcd 3.4's
        `authApplierV3.UserGet` / `RoleGet`): its own user (a USER principal's, if it exists)
        and the roles that user holds, with their permissions; `admin` as in `Status`. Never
        the state's export, never another user."""
        state = self.tracker.state
        p = identity_of_call(context)
        resp = auth_pb2.AuthStatusResponse(enabled=state.enabled, revision=state.version, identity=p.describe(),
                                           admin=(not state.enabled) or self.guard.grants(p).admin)
        u = state.users.get(p.name) if p.kind is PrincipalKind.USER else None
        if u is not None:
            resp.users.add(name=u.name, roles=list(u.roles), has_password=bool(u.password))
            for name in u.roles:
                r = state.roles.get(name)
                if r is not None:
                    resp.roles.add(name=r.name, permissions=[permission_pb(x) for x in r.perms])
        return resp
