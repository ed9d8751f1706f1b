"""etcd's v3 API on a kvstore cluster (3 nodes, 2 data groups; README "etcd compatibility"; also
3 nodes with 2 groups of 2 replicas and 5 nodes with 4 groups of 3, where nodes lack groups),
driven by the real `etcdctl` 3.4 and by python-etcd3, and differentially against a real etcd
started on loopback: the same commands, the same output once normalised; each command of the
KV differential scripts is also checked to exercise what it names (`_exercised`: an answer, an
empty answer, or the server's error), so a case whose input etcdctl refuses, or whose
transaction runs an empty branch, fails instead of comparing two equal non-answers.

Normalised (`_norm`): revisions (each replaced by its rank among the revisions the script's own
writes got, in order: kvstore's revisions are clock values, etcd's a counter), header fields
(`cluster_id`, `member_id`, `raft_term`, `revision`) and lease ids (replaced by `LEASE`); in the
Cluster/Maintenance commands also endpoints (`EP`), durations (`T`), member ids (`ID`), and
`endpoint status` is compared by its fields' names (values differ: versions, sizes, indexes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterharness import Cluster

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.timeout(300)


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed (scripts/system-deps.sh installs etcd-server and etcd-client)")
        pytest.skip(f"{binary} is not installed: apt-get install -y etcd-server etcd-client")


@pytest.fixture(scope="module")
def kv_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The module's kvstore cluster (3 nodes, 2 data groups)."""
    c = Cluster(Path(tmp_path_factory.mktemp("etcdkv")), 3, extra_args=["--groups", "2"]).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def kv(kv_cluster: Cluster) -> str:
    """The endpoint etcdctl talks to (node 2: some groups are led elsewhere, so writes are
    forwarded)."""
    return kv_cluster.endpoints[1]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _need("etcd")
    from bench.kvbench.clusters import EtcdCluster

    e = EtcdCluster(Path(tmp_path_factory.mktemp("etcd")), n=1)
    e.start()
    try:
        yield e.endpoints[0]
    finally:
        e.stop()


def ctl(endpoint: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    _need("etcdctl")
    return subprocess.run(
        ["etcdctl", f"--endpoints={endpoint}", "--command-timeout=15s", *args], input=stdin,
        capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"},
    )


def _rev(endpoint: str, key: str, value: str) -> int:
    """Put and return the put's revision (etcdctl -w json: the header's)."""
    p = ctl(endpoint, "put", key, value, "-w", "json")
    assert p.returncode == 0, p.stderr
    return int(json.loads(p.stdout)["header"]["revision"])


REVISION_FIELDS = ("create_revision", "mod_revision", "revision", "compact_revision")


def _norm(text: str, revs: list[int]) -> str:
    """Normalise one command's output (see the module docstring)."""
    rank = {r: f"R{i}" for i, r in enumerate(sorted(set(revs)))}

    def fix(o: Any) -> Any:
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if k in ("header", "Header", "cluster_id", "member_id", "raft_term"):
                    continue
                if k in REVISION_FIELDS and isinstance(v, int):
                    v = rank.get(v, "R?")
                if k in ("lease", "ID") and isinstance(v, int) and v:
                    v = "LEASE"
                out[k] = fix(v)
            return out
        if isinstance(o, list):
            return [fix(x) for x in o]
        return o

    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("{"):
            lines.append(json.dumps(fix(json.loads(s)), sort_keys=True))
        else:
            line = re.sub(r"\b[0-9a-f]{16}\b", "LEASE", line)
            lines.append(re.sub(r"(--rev=|revision |compact )(\d+)",
                                lambda m: m.group(1) + rank.get(int(m.group(2)), "R?"), line))
    return "\n".join(lines)


Script = Callable[[str], list[tuple[str, str]]]


def _differential(kv: str, etcd: str, script: Script) -> None:
    """Run `script` (endpoint -> [(command, output)]) on both and compare the normalised outputs."""
    got = {name: script(ep) for name, ep in (("kvstore", kv), ("etcd", etcd))}
    assert [c for c, _ in got["kvstore"]] == [c for c, _ in got["etcd"]]
    for (cmd, a), (_, b) in zip(got["kvstore"], got["etcd"], strict=True):
        assert a == b, f"{cmd}:\n--- kvstore\n{a}\n--- etcd\n{b}"


ANSWER, EMPTY, ERROR = "answer", "empty", "error"
"""What a differential case's command must do on both stores (`_exercised`)."""


def _exercised(ep: str, args: tuple[str, ...], stdin: str | None, p: subprocess.CompletedProcess[str],
               expect: str) -> None:
    """A case exercises what it names, so a vacuous one fails rather than compare two equal
    non-answers: `ANSWER` exits 0 with output (a `txn`: at least one response on the path taken,
    and etcdctl's txn input is compares, a blank line, success ops, a blank line, failure ops);
    `EMPTY` exits 0 printing nothing; `ERROR` fails with the server's error (`etcdserver: ...`),
    not etcdctl's refusal of its own input (usage, `invalid txn request`)."""
    where = f"{' '.join(args)} {stdin!r} at {ep}:\n{p.stdout}{p.stderr}"
    if expect == ERROR:
        assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("Error: etcdserver: "), where
        return
    assert p.returncode == 0, where
    if expect == EMPTY:
        assert p.stdout == "", where
        return
    assert p.stdout.strip(), where
    if args[0] == "txn":
        if "json" in args:
            assert json.loads(p.stdout).get("responses"), where
        else:  # SUCCESS / FAILURE, then each response after a blank line
            assert p.stdout.strip().splitlines()[1:], where


def _etcd_txn(ep: str, request: Any) -> str:
    """An etcd `Txn` sent over gRPC (what etcdctl 3.4 cannot say, e.g. a Range's count_only in a
    Txn; its txn parser refuses `get --count-only`), as JSON with the proto's field names."""
    import grpc
    from google.protobuf.json_format import MessageToJson

    from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc

    with grpc.insecure_channel(ep) as ch:
        resp = rpc_pb2_grpc.KVStub(ch).Txn(request, timeout=15)
    assert resp.responses, f"a vacuous Txn at {ep}: {resp}"
    return MessageToJson(resp, preserving_proto_field_name=True, indent=None)


def test_kv_commands_answer_as_etcd(kv: str, etcd: str) -> None:
    from kvstore.etcdpb.etcdserverpb import rpc_pb2

    def script(ep: str) -> list[tuple[str, str]]:
        revs = [_rev(ep, "d/a", "1"), _rev(ep, "d/b", "2"), _rev(ep, "d/c", "3"), _rev(ep, "d/b", "22")]
        out: list[tuple[str, str]] = []

        def run(*args: str, stdin: str | None = None, expect: str = ANSWER) -> None:
            p = ctl(ep, *args, stdin=stdin)
            _exercised(ep, args, stdin, p, expect)
            text = p.stdout + (f"\nexit {p.returncode}: {p.stderr.strip().splitlines()[-1]}" if p.returncode else "")
            out.append((_norm(" ".join(args), revs), _norm(text, revs)))

        run("get", "d/", "--prefix")
        run("get", "d/", "--prefix", "--limit", "2", "-w", "json")
        run("get", "d/", "--prefix", "--keys-only")
        run("get", "d/", "--prefix", "--sort-by=VALUE", "--order=DESCEND", "--print-value-only")
        run("get", "d/", "--prefix", "--sort-by=MODIFY", "-w", "json")
        run("get", "d/", "--prefix", "--sort-by=VERSION", "--order=DESCEND", "--limit", "1")
        run("get", "d/a", "d/c")  # a range [d/a, d/c)
        run("get", "d/b", f"--rev={revs[1]}")
        run("get", "d/", "--prefix", f"--rev={revs[2]}", "-w", "json")
        run("get", "d/", "--prefix", "--consistency=s", "--print-value-only")
        run("get", "d/nothing", expect=EMPTY)
        run("put", "d/a", "11", "--prev-kv")
        run("put", "d/b", "--ignore-value", "--prev-kv")
        run("get", "d/b", "-w", "json")  # the same value, version 3
        run("put", "d/nothing", "--ignore-value", expect=ERROR)
        run("txn", stdin='value("d/a") = "11"\nversion("d/b") = "2"\ncreate("d/none") = "0"\n\n'
                         'put d/x xv\nget d/a\ndel d/c\n\nget d/b\n\n')
        run("txn", "-w", "json", stdin='mod("d/a") < "1"\n\nput d/y yv\n\nget d/b\nget d/nothing\n\n')
        # a Mutex.Lock's shape: a leased put and ranges over the prefix in one Txn (both branches)
        granted = ctl(ep, "lease", "grant", "60")
        assert granted.returncode == 0, granted.stderr
        lid = granted.stdout.split()[1]
        lock = (f'create("d/lk") = "0"\n\nput d/lk lv --lease={lid}\nget d/ --prefix --sort-by=CREATE --limit=2\n\n'
                'get d/lk\nget d/ --prefix --sort-by=CREATE --order=DESCEND --limit=1\n\n')
        run("txn", "-w", "json", stdin=lock)
        run("txn", "-w", "json", stdin=lock)  # the key exists: the read-only branch
        run("get", "d/lk", "-w", "json")
        run("txn", "-w", "json", stdin='\nget d/ --prefix --keys-only\nget d/ --prefix --limit=1 --keys-only\n\n\n')
        # count_only ranges in a Txn (etcdctl 3.4's txn has no --count-only: sent over gRPC), read
        # only and after a write into the range (kvstore's Txn with scans: the count at its place)
        count = rpc_pb2.RangeRequest(key=b"d/", range_end=b"d0", count_only=True)
        count_1 = rpc_pb2.RangeRequest(key=b"d/", range_end=b"d0", count_only=True, limit=1)
        req = rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_range=count),
                                          rpc_pb2.RequestOp(request_range=count_1)])
        out.append(("Txn count_only", _norm(_etcd_txn(ep, req), revs)))
        req = rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_range=count),
                                          rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"d/cnt", value=b"n")),
                                          rpc_pb2.RequestOp(request_range=count)])
        got = _etcd_txn(ep, req)
        revs.append(int(json.loads(got)["header"]["revision"]))
        out.append(("Txn count_only, put, count_only", _norm(got, revs)))
        assert [r["response_range"].get("count") for r in json.loads(got)["responses"][::2]] == ["4", "5"], got
        assert ctl(ep, "del", "d/cnt").returncode == 0
        # a read of the written key before its put sees the old value; other groups' keys and ranges after
        run("txn", "-w", "json", stdin='\nget d/a\nput d/a 12\nget d/b\nget d/ --prefix --keys-only\n\n\n')
        # range deletes inside a Txn (kvstore: across every group at the Txn's revision): the counts
        run("txn", stdin='value("d/b") = "22"\n\ndel --prefix d/x\ndel d/y d/z\nput d/n nv\n\nget d/b\n\n')
        run("put", "d/lk", "lv2", f"--lease={lid}", "--prev-kv")
        run("lease", "revoke", lid)
        run("get", "d/", "--prefix")
        run("del", "d/a", "--prev-kv")
        run("del", "d/nothing")
        # ranges, then writes into them, in one Txn (etcd's sequential semantics: a range shows the
        # writes before it, not those after it): kvstore's Txn with scans
        run("txn", "-w", "json", stdin='value("d/b") = "22"\n\nget d/ --prefix --limit=2\nput d/b 33\n'
                                       'get d/ --prefix --keys-only\ndel --prefix d/c\nget d/ --prefix\n\n\n')
        assert '"succeeded": true' in out[-1][1], out[-1]
        run("del", "d/", "--prefix", "--prev-kv", "-w", "json")  # the deleted keys as they were, in key order
        revs += [_rev(ep, "d/s1", "1"), _rev(ep, "d/s2", "2")]
        run("txn", stdin='\nget d/s --prefix\ndel --prefix d/s\nget d/s --prefix\n\n\n')  # get, then del, --prefix
        assert out[-1][1] == "SUCCESS\n\nd/s1\n1\nd/s2\n2\n\n2\n", out[-1]
        revs += [_rev(ep, "d/s1", "3"), _rev(ep, "d/s2", "4")]
        run("txn", "-w", "json", stdin='\ndel d/s1\ndel --prefix d/s --prev-kv\n\n\n')  # prev_kv at its place
        assert '"succeeded": true' in out[-1][1], out[-1]
        run("get", "", "--prefix", "--keys-only", expect=EMPTY)  # every key the script wrote is gone (it runs first)
        return out

    _differential(kv, etcd, script)


