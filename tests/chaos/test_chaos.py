"""The chaos harness (`kvchaos`), end to end and in parts.

The netns runs need root (CI runs as root) and `ip` / `iptables`; they are skipped only when not
root. Every network address they use lives in namespaces the run creates (10.77.X.0/24 behind a
bridge in its own namespace); the local-backend run uses 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos import netns
from chaos.checker import Status
from chaos.checks import analyze_records
from chaos.nemesis import ALL_FAMILIES, FaultWindow, Nemesis, NemesisOptions, parse_families
from chaos.state import RunState, pid_alive
from chaos.workload import OpRecord, bank_value, to_operations

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the netns backend needs root")


def kvchaos(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "chaos.cli", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    # stderr first: the verdict is stdout's last line, and grpc's C core may log to stderr at any
    # moment (e.g. a failed TLS handshake with a port another test's node took after a kill).
    return proc.returncode, proc.stderr + proc.stdout


def run_dir_of(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def assert_cleaned(run_dir: Path, registry: Path | None = None) -> None:
    """Nothing the run created is left: namespaces (with the bridge and the iptables rules
    inside them), processes, the registry entry."""
    st = RunState(run_dir / "state.json")
    data = st.read()
    assert data["torn_down"] is True
    for ns in data["namespaces"]:
        assert not netns.namespace_exists(ns), ns
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if shutil.which("ip") else ""
    assert f"kvc-{data['run_id']}-" not in listing
    assert data["pids"] == {}
    reg = registry or Path(os.environ["KVCHAOS_REGISTRY"])
    assert reg.is_dir() and not list(reg.glob(f"{data['run_id']}.json"))


def node_pids_of(run_dir: Path) -> list[int]:
    """PIDs of the processes of this run's nodes still running (by the data dir in their
    command line: only this run's nodes have it)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(run_dir / "data") in cmd and pid_alive(int(entry.name)):
            out.append(int(entry.name))
    return out


@pytest.fixture(autouse=True)
def private_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCHAOS_REGISTRY", str(tmp_path / "registry"))


# --------------------------------------------------------------------------------------------
# end to end


@needs_root
def test_netns_five_nodes_all_nemeses_set_is_valid(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--nodes", "5", "--time", "45", "--nemesis", "all", "--workload", "set",
                          "--seed", "5", "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    d = run_dir_of(out)
    summary = json.loads((d / "summary.json").read_text())
    s = summary["analysis"]["set"]
    assert s["valid"] is True and s["lost_count"] == 0 and s["acknowledged"] > 500, s
    families = {f["family"] for f in summary["faults"]}
    assert len(families - {"heal"}) >= 3, summary["faults"]
    assert_cleaned(d)
    assert node_pids_of(d) == []


@needs_root
def test_netns_rebalance_during_partitions_and_kills_is_valid(tmp_path: Path) -> None:
    """Range moves (add / remove a data group, rebalance) with a partition or a kill injected
    while they run: the history stays linearizable, nothing acknowledged is lost, and every
    move finishes once the faults are healed. Also the netns backend's basics, checked on this
    run (one fewer 50 s run in CI): the run's files (history in the checker's format, ops,
    report, faults, node logs), nodes on the namespaces' addresses, a partition healed, and
    nothing left behind (namespaces, processes, registry). One data group's register under
    partitions and kills (the run this one absorbed) is run by the forge and TLS runs below
    (forge,partition,kill) and the replica run (replicas,partition,kill)."""
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--nodes", "3", "--groups", "4", "--time", "45", "--nemesis",
                          "rebalance,partition,kill", "--workload", "register", "--seed", "11", "--watchers", "4",
                          "--out", str(out)],
                         timeout=420)
    lines = text.strip().splitlines()
    assert lines[-1] == "verdict: valid", text[-6000:]
    assert code == 0
    d = run_dir_of(out)
    summary = json.loads((d / "summary.json").read_text())
    a = summary["analysis"]
    assert summary["verdict"] == "valid" and a["reasons"] == [], a["reasons"]
    assert a["linearizability"]["verdict"] == "linearizable"
    assert a["counts"]["ok"] > 300, a["counts"]
    for name in ("history.jsonl", "ops.jsonl", "index.html", "faults.json", "nodes/n1.log", "nodes/n3.log"):
        assert (d / name).exists(), name
    # the history is the checker's format, and every op has an invoke and a completion
    from chaos.checker import load_jsonl

    assert len(load_jsonl(d / "history.jsonl")) >= a["counts"]["ok"]
    assert "kvstore node 1 ready on 10.77." in (d / "nodes" / "n1.log").read_text()
    assert {"partition", "kill"} <= {f["family"] for f in summary["faults"]}, summary["faults"]
    assert any(f["family"] == "partition" and f["end"] is not None for f in summary["faults"])
    # no lost writes: every key of the run was read after the heal (the checker saw those reads)
    finals = {r["key"] for r in map(json.loads, (d / "ops.jsonl").read_text().splitlines())
              if r.get("final") and r["status"] == "ok"}
    assert set(summary["execution"]["keys"]) <= finals
    # the cluster was sharded, and the layout changed under faults
    assert summary["config"]["groups"] == 4
    assert "4 data groups" in (d / "nodes" / "n1.log").read_text()
    faults = summary["faults"]
    changes = [f for f in faults if f["family"] == "rebalance"]
    assert changes, faults
    assert changes[0]["info"]["groups_before"] == [1, 2, 3, 4], changes[0]
    planned = [f for f in changes if (f["info"].get("planned_moves") or 0) > 0]
    assert planned, changes
    overlapping = [
        (c, f) for c in planned for f in faults
        if f["family"] in ("partition", "kill") and c["start"] <= f["start"] <= (c["end"] or 1e9)
    ]
    assert overlapping, faults
    # ... and the moves were in flight while a partition or a kill was in place
    assert any((c["info"].get("moves_during_fault") or 0) > 0 for c in planned), changes
    # liveness: every range move finished after the heal, and that is reported
    lv = summary["liveness"]
    assert lv["checked"] is True and lv["valid"] is True, lv
    assert lv["moves"]["settled"] is True and lv["moves"]["moves_pending"] == 0
    assert lv["moves_planned"] >= sum(f["info"]["planned_moves"] for f in planned) > 0
    assert any(f["family"] == "heal" and f["kind"] == "moves" and f["ok"] for f in faults)
    assert "kvchaos: range moves:" in text and "none pending" in text
    assert "rebalance" in (d / "index.html").read_text()
    # the watchers (every key, the prefix, one key, a range) went through the moves, partitions and
    # kills by resuming, and their histories hold etcd's watch guarantees against the writes
    wt = summary["watch"]
    assert wt["checked"] is True and wt["valid"] is True and wt["violations"] == {}, wt
    assert wt["watchers"] == 4 and wt["ended"] == {"stopped": 4}, wt
    assert wt["events"] > 500 and wt["acked_checked"] > 500 and wt["cross_checked"] > 100, wt
    assert wt["resumes"] > 0, wt
    assert (d / "watches.jsonl").exists()
    assert "kvchaos: watch: 4 watcher(s)" in text
    assert_cleaned(d)
    assert node_pids_of(d) == []


