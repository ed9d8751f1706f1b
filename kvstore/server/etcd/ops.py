"""Pure conversions for etcd's Cluster and Maintenance services (fuzzed in
tests/unit/test_etcd_ops.py): peer URLs to kvstore member addresses, kvstore members to etcd's
`Member`, alarm types both ways, the new member id of a MemberAdd, and the uint32 hash etcd's
HashKV answers for the per-group hashes of a node.

Every function here is total on its input type: garbage raises `EtcdRequestError` (a definite
refusal, nothing happened) and nothing else."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from kvstore import errors
from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.raft.types import MAX_CONF_CONTEXT
from kvstore.v1 import admin_pb2

from .convert import EtcdRequestError, invalid

MEMBER_NOT_FOUND = "etcdserver: member not found"
PEER_URL_EXISTS = "etcdserver: Peer URLs already exists"
NOT_LEARNER = "etcdserver: can only promote a learner member"
BAD_TRANSFEREE = "etcdserver: bad leader transferee"

VERSION = "3.4.0"
"""The etcd version kvstore's etcd API answers in `Status` (the API level it implements)."""


def peer_address(url: str) -> str:
    """The kvstore member address HOST:PORT of an etcd peer URL (`http://HOST:PORT`,
    `https://HOST:PORT` or a bare `HOST:PORT`); EtcdRequestError for anything else."""
    if not isinstance(url, str) or not url or len(url.encode("utf-8", "surrogatepass")) > MAX_CONF_CONTEXT:
        raise invalid(f"etcdserver: peer URL must be 1..{MAX_CONF_CONTEXT} bytes")
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise invalid(f"etcdserver: malformed peer URL {url!r}") from None
    if parts.scheme not in ("http", "https") or not host or port is None or port == 0 \
            or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise invalid(f"etcdserver: peer URL {url!r} is not http(s)://HOST:PORT")
    if any(c.isspace() or not c.isprintable() for c in host):
        raise invalid(f"etcdserver: peer URL {url!r} has a malformed host")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def one_peer_address(urls: Iterable[str]) -> str:
    """The one address of a MemberAdd / MemberUpdate (a kvstore member has exactly one)."""
    urls = list(urls)
    if len(urls) != 1:
        raise invalid(f"etcdserver: kvstore members have exactly one peer URL, got {len(urls)}")
    return peer_address(urls[0])


def member_of(m: admin_pb2.Member) -> rpc_pb2.Member:
    """etcd's view of a kvstore member: its id, name `kvstore-<id>`, its peer address as the peer
    URL, and as client URLs the peer address (the etcd API is served there) and its client-only
    port if it published one."""
    peer = f"http://{m.address}" if m.address else ""
    clients = [u for u in (peer, f"http://{m.client_address}" if m.client_address else "") if u]
    return rpc_pb2.Member(ID=m.id, name=f"kvstore-{m.id}" if m.address else "", peerURLs=[peer] if peer else [],
                          clientURLs=clients, isLearner=m.learner)


NEW_MEMBER_IDS = (1 << 32, 1 << 48)
"""[low, high) of the ids MemberAdd draws from: random, as etcd's server picks them, above every
id an operator numbers nodes with by hand (1, 2, 3, ...) so that a just-removed member's id (and
the data directory named after it) is never handed out again by chance; at most 15 decimal
digits (`kvstore serve --id` takes 18)."""


def new_member_id(existing: Iterable[int], draw: Callable[[int, int], int]) -> int:
    """The id of a member added through etcd's MemberAdd: `draw(low, high)` (a random integer
    in [low, high), injected) from `NEW_MEMBER_IDS`, drawn again while it is a member's
    (`existing`). The new node is started with `kvstore serve --id ID`."""
    taken = set(existing)
    for _ in range(64):
        new = draw(*NEW_MEMBER_IDS)
        if not NEW_MEMBER_IDS[0] <= new < NEW_MEMBER_IDS[1]:
            raise ValueError(f"drew member id {new} outside {NEW_MEMBER_IDS}")
        if new not in taken:
            return new
    raise EtcdRequestError("FAILED_PRECONDITION", "kvstore: no unused member id was drawn in 64 tries")


def kvstore_alarm(t: int) -> int | None:
    """The kvstore AlarmType of an etcd AlarmType (NONE: every type); None for CORRUPT, which
    kvstore never raises."""
    if t == rpc_pb2.NONE:
        return admin_pb2.ALARM_NONE
    if t == rpc_pb2.NOSPACE:
        return admin_pb2.ALARM_NOSPACE
    if t == rpc_pb2.CORRUPT:
        return None
    raise invalid(f"etcdserver: unknown alarm type {t}")


