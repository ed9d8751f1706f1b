"""The client-only port (`kvstore serve --client-listen`, issue 15) on a real 3-node TLS + auth
cluster: a client holding the CA and a password but no client certificate reads and writes keys
of every group through one node's client port, following the leaders on other nodes through the
client addresses the nodes publish; without a token it is refused (UNAUTHENTICATED, definite);
node-to-node RPCs are not served on that port; the peer port still refuses a TLS client without
a certificate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clusterharness import Cluster

from kvstore import errors
from kvstore.client import Client
from kvstore.shard.shardmap import ShardMap
from kvstore.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, kv_pb2, kv_pb2_grpc, raft_pb2, shard_pb2

PASSWORD = "client-port-pw"
GROUPS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("clientport")
    c = Cluster(root, 3, certs_dir=root / "certs", client_ports=True, extra_args=["--groups", str(GROUPS)])
    c.start()
    try:
        _enable_auth(c)
        yield c
    finally:
        c.stop()


def _enable_auth(c: Cluster) -> None:
    """root with PASSWORD, auth on; done as root by its client certificate on the peer ports."""
    Op = auth_pb2.AuthChangeRequest
    with Client(c.endpoints, credentials=c.credentials, timeout=30) as cl:
        cl.auth_call("Change", Op(op=Op.USER_ADD, user="root", password=PASSWORD))
        cl.auth_call("Change", Op(op=Op.ENABLE))


def _published_map(c: Cluster, timeout: float = 30.0) -> ShardMap:
    """The shard map once every node published its client address in it."""
    deadline = time.monotonic() + timeout
    with Client(c.endpoints, credentials=c.credentials, timeout=10) as cl:
        while True:
            m = cl.shard_map(refresh=True)
            if m is not None and m.clients == c.client_addresses:
                return m
            assert time.monotonic() < deadline, f"client addresses never published: {m and m.clients}"
            time.sleep(0.05)


def _leaders(c: Cluster, groups: list[int], timeout: float = 30.0) -> dict[int, int]:
    """group -> its leader, once every node names the same one for every group in `groups` and
    some group is led by a node other than node 1 (the leader balancer spreads them)."""
    from kvstore.client import group_status

    deadline = time.monotonic() + timeout
    while True:
        views = {g: {gs.leader_id if (st := n.status()) is not None and (gs := group_status(st, g)) else 0
                     for n in c.nodes.values()} for g in groups}
        if all(len(v) == 1 and 0 not in v for v in views.values()):
            leaders = {g: next(iter(v)) for g, v in views.items()}
            if set(leaders.values()) - {1}:
                return leaders
        assert time.monotonic() < deadline, f"leaders never settled: {views}"
        time.sleep(0.05)


def _keys_of_every_group(m: ShardMap) -> dict[int, bytes]:
    keys: dict[int, bytes] = {}
    i = 0
    while len(keys) < len(m.data_groups()):
        k = f"cp/{i}".encode()
        keys.setdefault(m.group_for_key(k), k)
        i += 1
    return keys


def _ca(c: Cluster) -> grpc.ChannelCredentials:
    assert c.certs_dir is not None
    return grpc.ssl_channel_credentials((c.certs_dir / "ca.crt").read_bytes())


def test_a_token_without_a_client_certificate_reaches_every_group_through_one_client_port(cluster: Cluster) -> None:
    m = _published_map(cluster)
    by_group = _leaders(cluster, m.data_groups())
    leaders = set(by_group.values())
    keys = _keys_of_every_group(m)
    assert cluster.certs_dir is not None
    first = cluster.client_addresses[1]
    with Client([first], cacert=cluster.certs_dir / "ca.crt", user="root", password=PASSWORD, timeout=20) as cl:
        for g, k in sorted(keys.items()):
            cl.put(k, f"v{g}".encode())
        for g, k in sorted(keys.items()):
            assert cl.get(k) == f"v{g}".encode()
        assert dict(cl.scan(b"cp/")) == {k: f"v{g}".encode() for g, k in keys.items()}
        assert cl.cas(keys[max(keys)], f"v{max(keys)}".encode(), b"swapped") is True
        learned = set(cl.endpoints)
    # it stayed on client ports (a peer port would refuse it) and learned the other nodes' ones
    assert learned <= set(cluster.client_endpoints), learned
    assert {cluster.client_addresses[n] for n in leaders} <= learned

    # members and redirects carry the client addresses too
    with grpc.secure_channel(first, _ca(cluster)) as ch:
        token = auth_stub_login(ch)
        deadline = time.monotonic() + 10
        while True:  # node 1 applies the map with every client address (it may lag the newest map a little)
            st = admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), metadata=_bearer(token), timeout=5)
            if {mb.id: mb.client_address for mb in st.members} == cluster.client_addresses:
                break
            assert time.monotonic() < deadline, st.members
            time.sleep(0.05)
        assert st.client_address == first
        # node 1 answers a write of a group it does not lead with NOT_LEADER, whose hint names the
        # leader's client port. The leader balancer may move a leadership to node 1 between the
        # look and the put (the put then succeeds): look again, bounded.
        deadline = time.monotonic() + 20
        while True:
            now_leading = _leaders(cluster, m.data_groups())
            follower = next(g for g, n in now_leading.items() if n != 1)
            r = kv_pb2_grpc.KVStub(ch).Put(kv_pb2.PutRequest(key=keys[follower], value=b"x"),
                                           metadata=_bearer(token), timeout=5)
            if r.error.code == kv_pb2.NOT_LEADER:
                break
            assert r.error.code == kv_pb2.OK, r.error
            assert time.monotonic() < deadline, f"node 1 kept answering writes of groups it did not lead: {r.error}"
        assert r.error.leader_client_hint == cluster.client_addresses[r.error.leader_id], r.error
        assert r.error.leader_hint == cluster.peers[r.error.leader_id]


def auth_stub_login(ch: grpc.Channel) -> str:
    from kvstore.v1 import auth_pb2_grpc

    r = auth_pb2_grpc.AuthStub(ch).Authenticate(auth_pb2.AuthenticateRequest(user="root", password=PASSWORD),
                                                timeout=10)
    assert r.error.code == kv_pb2.OK and r.token, r.error
    return str(r.token)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_the_client_port_refuses_calls_without_a_token_and_serves_no_internal_rpc(cluster: Cluster) -> None:
    _published_map(cluster)
    addr = cluster.client_addresses[2]
    with grpc.secure_channel(addr, _ca(cluster)) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            kv_pb2_grpc.KVStub(ch).Put(kv_pb2.PutRequest(key=b"cp/anon", value=b"v"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "log in" in exc.value.details() and "peer port" in exc.value.details()
        token = auth_stub_login(ch)
        internal = [
            ("/kvstore.v1.Raft/Send", raft_pb2.RaftBatch(), True),
            ("/kvstore.v1.Raft/SendSnapshot", raft_pb2.SnapshotChunk(), True),
            ("/kvstore.v1.Shard/GroupPropose", shard_pb2.GroupProposeRequest(group=1, from_node=1), False),
            ("/kvstore.v1.Shard/ExportRange", shard_pb2.ExportRangeRequest(group=1, from_node=1), False),
        ]
        for path, req, streaming in internal:
            ser = type(req).SerializeToString
            with pytest.raises(grpc.RpcError) as exc:
                if streaming:
                    ch.stream_unary(path, request_serializer=ser)(iter([req]), metadata=_bearer(token), timeout=5)
                elif path.endswith("ExportRange"):
                    list(ch.unary_stream(path, request_serializer=ser)(req, metadata=_bearer(token), timeout=5))
                else:
                    ch.unary_unary(path, request_serializer=ser)(req, metadata=_bearer(token), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED, (path, exc.value.code())
    # the client library: a definite Unauthenticated, nothing written
    with Client([addr], credentials=_ca(cluster), client_port=True, timeout=5) as cl, \
            pytest.raises(errors.Unauthenticated) as err:
        cl.put(b"cp/anon", b"v")
    assert not err.value.indeterminate
    # the peer port still wants a client certificate: no TLS handshake without one
    with grpc.secure_channel(cluster.peers[2], _ca(cluster)) as ch, pytest.raises(grpc.RpcError) as exc:
        admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=3)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    with Client(cluster.endpoints, credentials=cluster.credentials, timeout=10) as cl:
        assert cl.get(b"cp/anon") is None


def test_kvctl_with_cacert_and_password_on_client_ports(cluster: Cluster, tmp_path: Path) -> None:
    m = _published_map(cluster)
    keys = _keys_of_every_group(m)
    assert cluster.certs_dir is not None
    env = {**os.environ, "KVSTORE_PASSWORD": PASSWORD}
    env.pop("KVSTORE_CERTS_DIR", None)
    base = [sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", cluster.client_addresses[3],
            "--cacert", str(cluster.certs_dir / "ca.crt"), "--user", "root"]
    for g, k in sorted(keys.items()):
        r = subprocess.run([*base, "put", k.decode(), f"kvctl{g}"], capture_output=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([*base, "scan", "cp/"], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("\t") for line in r.stdout.decode().splitlines())
    assert {k.decode(): f"kvctl{g}" for g, k in keys.items()}.items() <= lines.items()
    bad = {**env, "KVSTORE_PASSWORD": "wrong"}
    r = subprocess.run([*base, "get", keys[min(keys)].decode()], capture_output=True, env=bad, timeout=60)
    assert r.returncode == 2 and b"login" in r.stderr and not r.stdout, (r.stdout, r.stderr)


def test_a_certificate_reload_reaches_the_peer_port_and_the_client_port(tmp_path: Path) -> None:
    """Each port's dynamic credentials fetch the reloaded certificate (once), independently: a
    reload consumed by one port's handshake is not lost to the other's."""
    from kvstore.security import certs, tls

    certs.create_ca(tmp_path)
    nd = tmp_path / "n1"
    certs.create_node(nd, 1, ["127.0.0.1"], ca_key=tmp_path / certs.CA_KEY)
    node_tls = tls.NodeTls(nd, 1)
    peer, client = node_tls._fetcher(), node_tls._fetcher()
    assert peer() is None and client() is None  # nothing new yet
    certs.create_node(nd, 1, ["127.0.0.1", "localhost"], ca_key=tmp_path / certs.CA_KEY, overwrite=True)
    assert node_tls.reload()
    assert peer() is not None
    assert client() is not None  # the client port gets it too
    assert peer() is None and client() is None  # once each
