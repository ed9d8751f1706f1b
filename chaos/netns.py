"""Test hosts in Linux network namespaces, joined on a bridge; partitions with iptables.

Layout of run ``R`` (needs root, ``ip`` from iproute2 and ``iptables``)::

    kvc-R-br       a namespace holding only the bridge ``br0`` and one veth end per host
    kvc-R-n1..nN   one namespace per node host: ``eth0`` = 10.77.X.i/24, port 2379
    kvc-R-client   the harness's client host: ``eth0`` = 10.77.X.100/24

The root namespace gets no address and no route into the test network, and no namespace has a
default route: nothing in a test can reach anything outside it, and nothing outside can reach
it. The harness's own client side (workload, nemesis, admin calls) runs inside ``kvc-R-client``.

Partitions are ``DROP`` rules in each node namespace's own chains ``KVC-IN`` / ``KVC-OUT``
(jumped to from INPUT / OUTPUT), in both directions; healing flushes the chains. Rules vanish
with their namespace, so teardown is deleting the namespaces (after killing their processes).

Every namespace is recorded in the run's state file before it is created (see
:mod:`chaos.state`); :func:`teardown` and ``kvchaos clean`` work from that record.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .state import RunState, pid_alive

__all__ = [
    "PORT",
    "Topology",
    "heal",
    "ip_netns_exec",
    "namespace_exists",
    "namespace_pids",
    "partition",
    "setup",
    "teardown",
]

PORT = 2379
CLIENT_HOST = 100
CHAIN_IN = "KVC-IN"
CHAIN_OUT = "KVC-OUT"


class NetnsError(RuntimeError):
    pass


def require_tools() -> None:
    """Raise NetnsError unless we are root and have ``ip`` and ``iptables``."""
    if os.geteuid() != 0:
        raise NetnsError("the netns backend needs root (use --backend local otherwise)")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise NetnsError(f"the netns backend needs `{tool}` (apt-get install -y iproute2 iptables)")


def _run(args: Sequence[str], *, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip_netns_exec(ns: str) -> list[str]:
    """The command prefix that runs a program inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def namespace_exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}")


