"""Container hosts for kvchaos (``--backend container``): every node is a podman container of
the kvstore image (the one ``docker/Dockerfile`` builds, what users deploy), on a bridge network
the run creates.

Layout of run ``R`` (root, ``podman``, ``nsenter`` and ``iptables`` on the host)::

    kvc-R            the run's podman network: 10.78.X.0/24 (X from the run id; the next free
                     one if taken), no DNS plugin; the host is its gateway 10.78.X.1
    kvc-R-node<ID>   the container of node ID, on host H at 10.78.X.(10+H):2379 (--ip)
    kvc-R-data<ID>   node ID's named volume, mounted at /var/lib/kvstore/data

The harness (workload, nemesis, admin calls) runs in the root namespace and talks only to the
run's own containers at their addresses on that network. With TLS, node ID's certificates
(``RUN_DIR/certs/n<ID>``, owned by the image's user) are mounted read-only at
/etc/kvstore/certs. Each node's output goes to ``RUN_DIR/nodes/n<ID>.container.log`` (podman's
k8s-file log driver: one timestamped line per line the node wrote; it survives restarts).

Faults: *kill* is ``podman kill -s KILL`` and ``podman start`` of the same container (same
volume, same address); *pause* is ``podman pause`` / ``unpause`` (the cgroup freezer); a
*partition* is iptables DROP rules in the container's own network namespace, in the chains
``KVC-IN`` / ``KVC-OUT`` (jumped to from INPUT / OUTPUT), written with the host's iptables
through ``nsenter -t PID -n``: the image needs neither iptables nor NET_ADMIN, and the rules go
with the container's namespace. The same way, ``KVC-EGRESS`` lets a node send only to loopback
and the run's subnet (the network's gateway is there for the harness, not for the nodes). Healing flushes the chains; a restarted container gets a fresh
namespace, and its chains are made again when it starts.

Every network, volume and container is recorded in the run's ``state.json`` (key
``container``) before it is created; :func:`teardown` and ``kvchaos clean RUN_DIR`` save each
volume as ``RUN_DIR/data/n<ID>.tar`` (``podman volume export``: the data of an invalid run stays
for inspection, as on the other backends), then remove exactly those, by name, then delete the iptables rules CNI leaves naming the network's bridge
(only while no other network uses that bridge name). Nothing is looked up by a broad pattern.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.security.net import host_of

from .cluster import METRICS_PORT, Cluster
from .state import RunState, pid_alive, proc_start_time

__all__ = [
    "DEFAULT_IMAGE",
    "ContainerBackend",
    "ContainerCluster",
    "ContainerError",
    "ContainerRecord",
    "ContainerTopology",
    "drop_bridge_rules",
    "require",
    "setup",
    "teardown",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "localhost/kvstore:latest"
PORT = 2379
DATA_MOUNT = "/var/lib/kvstore/data"
CERTS_MOUNT = "/etc/kvstore/certs"
CHAIN_IN = "KVC-IN"
CHAIN_OUT = "KVC-OUT"
CHAIN_EGRESS = "KVC-EGRESS"
LABEL = "kvchaos.run"


class ContainerError(RuntimeError):
    """The container backend cannot do what was asked (a missing tool or image, a podman
    command that failed); the message says which and why."""


def podman_env() -> dict[str, str]:
    """The environment of every podman command: CONTAINERS_CONF defaults to the repository's
    docker/containers.conf (runc, cgroupfs, ulimits a sandbox allows) when that file exists."""
    env = dict(os.environ)
    conf = REPO / "docker" / "containers.conf"
    if "CONTAINERS_CONF" not in env and conf.exists():
        env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS``; raise ContainerError (with its stderr) if it fails and ``check``."""
    try:
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False,
                              env=podman_env())
    except subprocess.TimeoutExpired as err:
        raise ContainerError(f"podman {' '.join(args[:3])}: no answer within {timeout:g} s") from err
    if check and proc.returncode != 0:
        raise ContainerError(f"podman {' '.join(args[:3])}: exit {proc.returncode}: "
                             f"{(proc.stderr.strip() or proc.stdout.strip())[-800:]}")
    return proc