def test_txn_lease_compare_with_a_range_answers_as_etcd(kv: str, etcd: str) -> None:
    """A Txn with a range and a Compare of a key's lease (sent over gRPC: etcdctl 3.4 cannot say
    it), answered as etcd: the lease of the key at the Txn's revision (a leased key, a key
    without a lease, an absent key: 0; a key a plain put detached), both outcomes, and a failure
    branch that writes only when the compare fails."""
    from kvstore.etcdpb.etcdserverpb import rpc_pb2

    def script(ep: str) -> list[tuple[str, str]]:
        granted = ctl(ep, "lease", "grant", "60")
        assert granted.returncode == 0, granted.stderr
        lid = int(granted.stdout.split()[1], 16)
        p = ctl(ep, "put", "lq/a", "1", f"--lease={lid:x}", "-w", "json")
        assert p.returncode == 0, p.stderr
        revs = [int(json.loads(p.stdout)["header"]["revision"]), _rev(ep, "lq/b", "2")]
        out: list[tuple[str, str]] = []
        rng = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"lq/", range_end=b"lq0"))

        def txn(name: str, key: bytes, result: int, lease: int, failure: list[rpc_pb2.RequestOp]) -> dict[str, Any]:
            req = rpc_pb2.TxnRequest(compare=[rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.LEASE, result=result,
                                                              lease=lease)],
                                     success=[rng], failure=failure)
            body: dict[str, Any] = json.loads(_etcd_txn(ep, req))
            if any("response_put" in r for r in body["responses"]):
                revs.append(int(body["header"]["revision"]))

            def ints(o: Any) -> Any:  # the proto's JSON spells int64 as strings: _norm ranks ints
                if isinstance(o, dict):
                    return {k: int(v) if k in (*REVISION_FIELDS, "lease") and isinstance(v, str) else ints(v)
                            for k, v in o.items()}
                return [ints(x) for x in o] if isinstance(o, list) else o

            out.append((name, _norm(json.dumps(ints(body)), revs)))
            return body

        get_a = [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"lq/a"))]
        eq, ne = rpc_pb2.Compare.EQUAL, rpc_pb2.Compare.NOT_EQUAL
        assert txn("leased = L", b"lq/a", eq, lid, get_a).get("succeeded")
        assert not txn("leased = L + 1", b"lq/a", eq, lid + 1, get_a).get("succeeded")
        assert not txn("leased = 0", b"lq/a", eq, 0, get_a).get("succeeded")
        assert txn("plain = 0", b"lq/b", eq, 0, get_a).get("succeeded")
        assert txn("absent = 0", b"lq/none", eq, 0, get_a).get("succeeded")
        assert txn("absent != L", b"lq/none", ne, lid, get_a).get("succeeded")
        put = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"lq/w", value=b"w")), rng]
        assert txn("holds: no write", b"lq/a", eq, lid, put).get("succeeded")
        assert not txn("fails: the write", b"lq/a", ne, lid, put).get("succeeded")
        revs.append(_rev(ep, "lq/a", "detached"))
        assert txn("detached = 0", b"lq/a", eq, 0, get_a).get("succeeded")
        assert ctl(ep, "lease", "revoke", f"{lid:x}").returncode == 0
        assert ctl(ep, "del", "lq/", "--prefix").returncode == 0
        return out

    _differential(kv, etcd, script)


def test_put_ignore_lease_answers_as_etcd(kv: str, etcd: str) -> None:
    """Put with --ignore-lease keeps the key's lease (alone, with --ignore-value, with
    --prev-kv), also inside a Txn; a key that does not exist is `key not found` (in a Txn only
    on the path taken); a lease with it is `lease is provided`."""
    def script(ep: str) -> list[tuple[str, str]]:
        granted = ctl(ep, "lease", "grant", "60")
        assert granted.returncode == 0, granted.stderr
        lid = granted.stdout.split()[1]
        revs = [_rev(ep, "il/c", "c1")]
        p = ctl(ep, "put", "il/a", "1", f"--lease={lid}", "-w", "json")
        assert p.returncode == 0, p.stderr
        revs.append(int(json.loads(p.stdout)["header"]["revision"]))
        out: list[tuple[str, str]] = []

        def run(*args: str, stdin: str | None = None, expect: str = ANSWER) -> None:
            p = ctl(ep, *args, stdin=stdin)
            _exercised(ep, args, stdin, p, expect)
            if p.returncode == 0 and args[0] in ("put", "txn") and "json" in args:
                revs.append(int(json.loads(p.stdout)["header"]["revision"]))
            text = p.stdout + (f"\nexit {p.returncode}: {p.stderr.strip().splitlines()[-1]}" if p.returncode else "")
            out.append((_norm(" ".join(args), revs), _norm(text, revs)))

        run("put", "il/a", "2", "--ignore-lease", "--prev-kv", "-w", "json")
        run("get", "il/a", "-w", "json")
        run("put", "il/a", "--ignore-value", "--ignore-lease", "-w", "json")
        run("get", "il/a", "-w", "json")
        run("put", "il/c", "c2", "--ignore-lease", "-w", "json")  # no lease: it stays without one
        run("get", "il/", "--prefix", "-w", "json")
        run("put", "il/none", "x", "--ignore-lease", expect=ERROR)
        run("put", "il/a", "3", "--ignore-lease", f"--lease={lid}", expect=ERROR)
        # inside a Txn (keys of one group): the put keeps the key's value and lease as it applies;
        # an absent key on the path taken fails the whole Txn, one on the other path does not
        run("txn", "-w", "json", stdin='value("il/a") = "2"\n\nput il/a --ignore-value --ignore-lease --prev-kv\n'
                                      'get il/a\n\nget il/a\n\n')
        run("get", "il/a", "-w", "json")
        run("txn", stdin='\nput il/none x --ignore-lease\n\n\n', expect=ERROR)
        run("txn", "-w", "json", stdin='version("il/none") > "0"\n\nput il/none --ignore-value\n\nget il/none\n\n')
        run("lease", "revoke", lid)
        assert ctl(ep, "del", "il/", "--prefix").returncode == 0
        return out

    _differential(kv, etcd, script)


def test_compaction_errors_as_etcd(kv: str, etcd: str) -> None:
    def script(ep: str) -> list[tuple[str, str]]:
        revs = [_rev(ep, "c/a", "1"), _rev(ep, "c/a", "2"), _rev(ep, "c/a", "3")]
        out = []
        for args in (("compact", str(revs[1])), ("get", "c/a", f"--rev={revs[0]}"), ("get", "c/a", f"--rev={revs[2]}"),
                     ("get", "c/a", "--rev=9000000000000000000")):
            p = ctl(ep, *args)
            err = p.stderr.strip().splitlines()[-1] if p.returncode else ""
            out.append((_norm(" ".join(args), revs), _norm(f"{p.stdout}{err}", revs)))
        return out

    _differential(kv, etcd, script)


def _watch(ep: str, done: Callable[[list[str]], bool], *args: str) -> list[str]:
    """The lines `etcdctl watch ARGS` prints until `done(lines)` holds (it runs until killed:
    read on a thread, waited on for at most 30 s, then stopped)."""
    _need("etcdctl")
    p = subprocess.Popen(["etcdctl", f"--endpoints={ep}", "watch", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "ETCDCTL_API": "3"})
    got: list[str] = []
    changed = threading.Condition()

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            with changed:
                got.append(line.rstrip("\n"))
                changed.notify_all()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        with changed:
            changed.wait_for(lambda: done(got), timeout=30)
            return list(got)
    finally:
        p.kill()
        p.wait(10)
        t.join(10)


def _lines(n: int) -> Callable[[list[str]], bool]:
    return lambda got: len(got) >= n


def _events(lines: list[str]) -> list[Any]:
    """Every event of etcdctl's -w json watch lines (responses may batch events differently)."""
    return [ev for line in lines if line.startswith("{") for ev in json.loads(line).get("Events") or []]


def test_watch_answers_as_etcd(kv: str, etcd: str) -> None:
    def script(ep: str) -> list[tuple[str, str]]:
        revs = [_rev(ep, "w/a", "1"), _rev(ep, "w/b", "2"), _rev(ep, "w/a", "3")]
        assert ctl(ep, "del", "w/b").returncode == 0
        out = [
            ("watch --prefix", "\n".join(_watch(ep, _lines(12), "w/", "--prefix", f"--rev={revs[0]}"))),
            ("watch --prev-kv", "\n".join(_watch(ep, _lines(8), "w/a", f"--rev={revs[0]}", "--prev-kv"))),
            ("watch range json", _norm(json.dumps({"Events": _events(_watch(
                ep, lambda got: len(_events(got)) >= 3, "w/a", "w/c", f"--rev={revs[1]}", "-w", "json"))}), revs)),
        ]
        return out

    _differential(kv, etcd, script)


def test_watch_from_the_compact_revision_answers_as_etcd(kv: str, etcd: str) -> None:
    """Compacted at C, a watch from exactly C gets the put at C, then what follows (etcd 3.4's
    `w.minRev < compactRev` refuses only starts below C; compaction keeps the versions at C).
    Without --prev-kv: the node serving the watch may not have applied the compaction yet, and
    the prev_kv of the event at C is there until it has (the hub's unit tests check it is gone)."""
    def script(ep: str) -> list[tuple[str, str]]:
        revs = [_rev(ep, "cc/a", "1"), _rev(ep, "cc/a", "2"), _rev(ep, "cc/a", "3")]
        assert ctl(ep, "compact", str(revs[1])).returncode == 0
        got = _watch(ep, lambda lines: len(_events(lines)) >= 2, "cc/a", f"--rev={revs[1]}", "-w", "json")
        return [("watch --rev=C", _norm(json.dumps({"Events": _events(got)}), revs))]

    _differential(kv, etcd, script)


