"""The kvstore image end to end: build it (on a base image built with debootstrap), start the
3-node compose cluster (docker/compose.3node.yaml) with Docker Compose v2 on podman, wait for
every node's health check (/readyz), let the health-gated one-shot `ready` service run, use
`kvctl` inside a node's container, SIGTERM one node (`compose stop`: it drains its leaderships
and exits 0) and check the other two still serve; then the TLS variant (docker/compose.tls.yaml:
certificates made by its one-shot `certs` service) serves kvctl over mutual TLS; and the
Kubernetes StatefulSet's pod spec (deploy/kubernetes/base/statefulset.yaml) run as podman containers
named like its pods, with its peer DNS names as network aliases: the pods take their ids from
their host names and form the cluster.

Root only (podman as root, apt-get for what is missing); skipped otherwise, never in CI (CI=true
fails instead). Everything is named kvstore-test-* and removed by name in `finally`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from podmanenv import IMAGE, REPO, Podman, Project, kustomize

pytestmark = pytest.mark.timeout(480)

NODES = ["kvstore-1", "kvstore-2", "kvstore-3"]


def _up_healthy(project: Project) -> None:
    """Start the nodes, wait for their health checks, then the health-gated `ready` service."""
    project.compose("up", "-d", "--no-build", *NODES)
    project.wait_healthy(NODES)
    with project.pm.health_pump([project.container(n) for n in NODES]):
        project.compose("up", "-d", "--no-build", "ready")
        r = project.pm.podman("wait", project.container("ready"))
    assert r.stdout.strip() == "0", r.stdout
    status = project.pm.podman("logs", project.container("ready")).stdout
    assert "3 members" in status, status


def _kvctl_works(project: Project, service: str, prefix: str) -> None:
    for k, v in (("a", "1"), ("b", "2"), ("c", "3")):
        project.exec(service, "kvctl", "put", f"{prefix}/{k}", v)
    assert project.exec(service, "kvctl", "get", f"{prefix}/b").stdout == "2\n"
    assert project.exec(service, "kvctl", "scan", f"{prefix}/").stdout == f"{prefix}/a\t1\n{prefix}/b\t2\n{prefix}/c\t3\n"
    missing = project.exec(service, "kvctl", "get", f"{prefix}/zz", check=False)
    assert missing.returncode == 1


def test_three_node_cluster_serves_and_a_stopped_node_drains(pm: Podman) -> None:
    project = Project(pm, "kvstore-test-3node", "compose.3node.yaml")
    try:
        _up_healthy(project)
        _kvctl_works(project, "kvstore-1", "app")
        st = json.loads(project.exec("kvstore-2", "kvctl", "-o", "json", "status").stdout)
        assert sorted(m["id"] for m in st["members"]) == [1, 2, 3]
        # SIGTERM (through tini) to node 3: it drains, stops cleanly, exits 0.
        project.compose("stop", "kvstore-3", timeout=120)
        state = pm.podman("inspect", "-f", "{{.State.ExitCode}} {{.State.Status}}", project.container("kvstore-3"))
        assert state.stdout.split() == ["0", "exited"], state.stdout
        log = pm.podman("logs", project.container("kvstore-3")).stderr
        assert "shutting down: draining" in log and "node 3 stopped" in log, log[-2000:]
        # The other two are a quorum: the data is there and writes go on.
        assert project.exec("kvstore-2", "kvctl", "get", "app/a").stdout == "1\n"
        project.exec("kvstore-2", "kvctl", "put", "app/d", "4")
        assert project.exec("kvstore-1", "kvctl", "get", "app/d").stdout == "4\n"
    finally:
        project.down()
    assert pm.podman("ps", "-a", "--filter", "name=kvstore-test-3node", "-q").stdout.strip() == ""


def test_tls_cluster_serves_over_mutual_tls(pm: Podman) -> None:
    project = Project(pm, "kvstore-test-tls", "compose.tls.yaml")
    try:
        project.compose("up", "--no-build", "certs", timeout=180)
        assert pm.podman("inspect", "-f", "{{.State.ExitCode}}", project.container("certs")).stdout.strip() == "0"
        _up_healthy(project)
        _kvctl_works(project, "kvstore-3", "tls")
        # The node's port refuses a client without a certificate of the cluster's CA.
        plain = project.exec("kvstore-1", "env", "-u", "KVSTORE_CERTS_DIR", "kvctl", "--timeout", "3",
                             "get", "tls/a", check=False)
        assert plain.returncode == 2, (plain.returncode, plain.stdout, plain.stderr)
    finally:
        project.down()
    assert pm.podman("volume", "ls", "-q", "--filter", "name=kvstore-test-tls").stdout.strip() == ""



def test_statefulset_pods_take_their_ids_from_their_names(pm: Podman) -> None:
    """What Kubernetes would do with the StatefulSet, on podman: pod kvstore-N with host name
    kvstore-N, reachable as kvstore-N.kvstore-peer (the headless Service), the pod spec's
    environment and arguments, a volume per pod."""
    sts = yaml.safe_load((REPO / "deploy" / "kubernetes" / "base" / "statefulset.yaml").read_text())
    name, svc, n = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    env = [f"{e['name']}={e['value']}" for e in c["env"]]
    net = "kvstore-test-k8s"
    pods = [f"kvstore-test-k8s-{i}" for i in range(n)]
    volumes = [f"kvstore-test-k8s-data-{i}" for i in range(n)]
    try:
        pm.podman("network", "create", net)
        for i, pod in enumerate(pods):
            pm.podman("run", "-d", "--name", pod, "--hostname", f"{name}-{i}", "--network", net,
                      "--network-alias", f"{name}-{i}.{svc}", "-v", f"{volumes[i]}:{c['volumeMounts'][0]['mountPath']}",
                      *(a for e in env for a in ("-e", e)), IMAGE, *c["args"])
        pm.wait_healthy(pods)
        st = json.loads(pm.podman("exec", pods[0], "kvctl", "-o", "json", "status").stdout)
        assert {m["id"]: m["address"] for m in st["members"]} == {
            i + 1: f"{name}-{i}.{svc}:2379" for i in range(n)}
        pm.podman("exec", pods[1], "kvctl", "put", "k8s/key", "v")
        assert pm.podman("exec", pods[2], "kvctl", "get", "k8s/key").stdout == "v\n"
        grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pm.podman("stop", "-t", str(grace), pods[0], timeout=grace + 30)
        assert pm.podman("inspect", "-f", "{{.State.ExitCode}}", pods[0]).stdout.strip() == "0"
        assert "node 1 stopped" in pm.podman("logs", pods[0]).stderr
    finally:
        pm.podman("rm", "-f", "-t", "5", *pods, check=False)
        pm.podman("volume", "rm", "-f", *volumes, check=False)
        pm.remove_networks(pm.networks(net))


def test_tls_statefulset_pods_serve_over_mutual_tls_with_exec_probes(pm: Podman, tmp_path: Path) -> None:
    """The TLS overlay (deploy/kubernetes/tls) on podman: the Secret made by make-certs.sh (as
    Kubernetes mounts it: group 10001, mode 0440), each pod's init container copying its own
    certificates into an in-memory volume, the pods serving with KVSTORE_CERTS_DIR; the exec
    probes pass, a plain HTTP probe gets nothing, kvctl inside a pod is a TLS client."""
    (sts,) = [d for d in kustomize(REPO / "deploy" / "kubernetes" / "tls") if d["kind"] == "StatefulSet"]
    name, svc, n = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    spec = sts["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    (init,) = spec["initContainers"]
    env = [f"{e['name']}={e['value']}" for e in c["env"]]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    certs = tmp_path / "certs"
    r = subprocess.run(["sh", str(REPO / "deploy" / "kubernetes" / "tls" / "make-certs.sh"), str(certs), "default",
                        str(n)], capture_output=True, text=True, timeout=120,
                       env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    # As the kubelet mounts the Secret (defaultMode, group fsGroup) and the emptyDir (the pod's user).
    sc = spec["securityContext"]
    uid, fs_group = sc["runAsUser"], sc["fsGroup"]
    mode = next(v for v in spec["volumes"] if v["name"] == "tls-secret")["secret"]["defaultMode"]
    secret = certs / "secret"
    os.chown(secret, 0, fs_group)
    for f in secret.iterdir():
        os.chown(f, 0, fs_group)
        f.chmod(mode)
    net = "kvstore-test-k8stls"
    pods = [f"{net}-{i}" for i in range(n)]
    volumes = [f"{net}-data-{i}" for i in range(n)]
    try:
        pm.podman("network", "create", net)
        for i, pod in enumerate(pods):
            empty_dir = tmp_path / f"empty-dir-{i}"  # the pod's emptyDir, shared by its two containers
            empty_dir.mkdir(mode=0o700)
            os.chown(empty_dir, uid, fs_group)
            pm.podman("run", "--rm", "--network", "none", "-e", f"POD_NAME={name}-{i}",
                      "-v", f"{secret}:{init_mounts['tls-secret']}:ro", "-v", f"{empty_dir}:{init_mounts['certs']}",
                      "--entrypoint", init["command"][0], IMAGE, *init["command"][1:], *init["args"])
            pm.podman("run", "-d", "--name", pod, "--hostname", f"{name}-{i}", "--network", net,
                      "--network-alias", f"{name}-{i}.{svc}", "-v", f"{net}-data-{i}:{mounts['data']}",
                      "-v", f"{empty_dir}:{mounts['certs']}:ro", *(a for e in env for a in ("-e", e)),
                      IMAGE, *c["args"])
        ready, live = c["readinessProbe"]["exec"]["command"], c["livenessProbe"]["exec"]["command"]
        pending = list(pods)
        deadline = time.monotonic() + 120
        while pending:  # what the kubelet does with the readiness probe, until every pod is ready
            pending = [p for p in pending if pm.podman("exec", p, *ready, check=False).returncode != 0]
            running = pm.podman("inspect", "-f", "{{.State.Running}}", *pending).stdout.split() if pending else []
            assert "false" not in running, [pm.podman("logs", p, check=False).stderr[-1500:] for p in pending]
            assert time.monotonic() < deadline, [pm.podman("logs", p, check=False).stderr[-1500:] for p in pending]
            if pending:
                time.sleep(1)
        assert pm.podman("exec", pods[0], *live).stdout.startswith("/livez: 200")
        # Without a client certificate of the cluster's CA, /readyz answers nothing (why httpGet cannot probe).
        plain = pm.podman("exec", pods[0], "python3", "-c", "import urllib.request as u; "
                          "u.urlopen('http://127.0.0.1:9090/readyz', timeout=3)", check=False)
        assert plain.returncode != 0
        pm.podman("exec", pods[1], "kvctl", "put", "k8s/tls", "v")
        assert pm.podman("exec", pods[2], "kvctl", "get", "k8s/tls").stdout == "v\n"
        st = json.loads(pm.podman("exec", pods[0], "kvctl", "-o", "json", "status").stdout)
        assert {m["id"]: m["address"] for m in st["members"]} == {i + 1: f"{name}-{i}.{svc}:2379" for i in range(n)}
        # The kvstore container holds its own node key only.
        listing = pm.podman("exec", pods[0], "ls", mounts["certs"]).stdout.split()
        assert sorted(listing) == ["ca.crt", "client.root.crt", "client.root.key", "node.crt", "node.key"]
    finally:
        pm.podman("rm", "-f", "-t", "5", *pods, check=False)
        pm.podman("volume", "rm", "-f", *volumes, check=False)
        pm.remove_networks(pm.networks(net))