def etcd_alarms(alarms: Iterable[admin_pb2.Alarm]) -> list[rpc_pb2.AlarmMember]:
    """kvstore's raised alarms as etcd's (kvstore raises only NOSPACE)."""
    return [rpc_pb2.AlarmMember(memberID=a.node_id, alarm=rpc_pb2.NOSPACE)
            for a in alarms if a.type == admin_pb2.ALARM_NOSPACE]


def hash32(parts: Iterable[tuple[int, bytes]]) -> int:
    """The uint32 of etcd's Hash/HashKV for a node: CRC-32 over each hosted data group's id
    (8 bytes, big-endian) and its BLAKE2b key-space hash, in group order. Two nodes that host the
    same groups answer the same hash iff every group's hash is the same."""
    crc = 0
    for gid, digest in sorted(parts):
        crc = zlib.crc32(gid.to_bytes(8, "big") + digest, crc)
    return crc


# --- Auth ------------------------------------------------------------------------------------
AUTH_FAILED = "etcdserver: authentication failed, invalid user ID or password"
AUTH_NOT_ENABLED = "etcdserver: authentication is not enabled"
ROOT_USER_NOT_EXIST = "etcdserver: root user does not exist"
ROOT_ROLE_NOT_EXIST = "etcdserver: root user does not have root role"
USER_EXISTS = "etcdserver: user name already exists"
USER_EMPTY = "etcdserver: user name is empty"
USER_NOT_FOUND = "etcdserver: user name not found"
ROLE_EXISTS = "etcdserver: role name already exists"
ROLE_EMPTY = "etcdserver: role name is empty"
ROLE_NOT_FOUND = "etcdserver: role name not found"
ROLE_NOT_GRANTED = "etcdserver: role is not granted to the user"
PERMISSION_NOT_GRANTED = "etcdserver: permission is not granted to the role"

ETCD_ROOT_ROLE = "root"
"""etcd's role with every permission: kvstore's `ADMIN_ROLE` (`security/authstate.py`)."""


def role_to_kvstore(name: str) -> str:
    """An etcd role name as kvstore's: etcd's `root` is kvstore's `admin` and the other way round
    (a bijection, so a kvstore role named `root`, if any, shows as `admin`); others unchanged."""
    from kvstore.security.authstate import ADMIN_ROLE

    return {ETCD_ROOT_ROLE: ADMIN_ROLE, ADMIN_ROLE: ETCD_ROOT_ROLE}.get(name, name)


role_to_etcd = role_to_kvstore
"""The same swap, the other way (it is its own inverse)."""


def perm_kind(etcd_type: int) -> int:
    """kvstore's PermissionKind of an etcd `authpb.Permission.Type` (READ 0, WRITE 1, READWRITE 2)."""
    if etcd_type not in (0, 1, 2):
        raise invalid(f"etcdserver: unknown permission type {etcd_type}")
    return etcd_type + 1


def perm_type(kind: int) -> int:
    """etcd's permission type of a kvstore PermissionKind (1..3)."""
    if kind not in (1, 2, 3):
        raise ValueError(f"kvstore permission kind {kind}")
    return kind - 1


AUTH_ERRORS: dict[type[errors.Refused], str] = {
    errors.UserExists: USER_EXISTS,
    errors.UserNotFound: USER_NOT_FOUND,
    errors.RoleExists: ROLE_EXISTS,
    errors.RoleNotFound: ROLE_NOT_FOUND,
    errors.RoleNotGranted: ROLE_NOT_GRANTED,
    errors.PermissionNotGranted: PERMISSION_NOT_GRANTED,
    errors.RootUserMissing: ROOT_USER_NOT_EXIST,
    errors.AuthNotEnabled: AUTH_NOT_ENABLED,
}
"""etcd's message for each kvstore auth refusal (all FAILED_PRECONDITION, as etcd's)."""


def auth_error(err: errors.InvalidArgument) -> tuple[str, str]:
    """(gRPC status name, message) of a refused kvstore auth change, by its error class (never
    its text): etcd's where etcd has the same error, else kvstore's own message."""
    etcd = AUTH_ERRORS.get(type(err))  # type: ignore[arg-type]
    if etcd is not None:
        return "FAILED_PRECONDITION", etcd
    return "INVALID_ARGUMENT", f"etcdserver: {err.message}"