def namespace_pids(ns: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``ns`` (``ip netns pids``)."""
    if not namespace_exists(ns):
        return []
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def subnet_octet(run_id: str) -> int:
    """The third octet of the run's private /24 (10.77.X.0/24), derived from its id. Runs never
    share a bridge, so two runs with the same X do not collide; the octet only helps reading."""
    return 1 + int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 254


@dataclass(frozen=True)
class Topology:
    run_id: str
    hosts: int  # node hosts 1..hosts

    @property
    def prefix(self) -> str:
        return f"kvc-{self.run_id}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-client"

    def node_ns(self, host: int) -> str:
        return f"{self.prefix}-n{host}"

    @property
    def octet(self) -> int:
        return subnet_octet(self.run_id)

    def ip(self, host: int) -> str:
        return f"10.77.{self.octet}.{host}"

    @property
    def client_ip(self) -> str:
        return self.ip(CLIENT_HOST)

    def address(self, host: int) -> str:
        return f"{self.ip(host)}:{PORT}"

    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *(self.node_ns(h) for h in range(1, self.hosts + 1)), self.client_ns]


def _add_host(topo: Topology, state: RunState, ns: str, ip: str, port_name: str) -> None:
    state.add_namespace(ns)
    if not namespace_exists(ns):
        _run(["ip", "netns", "add", ns])
    # Created directly inside the two namespaces: the root namespace never sees either end.
    links = _run(["ip", "-n", ns, "-o", "link", "show", "eth0"], check=False)
    if links.returncode != 0:
        _run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port_name,
              "netns", topo.bridge_ns])
    _run(["ip", "-n", topo.bridge_ns, "link", "set", port_name, "master", "br0"])
    _run(["ip", "-n", topo.bridge_ns, "link", "set", port_name, "up"])
    have = _run(["ip", "-n", ns, "-o", "addr", "show", "dev", "eth0"], check=False).stdout
    if f" {ip}/" not in have:
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
    _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])


def setup(topo: Topology, state: RunState) -> None:
    """Create the namespaces, the bridge and the links (idempotent: finishes a partial setup)."""
    require_tools()
    with state.update() as data:
        data["bridge_ns"] = topo.bridge_ns
        data["topology"] = {"run_id": topo.run_id, "hosts": topo.hosts}
    state.add_namespace(topo.bridge_ns)
    if not namespace_exists(topo.bridge_ns):
        _run(["ip", "netns", "add", topo.bridge_ns])
    if _run(["ip", "-n", topo.bridge_ns, "-o", "link", "show", "br0"], check=False).returncode != 0:
        _run(["ip", "-n", topo.bridge_ns, "link", "add", "br0", "type", "bridge"])
    _run(["ip", "-n", topo.bridge_ns, "link", "set", "br0", "up"])
    _run(["ip", "-n", topo.bridge_ns, "link", "set", "lo", "up"])
    for h in range(1, topo.hosts + 1):
        _add_host(topo, state, topo.node_ns(h), topo.ip(h), f"v-n{h}")
        _ensure_chains(topo.node_ns(h), state)
    _add_host(topo, state, topo.client_ns, topo.client_ip, "v-client")


def add_host(topo: Topology, state: RunState, host: int) -> None:
    """Add node host ``host`` to an existing topology (idempotent)."""
    _add_host(topo, state, topo.node_ns(host), topo.ip(host), f"v-n{host}")
    _ensure_chains(topo.node_ns(host), state)


# ----- iptables -----


def _ipt(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([*ip_netns_exec(ns), "iptables", "-w", "5", *args], check=check)


def _ensure_chains(ns: str, state: RunState) -> None:
    state.add_chain_ns(ns)
    for chain, hook in ((CHAIN_IN, "INPUT"), (CHAIN_OUT, "OUTPUT")):
        if _ipt(ns, "-n", "-L", chain, check=False).returncode != 0:
            _ipt(ns, "-N", chain)
        if _ipt(ns, "-C", hook, "-j", chain, check=False).returncode != 0:
            _ipt(ns, "-I", hook, "1", "-j", chain)


def partition(topo: Topology, blocked: Iterable[tuple[int, int]]) -> None:
    """Cut the links ``(a, b)`` (host numbers) in both directions, on both ends: host ``a``
    drops packets from and to ``b`` and vice versa. Other cuts already in place stay."""
    rules: dict[int, set[int]] = {}
    for a, b in blocked:
        if a == b:
            continue
        rules.setdefault(a, set()).add(b)
        rules.setdefault(b, set()).add(a)
    for host, peers in sorted(rules.items()):
        ns = topo.node_ns(host)
        lines = ["*filter"]
        for p in sorted(peers):
            lines.append(f"-A {CHAIN_IN} -s {topo.ip(p)}/32 -j DROP")
            lines.append(f"-A {CHAIN_OUT} -d {topo.ip(p)}/32 -j DROP")
        lines.append("COMMIT")
        # --noflush: append to our chains without touching anything else, in one transaction
        proc = subprocess.run(
            [*ip_netns_exec(ns), "iptables-restore", "-w", "5", "--noflush"],
            input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=20, check=False,
        )
        if proc.returncode != 0:
            raise NetnsError(f"iptables-restore in {ns}: {proc.stderr.strip()}")


def heal(topo: Topology, hosts: Iterable[int] | None = None) -> None:
    """Remove every cut (flush our chains in every node namespace that still exists)."""
    for h in hosts if hosts is not None else range(1, topo.hosts + 1):
        ns = topo.node_ns(h)
        if namespace_exists(ns):
            _ipt(ns, "-F", CHAIN_IN, check=False)
            _ipt(ns, "-F", CHAIN_OUT, check=False)


def rules(ns: str) -> list[str]:
    """Our rules in ``ns`` (for tests and `kvchaos clean`)."""
    out = []
    for chain in (CHAIN_IN, CHAIN_OUT):
        proc = _ipt(ns, "-S", chain, check=False)
        out += [ln for ln in proc.stdout.splitlines() if ln.startswith("-A")]
    return out


# ----- teardown -----


def _kill_recorded(data: dict[str, object], log: list[str]) -> None:
    pids = data.get("pids") or {}
    assert isinstance(pids, dict)
    victims = []
    for spid, info in pids.items():
        pid = int(spid)
        start = info.get("start") if isinstance(info, dict) else None
        if pid_alive(pid, start):
            victims.append(pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.append(f"killed pid {pid}")
    _wait_gone(victims)


def _wait_gone(pids: Sequence[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return
        time.sleep(0.02)


def teardown(state: RunState) -> list[str]:
    """Remove everything the record lists: processes (by recorded PID and start time, then any
    process still inside one of the run's namespaces), iptables chains (with their namespace),
    namespaces. Idempotent; returns what it did."""
    data = state.read()
    log: list[str] = []
    _kill_recorded(data, log)
    namespaces = [str(n) for n in data.get("namespaces") or []]
    # A process started inside one of our namespaces that the record missed (e.g. the harness
    # died between fork and write): it lives in a namespace this run created, so it is ours.
    stray = [p for ns in namespaces for p in namespace_pids(ns) if p != os.getpid()]
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.append(f"killed pid {pid} (inside a namespace of the run)")
    _wait_gone(stray)
    for ns in reversed(namespaces):
        if namespace_exists(ns):
            proc = _run(["ip", "netns", "del", ns], check=False)
            if proc.returncode == 0:
                log.append(f"deleted namespace {ns}")
            else:
                log.append(f"could not delete namespace {ns}: {proc.stderr.strip()}")
    with state.update() as d:
        d["pids"] = {}
        d["torn_down"] = not any(namespace_exists(ns) for ns in namespaces)
    if not any(namespace_exists(ns) for ns in namespaces):
        state.unregister()
    return log