def test_watch_from_now_and_compacted_on_kvstore(kv: str) -> None:
    """A watch from now sees a later put (put again until one shows: the watch may not be
    created yet when the first goes out); a start revision below the compact revision is
    canceled with etcd's message."""
    p = subprocess.Popen(["etcdctl", f"--endpoints={kv}", "watch", "now/k"], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "ETCDCTL_API": "3"})
    lines: list[str] = []
    changed = threading.Condition()

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            with changed:
                lines.append(line.rstrip("\n"))
                changed.notify_all()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        i = 0
        while True:
            i += 1
            assert ctl(kv, "put", "now/k", f"v{i}").returncode == 0
            with changed:
                if changed.wait_for(lambda: "now/k" in lines, timeout=0.2):
                    break
            assert time.monotonic() < deadline, lines
        assert lines[0] == "PUT" and lines[1] == "now/k", lines
    finally:
        p.kill()
        p.wait(10)
        t.join(10)
    r0 = _rev(kv, "cw/a", "1")
    r1 = _rev(kv, "cw/a", "2")
    assert ctl(kv, "compact", str(r1)).returncode == 0
    lines = _watch(kv, _lines(1), "cw/a", f"--rev={r0}")
    assert lines[:1] == ["watch was canceled (etcdserver: mvcc: required revision has been compacted)"], lines
    # compacted at a delete's revision C, a watch from C gets the delete (kvstore keeps the
    # tombstone at C until the next compaction; etcd's compaction drops it, README "etcd
    # compatibility"), then the put after it
    p = ctl(kv, "del", "cw/a", "-w", "json")
    assert p.returncode == 0, p.stderr
    rd = int(json.loads(p.stdout)["header"]["revision"])
    _rev(kv, "cw/a", "3")
    assert ctl(kv, "compact", str(rd)).returncode == 0
    lines = _watch(kv, _lines(6), "cw/a", f"--rev={rd}")
    assert lines[:6] == ["DELETE", "cw/a", "", "PUT", "cw/a", "3"], lines


def test_lease_commands_answer_as_etcd(kv: str, etcd: str) -> None:
    def script(ep: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []

        def run(*args: str) -> str:
            p = ctl(ep, *args)
            text = p.stdout + (f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1]}" if p.returncode else "")
            out.append((_norm(" ".join(args), []), _norm(text, [])))
            return p.stdout

        lid = run("lease", "grant", "100").split()[1]
        run("put", f"--lease={lid}", "l/a", "1")
        run("put", f"--lease={lid}", "l/b", "2")
        run("lease", "keep-alive", "--once", lid)
        run("get", "l/", "--prefix", "-w", "json")  # the keys' lease (normalised to LEASE)
        listed = ctl(ep, "lease", "list").stdout
        assert lid in listed, listed
        ttl = ctl(ep, "lease", "timetolive", lid, "--keys").stdout
        assert re.fullmatch(rf"lease {lid} granted with TTL\(100s\), remaining\(\d+s\), attached keys\(\[l/[ab] l/[ab]\]\)\n",
                            ttl), ttl
        run("lease", "revoke", lid)
        # kvstore deletes a revoked lease's keys in its home group with the revoke and in the other
        # groups just after it answered (README "Leases"): wait for that, then compare
        deadline = time.monotonic() + 30
        while ctl(ep, "get", "l/", "--prefix").stdout:
            assert time.monotonic() < deadline, "the revoked lease's keys stayed"
            time.sleep(0.05)
        run("get", "l/", "--prefix")
        run("lease", "timetolive", lid)
        run("lease", "revoke", lid)
        run("lease", "keep-alive", "--once", lid)
        run("put", f"--lease={lid}", "l/c", "3")
        return out

    _differential(kv, etcd, script)


ETCD3_SCRIPT = r'''
import json, sys, threading, time
import etcd3
host, port = sys.argv[1].rsplit(":", 1)
c = etcd3.client(host=host, port=int(port), timeout=20)
out = {}
c.put("py/a", "1")
c.put("py/b", "2")
v, meta = c.get("py/a")
out["get"] = [v.decode(), meta.version]
out["prefix"] = [(v.decode(), m.key.decode()) for v, m in c.get_prefix("py/")]
ok, responses = c.transaction(
    compare=[c.transactions.value("py/a") == "1", c.transactions.version("py/b") > 0],
    success=[c.transactions.put("py/a", "10"), c.transactions.get("py/b")],
    failure=[c.transactions.delete("py/a")])
out["txn"] = [ok, [[(v.decode(), m.key.decode()) for v, m in r] if isinstance(r, list) else type(r).__name__
                   for r in responses]]
lease = c.lease(60)
c.put("py/l", "x", lease=lease)
out["lease_keys"] = sorted(k.decode() for k in lease.keys)
out["refresh"] = [r.TTL for r in lease.refresh()]
lease.revoke()
deadline = time.monotonic() + 20  # keys outside the lease's home group go just after the revoke
while c.get("py/l")[0] is not None and time.monotonic() < deadline:
    time.sleep(0.05)
out["after_revoke"] = c.get("py/l")[0]
events, cancel = c.watch_prefix("py/w/")
got = []
def reader():
    for ev in events:
        got.append((type(ev).__name__, ev.key.decode(), ev.value.decode()))
        if type(ev).__name__ == "DeleteEvent":
            break
t = threading.Thread(target=reader, daemon=True)
t.start()
deadline = time.monotonic() + 20
i = 0
while not got and time.monotonic() < deadline:  # the watch may not be created yet: put until seen
    i += 1
    c.put("py/w/k", "v%d" % i)
    time.sleep(0.2)
c.delete("py/w/k")
t.join(20)
cancel()
out["watch_last"] = got[-1] if got else None
out["deleted_prefix"] = c.delete_prefix("py/").deleted
print(json.dumps(out))
'''


ETCD3_VENV = Path(os.environ.get("KVSTORE_ETCD3_VENV", Path.home() / ".cache" / "kvstore" / "etcd3-0.12.0-venv"))
"""Where python-etcd3's virtualenv is kept between runs (made on first use: about 15 s)."""


