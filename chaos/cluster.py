"""The cluster under test: one ``kvstore serve`` process per host, started, killed, paused and
replaced by the harness, always by PID.

A *host* is a place a node runs: a network namespace (netns backend) or a loopback port (local
backend). Hosts are numbered 1..N and keep their address for the whole run; the node *id* on a
host changes when the membership nemesis replaces the node (a new id with an empty data dir,
never a reused one). With ``learners=L``, hosts N+1..N+L run read replicas (``kvstore serve
--learner``, which register themselves as learners once the voters have a leader).

With a :class:`~chaos.pki.RunPki` (``tls``), every node runs ``--certs-dir`` with its own node
certificate (its node id, the address of its host) instead of ``--insecure``, and every channel
the harness opens (:meth:`Cluster.channel`: admin calls, health checks, shard operations) is
mutual TLS with the admin client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import grpc.aio

from kvstore.client import group_status
from kvstore.security.net import host_of
from kvstore.v1 import admin_pb2, admin_pb2_grpc

from . import netns
from .pki import ADMIN_USER, RunPki
from .state import RunState

__all__ = ["Backend", "Cluster", "LocalBackend", "NetnsBackend", "NodeHost"]

METRICS_PORT = 9379
"""The nodes' Prometheus endpoint (``--metrics-listen``) on the netns backend, when enabled."""


class Backend(Protocol):
    name: str
    supports_partitions: bool

    def address(self, host: int) -> str: ...

    def metrics_address(self, host: int) -> str: ...

    def prefix(self, host: int) -> list[str]: ...

    def partition(self, cuts: set[tuple[int, int]]) -> None: ...

    def heal(self) -> None: ...


class NetnsBackend:
    """Hosts are namespaces ``kvc-R-nH``; partitions are iptables DROP rules (both directions)."""

    name = "netns"
    supports_partitions = True

    def __init__(self, topo: netns.Topology) -> None:
        self.topo = topo

    def address(self, host: int) -> str:
        return self.topo.address(host)

    def metrics_address(self, host: int) -> str:
        return f"{self.topo.ip(host)}:{METRICS_PORT}"

    def prefix(self, host: int) -> list[str]:
        return netns.ip_netns_exec(self.topo.node_ns(host))

    def partition(self, cuts: set[tuple[int, int]]) -> None:
        netns.partition(self.topo, cuts)

    def heal(self) -> None:
        netns.heal(self.topo)


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


class LocalBackend:
    """Hosts are ports on 127.0.0.1. There is no way to drop traffic between two local
    processes without root, so partitions are not supported: the nemesis emulates them by
    pausing (SIGSTOP) the side that would be cut off."""

    name = "local"
    supports_partitions = False

    def __init__(self, hosts: int, ports: list[int] | None = None) -> None:
        self.ports = ports or free_ports(hosts)
        self._metrics_ports: list[int] = []

    def address(self, host: int) -> str:
        return f"127.0.0.1:{self.ports[host - 1]}"

    def metrics_address(self, host: int) -> str:
        if not self._metrics_ports:
            self._metrics_ports = free_ports(len(self.ports))
        return f"127.0.0.1:{self._metrics_ports[host - 1]}"

    def prefix(self, host: int) -> list[str]:
        return []

    def partition(self, cuts: set[tuple[int, int]]) -> None:
        raise NotImplementedError("the local backend cannot partition")

    def heal(self) -> None:
        pass


class ProcessHandle(Protocol):
    """What the cluster needs of a node that is not a local child process (a container):
    ``poll()`` is None while it runs, else its exit code (also ``returncode``)."""

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...


