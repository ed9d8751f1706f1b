"""Three-node clusters of kvstore and of etcd on 127.0.0.1 with their data on disk.

Both expose the same small interface (:class:`BenchCluster`): start and wait until a leader
serves, the PIDs of the server processes, the current leader, kill -9 / restart of one member,
stop. Every process is started here and stopped by its PID (never by name); ports are picked
free on 127.0.0.1 at construction. kvstore nodes are :class:`clusterharness.NodeProc` (the
integration tests' harness), started with kvstore's default settings plus ``extra_args``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from kvstore.client import group_status
from kvstore.etcdpb.etcdserverpb import rpc_pb2 as etcd_pb2
from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc as etcd_pb2_grpc
from kvstore.security.tls import client_credentials
from kvstore.v1 import auth_pb2, auth_pb2_grpc

from .tls import BENCH_USER, ClusterCerts, make_cluster_certs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from clusterharness import NodeProc, free_ports

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ClusterError(RuntimeError):
    """A cluster did not come up (a process exited, or no leader in time)."""


def proc_cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds, from /proc.

    A process that is gone counts as 0 (take deltas over a window in which none exits)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), utime and stime
    return total / _CLK_TCK


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or "" if unknown."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        return ""
    return fstype


def check_real_disk(path: Path) -> str:
    """Refuse a data directory in memory (tmpfs / ramfs): fsync would cost nothing there."""
    fstype = filesystem_of(path)
    if fstype in ("tmpfs", "ramfs"):
        raise ClusterError(f"{path} is on {fstype}: put --data-root on a real disk")
    return fstype


class BenchCluster(Protocol):
    system: str
    root: Path
    certs: ClusterCerts | None

    @property
    def endpoints(self) -> list[str]: ...

    def start(self, timeout: float = 60.0) -> None: ...

    def start_all(self) -> None: ...

    def wait_ready(self, timeout: float = 60.0) -> None: ...

    def pids(self) -> list[int]: ...

    def leader(self) -> int | None: ...

    def kill9(self, member: int) -> None: ...

    def restart(self, member: int) -> None: ...

    def healthy(self) -> bool: ...

    def stop(self) -> None: ...

    def logs(self) -> str: ...


def _wait(what: str, cond: Callable[[], bool], timeout: float, check: Callable[[], None]) -> None:
    """Poll ``cond()`` every 50 ms until true; ``check()`` raises if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        if cond():
            return
        time.sleep(0.05)
    raise ClusterError(f"{what} within {timeout:g} s")


# ----- kvstore ------------------------------------------------------------------------------