def _etcd3_venv() -> Path:
    python = ETCD3_VENV / "bin" / "python"
    ok = python.exists() and subprocess.run([str(python), "-c", "import etcd3"], capture_output=True,
                                            env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"},
                                            timeout=60).returncode == 0
    if ok:
        return ETCD3_VENV
    ETCD3_VENV.parent.mkdir(parents=True, exist_ok=True)
    tmp = ETCD3_VENV.with_name(f"{ETCD3_VENV.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=120)
    pip = subprocess.run([str(tmp / "bin" / "pip"), "install", "-q", "etcd3==0.12.0", "protobuf<4"],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.fail(f"cannot install etcd3: {pip.stderr[-2000:]}")
    shutil.rmtree(ETCD3_VENV, ignore_errors=True)
    tmp.rename(ETCD3_VENV)  # only its bin/python is used, which finds its packages wherever it lies
    return ETCD3_VENV


def test_python_etcd3_client(kv: str) -> None:
    """python-etcd3 (a client nobody here wrote) in its own virtualenv (kept between runs:
    `ETCD3_VENV`): its generated code needs protobuf < 4, with the pure-Python protobuf runtime."""
    venv = _etcd3_venv()
    p = subprocess.run([str(venv / "bin" / "python"), "-c", ETCD3_SCRIPT, kv], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["get"] == ["1", 1]
    assert out["prefix"] == [["1", "py/a"], ["2", "py/b"]]
    assert out["txn"] == [True, ["ResponseOp", [["2", "py/b"]]]]  # etcd3 hands a put's response over raw
    assert out["lease_keys"] == ["py/l"] and out["refresh"] == [60]
    assert out["after_revoke"] is None
    assert out["watch_last"] is not None and out["watch_last"][0] == "DeleteEvent" and out["watch_last"][1] == "py/w/k"
    assert out["deleted_prefix"] == 2  # py/a and py/b (py/l went with its lease, py/w/k was deleted)


def _fuzz_requests() -> Any:
    from hypothesis import strategies as st

    from kvstore.etcdpb.authpb import auth_pb2 as authpb
    from kvstore.etcdpb.etcdserverpb import rpc_pb2

    i64 = st.integers(-(2**63), 2**63 - 1)
    keys = st.one_of(st.binary(max_size=8).map(lambda b: b"fz/" + b), st.just(b""),
                     st.sampled_from([4096, 4097]).map(lambda n: b"fz/" + b"k" * n))
    ends = st.one_of(st.just(b""), st.binary(max_size=8).map(lambda b: b"fz/" + b))
    ranges = st.builds(rpc_pb2.RangeRequest, key=keys, range_end=ends, limit=i64, revision=i64,
                       sort_order=st.integers(0, 4), sort_target=st.integers(0, 6), serializable=st.booleans(),
                       keys_only=st.booleans(), count_only=st.booleans(), min_mod_revision=i64)
    puts = st.builds(rpc_pb2.PutRequest, key=keys, value=st.binary(max_size=8), lease=i64, prev_kv=st.booleans(),
                     ignore_value=st.booleans(), ignore_lease=st.booleans())
    deletes = st.builds(rpc_pb2.DeleteRangeRequest, key=keys, range_end=ends, prev_kv=st.booleans())
    compares = st.builds(rpc_pb2.Compare, key=keys, result=st.integers(0, 5), target=st.integers(0, 5),
                         version=i64, mod_revision=i64)
    op = st.one_of(st.builds(rpc_pb2.RequestOp, request_range=ranges), st.builds(rpc_pb2.RequestOp, request_put=puts),
                   st.builds(rpc_pb2.RequestOp, request_delete_range=deletes))
    txns = st.builds(rpc_pb2.TxnRequest, compare=st.lists(compares, max_size=2), success=st.lists(op, max_size=2),
                     failure=st.lists(op, max_size=2))
    grants = st.builds(rpc_pb2.LeaseGrantRequest, TTL=i64, ID=i64)
    ttls = st.builds(rpc_pb2.LeaseTimeToLiveRequest, ID=i64, keys=st.booleans())
    revokes = st.builds(rpc_pb2.LeaseRevokeRequest, ID=i64)
    # Cluster and Maintenance: never a real member's id (1..3) and never one well-formed peer URL,
    # so no request changes the module's cluster
    strangers = st.integers(0, 2**64 - 1).filter(lambda i: i > 3 or i == 0)
    urls = st.one_of(st.text(max_size=30), st.just("http://127.0.0.1:1"), st.just("http://[::1]:2"))
    odd_urls = st.one_of(st.lists(st.text(max_size=30).filter(lambda u: "://" not in u and ":" not in u), max_size=1),
                         st.lists(urls, min_size=2, max_size=3))
    ops = st.one_of(
        st.builds(rpc_pb2.MemberAddRequest, peerURLs=odd_urls, isLearner=st.booleans()),
        st.builds(rpc_pb2.MemberRemoveRequest, ID=strangers),
        st.builds(rpc_pb2.MemberPromoteRequest, ID=strangers),
        st.builds(rpc_pb2.MemberUpdateRequest, ID=st.integers(0, 2**64 - 1), peerURLs=odd_urls),
        st.builds(rpc_pb2.HashKVRequest, revision=i64),
        st.builds(rpc_pb2.AlarmRequest, action=st.integers(0, 5), memberID=st.integers(0, 2**64 - 1),
                  alarm=st.integers(0, 5)),
        st.builds(rpc_pb2.MoveLeaderRequest, targetID=strangers),
        # Auth: reads, logins and changes of roles that do not exist (nothing changes)
        st.builds(rpc_pb2.AuthenticateRequest, name=st.text(max_size=70), password=st.text(max_size=300)),
        st.builds(rpc_pb2.AuthUserGetRequest, name=st.text(max_size=70)),
        st.builds(rpc_pb2.AuthRoleGetRequest, role=st.text(max_size=70)),
        st.builds(rpc_pb2.AuthRoleRevokePermissionRequest, role=st.text(max_size=70), key=st.binary(max_size=8),
                  range_end=st.binary(max_size=8)),
        st.builds(rpc_pb2.AuthRoleGrantPermissionRequest, name=st.text(max_size=8).map(lambda t: "fz-none" + t),
                  perm=st.builds(authpb.Permission, permType=st.integers(0, 5), key=st.binary(max_size=8),
                                 range_end=st.binary(max_size=8))),
    )
    return st.one_of(ranges, puts, deletes, txns, grants, ttls, revokes, ops)


def test_hostile_field_values_get_an_answer_or_a_definite_error(kv: str) -> None:
    """Any field values on KV, Lease, Cluster, Maintenance and Auth: served, or a gRPC status that is not UNKNOWN / INTERNAL
    and says `kvstore-outcome: definite` (nothing happened); the node serves on."""
    import grpc
    from hypothesis import HealthCheck, given, settings

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    methods = {rpc_pb2.RangeRequest: ("KV", "Range"), rpc_pb2.PutRequest: ("KV", "Put"),
               rpc_pb2.DeleteRangeRequest: ("KV", "DeleteRange"), rpc_pb2.TxnRequest: ("KV", "Txn"),
               rpc_pb2.LeaseGrantRequest: ("Lease", "LeaseGrant"),
               rpc_pb2.LeaseTimeToLiveRequest: ("Lease", "LeaseTimeToLive"),
               rpc_pb2.LeaseRevokeRequest: ("Lease", "LeaseRevoke"),
               rpc_pb2.MemberAddRequest: ("Cluster", "MemberAdd"), rpc_pb2.MemberRemoveRequest: ("Cluster", "MemberRemove"),
               rpc_pb2.MemberPromoteRequest: ("Cluster", "MemberPromote"),
               rpc_pb2.MemberUpdateRequest: ("Cluster", "MemberUpdate"),
               rpc_pb2.HashKVRequest: ("Maintenance", "HashKV"), rpc_pb2.AlarmRequest: ("Maintenance", "Alarm"),
               rpc_pb2.MoveLeaderRequest: ("Maintenance", "MoveLeader"),
               rpc_pb2.AuthenticateRequest: ("Auth", "Authenticate"), rpc_pb2.AuthUserGetRequest: ("Auth", "UserGet"),
               rpc_pb2.AuthRoleGetRequest: ("Auth", "RoleGet"),
               rpc_pb2.AuthRoleRevokePermissionRequest: ("Auth", "RoleRevokePermission"),
               rpc_pb2.AuthRoleGrantPermissionRequest: ("Auth", "RoleGrantPermission")}
    with grpc.insecure_channel(kv) as ch:
        stubs = {"KV": rpc_pb2_grpc.KVStub(ch), "Lease": rpc_pb2_grpc.LeaseStub(ch),
                 "Cluster": rpc_pb2_grpc.ClusterStub(ch), "Maintenance": rpc_pb2_grpc.MaintenanceStub(ch),
                 "Auth": rpc_pb2_grpc.AuthStub(ch)}

        @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(req=_fuzz_requests())
        def check(req: Any) -> None:
            svc, name = methods[type(req)]
            try:
                getattr(stubs[svc], name)(req, timeout=30)
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (req, err)
                outcome = dict(err.trailing_metadata() or ()).get("kvstore-outcome")  # type: ignore[attr-defined]
                assert outcome == "definite", (req, code, err.details(), outcome)  # type: ignore[attr-defined]

        check()
        members = stubs["Cluster"].MemberList(rpc_pb2.MemberListRequest(), timeout=30).members
        assert [m.ID for m in members] == [1, 2, 3]
        assert not stubs["Auth"].RoleList(rpc_pb2.AuthRoleListRequest(), timeout=30).roles
        stubs["KV"].Put(rpc_pb2.PutRequest(key=b"fz-after", value=b"ok"), timeout=30)
        assert stubs["KV"].Range(rpc_pb2.RangeRequest(key=b"fz-after"), timeout=30).kvs[0].value == b"ok"


def test_many_watches_on_one_stream_filters_cancel_and_progress(kv: str) -> None:
    """etcd's Watch on one stream: ids 0 and 1 assigned in order, a NOPUT prefix watch with
    prev_kv sees only the DELETE (with the previous value), a key watch sees the PUTs; a progress
    request answers each watch; a cancel is answered canceled; an invalid create is answered
    watch_id -1, created and canceled, and the stream goes on."""
    import queue

    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    start = _rev(kv, "ms/a", "0")
    assert ctl(kv, "put", "ms/a", "1").returncode == 0
    assert ctl(kv, "del", "ms/a").returncode == 0
    reqs: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()

    def requests() -> Iterator[rpc_pb2.WatchRequest]:
        while (r := reqs.get()) is not None:
            yield r

    def create(**kw: Any) -> rpc_pb2.WatchRequest:
        return rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(**kw))

    with grpc.insecure_channel(kv) as ch:
        stream = rpc_pb2_grpc.WatchStub(ch).Watch(requests(), timeout=60)
        reqs.put(create(key=b"ms/", range_end=b"ms0", start_revision=start, prev_kv=True,
                        filters=[rpc_pb2.WatchCreateRequest.NOPUT]))
        reqs.put(create(key=b"ms/a", start_revision=start))
        reqs.put(create(key=b""))  # invalid: no key
        got: dict[int, list[rpc_pb2.WatchResponse]] = {}
        events: dict[int, list[tuple[int, bytes, bytes, bytes]]] = {0: [], 1: []}
        for resp in stream:
            got.setdefault(resp.watch_id, []).append(resp)
            for e in resp.events:
                events[resp.watch_id].append((e.type, e.kv.key, e.kv.value, e.prev_kv.value))
            if len(events[0]) == 1 and len(events[1]) == 3 and -1 in got:
                break
        assert got[0][0].created and got[1][0].created
        assert got[-1][0].created and got[-1][0].canceled and "key is not provided" in got[-1][0].cancel_reason
        assert events[0] == [(1, b"ms/a", b"", b"1")]  # DELETE only, with the value before it
        assert [(t, v) for t, _, v, _ in events[1]] == [(0, b"0"), (0, b"1"), (1, b"")]
        reqs.put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        progressed: set[int] = set()
        for resp in stream:
            if not resp.events and not resp.created and not resp.canceled:
                progressed.add(resp.watch_id)
            if progressed >= {0, 1}:
                break
        reqs.put(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=1)))
        for resp in stream:
            if resp.canceled:
                assert resp.watch_id == 1
                break
        reqs.put(None)
        stream.cancel()


def test_every_node_answers_for_keys_of_groups_it_does_not_host(tmp_path: Path) -> None:
    """3 nodes, 2 groups of 2 replicas each: some node lacks some group. Every node still takes
    puts, gets, deletes and a lease put of every key (sent on to a node hosting its group), and
    ranges over every group."""
    c = Cluster(tmp_path, 3, extra_args=["--groups", "2", "--replication", "2"]).start()
    try:
        c.wait_serving()
        lid = ctl(c.endpoints[0], "lease", "grant", "60").stdout.split()[1]
        for i, ep in enumerate(c.endpoints):
            for k in range(4):
                key = f"ph/{i}/{k}"
                p = ctl(ep, "put", key, f"v{k}") if k else ctl(ep, "put", f"--lease={lid}", key, "v0")
                assert p.returncode == 0, (ep, key, p.stderr)
                g = ctl(ep, "get", key, "--print-value-only")
                assert (g.returncode, g.stdout) == (0, f"v{k}\n"), (ep, key, g.stderr)
            d = ctl(ep, "del", f"ph/{i}/3")
            assert (d.returncode, d.stdout) == (0, "1\n"), (ep, d.stderr)
            assert ctl(ep, "lease", "keep-alive", "--once", lid).returncode == 0
        expect = "".join(f"ph/{i}/{k}\n" for i in range(3) for k in range(3))
        for ep in c.endpoints:  # a range reads the groups this node lacks at a node that has them
            g = ctl(ep, "get", "ph/", "--prefix", "--keys-only")
            assert (g.returncode, g.stdout.replace("\n\n", "\n")) == (0, expect), (ep, g.stderr)
        _maintenance_on_a_partly_hosting_cluster(c, tmp_path, keys=9)
    finally:
        c.stop()


def _maintenance_on_a_partly_hosting_cluster(c: Cluster, tmp_path: Path, keys: int) -> None:
    """Cluster and Maintenance where nodes host different data groups: every node lists the
    same members and the metadata group's leader, answers HashKV over the groups it hosts (nodes
    that host the same groups agree), saves a snapshot of every group (kvctl reads all `keys`),
    and move-leader moves the metadata group and every data group the target votes in."""
    from click.testing import CliRunner

    from kvstore.cli.kvctl import cli as kvctl_cli

    eps = c.endpoints
    hosted = {}
    for nid, n in c.nodes.items():
        st = n.status(timeout=5)
        assert st is not None
        hosted[nid] = frozenset(g.group for g in st.groups)
    lists = {ctl(ep, "member", "list").stdout for ep in eps}
    assert len(lists) == 1 and len(next(iter(lists)).splitlines()) == len(eps)
    leaders = {json.loads(ctl(ep, "endpoint", "status", "-w", "json").stdout)[0]["Status"]["leader"] for ep in eps}
    assert len(leaders) == 1

    def hashes() -> dict[int, int]:
        p = ctl(",".join(eps), "endpoint", "hashkv", "-w", "json")
        assert p.returncode == 0, p.stderr
        return {eps.index(h["Endpoint"]) + 1: h["HashKV"]["hash"] for h in json.loads(p.stdout)}
    deadline = time.monotonic() + 30
    while any(h[a] != h[b] for h in [hashes()] for a in h for b in h if hosted[a] == hosted[b]):
        assert time.monotonic() < deadline, "nodes that host the same groups never agreed"

    lacking = next((nid for nid in hosted if hosted[nid] != max(hosted.values(), key=len)), 1)
    snap = tmp_path / "partial.snap"
    p = ctl(eps[lacking - 1], "snapshot", "save", str(snap))
    assert p.returncode == 0, p.stderr
    r = CliRunner().invoke(kvctl_cli, ["-o", "json", "snapshot", "status", str(snap)])
    assert r.exit_code == 0 and json.loads(r.stdout)["keys"] == keys, r.output

    target = next(nid for nid in hosted if nid != next(iter(leaders)))
    p = ctl(",".join(eps), "move-leader", f"{target:x}")
    assert p.returncode == 0 and "Leadership transferred" in p.stdout, p.stdout + p.stderr
    st = c.nodes[target].status(timeout=5)
    assert st is not None and all(g.leader_id == target for g in st.groups if g.group in hosted[target])


def _ops_norm(text: str, endpoint: str) -> str:
    text = text.replace(endpoint, "EP")
    text = re.sub(r"took = [0-9.]+[a-zµ]+", "took = T", text)
    return re.sub(r"\b(member|Member) [0-9a-f]+\b", r"\1 ID", text)