@needs_root
def test_netns_forged_and_malformed_traffic_is_refused_and_the_run_stays_valid(tmp_path: Path) -> None:
    """The forge nemesis (forged traffic as a non-member, malformed traffic under member ids)
    between partitions and kills: linearizable, every non-member call refused with
    PERMISSION_DENIED, the nodes counted their refusals, no forged value was ever read, no node
    died or wedged, and the throughput under forged traffic did not drop."""
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--nodes", "3", "--time", "30", "--nemesis", "forge,partition,kill",
                          "--workload", "register", "--seed", "13", "--insecure", "--out", str(out)], timeout=180)
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    d = run_dir_of(out)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["config"]["tls"] is False and "--insecure" in (d / "nodes" / "n1.log").read_text()
    assert summary["analysis"]["linearizability"]["verdict"] == "linearizable"
    fg = summary["forge"]
    assert fg["checked"] is True and fg["valid"] is True and fg["windows"] >= 1, fg
    assert fg["forged_messages"] > 1000 and fg["forged_rpcs"] > 100, fg
    assert fg["outsider_codes"].get("PERMISSION_DENIED", 0) > 50 and fg["accepted_from_outsider"] == 0, fg
    assert fg["member_codes"].get("OK", 0) > 0, fg  # malformed messages under member ids: dropped, stream fine
    for reason in ("not_member", "malformed", "unknown_group", "snapshot"):
        assert fg["refused"].get(reason, 0) > 0, fg["refused"]
    assert fg["forged_reads"] == 0 and fg["nodes_dead"] == [] and fg["nodes_unresponsive"] == []
    assert fg["availability"] is not None and fg["availability"] >= 0.5, fg
    (w, *_) = [f for f in summary["faults"] if f["family"] == "forge"]
    assert w["ok"] and w["info"]["refused_total"] > 0 and w["info"]["nodes_scraped"] == 3, w
    assert {"partition", "kill"} <= {f["family"] for f in summary["faults"]}
    assert "kvchaos: forge:" in text
    assert_cleaned(d)
    assert node_pids_of(d) == []


