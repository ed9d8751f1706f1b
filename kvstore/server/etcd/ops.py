"""Pure conversions for etcd's Cluster and Maintenance services (fuzzed in
tests/unit/test_etcd_ops.py): peer URLs to kvstore member addresses, kvstore members to etcd's
`Member`, alarm types both ways, the new member id of a MemberAdd, and the uint32 hash etcd's
HashKV answers for the per-group hashes of a node.

Every function here is total on its input type: garbage raises `EtcdRequestError` (a definite
refusal, nothing happened) and nothing else."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from urllib.parse import urlsplit

from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.raft.types import MAX_CONF_CONTEXT, MAX_U63
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


def new_member_id(existing: Iterable[int]) -> int:
    """The id of a member added through etcd's MemberAdd (etcd's server picks it, so does
    kvstore's etcd API): one above the highest member id, which the new node is started with
    (`kvstore serve --id`)."""
    top = max(existing, default=0)
    if top >= MAX_U63 - 1:
        raise EtcdRequestError("FAILED_PRECONDITION", "kvstore: no member id left above the highest one")
    return top + 1


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
