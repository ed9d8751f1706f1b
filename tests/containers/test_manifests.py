"""Offline checks of the deployment files (no container engine, no root): hadolint on
docker/Dockerfile, `docker compose config` on each compose file, kubernetes-validate (bundled
schemas) on deploy/kubernetes, and the facts they must agree on with the code: every KVSTORE_*
variable they set is one `kvstore serve` or `kvctl` reads, node ids and peers line up, the grace
period outlasts the drain. Plus the image's health check script's address parsing (fuzzed)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from podmanenv import REPO, compose_binary

from kvstore.cli import kvctl
from kvstore.cli.serve_env import id_from_hostname, natural_envvars
from kvstore.cli.server import serve

DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "kubernetes"
COMPOSE_FILES = {"compose.3node.yaml": 3, "compose.5node.yaml": 5, "compose.tls.yaml": 3}
KVCTL_VARS = {v for p in kvctl.cli.params if p.envvar for v in ([p.envvar] if isinstance(p.envvar, str) else p.envvar)}
KNOWN_VARS = set(natural_envvars(serve)) | KVCTL_VARS


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def test_dockerfile_passes_hadolint() -> None:
    r = subprocess.run([_bin("hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (DOCKER / "Dockerfile").read_text()
    assert "FROM debian:bookworm-slim" in text and "tini" in text and "HEALTHCHECK" in text
    assert "USER 10001" in text and "VOLUME" in text and "EXPOSE 2379 9090" in text


def _compose_config(path: Path) -> dict[str, Any]:
    r = subprocess.run([str(compose_binary()), "-f", str(path), "config", "--format", "json"],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize(("name", "nodes"), sorted(COMPOSE_FILES.items()))
def test_compose_file_is_valid_and_consistent(name: str, nodes: int) -> None:
    cfg = _compose_config(DOCKER / name)
    services = cfg["services"]
    node_names = sorted(s for s in services if s.startswith("kvstore-"))
    assert node_names == [f"kvstore-{i}" for i in range(1, nodes + 1)]
    ids = set()
    for svc in node_names:
        s = services[svc]
        env = s["environment"]
        assert set(env) <= KNOWN_VARS, set(env) - KNOWN_VARS
        ids.add(int(env["KVSTORE_ID"]))
        peers = dict(p.split("=") for p in env["KVSTORE_PEERS"].split(","))
        assert peers == {str(i): f"kvstore-{i}:2379" for i in range(1, nodes + 1)}
        assert s["healthcheck"]["test"] == ["CMD", "/usr/local/bin/kvstore-healthcheck", "readyz"]
        data = [v for v in s["volumes"] if v["target"] == "/var/lib/kvstore/data"]
        assert data and data[0]["type"] == "volume" and data[0]["source"] == f"{svc}-data"
        assert float(env["KVSTORE_DRAIN_TIMEOUT"]) < _seconds(s["stop_grace_period"])
        assert ("KVSTORE_CERTS_DIR" in env) == (name == "compose.tls.yaml")
    assert ids == set(range(1, nodes + 1))
    ready = services["ready"]["depends_on"]
    assert {k: v["condition"] for k, v in ready.items()} == dict.fromkeys(node_names, "service_healthy")


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60}
    total, num = 0.0, ""
    for ch in duration:
        if ch.isdigit() or ch == ".":
            num += ch
        else:
            total += float(num) * units[ch]
            num = ""
    return total


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    restart: sometimes\n    helthcheck: {}\n")
    r = subprocess.run([str(compose_binary()), "-f", str(bad), "config", "-q"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0


def _k8s_docs() -> dict[str, dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files
    return {f: yaml.safe_load((K8S / f).read_text()) for f in files}


def test_kubernetes_manifests_validate_offline(tmp_path: Path) -> None:
    files = [str(K8S / f) for f in _k8s_docs()]
    r = subprocess.run([_bin("kubernetes-validate"), "--strict", "--quiet", *files], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "statefulset.yaml").read_text().replace("replicas: 3", "replicas: three"))
    r = subprocess.run([_bin("kubernetes-validate"), "--strict", "--quiet", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0


def test_statefulset_follows_the_conventions() -> None:
    docs = _k8s_docs()
    by_kind = {d["kind"]: d for d in docs.values()}
    sts, pdb = by_kind["StatefulSet"], by_kind["PodDisruptionBudget"]
    peer = next(d for d in docs.values() if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    spec = sts["spec"]
    assert spec["serviceName"] == peer["metadata"]["name"] and peer["spec"]["publishNotReadyAddresses"] is True
    assert spec["podManagementPolicy"] == "Parallel"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= KNOWN_VARS, set(env) - KNOWN_VARS
    assert env["KVSTORE_ID"] == "auto"
    svc, name, n = spec["serviceName"], sts["metadata"]["name"], spec["replicas"]
    # Pod NAME-i is node i+1 (--id-from-hostname), and its peers entry is its stable DNS name.
    expected = {str(id_from_hostname(f"{name}-{i}")): f"{name}-{i}.{svc}:2379" for i in range(n)}
    assert dict(p.split("=") for p in env["KVSTORE_PEERS"].split(",")) == expected
    assert pod["terminationGracePeriodSeconds"] > float(env["KVSTORE_DRAIN_TIMEOUT"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env["KVSTORE_METRICS_LISTEN"].endswith(f":{ports['metrics']}")
    assert env["KVSTORE_LISTEN"].endswith(f":{ports['grpc']}")
    (claim,) = spec["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": env["KVSTORE_DATA_DIR"]} in c["volumeMounts"]


def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvstore_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HC = _healthcheck()


def test_healthcheck_target() -> None:
    assert HC.target("0.0.0.0:9090") == ("127.0.0.1", 9090)
    assert HC.target("[::]:9") == ("127.0.0.1", 9)
    assert HC.target("10.0.0.5:9090") == ("10.0.0.5", 9090)
    assert HC.target(":9090") == ("127.0.0.1", 9090)
    for bad in ("", "9090", "host:", "host:0", "host:65536", "host:x", "host:-1", "host:\u00b2"):
        with pytest.raises(ValueError, match="not HOST:PORT"):
            HC.target(bad)


@given(st.text(max_size=40))
def test_healthcheck_target_is_total(text: str) -> None:
    try:
        host, port = HC.target(text)
    except ValueError:
        return
    assert 0 < port < 65536 and isinstance(host, str)


def test_healthcheck_reports_an_unset_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSTORE_METRICS_LISTEN", raising=False)
    assert HC.main(["kvstore-healthcheck"]) == 1
    assert HC.main(["kvstore-healthcheck", "bogus"]) == 2