@needs_root
def test_netns_tls_run_refuses_every_forged_identity_under_partitions_and_kills(tmp_path: Path) -> None:
    """`kvchaos run --tls`: the nodes run with certificates, every harness channel is mutual TLS,
    and the forge nemesis plays outsiders (a) without a certificate, (b) with a client
    certificate of the cluster's CA aimed at internal RPCs, (c) with member X's node certificate
    claiming to be member Y, (d) with certificates of another CA, between partitions and kills.
    The run is valid, every one of those calls was refused (the handshake, or PERMISSION_DENIED)
    and none was answered, no forged value was ever read, and the nodes counted the identity
    refusals."""
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--nodes", "3", "--time", "30", "--nemesis", "forge,partition,kill",
                          "--workload", "register", "--seed", "13", "--tls", "--out", str(out)], timeout=180)
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    d = run_dir_of(out)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["config"]["tls"] is True and summary["execution"]["tls"] is True
    assert summary["analysis"]["linearizability"]["verdict"] == "linearizable"
    assert summary["analysis"]["counts"]["ok"] > 300, summary["analysis"]["counts"]
    for h in (1, 2, 3):  # each node served its own certificate, never plaintext
        log = (d / "nodes" / f"n{h}.log").read_text()
        assert "(TLS, certificates from" in log and "--insecure" not in log, log[-2000:]
    fg = summary["forge"]
    assert fg["checked"] is True and fg["valid"] is True and fg["tls"] is True and fg["rounds"] > 0, fg
    # (a) and (d) end at the handshake (or UNAUTHENTICATED / PERMISSION_DENIED, should the
    # cluster accept certificate-less connections for tokens); (b) and (c) PERMISSION_DENIED
    for case in ("no_cert", "client_cert", "wrong_node", "other_ca"):
        assert fg["tls_refused"].get(case, 0) > 20, (case, fg["tls_codes"])
        assert "OK" not in fg["tls_codes"][case], (case, fg["tls_codes"])
    for case in ("client_cert", "wrong_node"):
        # (CALL_BROKEN: a client-streaming call gRPC broke off as the node ended it, its refusal
        # unread: counted unreached, as forge.CALL_BROKEN says)
        assert set(fg["tls_codes"][case]) <= {"PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                                              "CANCELLED", "CALL_BROKEN"}, fg["tls_codes"]
    assert fg["not_refused"] == 0 and fg["accepted_from_outsider"] == 0, fg
    assert fg["handshakes_failed"] > 50, fg
    # node 99 with a genuine certificate is still not a member; a member's malformed traffic
    # (over its own certificate) is dropped by the decode; the nodes counted identity refusals
    assert fg["outsider_codes"].get("PERMISSION_DENIED", 0) > 50, fg
    for reason in ("identity", "not_member", "malformed", "unknown_group", "snapshot"):
        assert fg["refused"].get(reason, 0) > 0, fg["refused"]
    assert fg["forged_reads"] == 0 and fg["nodes_dead"] == [] and fg["nodes_unresponsive"] == []
    assert fg["availability"] is not None and fg["availability"] >= 0.5, fg
    assert {"partition", "kill"} <= {f["family"] for f in summary["faults"]}
    assert "TLS outsiders refused" in text and "not refused 0" in text
    assert "mutual TLS" in (d / "index.html").read_text()
    assert not (d / "certs").exists()  # a valid run drops its throwaway CA with its data
    assert_cleaned(d)
    assert node_pids_of(d) == []


def test_local_backend_tls_forge_run_is_valid(tmp_path: Path) -> None:
    """The same TLS outsiders on the local backend (no root): valid, every case refused."""
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--backend", "local", "--nodes", "3", "--time", "10", "--nemesis", "forge",
                          "--seed", "2", "--keep-data", "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    d = run_dir_of(out)
    fg = json.loads((d / "summary.json").read_text())["forge"]
    assert fg["tls"] is True and fg["not_refused"] == 0 and fg["forged_reads"] == 0, fg
    assert all(fg["tls_refused"].get(c, 0) > 0 for c in ("no_cert", "client_cert", "wrong_node", "other_ca")), fg
    assert fg["refused"].get("identity", 0) > 0, fg["refused"]
    # TLS is the default: the nodes ran with their own certificates (--keep-data keeps them)
    assert sorted(p.name for p in (d / "certs" / "n1").iterdir()) == ["ca.crt", "node.crt", "node.key"]
    assert "mutual TLS" in text


def test_forge_check_fails_on_forged_reads_accepted_outsiders_and_dead_nodes(tmp_path: Path) -> None:
    from chaos.runner import RunConfig, analyze

    cfg = RunConfig(time=6, nemesis=["forge"], run_id="t")
    recs = [
        _op(1, "put", "r/0", "a", None, 0.0, 1.0),
        _op(2, "get", "r/0", None, "a", 2.0, 2.2),  # under forged traffic
        _op(2, "get", "r/0", None, "a", 3.5, 4.0),
        _op(3, "get", "r/0", None, "a", 6.0, 7.0, final=True),
    ]
    info = {"forged_messages": 500, "forged_rpcs": 40, "outsider_codes": {"PERMISSION_DENIED": 20},
            "member_codes": {"OK": 20}, "refused": {"not_member": 20, "malformed": 200}, "refused_total": 220,
            "accepted_from_outsider": 0, "nodes_dead": [], "nodes_unresponsive": []}
    window = FaultWindow("forge", "outsider+malformed", "x", 1.5, 2.5, hosts=[1, 2, 3], info=info).to_json()
    _write_run(tmp_path / "good", cfg, {"keys": ["r/0"]}, [window], recs)
    summary = analyze(tmp_path / "good")
    assert summary["forge"]["valid"] is True and summary["forge"]["refused_total"] == 220, summary["forge"]
    assert summary["verdict"] == "valid"
    bad_read = [*recs[:3], _op(4, "get", "r/0", None, "FORGED", 4.0, 5.0), recs[3]]
    _write_run(tmp_path / "read", cfg, {"keys": ["r/0"]}, [window], bad_read)
    summary = analyze(tmp_path / "read")
    assert summary["verdict"] == "invalid" and summary["forge"]["forged_reads"] == 1
    assert any(r.startswith("forge: 1 read(s) returned the forged value") for r in summary["analysis"]["reasons"])
    dead = {**window, "info": {**info, "nodes_dead": [2], "accepted_from_outsider": 3}}
    _write_run(tmp_path / "dead", cfg, {"keys": ["r/0"]}, [dead], recs)
    reasons = analyze(tmp_path / "dead")["forge"]["reasons"]
    assert any("not refused" in r for r in reasons) and any("dead on hosts [2]" in r for r in reasons), reasons


def test_forge_healthy_throughput_counts_only_faulted_time_inside_the_fault_period(tmp_path: Path) -> None:
    """A fault that outlasts fault_until (a member replacement) or overlaps another is subtracted
    from the healthy time only where it lies inside [first fault, fault_until], once."""
    from chaos.runner import RunConfig, analyze

    cfg = RunConfig(time=10, nemesis=["forge", "member"], run_id="t")
    recs = [_op(1, "put", "r/0", f"v{i}", None, t, t + 0.1) for i, t in enumerate([1.2, 2.5, 3.5, 4.5])]
    recs.append(_op(2, "get", "r/0", None, "v3", 9.0, 9.5, final=True))
    info = {"forged_messages": 10, "forged_rpcs": 2, "outsider_codes": {"PERMISSION_DENIED": 2},
            "member_codes": {}, "refused": {"not_member": 2}, "refused_total": 2,
            "accepted_from_outsider": 0, "nodes_dead": [], "nodes_unresponsive": []}
    forge = FaultWindow("forge", "outsider+malformed", "x", 1.0, 2.0, hosts=[1, 2, 3], info=info).to_json()
    member = FaultWindow("member", "replace", "x", 5.0, 30.0, hosts=[3]).to_json()
    inner = FaultWindow("pause", "one", "x", 5.5, 6.0, hosts=[2]).to_json()
    _write_run(tmp_path / "r", cfg, {"keys": ["r/0"], "fault_until": 8.0}, [forge, member, inner], recs)
    f = analyze(tmp_path / "r")["forge"]
    # healthy: [1, 8] minus [1, 2] and [5, 8] = 3 s with 3 ok operations
    assert f["ok_per_s_healthy"] == 1.0 and f["ok_per_s_forge"] == 1.0, f


def test_forge_check_under_tls_needs_every_outsider_refused_and_none_answered(tmp_path: Path) -> None:
    from chaos.forge import TLS_CASES
    from chaos.runner import RunConfig, analyze

    cfg = RunConfig(time=6, nemesis=["forge"], run_id="t", tls=True)
    recs = [
        _op(1, "put", "r/0", "a", None, 0.0, 1.0),
        _op(2, "get", "r/0", None, "a", 2.0, 2.2),
        _op(2, "get", "r/0", None, "a", 3.5, 4.0),
        _op(3, "get", "r/0", None, "a", 6.0, 7.0, final=True),
    ]
    tls = {"no_cert": {"HANDSHAKE_FAILED": 30}, "other_ca": {"HANDSHAKE_FAILED": 25, "UNAUTHENTICATED": 5},
           "client_cert": {"PERMISSION_DENIED": 10}, "wrong_node": {"PERMISSION_DENIED": 9, "UNAVAILABLE": 1}}
    info = {"forged_messages": 500, "forged_rpcs": 80, "rounds": 5, "outsider_codes": {"PERMISSION_DENIED": 20},
            "member_codes": {"OK": 20}, "refused": {"identity": 19}, "refused_total": 19,
            "accepted_from_outsider": 0, "nodes_dead": [], "nodes_unresponsive": [], "tls": tls,
            "tls_refused": {"no_cert": 30, "other_ca": 30, "client_cert": 10, "wrong_node": 9},
            "handshakes_failed": 55, "not_refused": 0}
    window = FaultWindow("forge", "outsider+malformed", "x", 1.5, 2.5, hosts=[1, 2, 3], info=info).to_json()
    _write_run(tmp_path / "good", cfg, {"keys": ["r/0"]}, [window], recs)
    summary = analyze(tmp_path / "good")
    fg = summary["forge"]
    assert summary["verdict"] == "valid" and fg["valid"] is True, fg
    assert fg["tls_refused"] == {"client_cert": 10, "no_cert": 30, "other_ca": 30, "wrong_node": 9}
    assert fg["handshakes_failed"] == 55 and fg["tls_codes"]["other_ca"]["UNAUTHENTICATED"] == 5
    # a forged call over TLS that was answered makes the run invalid
    answered = {**window, "info": {**info, "not_refused": 2, "not_refused_detail": ["wrong_node: Raft.Send: OK: "]}}
    _write_run(tmp_path / "answered", cfg, {"keys": ["r/0"]}, [answered], recs)
    summary = analyze(tmp_path / "answered")
    assert summary["verdict"] == "invalid"
    assert any("2 forged call(s) over TLS were not refused" in r for r in summary["analysis"]["reasons"])
    # an outsider that was never refused proved nothing: invalid too
    for case in TLS_CASES:
        idle = {**window, "info": {**info, "tls_refused": {c: n for c, n in info["tls_refused"].items()  # type: ignore[attr-defined]
                                                             if c != case}}}
        _write_run(tmp_path / case, cfg, {"keys": ["r/0"]}, [idle], recs)
        reasons = analyze(tmp_path / case)["forge"]["reasons"]
        assert any(f"['{case}'] were never refused" in r for r in reasons), reasons
    # a plaintext run does not ask for TLS refusals
    plain = RunConfig(time=6, nemesis=["forge"], run_id="t")
    bare = {**window, "info": {k: v for k, v in info.items() if not k.startswith(("tls", "handshakes", "not_"))}}
    _write_run(tmp_path / "plain", plain, {"keys": ["r/0"]}, [bare], recs)
    assert analyze(tmp_path / "plain")["forge"]["valid"] is True


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(["no_cert", "client_cert", "wrong_node", "other_ca"]),
       code=st.one_of(st.sampled_from([c.name for c in grpc.StatusCode] + ["HANDSHAKE_FAILED", "OK_INSTALLED"]),
                      st.text(max_size=30)),
       internal=st.booleans())