def require(image: str) -> None:
    """Raise ContainerError unless we are root with podman, nsenter and iptables, and ``image``
    exists locally (it is never pulled)."""
    if os.geteuid() != 0:
        raise ContainerError("the container backend needs root (podman as root, iptables in the containers)")
    for tool in ("podman", "nsenter", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            raise ContainerError(f"the container backend needs `{tool}` (scripts/system-deps.sh installs podman)")
    if podman("image", "exists", image, check=False).returncode != 0:
        raise ContainerError(f"no image {image}: build it first, from the repository root: "
                             f"podman build -f docker/Dockerfile -t {image} .")


def image_user(image: str) -> tuple[int, int]:
    """The uid and gid the image runs as (its USER; 0:0 if it names none or a name)."""
    user = podman("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()
    uid, _, gid = user.partition(":")
    try:
        return int(uid or 0), int(gid or uid or 0)
    except ValueError:
        return 0, 0


def subnet_octet(run_id: str, attempt: int = 0) -> int:
    """The third octet of the run's 10.78.X.0/24, from its id (the next ones if taken)."""
    return 1 + (int(hashlib.sha256(run_id.encode()).hexdigest(), 16) + attempt) % 254


@dataclass(frozen=True, slots=True)
class ContainerTopology:
    """Names and addresses of one run's containers (see the module doc)."""

    run_id: str
    hosts: int
    octet: int

    @property
    def network(self) -> str:
        return f"kvc-{self.run_id}"

    def container(self, node_id: int) -> str:
        return f"kvc-{self.run_id}-node{node_id}"

    def volume(self, node_id: int) -> str:
        return f"kvc-{self.run_id}-data{node_id}"

    @property
    def subnet(self) -> str:
        return f"10.78.{self.octet}.0/24"

    def ip(self, host: int) -> str:
        return f"10.78.{self.octet}.{10 + host}"

    def address(self, host: int) -> str:
        return f"{self.ip(host)}:{PORT}"

    @classmethod
    def from_state(cls, state: RunState) -> ContainerTopology:
        rec = ContainerRecord.from_json(state.read().get("container"))
        return cls(rec.run_id, rec.hosts, rec.octet)


_RUN_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.]{0,31}")
_BRIDGE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]{0,14}")  # a Linux interface name


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """The ``container`` key of a run's state.json, validated: every name is one this module
    makes for the record's run id (``kvc-RUN``, ``kvc-RUN-node<ID>``, ``kvc-RUN-data<ID>``), so
    a damaged or hostile record can never make ``kvchaos clean`` remove anything else (or pass
    an option such as ``--all`` to podman)."""

    run_id: str
    hosts: int
    octet: int
    network: str
    bridge: str
    containers: tuple[str, ...]
    volumes: tuple[str, ...]

    @classmethod
    def from_json(cls, obj: object) -> ContainerRecord:
        """Parse the record; raises ContainerError (saying what is wrong) on anything else."""
        if not isinstance(obj, dict):
            raise ContainerError("state.json has no container record")
        run_id = obj.get("run_id")
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise ContainerError(f"container record: bad run id {run_id!r}")
        hosts, octet = obj.get("hosts"), obj.get("octet")
        if type(hosts) is not int or not 1 <= hosts <= 200:
            raise ContainerError(f"container record: bad host count {hosts!r}")
        if type(octet) is not int or not 1 <= octet <= 254:
            raise ContainerError(f"container record: bad subnet octet {octet!r}")
        network = obj.get("network", f"kvc-{run_id}")
        if network != f"kvc-{run_id}":
            raise ContainerError(f"container record: network {network!r} is not kvc-{run_id}")
        bridge = obj.get("bridge", "")
        if not isinstance(bridge, str) or (bridge and not _BRIDGE.fullmatch(bridge)):
            raise ContainerError(f"container record: bad bridge name {bridge!r}")

        def names(key: str, kind: str) -> tuple[str, ...]:
            items = obj.get(key, [])
            pattern = re.compile(rf"kvc-{re.escape(run_id)}-{kind}[1-9][0-9]{{0,5}}")
            if not isinstance(items, list) or not all(isinstance(n, str) and pattern.fullmatch(n) for n in items):
                raise ContainerError(f"container record: {key} must be names kvc-{run_id}-{kind}<id>: {items!r}")
            return tuple(items)

        return cls(run_id, hosts, octet, network, bridge, names("containers", "node"), names("volumes", "data"))


