"""kvctl exit codes and messages against the in-process fake cluster (127.0.0.1 only)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from test_client_fakes import Action, FakeCluster, closed_port

from kvstore.cli.kvctl import DEFAULT_ENDPOINTS, cli
from kvstore.v1 import kv_pb2

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shared() -> Iterator[FakeCluster]:
    with FakeCluster(3) as c:
        yield c


@pytest.fixture
def cluster(shared: FakeCluster) -> FakeCluster:
    c = shared
    c.leader_id, c.term, c.hint, c.status_leader = 1, 1, True, True
    c.store.clear()
    c.sessions.clear()
    c.applied.clear()
    c.calls.clear()
    c.admin_calls.clear()
    for n in c.nodes.values():
        n.hang = False
        n.script.clear()
    return c


def kvctl(cluster: FakeCluster | None, *args: str, endpoints: str | None = None, timeout: str = "3") -> Result:
    eps = endpoints if endpoints is not None else ",".join(cluster.endpoints if cluster else [])
    return CliRunner().invoke(
        cli, ["--endpoints", eps, "--timeout", timeout, *args], env={"COLUMNS": "200"}, catch_exceptions=False
    )


def test_put_get_delete(cluster: FakeCluster) -> None:
    r = kvctl(cluster, "put", "greeting", "héllo wörld")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    assert cluster.store[b"greeting"] == "héllo wörld".encode()
    r = kvctl(cluster, "get", "greeting")
    assert r.exit_code == 0 and r.stdout_bytes == "héllo wörld\n".encode()
    r = kvctl(cluster, "get", "missing")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr == ""
    r = kvctl(cluster, "-o", "json", "get", "missing")
    assert r.exit_code == 1 and json.loads(r.stdout) == {"key": "missing", "found": False, "value": None, "revision": 0}
    r = kvctl(cluster, "delete", "greeting")
    assert r.exit_code == 0 and r.stdout == ""
    r = kvctl(cluster, "-o", "json", "delete", "greeting")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"key": "greeting", "existed": False, "revision": None}


def test_rev_and_compact_arguments_are_checked_before_any_call(cluster: FakeCluster) -> None:
    for args in (["get", "k", "--rev", "0"], ["get", "k", "--rev", "-5"], ["scan", "--rev", str(1 << 63)],
                 ["compact", "0"], ["compact", "x"]):
        r = kvctl(cluster, *args)
        assert r.exit_code == 2 and "Invalid value" in r.stderr, args
    assert not cluster.calls


def test_binary_value_and_hex(cluster: FakeCluster) -> None:
    cluster.store[b"bin"] = b"\x00\xff\n"
    r = kvctl(cluster, "get", "bin")
    assert r.exit_code == 0 and r.stdout_bytes == b"\x00\xff\n\n"
    r = kvctl(cluster, "--hex", "get", "62696e")
    assert r.exit_code == 0 and r.stdout == "00ff0a\n"
    r = kvctl(cluster, "--hex", "put", "6b", "zz")
    assert r.exit_code == 2 and "not valid hex" in r.stderr


def test_cas(cluster: FakeCluster) -> None:
    assert kvctl(cluster, "cas", "--absent", "lock", "me").exit_code == 0
    assert cluster.store[b"lock"] == b"me"
    assert kvctl(cluster, "cas", "--absent", "lock", "you").exit_code == 1
    assert kvctl(cluster, "cas", "lock", "you", "x").exit_code == 1
    r = kvctl(cluster, "-o", "json", "cas", "lock", "me", "you")
    assert r.exit_code == 0 and json.loads(r.stdout)["swapped"] is True
    assert cluster.store[b"lock"] == b"you"
    r = kvctl(cluster, "cas", "lock", "you")
    assert r.exit_code == 2 and "KEY EXPECTED NEW" in r.stderr
    r = kvctl(cluster, "cas", "--help")
    assert "--absent" in r.stdout and "Exit 0 if swapped, 1 if not" in r.stdout


def test_scan(cluster: FakeCluster) -> None:
    for i in range(5):
        cluster.store[b"s/%d" % i] = b"v%d" % i
    cluster.store[b"t"] = b"x"
    r = kvctl(cluster, "scan", "s/")
    assert r.exit_code == 0
    assert r.stdout == "".join(f"s/{i}\tv{i}\n" for i in range(5))
    r = kvctl(cluster, "scan", "s/", "--limit", "2")
    assert r.stdout.splitlines() == ["s/0\tv0", "s/1\tv1"]
    r = kvctl(cluster, "-o", "json", "scan")
    assert [json.loads(line)["key"] for line in r.stdout.splitlines()] == [*(f"s/{i}" for i in range(5)), "t"]


def test_status(cluster: FakeCluster) -> None:
    cluster.index = 42
    dead = closed_port()
    eps = ",".join([cluster.addr(2), dead])
    r = kvctl(cluster, "status", endpoints=eps)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "leader node 1" in out and "3 members" in out
    for n in (1, 2, 3):
        assert cluster.addr(n) in out  # members were discovered from node 2
    assert dead in out and "unreachable" in out
    assert "42" in out
    r = kvctl(cluster, "-o", "json", "status", endpoints=eps)
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["leader"] == {"id": 1, "address": cluster.addr(1), "term": 1}
    assert sorted(m["id"] for m in doc["members"]) == [1, 2, 3]
    reachable = [n for n in doc["nodes"] if n["reachable"]]
    assert sorted(n["node_id"] for n in reachable) == [1, 2, 3]
    assert reachable[0]["groups"][0]["commit"] == 42
    assert [n["endpoint"] for n in doc["nodes"] if not n["reachable"]] == [dead]


def test_admin_commands(cluster: FakeCluster) -> None:
    cluster.set_leader(2)
    r = kvctl(cluster, "member", "add", "4", "127.0.0.1:1")
    assert r.exit_code == 0 and r.stdout == "added 4\n"
    req = cluster.admin_calls[-1]
    assert req[0] == 2 and req[1] == "AddMember" and req[2].learner is True
    assert kvctl(cluster, "member", "add", "5", "127.0.0.1:2", "--voter").exit_code == 0
    assert cluster.admin_calls[-1][2].learner is False
    assert kvctl(cluster, "member", "promote", "4").exit_code == 0
    r = kvctl(cluster, "-o", "json", "member", "remove", "4")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    assert kvctl(cluster, "raft-snapshot").exit_code == 0
    assert kvctl(cluster, "raft-snapshot", "--node", cluster.addr(2)).exit_code == 0
    n = len(cluster.admin_calls)
    assert kvctl(cluster, "snapshot").exit_code == 0  # the old spelling, kept as an alias
    r = kvctl(cluster, "snapshot", "--node", cluster.addr(2), "-o", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    assert [c[1] for c in cluster.admin_calls[n:]] == ["Snapshot", "Snapshot"]
    r = kvctl(cluster, "transfer-leader", "3")
    assert r.exit_code == 0 and cluster.leader_id == 3
    assert kvctl(cluster, "transfer-leader").exit_code == 0
    assert cluster.admin_calls[-1][2].to == 0
    assert kvctl(cluster, "member", "add", "x", "a:1").exit_code == 2  # usage


def test_unreachable_is_exit_2_with_one_line(cluster: FakeCluster) -> None:
    eps = [closed_port(), closed_port()]
    r = kvctl(None, "put", "k", "v", endpoints=",".join(eps), timeout="0.5")
    assert r.exit_code == 2
    assert r.stderr == f"kvctl: cannot reach any endpoint ({eps[0]}, {eps[1]}): connection refused\n"
    r = kvctl(None, "get", "k", endpoints=",".join(eps), timeout="0.5")
    assert r.exit_code == 2 and r.stderr.startswith("kvctl: cannot reach any endpoint")
    r = kvctl(None, "status", endpoints=eps[0], timeout="0.5")
    assert r.exit_code == 2 and r.stderr.startswith(f"kvctl: cannot reach any endpoint ({eps[0]})")


def test_value_too_large_message(cluster: FakeCluster) -> None:
    r = kvctl(cluster, "put", "k", "x" * 2_000_000)
    assert r.exit_code == 2
    assert r.stderr == "kvctl: value too large: 2000000 bytes > 1048576\n"
    assert cluster.calls == []


def test_indeterminate_is_exit_3(cluster: FakeCluster) -> None:
    cluster.script(1, *[Action("error", kv_pb2.TIMEOUT, indeterminate=True, methods=("Put",))] * 1000)
    r = kvctl(cluster, "put", "k", "v", timeout="0.3")
    assert r.exit_code == 3
    assert r.stderr.startswith("kvctl: put did not complete within 0.3s")
    assert r.stderr.endswith("(indeterminate: the write may have been applied)\n")
    assert r.stderr.count("\n") == 1


def test_definite_server_error_is_exit_2(cluster: FakeCluster) -> None:
    cluster.script(1, Action("error", kv_pb2.INVALID_ARGUMENT))
    r = kvctl(cluster, "put", "k", "v")
    assert r.exit_code == 2 and r.stderr == "kvctl: scripted\n"


def test_endpoints_env_and_default(cluster: FakeCluster) -> None:
    r = CliRunner().invoke(cli, ["put", "e", "1"], env={"KVSTORE_ENDPOINTS": cluster.addr(2)})
    assert r.exit_code == 0 and cluster.store[b"e"] == b"1"
    r = CliRunner().invoke(cli, ["--help"])
    assert DEFAULT_ENDPOINTS in r.stdout and "Exit codes" in r.stdout


def test_console_script_subprocess(cluster: FakeCluster) -> None:
    cluster.store[b"sub"] = b"process"
    cmd = [sys.executable, "-c", "from kvstore.cli.kvctl import main; main()",
           "--endpoints", cluster.addr(3), "get", "sub"]
    p = subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=20)
    assert p.returncode == 0 and p.stdout == b"process\n", p.stderr
    p = subprocess.run([*cmd[:-1], "nope"], capture_output=True, cwd=ROOT, timeout=20)
    assert p.returncode == 1 and p.stdout == b"" and p.stderr == b""


def test_put_value_from_stdin(cluster: FakeCluster) -> None:
    big = bytes(range(256)) * 1200  # 300 KiB: more than one command-line argument may hold
    r = CliRunner().invoke(
        cli, ["--endpoints", ",".join(cluster.endpoints), "put", "blob", "-"], input=big, catch_exceptions=False
    )
    assert r.exit_code == 0, r.stderr
    assert cluster.store[b"blob"] == big


def test_cacert_needs_a_password_and_excludes_a_client_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not used: the flags are refused first")
    r = CliRunner().invoke(cli, ["--endpoints", "127.0.0.1:1", "--cacert", str(ca), "get", "k"],
                           env={"KVSTORE_PASSWORD": None})
    assert r.exit_code == 2 and "--cacert (no client certificate) needs --password" in r.output
    r = CliRunner().invoke(cli, ["--endpoints", "127.0.0.1:1", "--cacert", str(ca), "--certs-dir", str(tmp_path),
                                 "--password", "p", "get", "k"])
    assert r.exit_code == 2 and "not both" in r.output