def test_cluster_and_maintenance_commands(kv_cluster: Cluster, kv: str, etcd: str, tmp_path: Path) -> None:
    """etcdctl's member, endpoint, alarm, defrag, move-leader and snapshot commands (etcd's
    Cluster and Maintenance services) against kvstore, compared with etcd where comparable."""
    def script(ep: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []

        def run(*args: str) -> None:
            p = ctl(ep, *args)
            text = p.stdout + (f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1]}" if p.returncode else "")
            out.append((" ".join(args), _ops_norm(text, ep)))

        run("alarm", "list")
        run("alarm", "disarm")
        run("defrag")
        run("endpoint", "health")
        run("member", "remove", "1234")
        run("member", "promote", "1234")
        run("member", "update", "1234", "--peer-urls=http://127.0.0.1:1")
        status = json.loads(ctl(ep, "endpoint", "status", "-w", "json").stdout)[0]["Status"]
        out.append(("endpoint status fields", " ".join(sorted(k for k in status if k != "header"))))
        snap = tmp_path / f"{'kv' if ep == kv else 'etcd'}.snap"
        p = ctl(ep, "snapshot", "save", str(snap))
        out.append(("snapshot save", f"{p.returncode} {p.stdout.replace(str(snap), 'FILE').strip()}"))
        return out

    ctl(kv, "put", "ops/a", "1")
    _differential(kv, etcd, script)

    # the saved kvstore snapshot is kvstore's backup in etcd's envelope: kvctl reads it
    from click.testing import CliRunner

    from kvstore.cli.kvctl import cli as kvctl_cli

    r = CliRunner().invoke(kvctl_cli, ["-o", "json", "snapshot", "status", str(tmp_path / "kv.snap")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["keys"] >= 1

    eps = kv_cluster.endpoints
    members = json.loads(ctl(kv, "member", "list", "-w", "json").stdout)["members"]
    assert [(m["ID"], m["name"], m["peerURLs"], m.get("isLearner", False)) for m in members] == [
        (i + 1, f"kvstore-{i + 1}", [f"http://{a}"], False) for i, a in enumerate(eps)]

    # every node hosts both groups: their HashKV agrees once each applied the same writes
    def hashes() -> set[str]:
        p = ctl(",".join(eps), "endpoint", "hashkv", "-w", "json")
        assert p.returncode == 0, p.stderr
        return {str(h["HashKV"]["hash"]) for h in json.loads(p.stdout)}
    deadline = time.monotonic() + 30
    while len(hashes()) != 1:
        assert time.monotonic() < deadline, "the replicas' HashKV never agreed"

    # a learner added and removed (never started: it only ever is a learner)
    # (its id drawn at random as etcd's, above hand-numbered ids: not 4, one above the highest)
    p = ctl(kv, "member", "add", "extra", "--peer-urls=http://127.0.0.1:1", "--learner")
    added = re.search(r"Member +([0-9a-f]+) added", p.stdout)
    assert p.returncode == 0 and added is not None, p.stdout + p.stderr
    new = int(added[1], 16)
    from kvstore.server.etcd.ops import NEW_MEMBER_IDS

    assert NEW_MEMBER_IDS[0] <= new < NEW_MEMBER_IDS[1]
    assert (f"{new:x}, started, kvstore-{new}, http://127.0.0.1:1, http://127.0.0.1:1, true"
            in ctl(kv, "member", "list").stdout)
    p = ctl(kv, "member", "add", "again", "--peer-urls=http://127.0.0.1:1")
    assert p.returncode != 0 and "etcdserver: Peer URLs already exists" in p.stderr, p.stderr
    p = ctl(kv, "member", "remove", f"{new:x}")
    assert p.returncode == 0 and re.match(rf"Member +{new:x} removed", p.stdout), p.stdout + p.stderr
    # The endpoint lists the members as it has applied them: a remove it forwarded to the leader
    # returns once the leader applied it, and this endpoint follows when it applies it too.
    deadline = time.monotonic() + 30
    while (ids := [m["ID"] for m in json.loads(ctl(kv, "member", "list", "-w", "json").stdout)["members"]]) != [1, 2, 3]:
        assert time.monotonic() < deadline, ids

    # move-leader: etcdctl sends it to the (metadata group's) leader; every group follows
    leader = json.loads(ctl(kv, "endpoint", "status", "-w", "json").stdout)[0]["Status"]["leader"]
    target = next(i for i in (1, 2, 3) if i != leader)
    p = ctl(",".join(eps), "move-leader", f"{target:x}")
    assert p.returncode == 0 and "Leadership transferred" in p.stdout, p.stdout + p.stderr
    # the reply comes once the transfers were started and the target led; a node's status may
    # still show a group's old leader for a moment: wait for every group to name the target
    deadline = time.monotonic() + 15
    while True:
        st = kv_cluster.nodes[target].status(timeout=5)
        leaders = None if st is None else {g.group: g.leader_id for g in st.groups}
        if leaders == {0: target, 1: target, 2: target}:
            break
        assert time.monotonic() < deadline, f"not every group is led by node {target}: {leaders}"
        time.sleep(0.05)


def test_auth_commands_answer_as_etcd(kv: str, etcd: str) -> None:
    """etcdctl's user / role / auth commands (etcd's Auth service over kvstore's RBAC), a get with
    `--user` (etcd's token metadata), permission denied outside the role's keys and a wrong
    password; a non-root user gets itself and the roles it holds, and permission denied for
    anything else (etcd 3.4's authApplierV3); everything is undone at the end (auth off, users and
    roles deleted)."""
    root, alice = "--user=root:rootpw", "--user=alice:alicepw"

    def script(ep: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []

        def run(*args: str, stdin: str | None = None) -> None:
            p = ctl(ep, *args, stdin=stdin)
            text = p.stdout + (f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1]}" if p.returncode else "")
            out.append((" ".join(args), text))

        try:
            for args in [("user", "add", "root:rootpw"), ("role", "add", "r1"),
                         ("role", "grant-permission", "r1", "readwrite", "au/", "--prefix"),
                         ("user", "add", "alice:alicepw"), ("user", "grant-role", "alice", "r1"), ("auth", "enable"),
                         ("put", "au/x", "1", root), ("get", "au/x", "--user=alice:alicepw"),
                         ("put", "au/y", "2", "--user=alice:alicepw"), ("get", "other", "--user=alice:alicepw"),
                         ("get", "au/x", "--user=alice:wrong"), ("user", "add", "alice:x", root),
                         ("user", "list", root), ("role", "list", root), ("role", "get", "r1", root),
                         ("user", "get", "alice", root), ("user", "get", "root", root), ("user", "get", "nobody", root),
                         # etcd 3.4: a user reads itself and the roles it holds, nothing else
                         ("user", "get", "alice", alice), ("user", "get", "root", alice),
                         ("user", "get", "nobody", alice), ("role", "get", "r1", alice), ("role", "get", "root", alice),
                         ("role", "get", "nosuch", alice), ("user", "list", alice), ("role", "add", "r2", alice),
                         ("role", "revoke-permission", "r1", "au/", "--prefix", root), ("role", "get", "r1", root),
                         ("role", "revoke-permission", "r1", "au/", "--prefix", root),
                         ("user", "revoke-role", "alice", "r1", root)]:
                run(*args)
            run("user", "passwd", "alice", "--interactive=false", root, stdin="alicepw2\n")
            run("get", "au/x", "--user=alice:alicepw2")  # her new password logs in; no role: denied
            # no credentials: etcd's exact refusal on both (INVALID_ARGUMENT "user name is empty")
            p = ctl(ep, "get", "au/x")
            assert p.returncode != 0 and "etcdserver: user name is empty" in p.stderr, p.stderr
            if ep == kv:
                # a token that is not (or no longer) valid: etcd's exact message, which etcd
                # clients match to log in again
                import grpc

                from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

                with grpc.insecure_channel(ep) as ch, pytest.raises(grpc.RpcError) as e:
                    rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"au/x"), metadata=(("token", "kv1.bogus"),),
                                                  timeout=30)
                assert (e.value.code(), e.value.details()) == (  # type: ignore[attr-defined]
                    grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
        finally:
            for args in [("auth", "disable", root), ("user", "delete", "alice"), ("role", "delete", "r1"),
                         ("user", "delete", "root"), ("role", "delete", "root"), ("user", "list"), ("role", "list")]:
                run(*args)
        return out

    _differential(kv, etcd, script)


def test_lock_and_election_services(kv: str) -> None:
    """etcd's v3lockpb.Lock and v3electionpb.Election (what clientv3's `concurrency` users and
    etcd gateways call) over kvstore's recipes: the lock key under NAME/ with the lowest create
    revision holds, its create revision is the fencing token; a second locker gets the lock
    once the first unlocks, with a higher token; a Lock that is canceled removes its key; an
    election's Observe stream follows Proclaim and Resign."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
    from kvstore.etcdpb.v3electionpb import v3election_pb2 as epb
    from kvstore.etcdpb.v3electionpb import v3election_pb2_grpc as epb_grpc
    from kvstore.etcdpb.v3lockpb import v3lock_pb2 as lpb
    from kvstore.etcdpb.v3lockpb import v3lock_pb2_grpc as lpb_grpc

    def until(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    with grpc.insecure_channel(kv) as ch:
        lease, kvs = rpc_pb2_grpc.LeaseStub(ch), rpc_pb2_grpc.KVStub(ch)
        lock, elect = lpb_grpc.LockStub(ch), epb_grpc.ElectionStub(ch)
        l1, l2, l3 = (lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=30).ID for _ in range(3))

        def exists(key: bytes) -> bool:
            return bool(kvs.Range(rpc_pb2.RangeRequest(key=key), timeout=30).kvs)

        first = lock.Lock(lpb.LockRequest(name=b"lk", lease=l1), timeout=30)
        assert first.key == b"lk/%016x" % l1 and first.header.revision > 0
        second = lock.Lock.future(lpb.LockRequest(name=b"lk", lease=l2), timeout=60)
        until(lambda: exists(b"lk/%016x" % l2), "the second locker's key was never put")
        assert not second.done()  # the first still holds: its key is the lowest
        third = lock.Lock.future(lpb.LockRequest(name=b"lk", lease=l3), timeout=60)
        until(lambda: exists(b"lk/%016x" % l3), "the third locker's key was never put")
        third.cancel()
        until(lambda: not exists(b"lk/%016x" % l3), "a canceled Lock left its key")
        lock.Unlock(lpb.UnlockRequest(key=first.key), timeout=30)
        got = second.result(timeout=60)
        assert got.key == b"lk/%016x" % l2 and got.header.revision > first.header.revision  # the fencing token grew
        lock.Unlock(lpb.UnlockRequest(key=got.key), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            lock.Lock(lpb.LockRequest(name=b"lk", lease=0), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == "etcdserver: requested lease not found"

        with pytest.raises(grpc.RpcError) as e:
            elect.Leader(epb.LeaderRequest(name=b"el"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == "election: no leader"
        leader = elect.Campaign(epb.CampaignRequest(name=b"el", lease=l1, value=b"p1"), timeout=30).leader
        assert (leader.name, leader.key, leader.lease) == (b"el", b"el/%016x" % l1, l1) and leader.rev > 0
        observed = elect.Observe(epb.LeaderRequest(name=b"el"), timeout=60)
        assert next(observed).kv.value == b"p1"
        elect.Proclaim(epb.ProclaimRequest(leader=leader, value=b"p2"), timeout=30)
        assert next(observed).kv.value == b"p2"
        assert elect.Leader(epb.LeaderRequest(name=b"el"), timeout=30).kv.value == b"p2"
        with pytest.raises(grpc.RpcError) as e:
            stale = epb.LeaderKey(name=b"el", key=leader.key, rev=leader.rev - 1, lease=l1)
            elect.Proclaim(epb.ProclaimRequest(leader=stale, value=b"no"), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and e.value.details() == "election: not leader"
        follower = elect.Campaign.future(epb.CampaignRequest(name=b"el", lease=l2, value=b"q"), timeout=60)
        until(lambda: exists(b"el/%016x" % l2), "the second candidate's key was never put")
        elect.Resign(epb.ResignRequest(leader=leader), timeout=30)
        nxt = follower.result(timeout=60).leader
        assert nxt.key == b"el/%016x" % l2 and nxt.rev > leader.rev
        assert next(observed).kv.value == b"q"
        observed.cancel()
        elect.Resign(epb.ResignRequest(leader=nxt), timeout=30)
        for lid in (l1, l2, l3):
            lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=30)


def test_cluster_maintenance_and_watches_on_five_nodes_five_groups_of_three(tmp_path: Path) -> None:
    """5 nodes, 5 data groups of 3 replicas (each node lacks some groups): puts and gets at every
    node, watches over groups the serving node lacks (merged across nodes), then the
    partly-hosting checks (members, status, hashkv, snapshot, move-leader)."""
    from clusterharness import free_ports

    c = Cluster(tmp_path, 5, extra_args=["--groups", "5", "--replication", "3"])
    metrics = dict(zip(sorted(c.nodes), free_ports(5), strict=True))
    for nid, port in metrics.items():
        c.nodes[nid].args += ["--metrics-listen", f"127.0.0.1:{port}"]
    c.start()
    try:
        c.wait_serving()
        for i in range(12):
            ep = c.endpoints[i % 5]
            assert ctl(ep, "put", f"five/{i}", str(i)).returncode == 0
            g = ctl(c.endpoints[(i + 2) % 5], "get", f"five/{i}", "--print-value-only")
            assert (g.returncode, g.stdout) == (0, f"{i}\n"), g.stderr
        _merged_watches_on_a_partly_hosting_cluster(c, metrics)
        _election_on_a_partly_hosting_cluster(c)
        _maintenance_on_a_partly_hosting_cluster(c, tmp_path, keys=28)  # five/ and mw/ keys
    finally:
        c.stop()


def _election_on_a_partly_hosting_cluster(c: Cluster) -> None:
    """Campaign and Observe (run in-process as the caller) at nodes that lack some data groups:
    their waits on keys under the name run merged across nodes, as an etcd watch does; Proclaim
    and Put with ignore_lease at every node keep the leader key's value and lease as etcd's."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
    from kvstore.etcdpb.v3electionpb import v3election_pb2 as epb
    from kvstore.etcdpb.v3electionpb import v3election_pb2_grpc as epb_grpc

    with grpc.insecure_channel(c.endpoints[0]) as ch0, grpc.insecure_channel(c.endpoints[1]) as ch1:
        lease = rpc_pb2_grpc.LeaseStub(ch0)
        l1, l2 = (lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=30).ID for _ in range(2))
        e0, e1 = epb_grpc.ElectionStub(ch0), epb_grpc.ElectionStub(ch1)
        first = e0.Campaign(epb.CampaignRequest(name=b"pe", lease=l1, value=b"a"), timeout=30).leader
        observed = e1.Observe(epb.LeaderRequest(name=b"pe"), timeout=60)
        assert next(observed).kv.value == b"a"
        second = e1.Campaign.future(epb.CampaignRequest(name=b"pe", lease=l2, value=b"b"), timeout=60)
        e0.Resign(epb.ResignRequest(leader=first), timeout=30)
        nxt = second.result(timeout=60).leader
        assert nxt.key == b"pe/%016x" % l2 and nxt.rev > first.rev
        assert next(observed).kv.value == b"b"
        observed.cancel()
        # Proclaim (one Txn) and a Put with ignore_lease at every node, the two that lack the
        # key's group among them (ignore_lease reads the key's lease where its group is hosted)
        terms = []
        for i, ep in enumerate(c.endpoints):
            with grpc.insecure_channel(ep) as ch:
                epb_grpc.ElectionStub(ch).Proclaim(epb.ProclaimRequest(leader=nxt, value=b"p%d" % i), timeout=30)
                kv = rpc_pb2_grpc.KVStub(ch)
                put = kv.Put(rpc_pb2.PutRequest(key=nxt.key, value=b"i%d" % i, ignore_lease=True, prev_kv=True),
                             timeout=30)
                assert (put.prev_kv.value, put.prev_kv.lease) == (b"p%d" % i, l2)
                terms.append(put.header.raft_term)
                held = kv.Txn(rpc_pb2.TxnRequest(compare=[
                    rpc_pb2.Compare(key=nxt.key, target=rpc_pb2.Compare.LEASE, result=rpc_pb2.Compare.EQUAL, lease=l2),
                    rpc_pb2.Compare(key=nxt.key, target=rpc_pb2.Compare.VALUE, result=rpc_pb2.Compare.EQUAL,
                                    value=b"i%d" % i)]), timeout=30)
                assert held.succeeded, i
        assert terms.count(0) == 2, terms  # raft_term 0: the serving node does not host the group
        e1.Resign(epb.ResignRequest(leader=nxt), timeout=30)


