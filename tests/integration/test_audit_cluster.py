"""The audit log on a real 3-node TLS cluster (`kvstore serve --audit-log`): an admin operation
(a leadership transfer) and data writes leave lines naming the caller's certificate, the chain
verifies with `kvstore audit verify` while the nodes run and after they stop, and fails, naming
the line, once a line is changed or the log is cut short."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from clusterharness import Cluster

from kvstore.client import Client


def _lines(path: Path) -> list[dict[str, object]]:
    files = [*sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:])), path]
    out = []
    for f in files:
        if f.exists():
            out += [json.loads(x) for x in f.read_bytes().splitlines() if x.endswith(b"}")]
    return out


def _verify(path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli.server", "audit", "verify", str(path), "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=120,
    )


def _wait_for(cond: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_real_cluster_audits_admin_ops_and_writes_and_verify_catches_tampering(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "cluster", n=3, certs_dir=tmp_path / "certs")
    audit = {nid: tmp_path / f"audit{nid}.log" for nid in c.nodes}
    for nid, n in c.nodes.items():
        n.args += ["--audit-log", str(audit[nid]), "--audit-writes", "--audit-sync-ms", "50"]
    c.start()
    try:
        leader = c.settled_leader(group=1)
        to = next(nid for nid in c.nodes if nid != leader.id)
        with Client(c.endpoints, credentials=c.credentials) as kv:
            kv.put(b"audited/key", b"v")
            kv.transfer_leader(to, groups=[1])

        def transfer_lines() -> list[tuple[int, dict[str, object]]]:
            return [(nid, x) for nid, p in audit.items() for x in _lines(p) if x["op"] == "Admin.TransferLeader"]

        _wait_for(lambda: transfer_lines(), "the Admin.TransferLeader audit line")
        ((nid, line),) = transfer_lines()
        assert line["identity"] == "root"  # the client certificate's common name
        assert str(line["peer"]).startswith("ipv4:127.0.0.1:")
        assert (line["to"], line["groups"], line["result"], line["node"]) == (to, "1", "ok", nid)
        writes = [x for p in audit.values() for x in _lines(p) if str(x["op"]).startswith("KV.")]
        assert any(x.get("key") == "audited/key" and x["result"] == "ok" and x["identity"] == "root" for x in writes)
        # the transfer took effect at group 1's leader, asked by a node: audited there too, unless
        # the node asked was that leader itself
        proposes = [x for p in audit.values() for x in _lines(p)
                    if x["op"] == "Shard.GroupPropose" and x.get("what") == "transfer_leader"]
        if nid != leader.id:
            assert proposes and all(x["identity"] not in ("anonymous", "root") for x in proposes)

        data_dir = c.nodes[nid].data_dir
        running = _verify(audit[nid], data_dir)
        assert running.returncode == 0, running.stdout + running.stderr
        assert "OK:" in running.stdout
    finally:
        c.stop()

    path, data_dir = audit[nid], c.nodes[nid].data_dir
    stopped = _verify(path, data_dir)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "unconfirmed" not in stopped.stdout  # a graceful stop confirms every line

    original = path.read_bytes()
    raw = original.splitlines(keepends=True)
    i = next(k for k, x in enumerate(raw) if b'"op":"Admin.TransferLeader"' in x)
    raw[i] = raw[i].replace(f'"to":{to}'.encode(), f'"to":{to % 3 + 1}'.encode())
    assert b"".join(raw) != original
    path.write_bytes(b"".join(raw))
    changed = _verify(path, data_dir)
    assert changed.returncode == 1, changed.stdout
    assert f"{path}:{i + 1}" in changed.stdout and "MAC mismatch" in changed.stdout

    path.write_bytes(b"".join(original.splitlines(keepends=True)[:-1]))
    cut = _verify(path, data_dir)
    assert cut.returncode == 1 and "truncated" in cut.stdout, cut.stdout

    path.write_bytes(original)
    assert _verify(path, data_dir).returncode == 0
