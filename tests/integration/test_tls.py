"""TLS (issue 15): certificate tooling, serve's secure default, and a real 3-node TLS cluster:
clients with a certificate of the cluster's CA work, everyone else fails the handshake; forged
internal RPCs under another identity get PERMISSION_DENIED and change nothing; certificates
rotate on SIGHUP while the cluster keeps serving."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from clusterharness import Cluster
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kvstore.cli.server import cli as kvstore_cli
from kvstore.client import Client, group_status
from kvstore.raft import MessageType
from kvstore.security import certs, tls
from kvstore.server.config import NodeConfig
from kvstore.v1 import admin_pb2, admin_pb2_grpc, raft_pb2, raft_pb2_grpc, shard_pb2, shard_pb2_grpc

# --- certificate tooling --------------------------------------------------------------------


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_cert_commands_write_a_cockroach_style_certs_dir(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    run = CliRunner().invoke
    for args in (["create-ca"], ["create-node", "--node-id", "7", "--host", "10.1.2.3", "--host", "kv-7.kv.svc"],
                 ["create-client", "--user", "alice"]):
        r = run(kvstore_cli, ["cert", *args, "--certs-dir", str(d)])
        assert r.exit_code == 0, r.output
    names = sorted(p.name for p in d.iterdir())
    assert names == ["ca.crt", "ca.key", "client.alice.crt", "client.alice.key", "node.crt", "node.key"]
    for p in d.iterdir():  # keys 0600, certificates world-readable
        assert stat.S_IMODE(p.stat().st_mode) == (0o600 if p.suffix == ".key" else 0o644), p
    ca, node, client = _cert(d / "ca.crt"), _cert(d / "node.crt"), _cert(d / "client.alice.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (node, client):
        leaf.verify_directly_issued_by(ca)
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["kvstore://node/7"]
    assert san.get_values_for_type(x509.DNSName) == ["kv-7.kv.svc"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    node_id, client_id = tls.identity_of(node), tls.identity_of(client)
    assert node_id.is_node and node_id.node_ids == {7} and "kv-7.kv.svc" in node_id.hosts
    assert not client_id.is_node and client_id.user == "alice" and not client_id.node_ids
    assert ExtendedKeyUsageOID.SERVER_AUTH not in client.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    # refuses to overwrite; --overwrite replaces (a new key)
    old_key = (d / "node.key").read_bytes()
    r = run(kvstore_cli, ["cert", "create-node", "--certs-dir", str(d), "--node-id", "7", "--host", "x"])
    assert r.exit_code != 0 and "exists" in r.output and (d / "node.key").read_bytes() == old_key
    r = run(kvstore_cli, ["cert", "create-node", "--certs-dir", str(d), "--node-id", "7", "--host", "x",
                          "--overwrite"])
    assert r.exit_code == 0 and (d / "node.key").read_bytes() != old_key
    assert stat.S_IMODE((d / "node.key").stat().st_mode) == 0o600
    r = run(kvstore_cli, ["cert", "create-client", "--certs-dir", str(d), "--user", "../evil"])
    assert r.exit_code != 0 and not list(tmp_path.glob("*.key"))


def test_node_certs_must_name_the_node_and_a_bad_reload_changes_nothing(tmp_path: Path) -> None:
    certs.create_ca(tmp_path)
    certs.create_node(tmp_path, 2, ["127.0.0.1"])
    with pytest.raises(ValueError, match="node\\(s\\) \\[2\\]"):
        tls.NodeCerts.load(tmp_path, 3)
    t = tls.NodeTls(tmp_path, 2)
    before = t.certs
    certs.create_client(tmp_path, "root")
    (tmp_path / "node.key").write_bytes((tmp_path / "client.root.key").read_bytes())  # not node.crt's key
    assert not t.reload() and t.certs is before and t.generation == 0
    certs.create_node(tmp_path, 2, ["127.0.0.1"], overwrite=True)
    assert t.reload() and t.certs is not before and t.generation == 1


@pytest.mark.parametrize(("listen", "peers", "extra", "ok"), [
    ("127.0.0.1:1", "1=127.0.0.1:1", {}, True),
    ("localhost:1", "1=localhost:1", {}, True),
    ("0.0.0.0:1", "1=127.0.0.1:1", {}, False),
    (":1", "1=127.0.0.1:1", {}, False),
    ("127.0.0.1:1", "1=10.0.0.5:1", {}, False),  # advertises a non-loopback address
    ("0.0.0.0:1", "1=10.0.0.5:1", {"insecure": True}, True),
    ("0.0.0.0:1", "1=10.0.0.5:1", {"certs_dir": Path("/certs")}, True),
])
def test_plaintext_is_refused_off_loopback(listen: str, peers: str, extra: dict[str, object], ok: bool) -> None:
    from kvstore.server.config import parse_peers

    cfg = NodeConfig(id=1, data_dir=Path("/nonexistent"), listen=listen, peers=parse_peers(peers),
                     **extra)  # type: ignore[arg-type]
    if ok:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match="--insecure"):
            cfg.validate()


def test_serve_exits_2_without_certs_on_a_public_address(tmp_path: Path) -> None:
    r = CliRunner().invoke(kvstore_cli, ["serve", "--id", "1", "--data-dir", str(tmp_path / "d"),
                                         "--listen", "0.0.0.0:0", "--peers", "1=127.0.0.1:1"])
    assert r.exit_code == 2 and "--certs-dir" in r.output and "--insecure" in r.output
    assert not (tmp_path / "d").exists()


# --- a real TLS cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from clusterharness import free_ports

    root = tmp_path_factory.mktemp("tls")
    c = Cluster(root, 3, certs_dir=root / "certs")
    (mport,) = free_ports(1)
    c.nodes[1].args += ["--metrics-listen", f"127.0.0.1:{mport}"]
    c.metrics_port = mport  # type: ignore[attr-defined]
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _health(addr: str, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    ch = grpc.insecure_channel(addr) if creds is None else grpc.secure_channel(addr, creds)
    with ch:
        try:
            admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=3)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _other_ca(tmp: Path, user: str = "root") -> Path:
    d = tmp / "other-ca"
    if not (d / "ca.crt").exists():
        certs.create_ca(d)
        certs.create_client(d, user)
        certs.create_node(d, 2, ["127.0.0.1"])
    return d


def test_clients_need_a_certificate_of_the_clusters_ca(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.certs_dir is not None
    with Client(cluster.endpoints, certs_dir=cluster.certs_dir, timeout=10) as cl:
        cl.put(b"tls-key", b"v1")
        assert cl.get(b"tls-key") == b"v1"
    env = {**os.environ, "KVSTORE_CERTS_DIR": str(cluster.certs_dir)}
    eps = ",".join(cluster.endpoints)
    r = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", eps, "get", "tls-key"],
                       capture_output=True, env=env, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == b"v1", r.stderr
    addr = cluster.nodes[1].address
    ca = (cluster.certs_dir / "ca.crt").read_bytes()
    other = _other_ca(tmp_path)
    assert _health(addr, tls.client_credentials(cluster.certs_dir)) == grpc.StatusCode.OK  # the control
    assert _health(addr, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert _health(addr, grpc.ssl_channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE  # no client cert
    other_client = grpc.ssl_channel_credentials(  # trusts the server, but its cert is of another CA
        ca, (other / "client.root.key").read_bytes(), (other / "client.root.crt").read_bytes())
    assert _health(addr, other_client) == grpc.StatusCode.UNAVAILABLE
    r = subprocess.run([sys.executable, "-m", "kvstore.cli.kvctl", "--endpoints", eps, "--timeout", "2",
                        "--certs-dir", str(other), "get", "tls-key"], capture_output=True, timeout=30)
    assert r.returncode == 2 and b"tls-key" not in r.stdout, (r.stdout, r.stderr)


def _node_creds(cluster: Cluster, nid: int) -> grpc.ChannelCredentials:
    nd = cluster.node_certs_dir(nid)
    return grpc.ssl_channel_credentials(
        (nd / "ca.crt").read_bytes(), (nd / "node.key").read_bytes(), (nd / "node.crt").read_bytes())


def _forged_send(addr: str, creds: grpc.ChannelCredentials, frm: int, to: int, term: int) -> grpc.StatusCode:
    """A Raft.Send batch claiming to come from `frm`: a vote request at a far higher term (it
    would depose the leader if it reached a core)."""
    pm = raft_pb2.RaftMessage(group=0, type=int(MessageType.VOTE), to=to, term=term, log_term=10**6, index=10**6)
    setattr(pm, "from", frm)
    batch = raft_pb2.RaftBatch(cluster_id="kvstore", to=to, messages=[pm])
    setattr(batch, "from", frm)
    with grpc.secure_channel(addr, creds) as ch:
        try:
            raft_pb2_grpc.RaftStub(ch).Send(iter([batch]), timeout=5)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _propose(addr: str, creds: grpc.ChannelCredentials, frm: int) -> grpc.StatusCode:
    req = shard_pb2.GroupProposeRequest(group=0, transfer=True, transfer_to=frm, cluster_id="kvstore",
                                        from_node=frm)
    with grpc.secure_channel(addr, creds) as ch:
        try:
            shard_pb2_grpc.ShardStub(ch).GroupPropose(req, timeout=5)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _terms(cluster: Cluster) -> dict[int, tuple[int, int]]:
    out = {}
    for nid, n in cluster.nodes.items():
        st = n.status()
        assert st is not None, f"node {nid} does not answer"
        g = group_status(st, 0)
        assert g is not None
        out[nid] = (g.term, g.leader_id)
    return out


def test_internal_rpcs_need_the_node_certificate_of_their_sender(cluster: Cluster) -> None:
    assert cluster.certs_dir is not None
    client = tls.client_credentials(cluster.certs_dir)
    node2 = _node_creds(cluster, 2)
    addr1 = cluster.nodes[1].address
    before = _terms(cluster)
    term = max(t for t, _ in before.values()) + 100
    assert _forged_send(addr1, client, 2, 1, term) == grpc.StatusCode.PERMISSION_DENIED  # a client cert
    assert _forged_send(addr1, node2, 3, 1, term) == grpc.StatusCode.PERMISSION_DENIED  # node 2 as node 3
    assert _propose(addr1, client, 2) == grpc.StatusCode.PERMISSION_DENIED
    assert _propose(addr1, node2, 3) == grpc.StatusCode.PERMISSION_DENIED
    time.sleep(0.5)
    assert _terms(cluster) == before  # nothing reached a core: no term jump, same leader
    assert "refused traffic from node 3 (identity)" in cluster.nodes[1].log_text()


def test_sighup_rotates_certificates_without_dropping_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    """Rotate every node to a new CA as the README says: ca.crt becomes old+new CA (SIGHUP all),
    then node.crt is signed by the new CA (SIGHUP all). A client that trusts and holds only the new CA's certificates is refused before
    and served after (the server presents and accepts the new certificates); peers redial with
    the new certificates (a follower restarted trusting only the new CA catches up), and the cluster
    keeps serving writes all along without an election."""
    assert cluster.certs_dir is not None
    new = tmp_path / "new-ca"
    certs.create_ca(new)
    certs.create_client(new, "root")
    new_only = tls.client_credentials(new)
    addr = {nid: n.address for nid, n in cluster.nodes.items()}
    assert all(_health(a, new_only) == grpc.StatusCode.UNAVAILABLE for a in addr.values())
    old_ca = (cluster.certs_dir / "ca.crt").read_bytes()
    bundle = old_ca + (new / "ca.crt").read_bytes()
    (cluster.certs_dir / "ca.crt").write_bytes(bundle)  # clients learn to trust the new CA first
    for n in cluster.nodes.values():
        n.credentials = tls.client_credentials(cluster.certs_dir)
    before = _terms(cluster)
    leader = before[1][1]
    victim = next(nid for nid in sorted(cluster.nodes, reverse=True) if nid != leader)
    with Client(cluster.endpoints, certs_dir=cluster.certs_dir, timeout=10) as cl:
        # The documented order: first every node trusts old+new CA, then new certificates.
        for nid, n in cluster.nodes.items():
            (cluster.node_certs_dir(nid) / "ca.crt").write_bytes(bundle)
            assert n.proc is not None
            os.kill(n.proc.pid, signal.SIGHUP)
            cl.put(f"trust-{nid}".encode(), b"x")  # the cluster serves mid-rotation
        time.sleep(0.5)
        for nid, n in cluster.nodes.items():
            nd = cluster.node_certs_dir(nid)
            certs.create_node(new / f"n{nid}", nid, ["127.0.0.1", "localhost"], ca_key=new / "ca.key")
            for name in ("node.key", "node.crt"):  # into the existing files (node.key stays 0600)
                shutil.copyfile(new / f"n{nid}" / name, nd / name)
            assert n.proc is not None
            os.kill(n.proc.pid, signal.SIGHUP)
            cl.put(f"rot-{nid}".encode(), b"x")
        deadline = time.monotonic() + 10
        while any(_health(a, new_only) != grpc.StatusCode.OK for a in addr.values()):
            assert time.monotonic() < deadline, "the nodes do not serve the new certificates"
            time.sleep(0.1)
        assert all(_health(a, tls.client_credentials(cluster.certs_dir)) == grpc.StatusCode.OK
                   for a in addr.values())  # old clients: the bundle still trusts the old CA
        cl.put(b"rot-after", b"y")
        assert _terms(cluster) == before  # no election: the cluster was never dropped
        # A follower restarts trusting ONLY the new CA: its peers must have redialled with new certs.
        (cluster.node_certs_dir(victim) / "ca.crt").write_bytes((new / "ca.crt").read_bytes())
        n3 = cluster.nodes[victim]
        assert n3.terminate() == 0
        cl.put(b"rot-while-down", b"z")
        n3.credentials = new_only
        n3.start()
        deadline = time.monotonic() + 20
        while True:
            st = n3.status()
            lead = cluster.nodes[leader].status()
            g3, gl = (group_status(st, 0) if st else None), (group_status(lead, 0) if lead else None)
            if g3 is not None and gl is not None and g3.leader_id == gl.leader_id and g3.applied >= gl.commit:
                break
            assert time.monotonic() < deadline, f"node {victim} does not catch up:\n{n3.log_text()[-3000:]}"
            time.sleep(0.1)
    assert "certificates reloaded" in cluster.nodes[1].log_text()
    assert all("PRIVATE KEY" not in n.log_text() for n in cluster.nodes.values())  # no secrets in logs


class _Ctx:
    def __init__(self, pem: bytes | None) -> None:
        self.pem = pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.pem]} if self.pem is not None else {}


def test_peer_verifier_uri_is_authoritative_and_hostnames_map_through_member_addresses(tmp_path: Path) -> None:
    """A `kvstore://node/<id>` SAN decides alone (node 2's certificate for 127.0.0.1 cannot pass as
    node 3 on 127.0.0.1); a node certificate without one (a StatefulSet pod's, for its hostname)
    passes as the node whose member address has that host; client certificates never pass."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    certs.create_ca(tmp_path)
    certs.create_node(tmp_path, 2, ["127.0.0.1"])
    certs.create_client(tmp_path, "root")
    ca, cakey = certs._load_ca(tmp_path, None)
    pod = certs._leaf(ca, cakey, ec.generate_private_key(ec.SECP256R1()), "kv-1",
                      certs.host_names(["kv-1.kv.svc"]), [ExtendedKeyUsageOID.SERVER_AUTH], 30)
    addresses = {1: "kv-1.kv.svc:2379", 2: "127.0.0.1:1", 3: "127.0.0.1:2"}
    v = tls.PeerVerifier(lambda n: addresses.get(n, ""))
    node2, client = (tmp_path / "node.crt").read_bytes(), (tmp_path / "client.root.crt").read_bytes()
    pod_pem = pod.public_bytes(serialization.Encoding.PEM)
    assert v.refusal(_Ctx(node2), 2) is None  # type: ignore[arg-type]
    assert "claims to be node 3" in (v.refusal(_Ctx(node2), 3) or "")  # type: ignore[arg-type]
    assert "client certificate" in (v.refusal(_Ctx(client), 2) or "")  # type: ignore[arg-type]
    assert v.refusal(_Ctx(None), 2) == "no peer certificate"  # type: ignore[arg-type]
    assert v.refusal(_Ctx(pod_pem), 1) is None  # type: ignore[arg-type]
    assert v.refusal(_Ctx(pod_pem), 2) is not None  # type: ignore[arg-type]


def _https_get(url: str, ca: Path | None, client: tuple[Path, Path] | None) -> str:
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else ssl.create_default_context()
    if client is not None:
        ctx.load_cert_chain(*client)
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return r.read().decode()


def test_metrics_are_served_over_https_with_mutual_tls_and_reload_with_the_certificates(tmp_path: Path) -> None:
    """With a certs directory the metrics endpoint is HTTPS with the node certificate: a client of
    the cluster's CA with a client certificate gets the metrics text; without a client
    certificate, with plaintext HTTP or trusting another CA, it gets none; a silent connection
    blocks nobody; a reload swaps in new certificates for later connections (and a bad one
    changes nothing)."""
    import socket
    import ssl
    import urllib.error
    import urllib.request

    from kvstore.server.metrics import Metrics
    from kvstore.server.metrics_http import MetricsEndpoint

    d, other = tmp_path / "certs", tmp_path / "other"
    for cd in (d, other):
        certs.create_ca(cd)
        certs.create_node(cd, 1, ["127.0.0.1"])
        certs.create_client(cd, "prometheus")
    metrics = Metrics()
    metrics.writes.inc(7)
    ep = MetricsEndpoint("127.0.0.1:0", metrics.registry, d)
    try:
        assert ep.url == f"https://127.0.0.1:{ep.port}/metrics"
        client = (d / "client.prometheus.crt", d / "client.prometheus.key")
        silent = socket.create_connection(("127.0.0.1", ep.port))  # says nothing: holds only its own thread
        try:
            text = _https_get(ep.url, d / "ca.crt", client)
        finally:
            silent.close()
        assert "kvstore_writes_total 7.0" in text
        refused: list[tuple[str, BaseException]] = []
        for what, url, ca, cert in (
            ("no client certificate", ep.url, d / "ca.crt", None),
            ("plaintext", f"http://127.0.0.1:{ep.port}/metrics", None, None),
            ("the server's certificate from another CA", ep.url, other / "ca.crt", client),
        ):
            try:
                if url.startswith("http:"):
                    with urllib.request.urlopen(url, timeout=10) as r:
                        body = r.read().decode()
                else:
                    body = _https_get(url, ca, cert)
            except (OSError, ssl.SSLError, urllib.error.URLError) as err:
                refused.append((what, err))
                continue
            raise AssertionError(f"{what}: served {body[:80]!r}")
        assert [w for w, _ in refused] == ["no client certificate", "plaintext", "the server's certificate from another CA"]
        # A bad reload (a key that is not the certificate's) changes nothing.
        good_key = (d / "node.key").read_bytes()
        (d / "node.key").write_bytes((d / "client.prometheus.key").read_bytes())
        assert not ep.reload()
        assert "kvstore_writes_total" in _https_get(ep.url, d / "ca.crt", client)
        (d / "node.key").write_bytes(good_key)
        # The other CA's material in place of ours: after a reload, only its clients are served.
        for name in ("ca.crt", "node.crt", "node.key"):
            (d / name).write_bytes((other / name).read_bytes())
        assert ep.reload()
        other_client = (other / "client.prometheus.crt", other / "client.prometheus.key")
        assert "kvstore_writes_total" in _https_get(ep.url, other / "ca.crt", other_client)
        with pytest.raises((OSError, ssl.SSLError, urllib.error.URLError)):
            _https_get(ep.url, other / "ca.crt", client)  # the old CA's client certificate
    finally:
        ep.close()


def test_a_tls_node_serves_its_metrics_over_https_only(cluster: Cluster) -> None:
    """`kvstore serve --certs-dir ... --metrics-listen ...`: the metrics endpoint verifies with the
    cluster's CA and a client certificate; plaintext HTTP gets nothing."""
    import urllib.request

    assert cluster.certs_dir is not None
    port = cluster.metrics_port  # type: ignore[attr-defined]
    client = (cluster.certs_dir / certs.client_cert_name("root"), cluster.certs_dir / certs.client_key_name("root"))
    text = _https_get(f"https://127.0.0.1:{port}/metrics", cluster.certs_dir / "ca.crt", client)
    assert "kvstore_raft_term" in text
    with pytest.raises(OSError):  # urllib's URLError and the dropped connection are both OSErrors
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()


def test_metrics_without_certificates_are_plain_http(tmp_path: Path) -> None:
    import urllib.request

    from kvstore.server.metrics import Metrics
    from kvstore.server.metrics_http import MetricsEndpoint

    metrics = Metrics()
    ep = MetricsEndpoint("127.0.0.1:0", metrics.registry)
    try:
        assert ep.url.startswith("http://") and not ep.reload()
        with urllib.request.urlopen(ep.url, timeout=10) as r:
            assert "kvstore_writes_total 0.0" in r.read().decode()
    finally:
        ep.close()