def _watchers(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("kvstore_watchers "))


def _merged_watches_on_a_partly_hosting_cluster(c: Cluster, metrics: dict[int, int]) -> None:
    """At a node lacking a data group: `etcdctl watch --prefix` from a revision prints every put
    of the prefix exactly once, in order, including puts to the groups the node does not host;
    on one gRPC stream a local key watch and a merged prefix watch both get their events, a
    progress request answers each (the merged one at a revision covering its events), a cancel
    of the merged one is answered and the local one goes on; once the stream ends, no node serves
    a watch any more (every sub-watch, here and at other nodes, ended with it)."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2

    hosted = {}
    for nid, n in c.nodes.items():
        st = n.status(timeout=5)
        assert st is not None
        hosted[nid] = {g.group for g in st.groups}
    every = set().union(*hosted.values())
    lacking = next(nid for nid in sorted(hosted) if hosted[nid] != every)
    ep = c.endpoints[lacking - 1]
    start = _rev(ep, "mw/0", "0")
    for i in range(1, 16):  # 16 keys over 5 groups: some in groups the node lacks
        assert ctl(c.endpoints[i % 5], "put", f"mw/{i}", str(i)).returncode == 0
    terms = [json.loads(ctl(ep, "get", f"mw/{i}", "-w", "json").stdout)["header"].get("raft_term", 0) for i in range(16)]
    assert 0 in terms, "every key is in a group the node hosts: the watch would not be merged"  # raft_term 0: not hosted here
    lines = _watch(ep, lambda got: len(got) >= 48, "--prefix", "mw/", f"--rev={start}")
    assert lines == [x for i in range(16) for x in ("PUT", f"mw/{i}", str(i))], lines

    def create(**kw: Any) -> rpc_pb2.WatchRequest:
        return rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(**kw))

    local_key = next(f"mw/{i}" for i in range(16) if terms[i])
    start = _rev(ep, local_key, "a")
    with grpc.insecure_channel(ep) as ch:
        stream, reqs = _stream(ch, "Watch", [create(key=local_key.encode(), start_revision=start),
                                             create(key=b"mw/", range_end=b"mw0", start_revision=start)])
        for i in range(6):
            assert ctl(c.endpoints[i % 5], "put", f"mw/{i}", f"b{i}").returncode == 0
        events: dict[int, list[tuple[bytes, bytes, int]]] = {0: [], 1: []}
        created: list[int] = []
        for resp in stream:
            assert not resp.canceled, resp
            if resp.created:
                created.append(resp.watch_id)
            events[resp.watch_id] += [(e.kv.key, e.kv.value, e.kv.mod_revision) for e in resp.events]
            if len(events[1]) == 7 and events[0]:
                break
        assert created == [0, 1]
        assert [(k, v) for k, v, _ in events[1]] == [(local_key.encode(), b"a")] + [
            (f"mw/{i}".encode(), f"b{i}".encode()) for i in range(6)]
        revs = [r for _, _, r in events[1]]
        assert revs == sorted(revs) and len(set(revs)) == 7
        reqs.put(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        progressed: dict[int, int] = {}
        for resp in stream:
            if not resp.events and not resp.created and not resp.canceled:
                progressed[resp.watch_id] = resp.header.revision
            if set(progressed) >= {0, 1}:
                break
        assert progressed[1] >= revs[-1]
        assert sum(_watchers(p) for p in metrics.values()) >= 3  # the key watch, and 2+ subs of the merged one
        reqs.put(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=1)))
        for resp in stream:
            if resp.canceled:
                assert resp.watch_id == 1 and not resp.events
                break
        assert ctl(ep, "put", local_key, "c").returncode == 0
        for resp in stream:
            assert resp.watch_id == 0 and not resp.canceled, resp
            if any(e.kv.value == b"c" for e in resp.events):
                break
        reqs.put(None)
        stream.cancel()
    deadline = time.monotonic() + 30
    while any(_watchers(p) for p in metrics.values()):
        assert time.monotonic() < deadline, {n: _watchers(p) for n, p in metrics.items()}
        time.sleep(0.05)


def _stream(ch: Any, method: str, first: list[Any]) -> tuple[Any, Any]:
    """A bidirectional etcd stream on `ch` (`Watch.Watch` or `Lease.LeaseKeepAlive`) opened with
    the requests `first`; returns (the call, a queue to send more on: None ends the requests)."""
    import queue

    from kvstore.etcdpb.etcdserverpb import rpc_pb2_grpc

    reqs: queue.Queue[Any] = queue.Queue()
    for r in first:
        reqs.put(r)

    def requests() -> Iterator[Any]:
        while (r := reqs.get()) is not None:
            yield r

    stub = rpc_pb2_grpc.WatchStub(ch) if method == "Watch" else rpc_pb2_grpc.LeaseStub(ch)
    return getattr(stub, method)(requests(), timeout=120), reqs


def test_watch_ids_are_not_reused_and_unknown_cancels_get_no_answer(kv: str) -> None:
    """As etcd's: an automatic id is never reused on a stream (0, cancel 0, then 1); a cancel of
    an id the stream does not have gets no answer (the next reply is the next create's); every
    header carries a revision, the node's current one where the reply has none (not 0)."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2

    _rev(kv, "wid/a", "0")

    def create(key: bytes) -> rpc_pb2.WatchRequest:
        return rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key))

    def cancel(wid: int) -> rpc_pb2.WatchRequest:
        return rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=wid))

    with grpc.insecure_channel(kv) as ch:
        stream, reqs = _stream(ch, "Watch", [create(b"wid/a")])
        got = [next(stream)]
        reqs.put(cancel(0))
        got.append(next(stream))
        reqs.put(cancel(7))
        reqs.put(create(b"wid/b"))
        got.append(next(stream))
        reqs.put(create(b""))
        got.append(next(stream))
        reqs.put(None)
        stream.cancel()
    assert [(r.watch_id, r.created, r.canceled) for r in got] == [
        (0, True, False), (0, False, True), (1, True, False), (-1, True, True)], got
    assert all(r.header.revision > 0 for r in got), got


