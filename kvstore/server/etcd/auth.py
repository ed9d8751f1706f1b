"""etcd's `Auth` service over kvstore's auth and RBAC (`server/auth_service.py`): every change
is kvstore's `Auth.Change` (a CAS of the auth state in the metadata group), every read its
`Auth.Status` (admins only), a login its `Auth.Authenticate`; the token it returns is good as
etcd's `token` metadata (`security/identity.token_of`) and as kvstore's bearer token.

etcd's conventions kept: `root` is the admin user; etcd's role `root` (every permission) is
kvstore's `admin` role under etcd's name (`ops.role_to_kvstore`); AuthEnable needs user root
with that role (as etcd 3.4: etcdctl adds and grants it when told it is missing) and is a no-op
when auth is on (kvstore's ENABLE would draw a new token key, ending every token). Who may call
what, as etcd 3.4's `authApplierV3`: UserGet of oneself and RoleGet of a role one holds are any
authenticated user's (`AuthService.own_status`; another user or role is etcd's `permission
denied`); every other method but Authenticate needs the admin permission (a user cannot change
its own password through this API: `kvctl` can). A user without a password (`no_password`) logs
in by client certificate only."""

from __future__ import annotations

from typing import Any

import grpc

from kvstore import errors
from kvstore.etcdpb.authpb import auth_pb2 as authpb
from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from kvstore.shard.shardmap import META_GROUP
from kvstore.v1 import auth_pb2

from .base import EtcdNode, fail
from .convert import EtcdRequestError, invalid
from .ops import (
    AUTH_FAILED,
    AUTH_NOT_ENABLED,
    PERMISSION_NOT_GRANTED,
    ROLE_EMPTY,
    ROLE_NOT_FOUND,
    ROOT_ROLE_NOT_EXIST,
    ROOT_USER_NOT_EXIST,
    USER_EMPTY,
    USER_NOT_FOUND,
    auth_error,
    perm_kind,
    perm_type,
    role_to_etcd,
    role_to_kvstore,
)
from .status import check_reply, of_kv_error

Op = auth_pb2.AuthChangeRequest