# ----- set up and tear down (from the record) -----


def _record(state: RunState, kind: str, name: str) -> None:
    """Add ``name`` to the record's list ``kind`` (containers, volumes) before creating it."""
    with state.update() as data:
        names = data.setdefault("container", {}).setdefault(kind, [])
        if name not in names:
            names.append(name)


def setup(run_id: str, hosts: int, image: str, state: RunState, attempts: int = 8) -> ContainerTopology:
    """Create the run's network (recorded first) on the first free 10.78.X.0/24."""
    require(image)
    last = ""
    for attempt in range(attempts):
        topo = ContainerTopology(run_id, hosts, subnet_octet(run_id, attempt))
        with state.update() as data:
            data["container"] = {"run_id": run_id, "hosts": hosts, "octet": topo.octet, "image": image,
                                 "network": topo.network, "bridge": "", "containers": [], "volumes": []}
        r = podman("network", "create", "--disable-dns", "--subnet", topo.subnet, "--label", f"{LABEL}={run_id}",
                   topo.network, check=False)
        if r.returncode == 0:
            bridge = podman("network", "inspect", "-f", "{{.NetworkInterface}}", topo.network).stdout.strip()
            with state.update() as data:
                data["container"]["bridge"] = bridge
            return topo
        last = r.stderr.strip()
        if podman("network", "exists", topo.network, check=False).returncode == 0:
            break  # the name itself exists: not a subnet clash, and not ours to touch
    raise ContainerError(f"cannot create network kvc-{run_id}: {last}")


def bridge_rules(bridge: str) -> list[tuple[str, list[str]]]:
    """The iptables rules (table, words of ``-S``) that name interface ``bridge``."""
    out = []
    for table in ("filter", "nat"):
        listed = subprocess.run(["iptables", "-w", "5", "-t", table, "-S"], capture_output=True, text=True,
                                check=False).stdout
        for line in listed.splitlines():
            words = shlex.split(line)
            if words[:1] == ["-A"] and bridge in words:
                out.append((table, words))
    return out


def drop_bridge_rules(bridge: str) -> list[str]:
    """Delete the iptables rules naming ``bridge`` (a removed network's bridge: CNI's plugins
    leave some behind, e.g. dnsname's DNS accept and the firewall plugin's isolation rules).
    Only rules naming that exact interface are touched. Returns the rules that remain."""
    for table, words in bridge_rules(bridge):
        subprocess.run(["iptables", "-w", "5", "-t", table, "-D", *words[1:]], capture_output=True, check=False)
    return [" ".join(w) for _, w in bridge_rules(bridge)]


def _bridge_in_use(bridge: str) -> bool:
    """Does any existing podman network use interface ``bridge`` (a name CNI reuses)?"""
    for name in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        r = podman("network", "inspect", "-f", "{{.NetworkInterface}}", name, check=False)
        if r.returncode == 0 and r.stdout.strip() == bridge:
            return True
    return False


