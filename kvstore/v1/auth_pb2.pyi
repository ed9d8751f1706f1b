from kvstore.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PermissionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERMISSION_UNSPECIFIED: _ClassVar[PermissionKind]
    READ: _ClassVar[PermissionKind]
    WRITE: _ClassVar[PermissionKind]
    READWRITE: _ClassVar[PermissionKind]
PERMISSION_UNSPECIFIED: PermissionKind
READ: PermissionKind
WRITE: PermissionKind
READWRITE: PermissionKind

class Permission(_message.Message):
    __slots__ = ("kind", "key", "range_end")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    RANGE_END_FIELD_NUMBER: _ClassVar[int]
    kind: PermissionKind
    key: bytes
    range_end: bytes
    def __init__(self, kind: _Optional[_Union[PermissionKind, str]] = ..., key: _Optional[bytes] = ..., range_end: _Optional[bytes] = ...) -> None: ...

class AuthenticateRequest(_message.Message):
    __slots__ = ("user", "password", "ttl_seconds")
    USER_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    user: str
    password: str
    ttl_seconds: int
    def __init__(self, user: _Optional[str] = ..., password: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class AuthenticateResponse(_message.Message):
    __slots__ = ("error", "token", "ttl_seconds")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    token: str
    ttl_seconds: int
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., token: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class AuthChangeRequest(_message.Message):
    __slots__ = ("op", "user", "role", "password", "permission")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNSPECIFIED: _ClassVar[AuthChangeRequest.Op]
        ENABLE: _ClassVar[AuthChangeRequest.Op]
        DISABLE: _ClassVar[AuthChangeRequest.Op]
        USER_ADD: _ClassVar[AuthChangeRequest.Op]
        USER_DELETE: _ClassVar[AuthChangeRequest.Op]
        USER_PASSWD: _ClassVar[AuthChangeRequest.Op]
        USER_GRANT_ROLE: _ClassVar[AuthChangeRequest.Op]
        USER_REVOKE_ROLE: _ClassVar[AuthChangeRequest.Op]
        ROLE_ADD: _ClassVar[AuthChangeRequest.Op]
        ROLE_DELETE: _ClassVar[AuthChangeRequest.Op]
        ROLE_GRANT: _ClassVar[AuthChangeRequest.Op]
        ROLE_REVOKE: _ClassVar[AuthChangeRequest.Op]
    UNSPECIFIED: AuthChangeRequest.Op
    ENABLE: AuthChangeRequest.Op
    DISABLE: AuthChangeRequest.Op
    USER_ADD: AuthChangeRequest.Op
    USER_DELETE: AuthChangeRequest.Op
    USER_PASSWD: AuthChangeRequest.Op
    USER_GRANT_ROLE: AuthChangeRequest.Op
    USER_REVOKE_ROLE: AuthChangeRequest.Op
    ROLE_ADD: AuthChangeRequest.Op
    ROLE_DELETE: AuthChangeRequest.Op
    ROLE_GRANT: AuthChangeRequest.Op
    ROLE_REVOKE: AuthChangeRequest.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    op: AuthChangeRequest.Op
    user: str
    role: str
    password: str
    permission: Permission
    def __init__(self, op: _Optional[_Union[AuthChangeRequest.Op, str]] = ..., user: _Optional[str] = ..., role: _Optional[str] = ..., password: _Optional[str] = ..., permission: _Optional[_Union[Permission, _Mapping]] = ...) -> None: ...

class AuthChangeResponse(_message.Message):
    __slots__ = ("error", "revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    revision: int
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class AuthStatusRequest(_message.Message):
    __slots__ = ("export_state",)
    EXPORT_STATE_FIELD_NUMBER: _ClassVar[int]
    export_state: bool
    def __init__(self, export_state: _Optional[bool] = ...) -> None: ...

class UserInfo(_message.Message):
    __slots__ = ("name", "roles", "has_password")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    HAS_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    has_password: bool
    def __init__(self, name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., has_password: _Optional[bool] = ...) -> None: ...

class RoleInfo(_message.Message):
    __slots__ = ("name", "permissions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    permissions: _containers.RepeatedCompositeFieldContainer[Permission]
    def __init__(self, name: _Optional[str] = ..., permissions: _Optional[_Iterable[_Union[Permission, _Mapping]]] = ...) -> None: ...

class AuthStatusResponse(_message.Message):
    __slots__ = ("error", "enabled", "revision", "identity", "admin", "users", "roles", "state")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    enabled: bool
    revision: int
    identity: str
    admin: bool
    users: _containers.RepeatedCompositeFieldContainer[UserInfo]
    roles: _containers.RepeatedCompositeFieldContainer[RoleInfo]
    state: bytes
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., enabled: _Optional[bool] = ..., revision: _Optional[int] = ..., identity: _Optional[str] = ..., admin: _Optional[bool] = ..., users: _Optional[_Iterable[_Union[UserInfo, _Mapping]]] = ..., roles: _Optional[_Iterable[_Union[RoleInfo, _Mapping]]] = ..., state: _Optional[bytes] = ...) -> None: ...
