"""Real kvstore node processes on loopback for integration tests.

With `client_ports`, every node also opens a client-only port (`--client-listen`, see
`client_endpoints`).

With `certs_dir`, the cluster runs TLS: the harness makes a CA there (unless one exists), a
client certificate of user `root` in it (so it serves as `kvctl --certs-dir`), and one certs
directory per node, `certs_dir/n<id>` (ca.crt, node.crt, node.key for 127.0.0.1 and localhost).

Every process is started by this harness and stopped by PID (never by name); ports are picked
free on 127.0.0.1; data lives under the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvstore.client import group_status
from kvstore.node.version import SUPPORTED_LEVEL
from kvstore.v1 import admin_pb2, admin_pb2_grpc


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NodeProc:
    id: int
    address: str
    data_dir: Path
    log_path: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials the harness talks to the node with (None: plaintext)."""
    env: dict[str, str] | None = None
    """Extra environment of the node process (e.g. PYTHONPATH of another release's code: then
    set `cwd` outside the repository too, as `python -m` puts the working directory first)."""
    cwd: Path | None = None

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.cli.server", "serve", *self.args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env} if self.env else None, cwd=self.cwd,
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def status(self, timeout: float = 1.0) -> admin_pb2.StatusResponse | None:
        try:
            with self.channel() as ch:
                return admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    root: Path
    n: int = 3
    extra_args: list[str] = field(default_factory=list)
    nodes: dict[int, NodeProc] = field(default_factory=dict)
    certs_dir: Path | None = None
    """TLS (see the module docstring); None: plaintext on loopback."""
    client_ports: bool = False
    """Give every node a client-only port too (`--client-listen`)."""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.credentials: grpc.ChannelCredentials | None = None
        if self.certs_dir is not None:
            from kvstore.security import certs, tls

            if not (self.certs_dir / certs.CA_CERT).exists():
                certs.create_ca(self.certs_dir)
            if not (self.certs_dir / certs.client_cert_name("root")).exists():
                certs.create_client(self.certs_dir, "root")
            self.credentials = tls.client_credentials(self.certs_dir)
        ports = free_ports(self.n * (2 if self.client_ports else 1))
        self.peers = {i + 1: f"127.0.0.1:{p}" for i, p in enumerate(ports[:self.n])}
        self.client_addresses = {i + 1: f"127.0.0.1:{p}" for i, p in enumerate(ports[self.n:])}
        """node id -> client-only address (with `client_ports`)."""
        for nid, addr in self.peers.items():
            self.nodes[nid] = self._make(nid, addr, self._peer_arg(), join=False)

    def _peer_arg(self) -> str:
        return ",".join(f"{i}={a}" for i, a in sorted(self.peers.items()))

    def _make(self, nid: int, addr: str, peers: str, join: bool, learner: bool = False) -> NodeProc:
        d = self.root / f"n{nid}"
        args = [
            "--id", str(nid), "--data-dir", str(d), "--listen", addr, "--peers", peers,
            "--tick-ms", "50", "--log-level", "info", "--replication", str(max(3, self.n)),
            # no SIGTERM drain unless a test asks for one (`extra_args`, the last one given wins):
            # `stop` stops every node at once, where handing leadership around only costs time
            "--drain-timeout", "0", *self.extra_args,
        ]
        if nid in self.client_addresses:
            args += ["--client-listen", self.client_addresses[nid]]
        if learner:
            args.append("--learner")
        elif join:
            args.append("--join")
        if self.certs_dir is not None:
            from kvstore.security import certs

            nd = self.node_certs_dir(nid)
            if not (nd / certs.NODE_CERT).exists():
                certs.create_node(nd, nid, ["127.0.0.1", "localhost"], ca_key=self.certs_dir / certs.CA_KEY)
            args += ["--certs-dir", str(nd)]
        return NodeProc(nid, addr, d, self.root / f"n{nid}.log", args, credentials=self.credentials)

    def node_certs_dir(self, nid: int) -> Path:
        assert self.certs_dir is not None
        return self.certs_dir / f"n{nid}"

    @property
    def endpoints(self) -> list[str]:
        return [n.address for _, n in sorted(self.nodes.items())]

    @property
    def client_endpoints(self) -> list[str]:
        return [a for _, a in sorted(self.client_addresses.items())]

    def start(self) -> Cluster:
        for n in self.nodes.values():
            n.start()
        self.wait_leader()
        self.wait_cluster_version()
        return self

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Wait until every running node answers (its port is open): `start` waits for one leader
        only, and a request a node sends on to another (etcd's API forwards) fails while that one
        is not listening yet."""
        deadline = time.monotonic() + timeout
        for n in self.nodes.values():
            while n.alive and n.status() is None:
                assert time.monotonic() < deadline, f"node {n.id} does not answer within {timeout} s"
                time.sleep(0.05)

    def wait_cluster_version(self, level: int = SUPPORTED_LEVEL, timeout: float = 20.0) -> None:
        """Wait until the metadata group's cluster version reaches `level` (a new cluster starts at
        1 and is raised once every member advertised: transactions are refused before that) on every
        running node (the gate checks the proposing node's own applied value) (none answering, e.g. auth on: return, the caller waits its own way)."""
        deadline = time.monotonic() + timeout
        while True:
            views = [st.cluster_version for n in self.nodes.values() if n.alive and (st := n.status()) is not None]
            if not views or min(views) >= level:
                return
            assert time.monotonic() < deadline, f"cluster versions {views} (want {level} on every node)"
            time.sleep(0.05)

    def add_node(self, nid: int, *, learner: bool = False) -> NodeProc:
        """Start node `nid` with --join (to be added by hand), or with --learner (it registers
        itself as a read replica)."""
        (port,) = free_ports(1)
        addr = f"127.0.0.1:{port}"
        peers = dict(self.peers)
        peers[nid] = addr
        node = self._make(
            nid, addr, ",".join(f"{i}={a}" for i, a in sorted(peers.items())), join=True, learner=learner
        )
        self.nodes[nid] = node
        self.peers[nid] = addr
        node.start()
        return node

    def leader(self) -> NodeProc | None:
        for n in self.nodes.values():
            if not n.alive:
                continue
            st = n.status()
            if st is not None and (g := group_status(st)) is not None and g.role == "leader":
                return n
        return None

    def wait_leader(self, timeout: float = 20.0, exclude: int | None = None) -> NodeProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ld = self.leader()
            if ld is not None and ld.id != exclude:
                return ld
            for n in self.nodes.values():
                if n.proc is not None and not n.alive and n.id != exclude and n.proc.returncode not in (-9, 0):
                    raise AssertionError(f"node {n.id} exited with {n.proc.returncode}:\n{n.log_text()[-3000:]}")
            time.sleep(0.05)
        logs = "\n".join(f"--- n{n.id}\n{n.log_text()[-2000:]}" for n in self.nodes.values())
        raise AssertionError(f"no leader within {timeout}s\n{logs}")

    def settled_leader(self, group: int = 1, timeout: float = 30.0, preferred: bool = True) -> NodeProc:
        """`group`'s leader once it is the group's preferred node (the leader balancer hands each
        group there after a start, and then leaves it) and every running node knows it; with
        `preferred` False, whichever node every running node hosting the group names."""
        from kvstore.client import Client

        want: int | None = None
        if preferred:
            with Client(self.endpoints, credentials=self.credentials) as c:
                smap = c.shard_map(refresh=True)
            assert smap is not None
            want = smap.groups[group].voters[0]
        deadline = time.monotonic() + timeout
        while True:
            # the views of the running nodes that host the group (one that does not answer: 0)
            views = []
            for n in self.nodes.values():
                if n.alive:
                    st = n.status()
                    g = group_status(st, group) if st is not None else None
                    if st is None or g is not None:
                        views.append(g.leader_id if g is not None else 0)
            target = want if want is not None else (views[0] if views else 0)
            node = self.nodes.get(target)
            if views and node is not None and node.alive and all(v == target for v in views):
                return node
            assert time.monotonic() < deadline, (f"the leader never settled on its preferred node ({views})"
                                                 if preferred else f"the nodes never agreed on a leader ({views})")
            time.sleep(0.05)

    def stop(self) -> None:
        for n in self.nodes.values():  # all at once: each node's graceful stop takes a while
            if n.alive and n.proc is not None:
                with contextlib.suppress(Exception):
                    n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.terminate()


def start_watching_cli(args: list[str]) -> subprocess.Popen[str]:
    """Start a long-running CLI (e.g. `kvctl watch`) with `faulthandler` on, so `stop_cli` can
    have it print every thread's stack if it does not exit."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop_cli(p: subprocess.Popen[str], timeout: float = 30) -> int:
    """SIGINT (what Ctrl-C sends) and its exit code. One that has not exited within `timeout` is
    never left behind: SIGABRT makes it print every thread's stack (faulthandler), then it is
    killed, and the test fails with those stacks."""
    p.send_signal(signal.SIGINT)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        err = p.stderr.read() if p.stderr is not None else ""
        raise AssertionError(f"process {p.pid} did not exit within {timeout} s of SIGINT; its stacks:\n{err[-6000:]}") from None


def probe(port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of a probe; (0, reason) if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, str(err)


def wait_probe(port: int, path: str, status: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got, body = probe(port, path)
        if got == status:
            return body
        assert time.monotonic() < deadline, f"{path} never answered {status}: last {got} {body!r}"
        time.sleep(0.05)