def teardown(state: RunState) -> list[str]:
    """Remove the recorded containers, volumes and network, and the rules CNI left naming the
    network's bridge. Idempotent; returns what it did."""
    data = state.read()
    if data.get("container") is None:
        return []  # the run stopped before it created anything
    rec = ContainerRecord.from_json(data["container"])
    log: list[str] = []
    for name in rec.containers:
        if podman("container", "exists", name, check=False).returncode == 0:
            r = podman("rm", "-f", "-t", "0", name, check=False, timeout=60)
            log.append(f"removed container {name}" if r.returncode == 0 else f"could not remove {name}: {r.stderr}")
    keep = state.path.parent / "data"  # the run folder's (a valid run deletes it unless --keep-data)
    for name in rec.volumes:
        if podman("volume", "exists", name, check=False).returncode == 0:
            tar = keep / f"n{name.rpartition('-data')[2]}.tar"
            if not tar.exists():
                keep.mkdir(parents=True, exist_ok=True)
                r = podman("volume", "export", name, "--output", str(tar), check=False, timeout=120)
                log.append(f"saved volume {name} as {tar}" if r.returncode == 0 else
                           f"could not save volume {name}: {r.stderr.strip()}")
            r = podman("volume", "rm", "-f", name, check=False)
            log.append(f"removed volume {name}" if r.returncode == 0 else f"could not remove {name}: {r.stderr}")
    net, bridge = rec.network, rec.bridge
    if podman("network", "exists", net, check=False).returncode == 0:
        if not bridge:
            bridge = podman("network", "inspect", "-f", "{{.NetworkInterface}}", net, check=False).stdout.strip()
        r = podman("network", "rm", "-f", net, check=False)
        log.append(f"removed network {net}" if r.returncode == 0 else f"could not remove {net}: {r.stderr}")
    if bridge and not _bridge_in_use(bridge):
        n = len(bridge_rules(bridge))
        left = drop_bridge_rules(bridge)
        if n:
            log.append(f"deleted {n - len(left)} iptables rule(s) naming {bridge}")
        if left:
            log.append(f"iptables rules naming {bridge} remain: {left}")
    gone = (all(podman("container", "exists", c, check=False).returncode != 0 for c in rec.containers)
            and all(podman("volume", "exists", v, check=False).returncode != 0 for v in rec.volumes)
            and podman("network", "exists", net, check=False).returncode != 0)
    with state.update() as d:
        d["torn_down"] = gone
    if gone:
        state.unregister()
    return log


# ----- partitions: iptables in the containers' namespaces -----


def _nsenter(pid: int) -> list[str]:
    return ["nsenter", "-t", str(pid), "-n"]


def _ipt(pid: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*_nsenter(pid), "iptables", "-w", "5", *args], capture_output=True, text=True,
                          timeout=20, check=False)
    if check and proc.returncode != 0:
        raise ContainerError(f"iptables {' '.join(args)} in the namespace of pid {pid}: {proc.stderr.strip()}")
    return proc


def ensure_chains(pid: int, subnet: str) -> None:
    """In ``pid``'s netns: our chains KVC-IN / KVC-OUT (partitions), jumped to from INPUT /
    OUTPUT, and KVC-EGRESS, which lets the node send only to loopback and the run's own
    ``subnet`` (RETURN, so KVC-OUT's cuts still apply) and rejects the rest: the network the
    run creates has a gateway (the harness reaches the nodes through it), and no node is to use
    it to reach anything else."""
    for chain, hook in ((CHAIN_IN, "INPUT"), (CHAIN_OUT, "OUTPUT"), (CHAIN_EGRESS, "OUTPUT")):
        if _ipt(pid, "-n", "-L", chain, check=False).returncode != 0:
            _ipt(pid, "-N", chain)
        if _ipt(pid, "-C", hook, "-j", chain, check=False).returncode != 0:
            _ipt(pid, "-A", hook, "-j", chain)
    _ipt(pid, "-F", CHAIN_EGRESS)
    for rule in (["-o", "lo", "-j", "RETURN"], ["-d", subnet, "-j", "RETURN"], ["-j", "REJECT"]):
        _ipt(pid, "-A", CHAIN_EGRESS, *rule)