def test_tls_outcome_never_counts_an_answer_as_a_refusal(case: str, code: str, internal: bool) -> None:
    """Whatever a forged call over TLS ends with, it is refused only by the handshake or a
    refusal status its case allows; an answer (OK, or an error from past the identity check) is
    never a refusal; a call that got no answer is unreached."""
    from chaos.forge import outcome

    if not internal and case in ("client_cert", "wrong_node"):
        with pytest.raises(ValueError):
            outcome(case, code, internal=internal)
        return
    o = outcome(case, code, internal=internal)
    assert o in ("refused", "unreached", "not_refused")
    if code.startswith("OK") or code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "INTERNAL", "UNKNOWN"):
        assert o == "not_refused"
    if o == "refused":
        allowed = {"PERMISSION_DENIED"} if case in ("client_cert", "wrong_node") else (
            {"HANDSHAKE_FAILED", "UNAUTHENTICATED", "PERMISSION_DENIED"} if internal
            else {"HANDSHAKE_FAILED", "UNAUTHENTICATED"})
        assert code in allowed
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"):
        assert o == "unreached"
    if code == "PERMISSION_DENIED" and not internal:
        assert o == "not_refused"  # a client RPC is refused by authentication, not authorization
    with pytest.raises(ValueError):
        outcome("no_such_case", code, internal=internal)


