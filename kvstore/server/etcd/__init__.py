"""etcd's v3 API (KV, Watch, Lease, Cluster, Maintenance, Auth; the v3lock and v3election
services) served on the node's own port, translated onto the kvstore
services' request logic (`server/requests.py`, `lease_service.py`, `watch_service.py`): see
README, "etcd compatibility". `convert.py` checks and translates messages (pure, fuzzed);
`kv.py`, `lease.py`, `watch.py`, `cluster.py`, `maintenance.py` and `auth.py` are the
servicers (`ops.py`: the pure conversions of the last three), `recipes.py` the lock and
election servicers (`client/concurrency.py`'s recipes run in-process as the caller,
`caller.py`); `status.py` maps kvstore errors onto etcd's
gRPC statuses and messages; `forward.py` sends a write to its group's leader."""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor

from kvstore.etcdpb.etcdserverpb import rpc_pb2
from kvstore.etcdpb.v3electionpb import v3election_pb2
from kvstore.etcdpb.v3lockpb import v3lock_pb2

from ..shards import GroupCaller
from .auth import EtcdAuth
from .base import EtcdNode
from .cluster import EtcdCluster
from .forward import Forwarder
from .kv import EtcdKV
from .lease import EtcdLease
from .maintenance import EtcdMaintenance
from .recipes import EtcdElection, EtcdLock, Recipes
from .watch import EtcdWatch

SERVICES = ("KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth")
"""etcd's services (package etcdserverpb) served."""

RECIPE_SERVICES = (v3lock_pb2.DESCRIPTOR.services_by_name["Lock"],
                   v3election_pb2.DESCRIPTOR.services_by_name["Election"])
"""etcd's lock and election services served (`v3lockpb.Lock`, `v3electionpb.Election`)."""


def etcd_services(kv: object, admin: object, auth: object, caller: GroupCaller | None, cluster_name: str,
                  node_id: int, timeout: float) -> list[tuple[object, ServiceDescriptor]]:
    """The etcd servicers of a node, over `kv`, `admin` and `auth`, its KV, Admin and Auth
    servicers as registered (audited with --audit-log), to register beside kvstore's own services.
    Maintenance.Snapshot and the lock and election services run in-process through them as the
    caller (`caller.py`, `backup.py`): nothing opens a client connection back to the node."""
    requests = kv.requests  # type: ignore[attr-defined]
    node = EtcdNode.of(requests.host, requests, Forwarder(kv, caller, timeout), cluster_name, node_id)
    servicers: dict[str, object] = {
        "KV": EtcdKV(node), "Watch": EtcdWatch(node), "Lease": EtcdLease(node), "Cluster": EtcdCluster(node, admin),
        "Auth": EtcdAuth(node, auth),
    }
    servicers["Maintenance"] = EtcdMaintenance(node, admin, auth, servicers["KV"], timeout)  # type: ignore[arg-type]
    recipes = Recipes(node, servicers["KV"], servicers["Watch"], timeout)  # type: ignore[arg-type]
    return [(servicers[name], rpc_pb2.DESCRIPTOR.services_by_name[name]) for name in SERVICES] + [
        (EtcdLock(recipes), RECIPE_SERVICES[0]), (EtcdElection(recipes), RECIPE_SERVICES[1])]


__all__ = ["RECIPE_SERVICES", "SERVICES", "etcd_services"]