def chain_rules(pid: int, chains: tuple[str, ...] = (CHAIN_IN, CHAIN_OUT)) -> list[str]:
    """The rules in our chains in ``pid``'s netns (for tests)."""
    out = []
    for chain in chains:
        out += [ln for ln in _ipt(pid, "-S", chain, check=False).stdout.splitlines() if ln.startswith("-A")]
    return out


@dataclass(slots=True)
class ContainerProcess:
    """A started container, seen through its init process (tini) on the host: it runs while
    that PID, with that start time, is alive. The exit code comes from podman once it stopped."""

    name: str
    pid: int
    start: int | None
    _code: int | None = None

    def poll(self) -> int | None:
        if self._code is not None:
            return self._code
        if pid_alive(self.pid, self.start):
            return None
        r = podman("inspect", "-f", "{{.State.ExitCode}}", self.name, check=False)
        try:
            self._code = int(r.stdout.strip())
        except ValueError:
            self._code = -1
        return self._code

    @property
    def returncode(self) -> int | None:
        return self.poll()


@dataclass
class ContainerBackend:
    """Hosts are containers at 10.78.X.(10+H) (``Backend`` of :mod:`chaos.cluster`)."""

    topo: ContainerTopology
    pids: dict[int, int] = field(default_factory=dict)  # host -> its container's init PID now
    name: str = "container"
    supports_partitions: bool = True

    def address(self, host: int) -> str:
        return self.topo.address(host)

    def metrics_address(self, host: int) -> str:
        return f"{self.topo.ip(host)}:{METRICS_PORT}"

    def prefix(self, host: int) -> list[str]:
        return []

    def attach(self, host: int, pid: int) -> None:
        """Host ``host`` now runs in the container whose init is ``pid``: make our chains there."""
        ensure_chains(pid, self.topo.subnet)
        self.pids[host] = pid

    def partition(self, cuts: set[tuple[int, int]]) -> None:
        """Cut the links ``(a, b)`` in both directions, on both ends (a stopped container's side
        is skipped: it has no namespace; its peer's rules still cut the link)."""
        rules: dict[int, set[int]] = {}
        for a, b in cuts:
            if a != b:
                rules.setdefault(a, set()).add(b)
                rules.setdefault(b, set()).add(a)
        for host, peers in sorted(rules.items()):
            pid = self.pids.get(host)
            if pid is None or not pid_alive(pid):
                continue
            lines = ["*filter"]
            for p in sorted(peers):
                lines += [f"-A {CHAIN_IN} -s {self.topo.ip(p)}/32 -j DROP",
                          f"-A {CHAIN_OUT} -d {self.topo.ip(p)}/32 -j DROP"]
            lines.append("COMMIT")
            proc = subprocess.run([*_nsenter(pid), "iptables-restore", "-w", "5", "--noflush"],
                                  input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=20,
                                  check=False)
            if proc.returncode != 0:
                raise ContainerError(f"iptables-restore in container host {host}: {proc.stderr.strip()}")

    def heal(self, hosts: Iterable[int] | None = None) -> None:
        for h in hosts if hosts is not None else sorted(self.pids):
            pid = self.pids.get(h)
            if pid is not None and pid_alive(pid):
                _ipt(pid, "-F", CHAIN_IN, check=False)
                _ipt(pid, "-F", CHAIN_OUT, check=False)