@dataclass
class NodeHost:
    host: int
    node_id: int
    address: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    handle: ProcessHandle | None = None  # set instead of ``proc`` when the node is a container
    paused: bool = False
    member: bool = True  # part of the cluster's configuration (False between remove and re-add)
    history: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        if self.handle is not None:
            return self.handle.poll() is None
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit code of a node that stopped (None while it runs or before it started)."""
        if self.handle is not None:
            return self.handle.poll()
        return self.proc.poll() if self.proc is not None else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Cluster:
    """N node hosts of one backend; every process is recorded in the run's state file."""

    def __init__(
        self,
        backend: Backend,
        run_dir: Path,
        n: int,
        state: RunState,
        *,
        tick_ms: int = 50,
        cluster_id: str = "kvchaos",
        extra_args: list[str] | None = None,
        log_level: str = "info",
        learners: int = 0,
        metrics: bool = False,
        tls: RunPki | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.env = dict(env or {})  # extra environment of the node processes (a planted bug's switch)
        self.tls = tls  # the run's certificates (None: plaintext, --insecure)
        self._admin_creds = tls.client(ADMIN_USER) if tls is not None else None
        self.metrics = metrics  # start the nodes with --metrics-listen (scraped by the forge nemesis)
        self.run_dir = Path(run_dir)
        self.n = n
        self.learners = learners
        self.state = state
        self.tick_ms = tick_ms
        self.cluster_id = cluster_id
        self.extra_args = list(extra_args or [])
        self.log_level = log_level
        self.data_root = self.run_dir / "data"
        self.log_root = self.run_dir / "nodes"
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.log_root.mkdir(parents=True, exist_ok=True)
        self.next_id = n + learners + 1
        peers = ",".join(f"{h}={backend.address(h)}" for h in range(1, n + 1))
        self.hosts: dict[int, NodeHost] = {}
        for h in range(1, n + 1):
            self.hosts[h] = self._make(h, h, peers, join=False)
        for h in range(n + 1, n + learners + 1):
            self.hosts[h] = self._make(h, h, f"{peers},{h}={backend.address(h)}", join=True, learner=True)
        self._admin_channels: dict[str, grpc.aio.Channel] = {}

    # ----- processes -----

    @property
    def voter_hosts(self) -> list[int]:
        """The hosts started as voters (the learner hosts are the rest)."""
        return [h for h in sorted(self.hosts) if h <= self.n]

    @property
    def learner_hosts(self) -> list[int]:
        return [h for h in sorted(self.hosts) if h > self.n]

    def _make(self, host: int, node_id: int, peers: str, *, join: bool, learner: bool = False) -> NodeHost:
        addr = self.backend.address(host)
        args = [
            "--id", str(node_id), "--data-dir", self._data_dir(node_id), "--listen", addr,
            "--peers", peers, "--cluster-id", self.cluster_id, "--tick-ms", str(self.tick_ms),
            "--log-level", self.log_level, "--replication", str(max(3, self.n)),
            *self._security_args(node_id, addr),
            *self.extra_args,
        ]
        if self.metrics:
            args += ["--metrics-listen", self.backend.metrics_address(host)]
        if learner:
            args.append("--learner")
        elif join:
            args.append("--join")
        return NodeHost(host, node_id, addr, args, self.log_root / f"n{node_id}.log")

    def _data_dir(self, node_id: int) -> str:
        """The ``--data-dir`` of node ``node_id`` as the node sees it."""
        return str(self.data_root / f"n{node_id}")

    def _security_args(self, node_id: int, address: str) -> list[str]:
        if self.tls is None:
            return ["--insecure"]  # explicitly plaintext: a private test network (netns) or loopback
        return ["--certs-dir", str(self.tls.node_dir(node_id, host_of(address)))]

    @property
    def endpoints(self) -> list[str]:
        return [self.backend.address(h) for h in sorted(self.hosts)]

    def start(self, host: int) -> None:
        nh = self.hosts[host]
        if nh.alive:
            return
        cmd = [*self.backend.prefix(host), sys.executable, "-m", "kvstore.cli.server", "serve", *nh.args]
        with open(nh.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} harness: starting node {nh.node_id} on host {host}\n".encode())
            log.flush()
            nh.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        nh.paused = False
        ns = netns_name(self.backend, host)
        self.state.add_pid(nh.proc.pid, f"node {nh.node_id} (host {host})", ns)

    def start_all(self) -> None:
        for h in sorted(self.hosts):
            self.start(h)

    def _note(self, nh: NodeHost, text: str) -> None:
        with contextlib.suppress(OSError), open(nh.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} harness: {text}\n".encode())

    def kill(self, host: int) -> None:
        """kill -9 the node on ``host`` (a paused node is killed too)."""
        nh = self.hosts[host]
        if nh.proc is None or nh.proc.poll() is not None:
            return
        self._note(nh, f"kill -9 node {nh.node_id} (pid {nh.proc.pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(nh.proc.pid, signal.SIGKILL)
        nh.proc.wait(10)
        nh.paused = False
        self.state.remove_pid(nh.proc.pid)

    def terminate(self, host: int, timeout: float = 10.0) -> None:
        nh = self.hosts[host]
        if nh.proc is None or nh.proc.poll() is not None:
            return
        if nh.paused:
            self.resume(host)
        nh.proc.send_signal(signal.SIGTERM)
        try:
            nh.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            nh.proc.kill()
            nh.proc.wait(10)
        self.state.remove_pid(nh.proc.pid)

    def pause(self, host: int) -> None:
        nh = self.hosts[host]
        if nh.alive and not nh.paused:
            self._note(nh, f"SIGSTOP node {nh.node_id}")
            assert nh.proc is not None
            os.kill(nh.proc.pid, signal.SIGSTOP)
            nh.paused = True

    def resume(self, host: int) -> None:
        nh = self.hosts[host]
        if nh.alive and nh.paused:
            assert nh.proc is not None
            os.kill(nh.proc.pid, signal.SIGCONT)
            self._note(nh, f"SIGCONT node {nh.node_id}")
        nh.paused = False

    def stop_all(self) -> None:
        for h in sorted(self.hosts):
            with contextlib.suppress(Exception):
                self.resume(h)
        for h in sorted(self.hosts):
            nh = self.hosts[h]
            if nh.alive:
                assert nh.proc is not None
                nh.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for h in sorted(self.hosts):
            nh = self.hosts[h]
            if nh.proc is None:
                continue
            try:
                nh.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                nh.proc.kill()
                nh.proc.wait(10)
            self.state.remove_pid(nh.proc.pid)

    def replace(self, host: int, peers: dict[int, str]) -> NodeHost:
        """A new node, with a fresh id and an empty data dir, on ``host`` (its old node must be
        stopped): started with ``--join`` to be added as a learner."""
        old = self.hosts[host]
        assert not old.alive
        nid = self.next_id
        self.next_id += 1
        peers = dict(peers)
        peers[nid] = self.backend.address(host)
        nh = self._make(host, nid, ",".join(f"{i}={a}" for i, a in sorted(peers.items())), join=True)
        nh.member = False
        nh.history = [*old.history, f"replaced node {old.node_id}"]
        self.hosts[host] = nh
        return nh

    # ----- admin RPCs -----

    def channel(self, address: str) -> grpc.aio.Channel:
        """The harness's (admin) channel to ``address``, made on first use and closed by
        :meth:`close`: mutual TLS with the admin client certificate on a TLS run."""
        ch = self._admin_channels.get(address)
        if ch is None:
            opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500),
                    ("grpc.enable_http_proxy", 0)]
            ch = self._admin_channels[address] = (
                grpc.aio.insecure_channel(address, options=opts) if self._admin_creds is None
                else grpc.aio.secure_channel(address, self._admin_creds, options=opts)
            )
        return ch

    def _admin(self, address: str) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel(address))

    async def close(self) -> None:
        chans = list(self._admin_channels.values())
        self._admin_channels.clear()
        for ch in chans:
            await ch.close()

    async def status(self, host: int, timeout: float = 0.7) -> admin_pb2.StatusResponse | None:
        nh = self.hosts[host]
        if not nh.alive or nh.paused:
            return None
        try:
            resp: admin_pb2.StatusResponse = await self._admin(nh.address).Status(
                admin_pb2.StatusRequest(), timeout=timeout
            )
            return resp
        except grpc.aio.AioRpcError:
            return None

    async def statuses(self, timeout: float = 0.7) -> dict[int, admin_pb2.StatusResponse]:
        hosts = sorted(self.hosts)
        answers = await asyncio.gather(*(self.status(h, timeout) for h in hosts))
        return {h: a for h, a in zip(hosts, answers, strict=True) if a is not None}

    async def leader(self, timeout: float = 0.7) -> int | None:
        """The host of the node that claims leadership in the highest term (None if none)."""
        best: tuple[int, int] | None = None
        for h, st in (await self.statuses(timeout)).items():
            g = group_status(st)
            if g is not None and g.role == "leader":
                term = g.term
                if best is None or term > best[0]:
                    best = (term, h)
        return best[1] if best is not None else None

    async def wait_learners(self, timeout: float = 30.0) -> bool:
        """Wait until every learner host's node is a learner that hears from a leader and has
        applied what the leader had committed when we looked."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sts = await self.statuses()
            ld = await self.leader()
            commit = sts[ld].groups[0].commit if ld is not None and ld in sts and sts[ld].groups else None
            ok = commit is not None
            for h in self.learner_hosts:
                st = sts.get(h)
                g = st.groups[0] if st is not None and st.groups else None
                nid = self.hosts[h].node_id
                if g is None or nid not in g.learners or g.leader_contact_ms < 0 or commit is None or g.applied < commit:
                    ok = False
            if ok:
                return True
            await asyncio.sleep(0.2)
        return False

    async def wait_leader(self, timeout: float = 20.0) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ld = await self.leader()
            if ld is not None:
                return ld
            await asyncio.sleep(0.1)
        return None

    async def refused(self, host: int, timeout: float = 2.0) -> dict[str, float] | None:
        """The node's ``kvstore_inbound_refused_total`` by reason, from its metrics endpoint (None
        if metrics are off or it does not answer). Never through a proxy."""
        if not self.metrics or not self.hosts[host].alive or self.hosts[host].paused:
            return None
        # a secure node serves its metrics over HTTPS and asks for a client certificate of its CA
        scheme = "http" if self.tls is None else "https"
        url = f"{scheme}://{self.backend.metrics_address(host)}/metrics"
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.tls.scraper_context(ADMIN_USER)))

        def scrape() -> str:
            opener = urllib.request.build_opener(*handlers)
            with opener.open(url, timeout=timeout) as resp:
                return str(resp.read().decode())

        try:
            text = await asyncio.to_thread(scrape)
        except (OSError, ValueError):
            return None
        out: dict[str, float] = {}
        for m in re.finditer(r'^kvstore_inbound_refused_total\{reason="([^"]+)"\} (\S+)$', text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def host_of_id(self, node_id: int) -> int | None:
        for h, nh in self.hosts.items():
            if nh.node_id == node_id:
                return h
        return None


def netns_name(backend: Backend, host: int) -> str | None:
    if isinstance(backend, NetnsBackend):
        return backend.topo.node_ns(host)
    return None
