"""Offline checks of the deployment files (no container engine, no root): hadolint on
docker/Dockerfile, `docker compose config` on each compose file, kubernetes-validate (bundled
schemas) on deploy/kubernetes (the base and, rendered with `kubectl kustomize`, the root and the
TLS overlay), and the facts they must agree on with the code: every KVSTORE_* variable they set
is one `kvstore serve` or `kvctl` reads, node ids and peers line up, the grace period outlasts the
drain; the TLS overlay's certificates (deploy/kubernetes/tls/make-certs.sh, `kvstore cert`) name
each pod's node id and the DNS names it is dialled at. Plus the image's health check script's
address parsing (fuzzed)."""

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
from podmanenv import REPO, compose_binary, kustomize

from kvstore.cli import kvctl
from kvstore.cli.serve_env import id_from_hostname, natural_envvars
from kvstore.cli.server import serve

DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "kubernetes"
K8S_BASE = K8S / "base"
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
    kust = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S_BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files
    return {f: yaml.safe_load((K8S_BASE / f).read_text()) for f in files}


def _validate(tmp_path: Path, name: str, docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([_bin("kubernetes-validate"), "--strict", "--quiet", str(path)], capture_output=True,
                          text=True, timeout=120)


def test_kubernetes_manifests_validate_offline(tmp_path: Path) -> None:
    files = [str(K8S_BASE / f) for f in _k8s_docs()]
    r = subprocess.run([_bin("kubernetes-validate"), "--strict", "--quiet", *files], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # The root (what `kubectl apply -k deploy/kubernetes` applies) is the base, unchanged.
    assert kustomize(K8S) == kustomize(K8S_BASE)
    tls = kustomize(K8S / "tls")
    assert sorted(d["kind"] for d in tls) == sorted(d["kind"] for d in _k8s_docs().values())
    r = _validate(tmp_path, "tls.yaml", tls)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S_BASE / "statefulset.yaml").read_text().replace("replicas: 3", "replicas: three"))
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


def _tls_statefulset() -> dict[str, Any]:
    (sts,) = [d for d in kustomize(K8S / "tls") if d["kind"] == "StatefulSet"]
    return sts


def test_tls_overlay_mounts_only_this_pods_certificates_and_probes_with_them() -> None:
    sts = _tls_statefulset()
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (init,) = pod["initContainers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= KNOWN_VARS, set(env) - KNOWN_VARS
    assert "KVSTORE_INSECURE" not in env and env["KVSTORE_CERTS_DIR"] == "/etc/kvstore/certs"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["certs"]["emptyDir"]["medium"] == "Memory"
    assert volumes["tls-secret"]["secret"]["secretName"] == "kvstore-tls"
    # The kvstore container sees its own certificates (the emptyDir) and never the Secret.
    assert {"name": "certs", "mountPath": env["KVSTORE_CERTS_DIR"], "readOnly": True} in c["volumeMounts"]
    assert "tls-secret" not in {m["name"] for m in c["volumeMounts"]}
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"tls-secret": "/secret", "certs": "/certs"}
    assert init["image"] == c["image"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in init["env"]
    # /livez and /readyz are mutual TLS now: exec probes with the image's check, not httpGet.
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "COPY docker/healthcheck.py /usr/local/bin/kvstore-healthcheck" in dockerfile
    for probe, path in (("readinessProbe", "readyz"), ("livenessProbe", "livez")):
        assert "httpGet" not in c[probe]
        assert c[probe]["exec"]["command"] == ["/usr/local/bin/kvstore-healthcheck", path]
        assert c[probe]["timeoutSeconds"] > HC.TIMEOUT


def _make_certs(*args: str) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(["sh", str(K8S / "tls" / "make-certs.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": path})


def test_make_certs_gives_each_pod_its_node_id_and_dns_names(tmp_path: Path) -> None:
    from cryptography import x509

    from kvstore.security.certs import node_uri

    sts = _tls_statefulset()
    name, svc, n = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    client_svc = next(d for d in _k8s_docs().values() if d["kind"] == "Service"
                      and d["spec"].get("clusterIP") != "None")["metadata"]["name"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    peers = dict(p.split("=") for p in next(e["value"] for e in c["env"] if e["name"] == "KVSTORE_PEERS").split(","))
    r = _make_certs(str(tmp_path / "c"), "ns1", str(n))
    assert r.returncode == 0, r.stderr
    secret = tmp_path / "c" / "secret"
    assert sorted(p.name for p in secret.iterdir()) == sorted(
        ["ca.crt", "client.root.crt", "client.root.key",
         *(f"{name}-{i}.node.{ext}" for i in range(n) for ext in ("crt", "key"))])
    ca = x509.load_pem_x509_certificate((secret / "ca.crt").read_bytes())
    for i in range(n):
        pod = f"{name}-{i}"
        cert = x509.load_pem_x509_certificate((secret / f"{pod}.node.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        node_id = id_from_hostname(pod)
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [node_uri(node_id)]
        dns = set(san.get_values_for_type(x509.DNSName))
        peer_host = peers[str(node_id)].rpartition(":")[0]
        assert peer_host == f"{pod}.{svc}"
        assert {peer_host, f"{peer_host}.ns1.svc", f"{peer_host}.ns1.svc.cluster.local", client_svc,
                f"{client_svc}.ns1.svc", "localhost"} <= dns
    # Run again with one more replica: the existing certificates stay, the new pod gets one.
    before = (secret / f"{name}-0.node.crt").read_bytes()
    assert _make_certs(str(tmp_path / "c"), "ns1", str(n + 1)).returncode == 0
    assert (secret / f"{name}-0.node.crt").read_bytes() == before and (secret / f"{name}-{n}.node.key").exists()
    for bad in (["x", "ns1", "three"], ["x", "Bad_NS"], []):
        r = _make_certs(*[str(tmp_path / b) if b == "x" else b for b in bad])
        assert r.returncode != 0 and "make-certs.sh" in r.stderr, r.stderr


def test_tls_init_container_copies_only_its_pods_certificates(tmp_path: Path) -> None:
    """The init container's script, run here with /secret and /certs pointing at test folders."""
    sts = _tls_statefulset()
    (init,) = sts["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["/bin/sh", "-ec"]
    assert _make_certs(str(tmp_path / "c"), "default", "3").returncode == 0
    script = init["args"][0].replace("/secret/", f"{tmp_path / 'c' / 'secret'}/").replace("/certs", str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    r = subprocess.run(["/bin/sh", "-ec", script], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "POD_NAME": "kvstore-1"})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "client.root.crt", "client.root.key", "node.crt",
                                                      "node.key"]
    assert (out / "node.crt").read_bytes() == (tmp_path / "c" / "secret" / "kvstore-1.node.crt").read_bytes()
    assert (out / "node.key").stat().st_mode & 0o777 == 0o400
    r = subprocess.run(["/bin/sh", "-ec", script], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "POD_NAME": "kvstore-7"})
    assert r.returncode == 1 and "Secret kvstore-tls has no kvstore-7.node.crt" in r.stderr, r.stderr


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