class ContainerCluster(Cluster):
    """The chaos cluster as podman containers of ``image`` (see the module doc): the node
    arguments are those of every backend, with the data dir and certificates at the image's
    mount points; kill / pause / stop act on the containers by name."""

    backend: ContainerBackend

    def __init__(self, backend: ContainerBackend, run_dir: Path, n: int, state: RunState, *, image: str,
                 **kwargs: Any) -> None:
        self.image = image
        self.uid, self.gid = image_user(image)
        self._created: set[str] = set()
        super().__init__(backend, run_dir, n, state, **kwargs)
        self.log_root = self.log_root.resolve()

    def _data_dir(self, node_id: int) -> str:
        return DATA_MOUNT

    def _security_args(self, node_id: int, address: str) -> list[str]:
        return ["--insecure"] if self.tls is None else ["--certs-dir", CERTS_MOUNT]

    def container(self, host: int) -> str:
        return self.backend.topo.container(self.hosts[host].node_id)

    def start(self, host: int) -> None:
        nh = self.hosts[host]
        if nh.alive:
            return
        topo = self.backend.topo
        name = topo.container(nh.node_id)
        self._note(nh, f"starting container {name} (node {nh.node_id}) on host {host}")
        if name in self._created:
            podman("start", name)
        else:
            mounts = ["-v", f"{topo.volume(nh.node_id)}:{DATA_MOUNT}"]
            if self.tls is not None:
                certs = self.tls.node_dir(nh.node_id, host_of(nh.address))
                for p in (certs, *certs.iterdir()):
                    os.chown(p, self.uid, self.gid)
                mounts += ["-v", f"{certs}:{CERTS_MOUNT}:ro"]
            _record(self.state, "volumes", topo.volume(nh.node_id))
            _record(self.state, "containers", name)
            self._created.add(name)
            log = self.log_root / f"n{nh.node_id}.container.log"
            podman("run", "-d", "--name", name, "--hostname", f"kvstore-{host}", "--network", topo.network,
                   "--ip", topo.ip(host), "--label", f"{LABEL}={topo.run_id}", "--no-healthcheck",
                   "--log-driver", "k8s-file", "--log-opt", f"path={log}", *mounts,
                   *(a for k, v in sorted(self.env.items()) for a in ("-e", f"{k}={v}")),
                   self.image, "serve", *nh.args, timeout=120)
        pid = int(podman("inspect", "-f", "{{.State.Pid}}", name).stdout.strip() or 0)
        if pid <= 0:
            raise ContainerError(f"container {name} is not running after start (see {self.log_root})")
        nh.handle = ContainerProcess(name, pid, proc_start_time(pid))
        nh.paused = False
        self.backend.attach(host, pid)

    def kill(self, host: int) -> None:
        """``podman kill -s KILL`` (a paused container is thawed first: SIGKILL waits for the
        freezer otherwise)."""
        nh = self.hosts[host]
        if not nh.alive:
            return
        name = self.container(host)
        self._note(nh, f"podman kill -s KILL {name}")
        if nh.paused:
            podman("unpause", name, check=False)
        podman("kill", "-s", "KILL", name, check=False)
        podman("wait", name, check=False, timeout=30)
        nh.paused = False

    def terminate(self, host: int, timeout: float = 10.0) -> None:
        nh = self.hosts[host]
        if not nh.alive:
            return
        if nh.paused:
            self.resume(host)
        podman("stop", "-t", str(int(timeout)), self.container(host), check=False, timeout=timeout + 30)

    def pause(self, host: int) -> None:
        nh = self.hosts[host]
        if nh.alive and not nh.paused:
            self._note(nh, f"podman pause {self.container(host)}")
            podman("pause", self.container(host))
            nh.paused = True

    def resume(self, host: int) -> None:
        nh = self.hosts[host]
        if nh.alive and nh.paused:
            podman("unpause", self.container(host), check=False)
            self._note(nh, f"podman unpause {self.container(host)}")
        nh.paused = False

    def stop_all(self) -> None:
        """SIGTERM every running container at once (each drains), SIGKILL after 10 s."""
        for h in sorted(self.hosts):
            self.resume(h)
        running = [self.container(h) for h in sorted(self.hosts) if self.hosts[h].alive]
        if running:
            t0 = time.monotonic()
            podman("stop", "-t", "10", *running, check=False, timeout=60)
            for h in sorted(self.hosts):
                self._note(self.hosts[h], f"stopped ({time.monotonic() - t0:.1f}s)")
