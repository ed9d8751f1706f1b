"""etcd's v3 API (KV, Watch, Lease) served on the node's own port, translated onto the kvstore
services' request logic (`server/requests.py`, `lease_service.py`, `watch_service.py`): see
README, "etcd compatibility". `convert.py` checks and translates messages (pure, fuzzed);
`kv.py`, `lease.py` and `watch.py` are the servicers; `status.py` maps kvstore errors onto etcd's
gRPC statuses and messages; `forward.py` sends a write to its group's leader."""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor

from kvstore.etcdpb.etcdserverpb import rpc_pb2

from ..shards import GroupCaller
from .base import EtcdNode
from .forward import Forwarder
from .kv import EtcdKV
from .lease import EtcdLease
from .watch import EtcdWatch

SERVICES = ("KV", "Watch", "Lease")
"""etcd's services served (Maintenance, Cluster and Auth are not yet)."""


def etcd_services(kv: object, caller: GroupCaller | None, cluster_name: str, node_id: int,
                  timeout: float) -> list[tuple[object, ServiceDescriptor]]:
    """The etcd servicers of a node, over `kv`, its KV servicer as registered (audited with
    --audit-log; a `KVService` underneath), to register beside kvstore's own services."""
    requests = kv.requests  # type: ignore[attr-defined]
    node = EtcdNode.of(requests.host, requests, Forwarder(kv, caller, timeout), cluster_name, node_id)
    servicers: dict[str, object] = {"KV": EtcdKV(node), "Watch": EtcdWatch(node), "Lease": EtcdLease(node)}
    return [(servicers[name], rpc_pb2.DESCRIPTOR.services_by_name[name]) for name in SERVICES]


__all__ = ["SERVICES", "etcd_services"]