class KvstoreCluster:
    """``kvstore serve`` x n with default settings; ``extra_args`` go on every command line."""

    system = "kvstore"

    def __init__(self, root: Path, extra_args: Sequence[str] = (), n: int = 3, tls: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        ports = free_ports(n)
        self.peers = {i + 1: f"127.0.0.1:{p}" for i, p in enumerate(ports)}
        peer_arg = ",".join(f"{i}={a}" for i, a in sorted(self.peers.items()))
        self.certs: ClusterCerts | None = make_cluster_certs(root, sorted(self.peers)) if tls else None
        """TLS on (mutual, with the cluster's CA) when set: every node, the harness and the
        benchmark's client use these certificates."""
        if tls:
            self.system = "kvstore-tls"
        creds = client_credentials(self.certs.client_dir) if self.certs is not None else None
        self.nodes: dict[int, NodeProc] = {}
        for nid, addr in self.peers.items():
            args = ["--id", str(nid), "--data-dir", str(root / f"n{nid}"), "--listen", addr,
                    "--peers", peer_arg, *self.extra_args]
            if self.certs is not None:
                args += ["--certs-dir", str(self.certs.node_dirs[nid])]
            self.nodes[nid] = NodeProc(nid, addr, root / f"n{nid}", root / f"n{nid}.log", args, credentials=creds)

    @property
    def endpoints(self) -> list[str]:
        return [n.address for _, n in sorted(self.nodes.items())]

    def start(self, timeout: float = 60.0) -> None:
        self.start_all()
        self.wait_ready(timeout)
        if self.certs is not None:
            self.enable_auth(timeout)

    def enable_auth(self, timeout: float = 60.0) -> None:
        """TLS + auth, as the issue's comparison wants it: user `root` (logged in by its client
        certificate, no password) and `kvctl auth enable`, so every call is authenticated and
        every operation's key checked against the caller's grants."""
        deadline = time.monotonic() + timeout
        Op = auth_pb2.AuthChangeRequest
        for req in (Op(op=Op.USER_ADD, user=BENCH_USER), Op(op=Op.ENABLE)):
            while True:
                n = self.nodes[1 + int(time.monotonic()) % len(self.nodes)]
                try:
                    with n.channel() as ch:
                        r = auth_pb2_grpc.AuthStub(ch).Change(req, timeout=5)
                    if r.error.code == 0 or (req.op == Op.USER_ADD and "exists" in r.error.message):
                        break
                    err = r.error.message
                except grpc.RpcError as e:
                    err = str(e)
                if time.monotonic() > deadline:
                    raise ClusterError(f"could not enable auth: {err}")
                time.sleep(0.2)
        # Every node must have applied it before the run starts (a follower answers from its
        # own applied auth state until then).
        for n in self.nodes.values():
            def enabled(n: NodeProc = n) -> bool:
                try:
                    with n.channel() as ch:
                        return auth_pb2_grpc.AuthStub(ch).Status(auth_pb2.AuthStatusRequest(), timeout=5).enabled
                except grpc.RpcError:
                    return False
            _wait(f"node {n.id} never applied auth enable", enabled, max(1.0, deadline - time.monotonic()),
                  self._check_alive)

    def start_all(self) -> None:
        for n in self.nodes.values():
            n.start()

    def _check_alive(self) -> None:
        for n in self.nodes.values():
            if n.proc is not None and not n.alive and n.proc.returncode != -signal.SIGKILL:
                raise ClusterError(
                    f"kvstore node {n.id} exited with {n.proc.returncode}; its log ends:\n{n.log_text()[-2000:]}"
                )

    def wait_ready(self, timeout: float = 60.0) -> None:
        _wait("no kvstore leader", lambda: self.leader() is not None, timeout, self._check_alive)

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes.values() if n.proc is not None and n.alive]

    def leader(self) -> int | None:
        for n in self.nodes.values():
            if not n.alive:
                continue
            st = n.status()
            # The data group's leader (group 1; group 0 holds the shard map and may be led
            # elsewhere): the node whose death interrupts the benchmark's writes.
            g = group_status(st) if st is not None else None
            if g is not None and g.role == "leader":
                return n.id
        return None

    def healthy(self) -> bool:
        """Every member up, all agreeing on one leader, and caught up with its commit index."""
        leads, commits, applied = set(), [], []
        for n in self.nodes.values():
            st = n.status() if n.alive else None
            g = group_status(st) if st is not None else None
            if g is None:
                return False
            leads.add(g.leader_id)
            commits.append(g.commit)
            applied.append(g.applied)
        return len(leads) == 1 and 0 not in leads and min(applied) + 100 >= max(commits)

    def kill9(self, member: int) -> None:
        self.nodes[member].kill9()

    def restart(self, member: int) -> None:
        self.nodes[member].start()

    def stop(self) -> None:
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.terminate()

    def logs(self) -> str:
        return "\n".join(f"--- kvstore n{n.id}\n{n.log_text()[-3000:]}" for n in self.nodes.values())


# ----- etcd ---------------------------------------------------------------------------------