def test_keep_alive_answers_unknown_leases_ttl_0_and_goes_on(kv: str) -> None:
    """clientv3 keeps every lease alive on one stream: an id that is not a lease's (malformed, or
    never granted) is answered TTL 0 with its ID, and the stream serves the next request. Lease
    replies and an empty Txn carry the node's current revision in their headers (not 0), as
    etcd's."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
    from kvstore.storage import leases

    _rev(kv, "ka/a", "0")
    with grpc.insecure_channel(kv) as ch:
        lease = rpc_pb2_grpc.LeaseStub(ch)
        g = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=30)
        never = leases.make_id(leases.home_group(g.ID), g.ID + 1)
        ids = [-1, never, g.ID]
        stream, reqs = _stream(ch, "LeaseKeepAlive", [rpc_pb2.LeaseKeepAliveRequest(ID=i) for i in ids])
        got = [next(stream) for _ in ids]
        reqs.put(None)
        stream.cancel()
        assert [(r.ID, r.TTL) for r in got[:2]] == [(-1, 0), (never, 0)]
        assert got[2].ID == g.ID and 0 < got[2].TTL <= 60
        headers = [g.header, *(r.header for r in got),
                   lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=g.ID), timeout=30).header,
                   lease.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=30).header,
                   rpc_pb2_grpc.KVStub(ch).Txn(rpc_pb2.TxnRequest(), timeout=30).header,
                   lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=g.ID), timeout=30).header]
    assert all(h.revision > 0 for h in headers), headers


def test_watchers_that_do_not_read_are_canceled_as_slow(kv: str) -> None:
    """Backpressure reaches kvstore's watch stream: etcd watch streams whose client reads nothing
    hold a bounded backlog each (kvstore's per-stream bound, a few translated responses), so
    together they reach the node's bound on queued watch bytes and kvstore cancels the fullest as
    a slow watcher. The puts are paced by a watcher that reads (on its own connection): the etcd
    layer keeps up with them, so without backpressure it queued every event and none was canceled."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    streams, puts, value = 18, 24, b"v" * (1000 << 10)
    create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"slow/", range_end=b"slow0"))
    # no BDP probing: the client's flow-control windows stay at 64 KiB, so what it does not read
    # stays on the server
    with grpc.insecure_channel(kv, options=[("grpc.http2.bdp_probe", 0)]) as ch, grpc.insecure_channel(
            kv, options=[("grpc.use_local_subchannel_pool", 1)]) as reader_ch:
        calls = [_stream(ch, "Watch", [create]) for _ in range(streams)]
        reader, reader_reqs = _stream(reader_ch, "Watch", [create])
        for call, _ in [*calls, (reader, None)]:
            assert next(call).created
        put = rpc_pb2_grpc.KVStub(ch).Put
        for i in range(puts):
            put(rpc_pb2.PutRequest(key=b"slow/%d" % i, value=value), timeout=60)
            while not any(e.kv.key == b"slow/%d" % i for e in next(reader).events):
                pass
        reasons = []
        for call, reqs in [*calls, (reader, reader_reqs)]:
            seen = 0
            while call is not reader and seen < puts:
                r = next(call)
                seen += len(r.events)
                if r.canceled:
                    reasons.append(r.cancel_reason)
                    break
            reqs.put(None)
            call.cancel()
    assert reasons and all("slow watcher" in r for r in reasons), reasons


class _Cli:
    """A long-running `etcdctl ARGS` (lock, elect): its output lines read on a thread, waited on
    with `wait_for` (at most 60 s), stopped by PID (SIGTERM: etcdctl unlocks / resigns on it)."""

    def __init__(self, ep: str, *args: str) -> None:
        _need("etcdctl")
        self.p = subprocess.Popen(["etcdctl", f"--endpoints={ep}", "--command-timeout=30s", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "ETCDCTL_API": "3"})
        self.lines: list[str] = []
        self.eof = False
        self.changed = threading.Condition()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def wait_for(self, cond: Callable[[list[str]], bool], what: str) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: cond(self.lines) or self.eof, timeout=60)
            assert cond(self.lines), f"{what}: {self.lines}"
            return list(self.lines)

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.terminate()
        rc = self.p.wait(30)
        self.t.join(10)
        return rc


def _keys(ep: str, prefix: str) -> list[str]:
    out = ctl(ep, "get", prefix, "--prefix", "--keys-only")
    assert out.returncode == 0, out.stderr
    return [k for k in out.stdout.split("\n") if k]


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_etcdctl_lock_and_elect(kv_cluster: Cluster, kv: str) -> None:
    """The real `etcdctl lock` and `etcdctl elect` (etcd's client-side recipes: a session
    lease, a Txn with a leased put and a range over the prefix sorted by create revision, a
    range with max_create_revision, a watch) against the 3-node, 2-group cluster, through two
    different nodes: the second locker waits until the first's holder exits, then runs its
    command holding the lock with a higher revision; the second candidate is elected when the
    first resigns, and `elect -l` observes both proposals."""
    other = kv_cluster.endpoints[2]
    first = _Cli(kv, "lock", "etl")
    procs = [first]
    try:
        held = first.wait_for(lambda ls: any(x.startswith("etl/") for x in ls), "the first lock was not taken")
        key1 = next(x for x in held if x.startswith("etl/"))
        second = _Cli(other, "lock", "etl", "--", "sh", "-c", 'echo "held $ETCD_LOCK_KEY $ETCD_LOCK_REV"')
        procs.append(second)
        _until(lambda: len(_keys(kv, "etl/")) == 2, "the second locker's key was never put")
        assert second.p.poll() is None and not any(x.startswith("held") for x in second.lines)  # it waits
        kv1 = json.loads(ctl(kv, "get", key1, "-w", "json").stdout)["kvs"][0]
        rev1 = kv1["create_revision"]
        assert kv1.get("lease")  # the Txn's put attached the key to the session's lease
        assert first.stop() == 0  # SIGTERM: it unlocks
        got = second.wait_for(lambda ls: any(x.startswith("held") for x in ls), "the second never held the lock")
        assert second.stop() == 0
        _, key2, rev2 = next(x for x in got if x.startswith("held")).split()
        assert key2.startswith("etl/") and key2 != key1 and int(rev2) > rev1
        _until(lambda: _keys(kv, "etl/") == [], "the second locker did not unlock")

        observer = _Cli(other, "elect", "-l", "ete")
        c1 = _Cli(kv, "elect", "ete", "p1")
        procs += [observer, c1]
        c1.wait_for(lambda ls: "p1" in ls, "the first candidate was not elected")
        observer.wait_for(lambda ls: "p1" in ls, "the observer did not see p1")
        c2 = _Cli(other, "elect", "ete", "p2")
        procs.append(c2)
        _until(lambda: len(_keys(kv, "ete/")) == 2, "the second candidate's key was never put")
        assert c2.p.poll() is None and "p2" not in c2.lines  # not elected while the first leads
        assert c1.stop() == 0  # SIGTERM: it resigns
        c2.wait_for(lambda ls: "p2" in ls, "the second candidate was not elected")
        observer.wait_for(lambda ls: "p2" in ls, "the observer did not see p2")
        assert c2.stop() == 0
        _until(lambda: _keys(kv, "ete/") == [], "the second candidate did not resign")
    finally:
        for p in procs:
            p.stop()


def test_txn_with_leases_over_grpc(kv: str, kv_cluster: Cluster) -> None:
    """What etcdctl cannot send: a Compare of a key's lease; a lease id homed outside the data
    groups is "requested lease not found" (never a routing error), in a Put and in a Txn; a Txn
    whose leased puts are in two groups (etcdctl's `txn` with `put --lease`) attaches both keys
    (a two-phase commit, level 7), their leases compared across the groups; a revoke deletes
    both; a revoked lease refuses the whole Txn, nothing written, in one group or two."""
    import grpc

    from kvstore.client import Client
    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc
    from kvstore.storage import leases

    def put(key: bytes, lease: int = 0) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"v", lease=lease))

    def lease_is(key: bytes, lid: int) -> rpc_pb2.Compare:
        return rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.LEASE, result=rpc_pb2.Compare.EQUAL, lease=lid)

    kv_cluster.wait_cluster_version()  # leased puts across groups: level 7
    with Client(kv_cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        home_of = m.group_for_key(b"gl/k0")
        same = next(b"gl/k%d" % i for i in range(1, 200) if m.group_for_key(b"gl/k%d" % i) == home_of)
        far = next(b"gl/k%d" % i for i in range(1, 200) if m.group_for_key(b"gl/k%d" % i) != home_of)
    with grpc.insecure_channel(kv) as ch:
        lease, kvs = rpc_pb2_grpc.LeaseStub(ch), rpc_pb2_grpc.KVStub(ch)
        lid = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=30).ID
        assert kvs.Txn(rpc_pb2.TxnRequest(success=[put(b"gl/a", lid)]), timeout=30).succeeded
        not_zero = rpc_pb2.Compare(key=b"gl/a", target=rpc_pb2.Compare.LEASE, result=rpc_pb2.Compare.NOT_EQUAL)
        got = kvs.Txn(rpc_pb2.TxnRequest(compare=[lease_is(b"gl/a", lid), not_zero], success=[put(b"gl/a")]),
                      timeout=30)
        assert got.succeeded
        assert not kvs.Txn(rpc_pb2.TxnRequest(compare=[lease_is(b"gl/a", lid)]), timeout=30).succeeded  # detached
        home0 = leases.make_id(1, 3) & ~leases.ID_GROUP_MASK
        for bad in (home0, home0 | 0x0FF, (1 << 63) - 1):  # homed in groups 0, 255, 4095
            for call in (lambda b=bad: kvs.Put(rpc_pb2.PutRequest(key=b"gl/x", lease=b), timeout=30),
                         lambda b=bad: kvs.Txn(rpc_pb2.TxnRequest(success=[put(b"gl/x", b)]), timeout=30),
                         lambda b=bad: kvs.Txn(rpc_pb2.TxnRequest(success=[put(b"gl/k0", b), put(far)]), timeout=30)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND,
                                                               "etcdserver: requested lease not found")
        # etcdctl's txn: two leased puts whose keys are in the two groups (one revision)
        out = ctl(kv, "txn", "-w", "json", stdin=f"\nput gl/k0 v --lease={lid:x}\nput {far.decode()} v "
                                                  f"--lease={lid:x}\n\n\n")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["succeeded"] is True
        both = kvs.Txn(rpc_pb2.TxnRequest(compare=[lease_is(b"gl/k0", lid), lease_is(far, lid)],
                                          success=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=far))]),
                       timeout=30)
        assert both.succeeded and both.responses[0].response_range.kvs[0].lease == lid
        ttl = lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lid, keys=True), timeout=30)
        assert {b"gl/k0", far} <= set(ttl.keys)
        # a leased put with a read of a key in the other group
        seen = kvs.Put(rpc_pb2.PutRequest(key=far, value=b"seen"), timeout=30).header.revision
        mixed = kvs.Txn(rpc_pb2.TxnRequest(success=[put(b"gl/k0", lid), rpc_pb2.RequestOp(
            request_range=rpc_pb2.RangeRequest(key=far))]), timeout=30)
        assert mixed.succeeded and mixed.responses[1].response_range.kvs[0].value == b"seen"
        assert mixed.header.revision > seen  # the Txn's revision: above every write acknowledged before it
        kvs.Put(rpc_pb2.PutRequest(key=far, value=b"v", lease=lid), timeout=30)
        lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=30)
        _until(lambda: not kvs.Range(rpc_pb2.RangeRequest(key=b"gl/k0"), timeout=30).kvs
               and not kvs.Range(rpc_pb2.RangeRequest(key=far), timeout=30).kvs, "the revoked lease's keys deleted")
        kvs.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"gl/", range_end=b"gl0"), timeout=30)
        for keys in ((b"gl/k0", same), (b"gl/k0", far)):  # one group, then two
            with pytest.raises(grpc.RpcError) as e:
                kvs.Txn(rpc_pb2.TxnRequest(success=[put(keys[0]), put(keys[1], lid)]), timeout=30)
            assert e.value.details() == "etcdserver: requested lease not found"
            assert dict(e.value.trailing_metadata() or ()).get("kvstore-outcome") == "definite"
            assert not kvs.Range(rpc_pb2.RangeRequest(key=b"gl/", range_end=b"gl0"), timeout=30).kvs
        kvs.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"gl/", range_end=b"gl0"), timeout=30)


