"""The kvstore image end to end: build it (on a base image built with debootstrap), start the
3-node compose cluster (docker/compose.3node.yaml) with Docker Compose v2 on podman, wait for
every node's health check (/readyz), let the health-gated one-shot `ready` service run, use
`kvctl` inside a node's container, SIGTERM one node (`compose stop`: it drains its leaderships
and exits 0) and check the other two still serve; then the TLS variant (docker/compose.tls.yaml:
certificates made by its one-shot `certs` service) serves kvctl over mutual TLS; and the
Kubernetes StatefulSet's pod spec (deploy/kubernetes/statefulset.yaml) run as podman containers
named like its pods, with its peer DNS names as network aliases: the pods take their ids from
their host names and form the cluster.

Root only (podman as root, apt-get for what is missing); skipped otherwise, never in CI (CI=true
fails instead). Everything is named kvstore-test-* and removed by name in `finally`.
"""

from __future__ import annotations

import json

import pytest
import yaml
from podmanenv import IMAGE, REPO, Podman, Project

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
    sts = yaml.safe_load((REPO / "deploy" / "kubernetes" / "statefulset.yaml").read_text())
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