def etcd_binary() -> str:
    return os.environ.get("ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class EtcdProc:
    id: int
    name: str
    client_url: str
    args: list[str]
    log_path: Path
    binary: str
    proc: subprocess.Popen[bytes] | None = None
    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials to talk to this member with (None: plaintext)."""

    @property
    def address(self) -> str:
        return self.client_url.removeprefix("http://").removeprefix("https://")

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        try:
            self.proc = subprocess.Popen(
                [self.binary, *self.args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def status(self, timeout: float = 1.0) -> etcd_pb2.StatusResponse | None:
        try:
            with self.channel() as ch:
                resp: etcd_pb2.StatusResponse = etcd_pb2_grpc.MaintenanceStub(ch).Status(
                    etcd_pb2.StatusRequest(), timeout=timeout
                )
                return resp
        except grpc.RpcError:
            return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class EtcdCluster:
    """etcd x n with default settings (WAL fsync on); ``extra_args`` go on every command line."""

    system = "etcd"

    def __init__(
        self, root: Path, extra_args: Sequence[str] = (), n: int = 3, binary: str | None = None, tls: bool = False
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.binary = binary or etcd_binary()
        ports = free_ports(2 * n)
        token = f"kvbench-{os.getpid()}-{ports[0]}"
        names = [f"n{i + 1}" for i in range(n)]
        scheme = "https" if tls else "http"
        client = [f"{scheme}://127.0.0.1:{ports[2 * i]}" for i in range(n)]
        peer = [f"{scheme}://127.0.0.1:{ports[2 * i + 1]}" for i in range(n)]
        self.certs: ClusterCerts | None = make_cluster_certs(root, list(range(1, n + 1))) if tls else None
        """TLS on when set: clients and peers both need a certificate of the cluster's CA
        (`--client-cert-auth`, `--peer-client-cert-auth`), as kvstore's mutual TLS."""
        if tls:
            self.system = "etcd-tls"
        creds = client_credentials(self.certs.client_dir) if self.certs is not None else None
        initial = ",".join(f"{nm}={p}" for nm, p in zip(names, peer, strict=True))
        self.nodes: dict[int, EtcdProc] = {}
        for i in range(n):
            args = [
                "--name", names[i], "--data-dir", str(root / names[i]),
                "--listen-client-urls", client[i], "--advertise-client-urls", client[i],
                "--listen-peer-urls", peer[i], "--initial-advertise-peer-urls", peer[i],
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token, "--logger", "zap", "--log-outputs", "stderr",
                *extra_args,
            ]
            if self.certs is not None:
                cert, key, ca = self.certs.node_cert(i + 1), self.certs.node_key(i + 1), self.certs.ca
                args += [
                    "--cert-file", str(cert), "--key-file", str(key), "--trusted-ca-file", str(ca),
                    "--client-cert-auth",
                    "--peer-cert-file", str(cert), "--peer-key-file", str(key), "--peer-trusted-ca-file", str(ca),
                    "--peer-client-cert-auth",
                ]
            self.nodes[i + 1] = EtcdProc(
                i + 1, names[i], client[i], args, root / f"{names[i]}.log", self.binary, credentials=creds
            )

    @property
    def endpoints(self) -> list[str]:
        return [n.address for _, n in sorted(self.nodes.items())]

    def start(self, timeout: float = 60.0) -> None:
        if not (os.path.exists(self.binary) or shutil.which(self.binary)):
            raise ClusterError(f"etcd not found ({self.binary}): apt-get install etcd-server")
        self.start_all()
        self.wait_ready(timeout)

    def start_all(self) -> None:
        for n in self.nodes.values():
            n.start()

    def _check_alive(self) -> None:
        for n in self.nodes.values():
            if n.proc is not None and not n.alive and n.proc.returncode != -signal.SIGKILL:
                raise ClusterError(
                    f"etcd {n.name} exited with {n.proc.returncode}; its log ends:\n{n.log_text()[-2000:]}"
                )

    def _range_ok(self) -> bool:
        """A linearizable Range answered by every live member (so a leader serves)."""
        for n in self.nodes.values():
            if not n.alive:
                continue
            try:
                with n.channel() as ch:
                    etcd_pb2_grpc.KVStub(ch).Range(etcd_pb2.RangeRequest(key=b"kvbench/ready"), timeout=1.0)
            except grpc.RpcError:
                return False
        return True

    def wait_ready(self, timeout: float = 60.0) -> None:
        _wait("etcd not serving linearizable reads", self._range_ok, timeout, self._check_alive)

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes.values() if n.proc is not None and n.alive]

    def _statuses(self) -> dict[int, etcd_pb2.StatusResponse | None]:
        return {nid: (n.status() if n.alive else None) for nid, n in self.nodes.items()}

    def leader(self) -> int | None:
        for nid, st in self._statuses().items():
            if st is not None and st.leader != 0 and st.leader == st.header.member_id:
                return nid
        return None

    def healthy(self) -> bool:
        sts = self._statuses()
        if any(st is None for st in sts.values()):
            return False
        leads = {st.leader for st in sts.values() if st is not None}
        applied = [st.raftAppliedIndex for st in sts.values() if st is not None]
        commits = [st.raftIndex for st in sts.values() if st is not None]
        return len(leads) == 1 and 0 not in leads and min(applied) + 100 >= max(commits)

    def kill9(self, member: int) -> None:
        self.nodes[member].kill9()

    def restart(self, member: int) -> None:
        self.nodes[member].start()  # an existing data dir: etcd ignores --initial-cluster-state

    def stop(self) -> None:
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.terminate()

    def logs(self) -> str:
        return "\n".join(f"--- etcd {n.name}\n{n.log_text()[-3000:]}" for n in self.nodes.values())


SYSTEMS = ("kvstore", "etcd", "kvstore-tls", "etcd-tls", "etcd-api")
"""`-tls`: the same system with mutual TLS on (clients and peers), certificates of one CA.
`etcd-api`: a kvstore cluster driven through its etcd API (the same client as etcd: the
comparison of the two stores through one identical client); it has no `-tls` twin."""


def make_cluster(
    system: str, root: Path, *, kvstore_args: Sequence[str] = (), etcd_args: Sequence[str] = ()
) -> BenchCluster:
    tls = system.endswith("-tls")
    base = system.removesuffix("-tls")
    if base == "kvstore":
        return KvstoreCluster(root, kvstore_args, tls=tls)
    if system == "etcd-api":
        c = KvstoreCluster(root, kvstore_args)
        c.system = "etcd-api"
        return c
    if base == "etcd":
        return EtcdCluster(root, etcd_args, tls=tls)
    raise ValueError(f"unknown system {system!r} (expected one of {', '.join(SYSTEMS)})")
