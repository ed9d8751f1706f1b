"""`kvchaos --backend container` against the image users deploy (docker/Dockerfile, built once
per session by conftest.py): a short mutual-TLS run with a partition and a kill whose history
must check linearizable and which must leave nothing behind; and `kvchaos clean RUN_DIR` after a
harness that died with its containers running and a partition in place.

Root only (podman as root); skipped otherwise, never in CI (CI=true fails instead). Everything a
run creates is named kvc-RUN-* and removed by the names recorded in its state.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from podmanenv import IMAGE, Podman

from chaos import containers
from chaos.state import RunState

pytestmark = pytest.mark.timeout(300)


def _kvchaos(pm: Podman, args: list[str], registry: Path, timeout: float = 240) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "chaos.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**pm.env, "KVCHAOS_REGISTRY": str(registry)})
    return proc.returncode, proc.stdout + proc.stderr


def _assert_all_gone(pm: Podman, rec: containers.ContainerRecord, registry: Path) -> None:
    assert rec.containers and rec.volumes and rec.bridge
    for name in rec.containers:
        assert pm.podman("container", "exists", name, check=False).returncode == 1, name
    for name in rec.volumes:
        assert pm.podman("volume", "exists", name, check=False).returncode == 1, name
    assert pm.podman("network", "exists", rec.network, check=False).returncode == 1
    if not any(b == rec.bridge for b in pm.networks("").values()):
        assert containers.bridge_rules(rec.bridge) == []
    assert not (registry / f"{rec.run_id}.json").exists()


def test_container_run_with_a_partition_and_a_kill_is_linearizable_and_cleans_up(pm: Podman, tmp_path: Path) -> None:
    out, registry = tmp_path / "runs", tmp_path / "registry"
    code, text = _kvchaos(pm, ["run", "--backend", "container", "--image", IMAGE, "--nodes", "3", "--time", "22",
                               "--nemesis", "partition,kill", "--fault-min", "2", "--fault-max", "3",
                               "--seed", "4", "--out", str(out)], registry)
    assert code == 0 and text.rstrip().endswith("verdict: valid"), text[-4000:]
    (run_dir,) = list(out.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["analysis"]["linearizability"]["verdict"] == "linearizable"
    assert summary["analysis"]["counts"]["ok"] > 500
    families = {f["family"] for f in summary["faults"]}
    assert {"partition", "kill"} <= families, summary["faults"]
    # A killed node came back in the same container (same volume): its log shows it served twice.
    killed = {i for f in summary["faults"] if f["family"] == "kill" for i in f["hosts"]}
    for host in killed:
        node_log = (run_dir / "nodes" / f"n{host}.container.log").read_text()
        assert node_log.count(f"kvstore node {host} ready on") >= 2, node_log[-2000:]
    harness_notes = "".join(p.read_text() for p in (run_dir / "nodes").glob("n?.log"))
    assert "podman kill -s KILL" in harness_notes
    rec = containers.ContainerRecord.from_json(RunState(run_dir / "state.json").read()["container"])
    assert len(rec.containers) == 3
    _assert_all_gone(pm, rec, registry)
    assert not (run_dir / "data").exists()  # saved at teardown, deleted as the run was valid


def test_clean_removes_what_a_dead_harness_left_running(pm: Podman, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers running, a partition in their namespaces, the harness gone: `kvchaos clean
    RUN_DIR` removes the recorded containers, volumes, network and bridge rules."""
    registry = tmp_path / "registry"
    monkeypatch.setattr("chaos.state.REGISTRY", registry)
    monkeypatch.setenv("CONTAINERS_CONF", pm.env["CONTAINERS_CONF"])
    run_dir = tmp_path / "run"
    run_id = os.urandom(3).hex()
    state = RunState.create(run_dir, run_id, "container")
    try:
        topo = containers.setup(run_id, 2, IMAGE, state)
        backend = containers.ContainerBackend(topo)
        cluster = containers.ContainerCluster(backend, run_dir, 2, state, image=IMAGE)
        cluster.start_all()
        first = backend.pids[1]
        cluster.kill(1)
        assert not cluster.hosts[1].alive and cluster.hosts[1].exit_code == 137
        cluster.start(1)  # the same container again: a new init process, the same volume
        assert cluster.hosts[1].alive and backend.pids[1] != first
        mounts = pm.podman("inspect", "-f", "{{range .Mounts}}{{.Name}}{{end}}", topo.container(1)).stdout.strip()
        assert mounts == topo.volume(1)
        assert containers.chain_rules(backend.pids[1], ("KVC-EGRESS",)) == [
            "-A KVC-EGRESS -o lo -j RETURN", f"-A KVC-EGRESS -d {topo.subnet} -j RETURN",
            "-A KVC-EGRESS -j REJECT --reject-with icmp-port-unreachable"]
        backend.partition({(1, 2)})
        assert containers.chain_rules(backend.pids[1]) == [
            f"-A KVC-IN -s {topo.ip(2)}/32 -j DROP", f"-A KVC-OUT -d {topo.ip(2)}/32 -j DROP"]
        cluster.pause(2)
        assert pm.podman("inspect", "-f", "{{.State.Status}}", topo.container(2)).stdout.strip() == "paused"
    finally:
        code, text = _kvchaos(pm, ["clean", str(run_dir)], registry, timeout=120)
    assert code == 0, text
    # The volumes were saved in the run folder before they went (the data stays for inspection).
    with tarfile.open(run_dir / "data" / "n1.tar") as tar:
        assert any(m.name.endswith("FORMAT") for m in tar.getmembers()), tar.getnames()[:20]
    assert f"removed container {topo.container(1)}" in text and f"removed network {topo.network}" in text, text
    _assert_all_gone(pm, containers.ContainerRecord.from_json(state.read()["container"]), registry)
    code, text = _kvchaos(pm, ["clean", str(run_dir)], registry, timeout=120)
    assert code == 0 and "nothing left" in text, text