def test_run_pki_makes_one_node_certificate_per_node_and_a_separate_ca(tmp_path: Path) -> None:
    from cryptography import x509

    from chaos.pki import ADMIN_USER, FORGER_USER, WORKLOAD_USER, RunPki
    from kvstore.security import tls as ktls

    pki = RunPki.create(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(pki.ca_cert)
    for user in (WORKLOAD_USER, ADMIN_USER, FORGER_USER):
        cert = x509.load_pem_x509_certificate((pki.root / f"client.{user}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        ident = ktls.identity_of(cert)
        assert ident.user == user and not ident.is_node
    d = pki.node_dir(4, "10.77.3.2")
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "node.crt", "node.key"]  # never the CA key
    node = x509.load_pem_x509_certificate((d / "node.crt").read_bytes())
    node.verify_directly_issued_by(ca)
    ident = ktls.identity_of(node)
    assert ident.is_node and ident.node_ids == {4} and ident.hosts == {"10.77.3.2"}
    ktls.NodeCerts.load(d, 4)  # what `kvstore serve --certs-dir` checks
    first = (d / "node.crt").read_bytes()
    assert RunPki.create(pki.root).node_dir(4, "10.77.3.2") == d and (d / "node.crt").read_bytes() == first
    pki.other_node(4, "10.77.3.2")  # another CA's forgery of node 4: not signed by the run's CA
    other = x509.load_pem_x509_certificate((pki.root / "other-ca" / "n4" / "node.crt").read_bytes())
    assert ktls.identity_of(other).node_ids == {4}
    with pytest.raises(Exception):  # noqa: B017 - cryptography raises InvalidSignature or ValueError
        other.verify_directly_issued_by(ca)


@pytest.fixture(scope="module")
def stale_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("the netns backend needs root")
    out = tmp_path_factory.mktemp("stale")
    reg = tmp_path_factory.mktemp("registry")
    code, text = kvchaos(
        ["run", "--nodes", "3", "--time", "12", "--nemesis", "partition", "--workload", "register",
         "--seed", "1", "--stale-reads", "--fault-min", "3", "--fault-max", "4", "--out", str(out)],
        env={"KVCHAOS_REGISTRY": str(reg)},
    )
    return code, text, run_dir_of(out), reg


@needs_root
def test_planted_stale_reads_make_the_run_invalid(stale_run: tuple[int, str, Path, Path]) -> None:
    code, text, d, reg = stale_run
    assert text.strip().splitlines()[-1] == "verdict: invalid", text[-4000:]
    assert code == 1
    summary = json.loads((d / "summary.json").read_text())
    a = summary["analysis"]
    assert a["linearizability"]["verdict"] == "not linearizable"
    assert a["bad_key"] and a["counterexample"]
    page = (d / "index.html").read_text()
    assert "is not linearizable" in page
    assert 'class="timeline"' in page and 'class="op bad"' in page
    # every operation of the counterexample is listed, and a read served by one node's local
    # state (the planted bug) is among them
    import html

    for op in a["counterexample"]:
        assert html.escape(op, quote=True) in page, op
    assert page.count("<tr class='cx'>") == len(a["counterexample"])
    assert "served by 10.77." in page
    assert_cleaned(d, reg)


@needs_root
def test_report_renders_in_headless_chromium(stale_run: tuple[int, str, Path, Path], tmp_path: Path) -> None:
    _code, _text, d, _reg = stale_run
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([*base, "--window-size=1200,1600", f"--screenshot={shot}", (d / "index.html").as_uri()],
                   capture_output=True, timeout=90, check=False)
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run([*base, "--dump-dom", (d / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=90, check=False).stdout
    assert 'id="verdict"' in dom and ">invalid<" in dom
    assert dom.count("<svg") >= 3  # throughput, latency, timeline


@needs_root
def test_netns_replica_reads_stay_linearizable_under_partitions(tmp_path: Path) -> None:
    """3 voters + 2 read replicas; gets through the replicas at linearizable, partitions that cut
    the replicas off and partitions of the voters: valid; a cut-off replica refuses."""
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--nodes", "3", "--learners", "2", "--time", "45", "--nemesis",
                          "replicas,partition,kill", "--workload", "replicas", "--seed", "11", "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    d = run_dir_of(out)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["analysis"]["counts"]["ok"] > 500, summary["analysis"]["counts"]
    assert "replicas" in {f["family"] for f in summary["faults"]}, summary["faults"]
    from chaos.runner import load_ops

    ops = load_ops(d / "ops.jsonl")
    learners = {summary["execution"]["nodes"][h]["address"] for h in ("4", "5")}
    gets = [r for r in ops if r.f == "get" and not r.final]
    pinned_ok = [r for r in gets if r.node in learners and r.status == "ok"]
    routed_by_learner = [r for r in gets if r.node in ("node 4", "node 5") and r.status == "ok"]
    refused = [r for r in gets if r.node in learners and r.status == "fail" and "StaleReplica" in (r.error or "")]
    assert len(pinned_ok) > 100 and len(routed_by_learner) > 100, (len(pinned_ok), len(routed_by_learner))
    # a replica cut off from the leader refused linearizable reads (never answered them stale)
    windows = [(f["start"], f["end"]) for f in summary["faults"] if f["family"] == "replicas"]
    assert any(any(a <= r.invoke <= b for a, b in windows) for r in refused), len(refused)
    assert_cleaned(d)
    assert node_pids_of(d) == []


@needs_root
def test_netns_stale_replica_reads_are_invalid_but_report_honest_staleness(tmp_path: Path) -> None:
    """The same workload at `stale` while the replicas are cut off: the checker must see the stale
    reads (invalid), and every read must still be within the staleness bound it reported."""
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--nodes", "3", "--time", "12", "--nemesis", "replicas", "--workload", "replicas",
                          "--read-consistency", "stale", "--seed", "1", "--fault-min", "3", "--fault-max", "4",
                          "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: invalid", text[-4000:]
    assert code == 1
    d = run_dir_of(out)
    a = json.loads((d / "summary.json").read_text())["analysis"]
    assert a["linearizability"]["verdict"] == "not linearizable"
    st = a["staleness"]
    # Every bound reported held (`valid`). A replica answers "unknown" (null) until its first
    # probe of a life is answered, which is honest; how many reads land in that window depends
    # on the machine's load, so only a small share is allowed.
    assert st["valid"] is True and st["reads"] > 200 and st["unknown_bound"] <= st["reads"] // 20, st
    assert st["max_bound"] >= 2.0, st  # the bound grew with the partition
    assert not any("staleness" in r for r in a["reasons"]), a["reasons"]
    assert_cleaned(d)


@needs_root
def test_clean_removes_what_a_crashed_harness_left(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos.cli", "run", "--nodes", "3", "--time", "60", "--nemesis", "partition",
         "--out", str(out), "--seed", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        d: Path | None = None
        while time.monotonic() < deadline:
            dirs = [p for p in out.iterdir()] if out.exists() else []
            if dirs and (dirs[0] / "state.json").exists():
                d = dirs[0]
                data = RunState(d / "state.json").read()
                if len(data.get("pids") or {}) >= 4 and (d / "nodes" / "n3.log").exists():
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("the run did not start its nodes")
        assert d is not None
        time.sleep(3)  # let the nemesis cut something
        data = RunState(d / "state.json").read()
        assert all(netns.namespace_exists(ns) for ns in data["namespaces"])
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the harness dies: no teardown runs
        proc.wait(10)
    assert node_pids_of(d), "the nodes should outlive the killed harness"
    code, text = kvchaos(["clean", "--all-stale"])
    assert code == 0, text
    assert "deleted namespace" in text
    assert_cleaned(d)
    assert node_pids_of(d) == []
    # idempotent
    code, text = kvchaos(["clean", str(d)])
    assert code == 0 and "nothing left" in text, text


def test_local_backend_kill_and_pause_is_valid(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--backend", "local", "--nodes", "3", "--time", "10", "--nemesis", "kill,pause",
                          "--workload", "bank1", "--seed", "3", "--watchers", "3", "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: valid", text[-4000:]
    assert code == 0
    d = run_dir_of(out)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["analysis"]["bank"]["valid"] is True
    assert summary["analysis"]["bank"]["reads"] > 50
    wt = summary["watch"]  # every transfer's cas seen by the watchers of every key and of b/
    assert wt["checked"] is True and wt["valid"] is True and wt["ended"] == {"stopped": 3}, wt
    assert wt["events"] > 50 and wt["acked_checked"] > 50, wt
    assert node_pids_of(d) == []


def test_planted_watch_bug_makes_a_local_run_invalid(tmp_path: Path) -> None:
    """Nodes that drop an event from a watch response now and then (the hidden
    --plant-watch-bug): the history stays linearizable, the watch checks make the run invalid."""
    out = tmp_path / "runs"
    code, text = kvchaos(["run", "--backend", "local", "--nodes", "3", "--time", "6", "--nemesis", "pause",
                          "--workload", "register", "--seed", "4", "--watchers", "3", "--plant-watch-bug", "drop",
                          "--out", str(out)])
    assert text.strip().splitlines()[-1] == "verdict: invalid", text[-4000:]
    assert code == 1
    d = run_dir_of(out)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["analysis"]["linearizability"]["verdict"] == "linearizable"
    wt = summary["watch"]
    assert wt["valid"] is False and wt["planted"] == "drop", wt
    assert set(wt["violations"]) <= {"reliable", "atomic"} and wt["violations"].get("reliable"), wt
    assert any(r.startswith("watch: reliable:") for r in summary["analysis"]["reasons"]), summary["analysis"]["reasons"]
    assert "PLANTED WATCH BUG 'drop'" in (d / "nodes" / "n1.log").read_text()
    assert node_pids_of(d) == []


def test_run_help_explains_local_partitions() -> None:
    code, text = kvchaos(["run", "--help"])
    assert code == 0
    assert "PAUSES" in text and "netns" in text and "member" in text


# --------------------------------------------------------------------------------------------
# parts


def test_parse_families() -> None:
    assert parse_families("partition,kill") == ["partition", "kill"]
    assert parse_families("all") == list(ALL_FAMILIES)
    assert parse_families("kill,all") == ["kill", *[f for f in ALL_FAMILIES if f != "kill"]]
    with pytest.raises(ValueError):
        parse_families("partition,flood")
    # rebalance is opt-in: `all` keeps meaning the classic faults
    assert "rebalance" not in parse_families("all")
    assert parse_families("rebalance,partition,kill") == ["rebalance", "partition", "kill"]
    assert parse_families("all,rebalance")[-1] == "rebalance"
    assert parse_families("garbage,kill") == ["forge", "kill"]  # an alias
    assert parse_families("forge,garbage") == ["forge"]


def test_rebalance_never_removes_the_last_group() -> None:
    nem = Nemesis(_FakeCluster(3), NemesisOptions(families=["rebalance"], seed=4, max_groups=3),  # type: ignore[arg-type]
                  lambda: 0.0, log=lambda s: None)
    seen = set()
    for _ in range(300):
        kind, g = nem._choose_change([7])
        assert kind in ("add", "rebalance") and g == 0
        kind, g = nem._choose_change([1, 2, 3])  # at max_groups: no add
        assert kind in ("remove", "rebalance")
        assert kind != "remove" or g in (1, 2, 3)
        seen.add(nem._choose_change([1, 2])[0])
    assert seen == {"add", "remove", "rebalance"}


class _FakeCluster:
    def __init__(self, n: int) -> None:
        self.hosts = {h: None for h in range(1, n + 1)}


@pytest.mark.parametrize("n", [3, 5])
def test_partition_topologies(n: int) -> None:
    nem = Nemesis(_FakeCluster(n), NemesisOptions(families=["partition"], seed=1), lambda: 0.0,  # type: ignore[arg-type]
                  log=lambda s: None)
    hosts = set(range(1, n + 1))

    def connected(cuts: set[tuple[int, int]], a: int, b: int) -> bool:
        return (a, b) not in cuts and (b, a) not in cuts

    groups, cuts, _ = nem._topology("halves", None)
    assert len(groups[0]) == n // 2 and set(groups[0]) | set(groups[1]) == hosts
    assert all(not connected(cuts, a, b) for a in groups[0] for b in groups[1])
    groups, cuts, _ = nem._topology("leader", 2)
    assert groups[0] == [2] and all(not connected(cuts, 2, b) for b in hosts - {2})
    groups, cuts, _ = nem._topology("bridge", None)
    a, (b,), c = groups
    assert all(connected(cuts, b, x) for x in hosts - {b})
    assert all(not connected(cuts, x, y) for x in a for y in c)
    _, cuts, _ = nem._topology("ring", None)
    assert cuts
    for h in hosts:  # everybody still sees a majority (itself included)
        assert 1 + sum(connected(cuts, h, o) for o in hosts - {h}) >= n // 2 + 1
    if n == 5:  # and no two nodes see the same majority
        views = {frozenset({h} | {o for o in hosts - {h} if connected(cuts, h, o)}) for h in hosts}
        assert len(views) == 5
    _, cuts, _ = nem._topology("random", None)
    assert cuts


def _op(p: int, f: str, key: str, value: Any, output: Any, t0: float, t1: float | None, status: str = "ok",
        final: bool = False) -> OpRecord:
    return OpRecord(p, f, key, value, output, t0, t1, status, workload="x", final=final)


def test_register_stale_read_is_invalid() -> None:
    recs = [
        _op(1, "put", "r/0", "a", None, 0.0, 1.0),
        _op(2, "put", "r/0", "b", None, 2.0, 3.0),
        _op(3, "get", "r/0", None, "a", 4.0, 5.0),  # reads the old value after b was acknowledged
        _op(4, "get", "r/0", None, "b", 6.0, 7.0, final=True),
    ]
    a = analyze_records(recs, workload="register", expected_final_keys=["r/0"])
    assert a.verdict == "invalid" and a.bad_key == "r/0"
    assert len(a.counterexample) >= 2


def test_stale_read_must_be_within_its_reported_staleness() -> None:
    def recs(bound: float | None) -> list[OpRecord]:
        read = _op(3, "get", "r/0", None, "a", 4.0, 5.0)
        read.consistency, read.staleness = "stale", bound
        return [
            _op(1, "put", "r/0", "a", None, 0.0, 1.0),
            _op(2, "put", "r/0", "b", None, 2.0, 3.0),
            read,  # "a" after "b" was acknowledged: stale
            _op(4, "get", "r/0", None, "b", 6.0, 7.0, final=True),
        ]

    honest = analyze_records(recs(2.5), workload="replicas", expected_final_keys=["r/0"])
    assert honest.linearizability["verdict"] == "not linearizable"  # stale reads are not linearizable
    assert honest.staleness is not None and honest.staleness["valid"] is True
    assert not any("staleness" in r for r in honest.reasons)
    lying = analyze_records(recs(0.5), workload="replicas", expected_final_keys=["r/0"])
    assert lying.staleness is not None and lying.staleness["valid"] is False
    assert any("staler than the bound" in r for r in lying.reasons)
    unknown = analyze_records(recs(None), workload="replicas", expected_final_keys=["r/0"])
    assert unknown.staleness is not None and unknown.staleness["valid"] is True
    assert unknown.staleness["unknown_bound"] == 1


def test_register_info_write_may_take_effect_later() -> None:
    recs = [
        _op(1, "put", "r/0", "a", None, 0.0, 1.0),
        _op(2, "cas", "r/0", ["a", "b"], None, 2.0, 3.0, status="info"),
        _op(3, "get", "r/0", None, "a", 4.0, 5.0),
        _op(4, "get", "r/0", None, "b", 6.0, 7.0, final=True),
    ]
    a = analyze_records(recs, workload="register", expected_final_keys=["r/0"])
    assert a.verdict == "valid", a.reasons


def test_missing_final_read_is_unknown() -> None:
    recs = [_op(1, "put", "r/0", "a", None, 0.0, 1.0)]
    a = analyze_records(recs, workload="register", expected_final_keys=["r/0"])
    assert a.verdict == "unknown"


def test_set_lost_acknowledged_add_is_invalid() -> None:
    recs = [
        _op(1, "put", "s/1-1", "1-1", None, 0.0, 1.0),
        _op(2, "put", "s/2-2", "2-2", None, 0.0, 1.0),
        _op(3, "put", "s/3-3", "3-3", None, 0.0, None, status="info"),
        _op(9, "scan", "s/", "s/", {"s/1-1": "1-1"}, 5.0, 6.0, final=True),
    ]
    a = analyze_records(recs, workload="set")
    assert a.verdict == "invalid"
    assert a.set is not None and a.set["lost"] == ["2-2"]
    # the final scan is also a read of every key: the lost add is a linearizability violation too
    ops = to_operations(recs)
    gets = [o for o in ops if o.f == "get"]
    assert {o.key for o in gets} == {"s/1-1", "s/2-2", "s/3-3"}
    assert all(o.status is Status.OK for o in gets)
    recs[-1] = _op(9, "scan", "s/", "s/", {"s/1-1": "1-1", "s/2-2": "2-2"}, 5.0, 6.0, final=True)
    assert analyze_records(recs, workload="set").verdict == "valid"


def test_bank_total_must_be_conserved() -> None:
    good = bank_value("init", [100, 100])
    bad = bank_value("1-1", [100, 90])
    recs = [
        _op(1, "cas", "b/0", [None, good], True, 0.0, 1.0),
        _op(2, "cas", "b/0", [good, bad], True, 2.0, 3.0),
        _op(3, "get", "b/0", None, bad, 4.0, 5.0, final=True),
    ]
    a = analyze_records(recs, workload="bank1", bank_total=200, bank_accounts=2, expected_final_keys=["b/0"])
    assert a.verdict == "invalid" and a.bank is not None and a.bank["bad_count"] == 1


def test_wait_moves_settled_is_bounded_and_reports_stuck_moves() -> None:
    import asyncio

    from kvstore.v1 import shard_pb2

    nem = Nemesis(_FakeCluster(3), NemesisOptions(families=["rebalance"]), lambda: 0.0,  # type: ignore[arg-type]
                  log=lambda s: None)
    answers = [
        {1: shard_pb2.ShardOpResponse(version=7, moves_pending=0,  # a node with an old map
                                      groups=[shard_pb2.GroupInfo(id=1, share=1.0)]),
         2: shard_pb2.ShardOpResponse(version=9, moves_pending=2, message="move 3: group 2 -> 5 (frozen)",
                                      groups=[shard_pb2.GroupInfo(id=1, share=0.5), shard_pb2.GroupInfo(id=5, share=0.5)])},
    ]

    async def infos(timeout: float = 4.0) -> dict[int, shard_pb2.ShardOpResponse]:
        return answers[-1]

    nem.shard_infos = infos  # type: ignore[method-assign]
    t0 = time.monotonic()
    out = asyncio.run(nem.wait_moves_settled(1.0))
    assert time.monotonic() - t0 < 5
    assert out["settled"] is False and out["moves_pending"] == 2 and out["version"] == 9  # the newest map
    assert nem.windows[-1].family == "heal" and nem.windows[-1].kind == "moves" and not nem.windows[-1].ok
    # a removed group still in the map (serving nothing) is not settled either
    answers.append({1: shard_pb2.ShardOpResponse(version=10, groups=[shard_pb2.GroupInfo(id=1, share=1.0),
                                                                       shard_pb2.GroupInfo(id=5, share=0.0)])})
    out = asyncio.run(nem.wait_moves_settled(0.6))
    assert out["settled"] is False and out["awaiting_drop"] == [5]
    answers.append({3: shard_pb2.ShardOpResponse(version=11, groups=[shard_pb2.GroupInfo(id=1, share=1.0)])})
    out = asyncio.run(nem.wait_moves_settled(5.0))
    assert out["settled"] is True and out["polls"] == 1 and nem.windows[-1].ok


def _write_run(d: Path, cfg: Any, execution: dict[str, Any], faults: list[dict[str, Any]],
               recs: list[OpRecord]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    (d / "execution.json").write_text(json.dumps(execution))
    (d / "faults.json").write_text(json.dumps(faults))
    (d / "ops.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in recs))


def test_moves_that_never_finish_fail_the_run_as_liveness(tmp_path: Path) -> None:
    from chaos.runner import RunConfig, analyze

    cfg = RunConfig(time=6, nemesis=["rebalance", "kill"], groups=4, run_id="t")
    recs = [
        _op(1, "put", "r/0", "a", None, 0.0, 1.0),
        _op(2, "get", "r/0", None, "a", 2.0, 3.0),
        _op(3, "get", "r/0", None, "a", 6.0, 7.0, final=True),
    ]
    change = FaultWindow("rebalance", "add", "add a data group to [1, 2, 3, 4]", 1.0, 4.0, hosts=[2],
                         info={"planned_moves": 4, "pending_at_heal": 3}).to_json()
    stuck = {"settled": False, "waited": 60.0, "timeout": 60.0, "moves_pending": 2, "version": 9,
             "groups": [], "awaiting_drop": [], "message": "move 3: group 2 -> 5 (frozen)"}
    _write_run(tmp_path / "stuck", cfg, {"keys": ["r/0"], "shards": stuck}, [change], recs)
    summary = analyze(tmp_path / "stuck")
    assert summary["verdict"] == "invalid"
    assert summary["analysis"]["linearizability"]["verdict"] == "linearizable"  # judged apart
    lv = summary["liveness"]
    assert lv["valid"] is False and lv["moves_planned"] == 4 and lv["changes_with_moves_pending_at_fault_heal"] == 1
    assert any(r.startswith("liveness: range moves did not finish") for r in summary["analysis"]["reasons"])
    assert "liveness: range moves did not finish" in (tmp_path / "stuck" / "index.html").read_text()

    _write_run(tmp_path / "done", cfg, {"keys": ["r/0"], "shards": {**stuck, "settled": True, "moves_pending": 0}},
               [change], recs)
    summary = analyze(tmp_path / "done")
    assert summary["verdict"] == "valid" and summary["liveness"]["valid"] is True

    _write_run(tmp_path / "unchecked", cfg, {"keys": ["r/0"]}, [change], recs)
    assert analyze(tmp_path / "unchecked")["verdict"] == "unknown"

    # an unsharded run without the rebalance nemesis has nothing to check
    plain = RunConfig(time=6, nemesis=["kill"], run_id="t")
    _write_run(tmp_path / "plain", plain, {"keys": ["r/0"]}, [], recs)
    summary = analyze(tmp_path / "plain")
    assert summary["verdict"] == "valid" and summary["liveness"]["checked"] is False


def test_report_of_a_synthetic_violation(tmp_path: Path) -> None:
    from chaos.report import write_report
    from chaos.runner import RunConfig

    recs = [
        _op(1, "put", "r/0", "a", None, 0.0, 1.0),
        _op(2, "put", "r/0", "b", None, 2.0, 3.0),
        _op(3, "get", "r/0", None, "a", 4.0, 5.0),
    ]
    recs[2].node = "10.77.1.1:2379"
    a = analyze_records(recs, workload="register")
    faults = [{"family": "partition", "kind": "one", "detail": "[1] | [2, 3]", "start": 1.5, "end": 4.5}]
    page = write_report(tmp_path, RunConfig(time=6), recs, faults, a, {}).read_text()
    assert "Key r/0 is not linearizable" in page
    assert "served by 10.77.1.1:2379" in page
    assert "partition one" in page
    assert page.count('class="fault"') == 2  # shaded in both plots


def test_a_call_grpc_broke_under_the_client_is_unreached_and_any_other_internal_is_not_refused() -> None:
    """gRPC's "Internal error from Core" (the client's library ended a client-streaming call the
    server had already finished, e.g. refused) carries no answer: unreached, never a refusal.
    Any other INTERNAL came from the server: not refused."""
    import grpc
    from grpc.aio import AioRpcError, Metadata

    from chaos.forge import _code, outcome

    broke = AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(), details="Internal error from Core")
    server = AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(), details="boom")
    assert outcome("wrong_node", _code(broke), internal=True) == "unreached"
    assert outcome("wrong_node", _code(server), internal=True) == "not_refused"


def test_a_watch_violation_makes_the_run_invalid_and_no_watch_record_unknown(tmp_path: Path) -> None:
    """`analyze` judges the watchers' histories (chaos.watchcheck) with the rest: a watcher that
    missed an acknowledged write makes a linearizable run invalid; a run with watchers but no
    watches.jsonl is unknown."""
    from chaos.runner import RunConfig, analyze
    from chaos.watchcheck import KeyRange, WatchBatchRecord, WatcherLog, WatchEventRecord
    from chaos.watchers import write_records

    cfg = RunConfig(time=6, nemesis=["kill"], run_id="t", watchers=1)
    recs = [
        _op(1, "put", "r/0", "a", None, 0.0, 1.0),
        _op(2, "put", "r/0", "b", None, 2.0, 3.0),
        _op(3, "get", "r/0", None, "b", 6.0, 7.0, final=True),
    ]
    recs[0].revision, recs[1].revision = 10, 20
    execution = {"keys": ["r/0"], "watch": {"end_revision": 20, "waited": 0.1}}
    put_a = WatchEventRecord("PUT", "r/0", "a", 10, 10, 1)
    put_b = WatchEventRecord("PUT", "r/0", "b", 20, 10, 2)
    for name, events in (("good", [put_a, put_b]), ("missed", [put_a])):
        d = tmp_path / name
        _write_run(d, cfg, execution, [], recs)
        log = WatcherLog(0, KeyRange("r/", "r0"), 0, False,
                         [WatchBatchRecord(9, []), *(WatchBatchRecord(e.revision, [e]) for e in events),
                          WatchBatchRecord(25, [])], 1, "stopped")
        write_records(d / "watches.jsonl", [log])
    summary = analyze(tmp_path / "good")
    assert summary["verdict"] == "valid", summary["analysis"]["reasons"]
    assert summary["watch"]["valid"] is True and summary["watch"]["acked_checked"] == 2
    summary = analyze(tmp_path / "missed")
    assert summary["verdict"] == "invalid"
    assert summary["analysis"]["linearizability"]["verdict"] == "linearizable"  # judged apart
    assert summary["watch"]["violations"] == {"reliable": 1}
    assert any(r.startswith("watch: reliable:") and "at 20 missing" in r for r in summary["analysis"]["reasons"])
    page = (tmp_path / "missed" / "index.html").read_text()
    assert "id='watch'" in page and "at 20 missing" in page
    (tmp_path / "missed" / "watches.jsonl").unlink()
    summary = analyze(tmp_path / "missed")
    assert summary["verdict"] == "unknown" and summary["watch"]["valid"] is None