class _LoginContext:
    """The caller's context for kvstore's Authenticate, whose refusal (an abort) becomes etcd's
    `authentication failed` (INVALID_ARGUMENT, definite) instead of ending the call itself."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> None:
        raise EtcdRequestError("INVALID_ARGUMENT", AUTH_FAILED)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _name(name: str, empty: str) -> str:
    if not name:
        raise invalid(empty)
    return name


class EtcdAuth(rpc_pb2_grpc.AuthServicer):
    def __init__(self, node: EtcdNode, auth: Any) -> None:
        self.n = node
        self.auth = auth

    def _header(self) -> rpc_pb2.ResponseHeader:
        return self.n.header(0, META_GROUP)

    async def _change(self, context: grpc.aio.ServicerContext, **kw: Any) -> None:
        r = await self.auth.Change(auth_pb2.AuthChangeRequest(**kw), context)
        err = errors.from_proto(r.error, is_write=True)
        if isinstance(err, errors.InvalidArgument):
            raise EtcdRequestError(*auth_error(err))
        check_reply(r.error, is_write=True)

    async def _state(self, context: grpc.aio.ServicerContext) -> auth_pb2.AuthStatusResponse:
        return await self.auth.Status(auth_pb2.AuthStatusRequest(), context)

    async def _readable(self, context: grpc.aio.ServicerContext) -> auth_pb2.AuthStatusResponse:
        """The auth state as the caller may read it for UserGet / RoleGet: all of it for an
        admin (or while auth is off), else its own user and the roles it holds
        (`AuthService.own_status`, etcd 3.4's rule)."""
        st = await self._state(context)
        return st if st.admin else self.auth.own_status(context)

    async def _role(self, name: str, context: grpc.aio.ServicerContext, *, own: bool = False) -> auth_pb2.RoleInfo:
        """The role `name` (etcd's name). With `own`, as UserGet / RoleGet read it: a caller
        without the admin permission sees only the roles it holds; any other is etcd's
        `permission denied` (PERMISSION_DENIED, definite), whether or not it exists."""
        kv_name = role_to_kvstore(_name(name, ROLE_EMPTY))
        st = await (self._readable(context) if own else self._state(context))
        for r in st.roles:
            if r.name == kv_name:
                return r
        if not st.admin:
            raise of_kv_error(errors.PermissionDenied(f"role {name!r} is not one the caller holds"))
        raise EtcdRequestError("FAILED_PRECONDITION", ROLE_NOT_FOUND)

    async def AuthEnable(self, request: rpc_pb2.AuthEnableRequest, context: grpc.aio.ServicerContext
                         ) -> rpc_pb2.AuthEnableResponse:
        try:
            st = await self._state(context)
            if not st.enabled:
                root = next((u for u in st.users if u.name == "root"), None)
                if root is None:
                    raise EtcdRequestError("FAILED_PRECONDITION", ROOT_USER_NOT_EXIST)
                if role_to_kvstore("root") not in root.roles:
                    raise EtcdRequestError("FAILED_PRECONDITION", ROOT_ROLE_NOT_EXIST)
                await self._change(context, op=Op.ENABLE)
            return rpc_pb2.AuthEnableResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "AuthEnable")

    async def AuthDisable(self, request: rpc_pb2.AuthDisableRequest, context: grpc.aio.ServicerContext
                          ) -> rpc_pb2.AuthDisableResponse:
        try:
            await self._change(context, op=Op.DISABLE)
            return rpc_pb2.AuthDisableResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "AuthDisable")

    async def Authenticate(self, request: rpc_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
                           ) -> rpc_pb2.AuthenticateResponse:
        try:
            r = await self.auth.Authenticate(auth_pb2.AuthenticateRequest(user=request.name, password=request.password),
                                             _LoginContext(context))
            if isinstance(errors.from_proto(r.error, is_write=False), errors.AuthNotEnabled):
                raise EtcdRequestError("FAILED_PRECONDITION", AUTH_NOT_ENABLED)
            check_reply(r.error, is_write=False)
            return rpc_pb2.AuthenticateResponse(header=self._header(), token=r.token)
        except Exception as err:
            await fail(err, context, "Authenticate")

    async def UserAdd(self, request: rpc_pb2.AuthUserAddRequest, context: grpc.aio.ServicerContext
                      ) -> rpc_pb2.AuthUserAddResponse:
        try:
            name = _name(request.name, USER_EMPTY)
            if not request.password and not request.options.no_password:
                raise invalid("etcdserver: a user needs a password (or options.no_password: certificate login only)")
            await self._change(context, op=Op.USER_ADD, user=name,
                               password="" if request.options.no_password else request.password)
            return rpc_pb2.AuthUserAddResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "UserAdd")

    async def UserGet(self, request: rpc_pb2.AuthUserGetRequest, context: grpc.aio.ServicerContext
                      ) -> rpc_pb2.AuthUserGetResponse:
        try:
            name = _name(request.name, USER_EMPTY)
            st = await self._readable(context)
            u = next((u for u in st.users if u.name == name), None)
            if u is None and not st.admin:  # etcd 3.4: a user may read itself only
                raise of_kv_error(errors.PermissionDenied(f"user {name!r} is not the caller"))
            if u is None:
                raise EtcdRequestError("FAILED_PRECONDITION", USER_NOT_FOUND)
            return rpc_pb2.AuthUserGetResponse(header=self._header(), roles=sorted(role_to_etcd(r) for r in u.roles))
        except Exception as err:
            await fail(err, context, "UserGet")

    async def UserList(self, request: rpc_pb2.AuthUserListRequest, context: grpc.aio.ServicerContext
                       ) -> rpc_pb2.AuthUserListResponse:
        try:
            users = sorted(u.name for u in (await self._state(context)).users)
            return rpc_pb2.AuthUserListResponse(header=self._header(), users=users)
        except Exception as err:
            await fail(err, context, "UserList")

    async def UserDelete(self, request: rpc_pb2.AuthUserDeleteRequest, context: grpc.aio.ServicerContext
                         ) -> rpc_pb2.AuthUserDeleteResponse:
        try:
            await self._change(context, op=Op.USER_DELETE, user=_name(request.name, USER_EMPTY))
            return rpc_pb2.AuthUserDeleteResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "UserDelete")

    async def UserChangePassword(self, request: rpc_pb2.AuthUserChangePasswordRequest,
                                 context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserChangePasswordResponse:
        try:
            await self._change(context, op=Op.USER_PASSWD, user=_name(request.name, USER_EMPTY),
                               password=request.password)
            return rpc_pb2.AuthUserChangePasswordResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "UserChangePassword")

    async def UserGrantRole(self, request: rpc_pb2.AuthUserGrantRoleRequest, context: grpc.aio.ServicerContext
                            ) -> rpc_pb2.AuthUserGrantRoleResponse:
        try:
            await self._change(context, op=Op.USER_GRANT_ROLE, user=_name(request.user, USER_EMPTY),
                               role=role_to_kvstore(_name(request.role, ROLE_EMPTY)))
            return rpc_pb2.AuthUserGrantRoleResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "UserGrantRole")

    async def UserRevokeRole(self, request: rpc_pb2.AuthUserRevokeRoleRequest, context: grpc.aio.ServicerContext
                             ) -> rpc_pb2.AuthUserRevokeRoleResponse:
        try:
            await self._change(context, op=Op.USER_REVOKE_ROLE, user=_name(request.name, USER_EMPTY),
                               role=role_to_kvstore(_name(request.role, ROLE_EMPTY)))
            return rpc_pb2.AuthUserRevokeRoleResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "UserRevokeRole")

    async def RoleAdd(self, request: rpc_pb2.AuthRoleAddRequest, context: grpc.aio.ServicerContext
                      ) -> rpc_pb2.AuthRoleAddResponse:
        try:
            await self._change(context, op=Op.ROLE_ADD, role=role_to_kvstore(_name(request.name, ROLE_EMPTY)))
            return rpc_pb2.AuthRoleAddResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "RoleAdd")

    async def RoleGet(self, request: rpc_pb2.AuthRoleGetRequest, context: grpc.aio.ServicerContext
                      ) -> rpc_pb2.AuthRoleGetResponse:
        try:
            r = await self._role(request.role, context, own=True)
            perms = [authpb.Permission(permType=perm_type(p.kind), key=p.key, range_end=p.range_end)  # type: ignore[arg-type]
                     for p in r.permissions]
            return rpc_pb2.AuthRoleGetResponse(header=self._header(), perm=perms)
        except Exception as err:
            await fail(err, context, "RoleGet")

    async def RoleList(self, request: rpc_pb2.AuthRoleListRequest, context: grpc.aio.ServicerContext
                       ) -> rpc_pb2.AuthRoleListResponse:
        try:
            roles = sorted(role_to_etcd(r.name) for r in (await self._state(context)).roles)
            return rpc_pb2.AuthRoleListResponse(header=self._header(), roles=roles)
        except Exception as err:
            await fail(err, context, "RoleList")

    async def RoleDelete(self, request: rpc_pb2.AuthRoleDeleteRequest, context: grpc.aio.ServicerContext
                         ) -> rpc_pb2.AuthRoleDeleteResponse:
        try:
            await self._change(context, op=Op.ROLE_DELETE, role=role_to_kvstore(_name(request.role, ROLE_EMPTY)))
            return rpc_pb2.AuthRoleDeleteResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "RoleDelete")

    async def RoleGrantPermission(self, request: rpc_pb2.AuthRoleGrantPermissionRequest,
                                  context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleGrantPermissionResponse:
        try:
            role = role_to_kvstore(_name(request.name, ROLE_EMPTY))
            perm = auth_pb2.Permission(kind=perm_kind(request.perm.permType), key=request.perm.key,  # type: ignore[arg-type]
                                       range_end=request.perm.range_end)
            await self._change(context, op=Op.ROLE_GRANT, role=role, permission=perm)
            return rpc_pb2.AuthRoleGrantPermissionResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "RoleGrantPermission")

    async def RoleRevokePermission(self, request: rpc_pb2.AuthRoleRevokePermissionRequest,
                                   context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleRevokePermissionResponse:
        """etcd names the permission by its keys only: the role's permission on exactly those keys
        (whatever its kind) is revoked."""
        try:
            r = await self._role(request.role, context)
            p = next((p for p in r.permissions if p.key == request.key and p.range_end == request.range_end), None)
            if p is None:
                raise EtcdRequestError("FAILED_PRECONDITION", PERMISSION_NOT_GRANTED)
            await self._change(context, op=Op.ROLE_REVOKE, role=r.name, permission=p)
            return rpc_pb2.AuthRoleRevokePermissionResponse(header=self._header())
        except Exception as err:
            await fail(err, context, "RoleRevokePermission")


__all__ = ["EtcdAuth"]
