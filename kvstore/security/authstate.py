"""The replicated authentication state and the commands that change it. STANDARD LIBRARY ONLY.

The state (users, their password hashes and roles, roles and their key permissions, whether auth
is enabled, and the key tokens are signed with) is the value of key `AUTH_KEY` in the metadata
group (group 0), next to the shard map, and changes like the map does: the node serving an
administrative request reads the state, computes the next one with `AuthState.apply` and
proposes a compare-and-swap of the whole encoded value (`kvstore/server/auth_service.py`). So
every change is one linearizable step from `version` to `version + 1`; it is persisted with the
state machine and carried in its snapshots like any key of group 0.

Invariants (checked by `AuthState.decode` and `AuthState.apply`, which raise `AuthError`, and
never anything else, for any input):
- names are 1..`MAX_NAME` characters of `NAME_CHARS`; at most `MAX_USERS` users, `MAX_ROLES`
  roles, `MAX_USER_ROLES` roles per user, `MAX_ROLE_PERMS` permissions per role, keys of at most
  `MAX_KEY` bytes; the encoded state is at most `MAX_STATE_BYTES`;
- a user's roles all exist (deleting a role revokes it from every user);
- auth can be enabled only while user `ROOT` exists and has a password or is reachable by a
  client certificate (it always exists once created: `ROOT` cannot be deleted while auth is on);
- enabling auth draws a fresh `token_key` (tokens issued before are void); a user's `revision`
  grows on every password change, so tokens naming an older revision are void;
- `version` grows by exactly one per applied command.

Wire (all integers big-endian): state = magic:u8 format:u8 version:u64 flags:u8 key:bytes8
users:u16 (name:str8 revision:u64 hash:bytes8 nroles:u8 role:str8*)* roles:u16 (name:str8
nperms:u8 (kind:u8 key:bytes16 end:bytes16)*)*; str8/bytes8/bytes16 are length-prefixed.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, replace

from kvstore import errors

AUTH_KEY = b"\x00kvstore/auth"
"""The key of the auth state in the metadata group."""
ROOT = "root"
"""The user that always has the admin permission (like etcd's root)."""
ADMIN_ROLE = "admin"
"""A role whose holders have the admin permission (membership, shards, leadership, snapshots,
users and roles). `ROOT` has it whether or not it holds the role."""

MAX_NAME = 64
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")
MAX_USERS = 256
MAX_ROLES = 256
MAX_USER_ROLES = 16
MAX_ROLE_PERMS = 32
MAX_KEY = 503
MAX_HASH = 128
TOKEN_KEY_BYTES = 32
MAX_STATE_BYTES = 256 << 10

_MAGIC = 0xA7
_FORMAT = 1
_HEAD = struct.Struct(">BBQB")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ENABLED = 0x01


class AuthError(ValueError):
    """An auth command or state that is not allowed or does not decode (the message says why).
    `refused`: the kvstore error class a caller tells this refusal apart by (`errors.Refused`:
    a user or role that exists or not, a role or permission not held, enabling without root);
    None for the others (then an `errors.InvalidArgument`)."""

    def __init__(self, message: str, refused: type[errors.Refused] | None = None) -> None:
        super().__init__(message)
        self.refused = refused

    def as_kv_error(self) -> errors.InvalidArgument:
        """The definite kvstore error of this refusal."""
        return (self.refused or errors.InvalidArgument)(str(self))


class PermKind(enum.IntEnum):
    READ = 1
    WRITE = 2
    READWRITE = 3

    def allows(self, access: PermKind) -> bool:
        return (int(self) & int(access)) == int(access)


@dataclass(frozen=True, slots=True, order=True)
class Permission:
    """`kind` on the keys `key <= k < end`; `end == b""` means the single key `key`, and
    `end == b"\\x00"` means every key from `key` on (etcd's convention)."""

    key: bytes
    end: bytes
    kind: PermKind

    def describe(self) -> str:
        if self.end == b"":
            where = f"key {self.key!r}"
        elif self.end == b"\x00":
            where = f"keys >= {self.key!r}"
        else:
            where = f"keys [{self.key!r}, {self.end!r})"
        return f"{self.kind.name.lower()} {where}"


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password: bytes = b""
    """The encoded password hash (`passwords.hash_password`); empty: no password login."""
    roles: tuple[str, ...] = ()
    """Sorted, no duplicates."""
    revision: int = 1


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    perms: tuple[Permission, ...] = ()
    """Sorted, no duplicates."""


class AuthOp(enum.IntEnum):
    ENABLE = 1
    DISABLE = 2
    USER_ADD = 3
    USER_DELETE = 4
    USER_PASSWD = 5
    USER_GRANT = 6
    USER_REVOKE = 7
    ROLE_ADD = 8
    ROLE_DELETE = 9
    ROLE_GRANT = 10
    ROLE_REVOKE = 11


@dataclass(frozen=True, slots=True)
class AuthCommand:
    """One change of the auth state. `password` is the encoded hash (never a clear password);
    `token_key` is the fresh key an ENABLE installs (drawn by the proposing node)."""

    op: AuthOp
    user: str = ""
    role: str = ""
    password: bytes = b""
    perm: Permission | None = None
    token_key: bytes = b""


def check_name(what: str, name: str) -> None:
    if not 0 < len(name) <= MAX_NAME or not set(name) <= NAME_CHARS:
        raise AuthError(
            f"{what} name {name[:80]!r} must be 1..{MAX_NAME} characters of letters, digits and ._@-"
        )


def check_perm(perm: Permission) -> None:
    if not isinstance(perm.kind, PermKind):
        raise AuthError("permission kind must be read, write or readwrite")
    if not 0 < len(perm.key) <= MAX_KEY:
        raise AuthError(f"permission key must be 1..{MAX_KEY} bytes")
    if len(perm.end) > MAX_KEY:
        raise AuthError(f"permission range end must be at most {MAX_KEY} bytes")
    if perm.end not in (b"", b"\x00") and perm.end <= perm.key:
        raise AuthError("permission range end must be after its key")


@dataclass(frozen=True, slots=True)
class AuthState:
    version: int = 0
    enabled: bool = False
    token_key: bytes = b""
    users: dict[str, User] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)

    # --- reading ----------------------------------------------------------------------------
    def is_admin(self, user: str) -> bool:
        if user == ROOT:
            return user in self.users
        u = self.users.get(user)
        return u is not None and ADMIN_ROLE in u.roles

    def perms_of(self, user: str) -> list[Permission]:
        u = self.users.get(user)
        if u is None:
            return []
        return [p for r in u.roles if (role := self.roles.get(r)) is not None for p in role.perms]

    # --- changing ---------------------------------------------------------------------------
    def apply(self, cmd: AuthCommand) -> AuthState:
        """The next state (version + 1), or AuthError saying why `cmd` is not allowed here."""
        users, roles = dict(self.users), dict(self.roles)
        enabled, key = self.enabled, self.token_key
        op = cmd.op
        if op == AuthOp.ENABLE:
            root = users.get(ROOT)
            if root is None:
                raise AuthError(f"create user {ROOT!r} before enabling auth", errors.RootUserMissing)
            if len(cmd.token_key) != TOKEN_KEY_BYTES:
                raise AuthError("enabling auth needs a fresh token key")
            enabled, key = True, cmd.token_key
        elif op == AuthOp.DISABLE:
            enabled, key = False, b""
        elif op in (AuthOp.USER_ADD, AuthOp.USER_DELETE, AuthOp.USER_PASSWD, AuthOp.USER_GRANT, AuthOp.USER_REVOKE):
            check_name("user", cmd.user)
            u = users.get(cmd.user)
            if op == AuthOp.USER_ADD:
                if u is not None:
                    raise AuthError(f"user {cmd.user!r} already exists", errors.UserExists)
                if len(users) >= MAX_USERS:
                    raise AuthError(f"at most {MAX_USERS} users")
                _check_hash(cmd.password)
                users[cmd.user] = User(cmd.user, cmd.password)
            elif u is None:
                raise AuthError(f"no user {cmd.user!r}", errors.UserNotFound)
            elif op == AuthOp.USER_DELETE:
                if cmd.user == ROOT and enabled:
                    raise AuthError(f"user {ROOT!r} cannot be deleted while auth is enabled")
                del users[cmd.user]
            elif op == AuthOp.USER_PASSWD:
                _check_hash(cmd.password)
                users[cmd.user] = replace(u, password=cmd.password, revision=u.revision + 1)
            else:
                check_name("role", cmd.role)
                if op == AuthOp.USER_GRANT:
                    if cmd.role not in roles:
                        raise AuthError(f"no role {cmd.role!r}", errors.RoleNotFound)
                    if cmd.role not in u.roles and len(u.roles) >= MAX_USER_ROLES:
                        raise AuthError(f"a user has at most {MAX_USER_ROLES} roles")
                    users[cmd.user] = replace(u, roles=tuple(sorted({*u.roles, cmd.role})))
                else:
                    if cmd.role not in u.roles:
                        raise AuthError(f"user {cmd.user!r} does not have role {cmd.role!r}", errors.RoleNotGranted)
                    users[cmd.user] = replace(u, roles=tuple(r for r in u.roles if r != cmd.role))
        elif op in (AuthOp.ROLE_ADD, AuthOp.ROLE_DELETE, AuthOp.ROLE_GRANT, AuthOp.ROLE_REVOKE):
            check_name("role", cmd.role)
            r = roles.get(cmd.role)
            if op == AuthOp.ROLE_ADD:
                if r is not None:
                    raise AuthError(f"role {cmd.role!r} already exists", errors.RoleExists)
                if len(roles) >= MAX_ROLES:
                    raise AuthError(f"at most {MAX_ROLES} roles")
                roles[cmd.role] = Role(cmd.role)
            elif r is None:
                raise AuthError(f"no role {cmd.role!r}", errors.RoleNotFound)
            elif op == AuthOp.ROLE_DELETE:
                del roles[cmd.role]
                for name, u in users.items():
                    if cmd.role in u.roles:
                        users[name] = replace(u, roles=tuple(x for x in u.roles if x != cmd.role))
            else:
                if cmd.perm is None:
                    raise AuthError("a permission is required")
                check_perm(cmd.perm)
                if op == AuthOp.ROLE_GRANT:
                    if cmd.perm not in r.perms and len(r.perms) >= MAX_ROLE_PERMS:
                        raise AuthError(f"a role has at most {MAX_ROLE_PERMS} permissions")
                    roles[cmd.role] = replace(r, perms=tuple(sorted({*r.perms, cmd.perm})))
                else:
                    if cmd.perm not in r.perms:
                        raise AuthError(f"role {cmd.role!r} has no permission {cmd.perm.describe()}",
                                        errors.PermissionNotGranted)
                    roles[cmd.role] = replace(r, perms=tuple(p for p in r.perms if p != cmd.perm))
        else:  # pragma: no cover - AuthOp is closed
            raise AuthError(f"unknown auth operation {op}")
        new = AuthState(self.version + 1, enabled, key, users, roles)
        if len(new.encode()) > MAX_STATE_BYTES:
            raise AuthError(f"the auth state would exceed {MAX_STATE_BYTES} bytes")
        return new

    # --- encoding ---------------------------------------------------------------------------
    def encode(self) -> bytes:
        out = [_HEAD.pack(_MAGIC, _FORMAT, self.version, _ENABLED if self.enabled else 0), _b8(self.token_key)]
        out.append(_U16.pack(len(self.users)))
        for name in sorted(self.users):
            u = self.users[name]
            out += [_s8(name), _U64.pack(u.revision), _b8(u.password), _U8.pack(len(u.roles))]
            out += [_s8(r) for r in u.roles]
        out.append(_U16.pack(len(self.roles)))
        for name in sorted(self.roles):
            r = self.roles[name]
            out += [_s8(name), _U8.pack(len(r.perms))]
            for p in r.perms:
                out += [_U8.pack(int(p.kind)), _b16(p.key), _b16(p.end)]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> AuthState:
        """The state `data` encodes; AuthError (only) for anything that is not a valid state."""
        if len(data) > MAX_STATE_BYTES:
            raise AuthError(f"auth state of {len(data)} bytes exceeds {MAX_STATE_BYTES}")
        r = _Reader(bytes(data))
        magic, fmt, version, flags = r.unpack(_HEAD)
        if magic != _MAGIC or fmt != _FORMAT:
            raise AuthError("not an auth state (bad magic or format)")
        if flags & ~_ENABLED:
            raise AuthError("auth state has unknown flags")
        key = r.b8()
        if len(key) not in (0, TOKEN_KEY_BYTES):
            raise AuthError("auth state token key has a bad length")
        users: dict[str, User] = {}
        (n,) = r.unpack(_U16)
        if n > MAX_USERS:
            raise AuthError("auth state has too many users")
        for _ in range(n):
            name = r.s8("user")
            (rev,) = r.unpack(_U64)
            pw = r.b8()
            if len(pw) > MAX_HASH:
                raise AuthError("auth state password hash too long")
            (nr,) = r.unpack(_U8)
            if nr > MAX_USER_ROLES:
                raise AuthError("auth state user has too many roles")
            uroles = tuple(r.s8("role") for _ in range(nr))
            if list(uroles) != sorted(set(uroles)) or name in users:
                raise AuthError("auth state users or roles out of order or repeated")
            users[name] = User(name, pw, uroles, rev)
        roles: dict[str, Role] = {}
        (n,) = r.unpack(_U16)
        if n > MAX_ROLES:
            raise AuthError("auth state has too many roles")
        for _ in range(n):
            name = r.s8("role")
            (np,) = r.unpack(_U8)
            if np > MAX_ROLE_PERMS:
                raise AuthError("auth state role has too many permissions")
            perms = []
            for _ in range(np):
                (kind,) = r.unpack(_U8)
                if kind not in (1, 2, 3):
                    raise AuthError(f"auth state permission kind {kind}")
                p = Permission(r.b16(), r.b16(), PermKind(kind))
                check_perm(p)
                perms.append(p)
            if perms != sorted(set(perms)) or name in roles:
                raise AuthError("auth state permissions or roles out of order or repeated")
            roles[name] = Role(name, tuple(perms))
        if r.pos != len(r.data):
            raise AuthError("auth state has trailing bytes")
        if list(users) != sorted(users) or list(roles) != sorted(roles):
            raise AuthError("auth state names out of order")
        for u in users.values():
            if any(x not in roles for x in u.roles):
                raise AuthError(f"auth state user {u.name!r} holds an unknown role")
        enabled = bool(flags & _ENABLED)
        if enabled and (ROOT not in users or not key):
            raise AuthError("auth state enabled without root or without a token key")
        return cls(version, enabled, key, users, roles)


def _check_hash(h: bytes) -> None:
    if len(h) > MAX_HASH:
        raise AuthError("password hash too long")


def _b8(b: bytes) -> bytes:
    if len(b) > 255:
        raise AuthError("field longer than 255 bytes")
    return _U8.pack(len(b)) + b


def _s8(s: str) -> bytes:
    return _b8(s.encode())


def _b16(b: bytes) -> bytes:
    return _U16.pack(len(b)) + b


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise AuthError("auth data truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        return s.unpack(self.take(s.size))

    def b8(self) -> bytes:
        return self.take(self.unpack(_U8)[0])

    def b16(self) -> bytes:
        return self.take(self.unpack(_U16)[0])

    def s8(self, what: str, *, empty: bool = False) -> str:
        raw = self.b8()
        try:
            s = raw.decode()
        except UnicodeDecodeError:
            raise AuthError(f"{what} name is not UTF-8") from None
        if s or not empty:
            check_name(what, s)
        return s