def test_watch_fragment_splits_a_large_revision_as_etcd(kv: str, etcd: str) -> None:
    """A range delete of 50 keys of 200 KB, watched with prev_kv from before it by a client with
    gRPC's default 4 MiB receive limit: without `fragment` the delete's response is too large to
    receive (RESOURCE_EXHAUSTED, on etcd as on kvstore); with it, every DELETE with its previous
    value arrives, in pieces marked `fragment` but the last (kvstore splits at its request limit,
    4 MiB, etcd at its --max-request-bytes, 1.5 MiB)."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    value = b"f" * 200_000
    keys = [b"frag/%02d" % i for i in range(50)]
    for ep in (kv, etcd):
        with grpc.insecure_channel(ep) as ch:
            stub = rpc_pb2_grpc.KVStub(ch)
            start = max(stub.Put(rpc_pb2.PutRequest(key=k, value=value), timeout=30).header.revision for k in keys)
            assert stub.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"frag/", range_end=b"frag0"),
                                    timeout=30).deleted == 50

            def create(fragment: bool, start: int = start) -> rpc_pb2.WatchRequest:
                return rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                    key=b"frag/", range_end=b"frag0", start_revision=start + 1, prev_kv=True, fragment=fragment,
                    filters=[rpc_pb2.WatchCreateRequest.NOPUT]))

            stream, reqs = _stream(ch, "Watch", [create(False)])
            with pytest.raises(grpc.RpcError) as e:
                for _ in stream:
                    pass
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (ep, e.value)
            reqs.put(None)
            stream, reqs = _stream(ch, "Watch", [create(True)])
            got: list[tuple[bytes, int]] = []
            flags: list[bool] = []
            for resp in stream:
                if resp.events:
                    flags.append(resp.fragment)
                    got.extend((ev.kv.key, len(ev.prev_kv.value)) for ev in resp.events if ev.type == 1)
                if len(got) >= len(keys) and not resp.fragment:
                    break
            reqs.put(None)
            stream.cancel()
        assert sorted(got) == [(k, len(value)) for k in keys], ep
        assert True in flags and flags[-1] is False, (ep, flags)


def test_txn_range_delete_over_etcdctl_and_grpc(kv: str) -> None:
    """etcdctl's `txn` with `del --prefix` (a DeleteRange over a range inside a Txn): kvstore's
    range delete in a transaction, across both data groups at the Txn's one revision; the
    count prints as etcd's. prev_kv of such a delete: the keys as they are at its place in the
    Txn; a put into the deleted range after it in the same Txn is etcd's DUPLICATE_KEY."""
    import grpc

    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    for i in range(6):
        assert ctl(kv, "put", f"etx/{i}", "v").returncode == 0
    p = ctl(kv, "txn", stdin='value("etx/0") = "v"\n\ndel --prefix etx/\nput etxdone yes\n\n\n')
    assert p.returncode == 0 and p.stdout == "SUCCESS\n\n6\n\nOK\n", (p.stdout, p.stderr)
    assert _keys(kv, "etx/") == []
    with grpc.insecure_channel(kv) as ch:
        kvs = rpc_pb2_grpc.KVStub(ch)
        rev = kvs.Put(rpc_pb2.PutRequest(key=b"etx/a", value=b"1"), timeout=30).header.revision
        dr = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"etx/", range_end=b"etx0"))
        got = kvs.Txn(rpc_pb2.TxnRequest(success=[dr]), timeout=30)
        assert got.succeeded and got.responses[0].response_delete_range.deleted == 1 and got.header.revision > rev
        # prev_kv: the keys as they are at the delete's place (one a delete before it removed: not there)
        for k in (b"etx/p", b"etx/q"):
            kvs.Put(rpc_pb2.PutRequest(key=k, value=b"1"), timeout=30)
        got = kvs.Txn(rpc_pb2.TxnRequest(success=[
            rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"etx/q")),
            rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"etx/", range_end=b"etx0",
                                                                              prev_kv=True))]), timeout=30)
        d = got.responses[1].response_delete_range
        assert got.succeeded and got.responses[0].response_delete_range.deleted == 1 and d.deleted == 1
        assert [(x.key, x.value) for x in d.prev_kvs] == [(b"etx/p", b"1")] and _keys(kv, "etx/") == []
        # ... in a nested Txn too (its range indexes the top-level plan's: was INTERNAL)
        kvs.Put(rpc_pb2.PutRequest(key=b"etx/n", value=b"2"), timeout=30)
        nested = rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(
            request_txn=rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
                key=b"etx/", range_end=b"etx0", prev_kv=True))]))]))
        got = kvs.Txn(rpc_pb2.TxnRequest(success=[nested]), timeout=30)
        d = got.responses[0].response_txn.responses[0].response_txn.responses[0].response_delete_range
        assert got.succeeded and d.deleted == 1 and [(x.key, x.value) for x in d.prev_kvs] == [(b"etx/n", b"2")]
        # a Txn that writes nothing on the path taken, and reads no range there: its header's
        # revision is the one it was evaluated at (at or above the last write), never 0
        got2 = kvs.Txn(rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=b"etx/n", target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.GREATER,
                                     version=0)],
            success=[nested], failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"etx/n"))]),
            timeout=30)
        assert not got2.succeeded and got2.header.revision >= got.header.revision > 0
        with pytest.raises(grpc.RpcError) as e:
            kvs.Txn(rpc_pb2.TxnRequest(success=[dr, rpc_pb2.RequestOp(
                request_put=rpc_pb2.PutRequest(key=b"etx/b", value=b"x"))]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "duplicate key" in (e.value.details() or "")
        # a leased put beside the range delete: carried by the two-phase commit (level 7)
        lid = rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=30).ID
        kvs.Put(rpc_pb2.PutRequest(key=b"etx/c", value=b"1"), timeout=30)
        got = kvs.Txn(rpc_pb2.TxnRequest(success=[dr, rpc_pb2.RequestOp(
            request_put=rpc_pb2.PutRequest(key=b"etxl", value=b"x", lease=lid))]), timeout=30)
        assert got.succeeded and got.responses[0].response_delete_range.deleted == 1
        ttl = rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lid, keys=True), timeout=30)
        assert list(ttl.keys) == [b"etxl"]


def test_a_txn_with_ranges_needs_read_on_the_range_it_deletes_under_auth(kv: str) -> None:
    """With auth on, a Txn that reads a range and deletes another (kvstore's Txn with scans)
    from a user who may read the first and only write the second: refused PERMISSION_DENIED
    before anything is written, whether the deleted range holds keys or not (its read-only
    evaluation would read that range as the user; before: refused only when it was empty)."""
    root, bob = "--user=root:rootpw", "--user=bob:bobpw"
    setup = [("user", "add", "root:rootpw"), ("role", "add", "tw1"),
             ("role", "grant-permission", "tw1", "read", "tar/", "--prefix"),
             ("role", "grant-permission", "tw1", "write", "taw/", "--prefix"),
             ("user", "add", "bob:bobpw"), ("user", "grant-role", "bob", "tw1"), ("auth", "enable")]
    try:
        for args in setup:
            p = ctl(kv, *args)
            assert p.returncode == 0, (args, p.stderr)
        assert ctl(kv, "put", "tar/a", "1", "--user=bob:bobpw").returncode != 0  # read only there
        for held in (False, True):
            if held:
                assert ctl(kv, "put", "taw/k", "v", root).returncode == 0
            p = ctl(kv, "txn", bob, stdin="\nget --prefix tar/\ndel --prefix taw/\n\n\n")
            assert p.returncode != 0 and "permission denied" in p.stderr, (held, p.stdout, p.stderr)
        got = ctl(kv, "get", "taw/k", "--print-value-only", root)
        assert got.stdout == "v\n", got.stderr  # nothing was deleted
    finally:
        for args in [("auth", "disable", root), ("user", "delete", "bob"), ("role", "delete", "tw1"),
                     ("user", "delete", "root"), ("role", "delete", "root"), ("del", "taw/k")]:
            ctl(kv, *args)


def test_txn_ranges_around_writes_in_two_groups_over_grpc(kv: str, kv_cluster: Cluster) -> None:
    """A Txn whose compare and puts are in two groups, with a range over both keys before and
    after the puts (kvstore's Txn with scans: a two-phase commit, each range read at its place):
    the first shows the keys as they were, with etcd's count and more under a limit; the last
    shows the puts at the Txn's revision."""
    import grpc

    from kvstore.client import Client
    from kvstore.etcdpb.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    with Client(kv_cluster.endpoints, timeout=20) as c:
        m = c.shard_map(refresh=True)
        assert m is not None
        k0 = b"etr/k0"
        far = next(b"etr/k%d" % i for i in range(1, 200) if m.group_for_key(b"etr/k%d" % i) != m.group_for_key(k0))

    def rng(**kw: Any) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"etr/", range_end=b"etr0", **kw))

    def put(key: bytes) -> rpc_pb2.RequestOp:
        return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"1"))

    with grpc.insecure_channel(kv) as ch:
        kvs = rpc_pb2_grpc.KVStub(ch)
        for k in (k0, far):
            kvs.Put(rpc_pb2.PutRequest(key=k, value=b"0"), timeout=30)
        got = kvs.Txn(rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=k0, target=rpc_pb2.Compare.VALUE, result=rpc_pb2.Compare.EQUAL, value=b"0")],
            success=[rng(limit=1), put(k0), put(far), rng()]), timeout=30)
        assert got.succeeded
        first, last = got.responses[0].response_range, got.responses[3].response_range
        assert (first.count, first.more, [kv.value for kv in first.kvs]) == (2, True, [b"0"])
        assert last.count == 2 and {(kv.key, kv.value, kv.mod_revision) for kv in last.kvs} == {
            (k0, b"1", got.header.revision), (far, b"1", got.header.revision)}
