"""A real two-release rolling upgrade. The previous release is this repository's own code before
transactions: the newest commit on the main line before the one that made TXN need feature level
2 that has the cluster version and no TXN at all (found in the git history, so the test follows
the repository: `git archive` of its `kvstore/` package, run with this environment's
dependencies): its nodes support level 1 only and do not know TXN. Three of them form a cluster under a writer; they
are replaced one at a time (SIGTERM, then the current release on the same data directory). The
cluster version stays 1 while any member runs the previous release (a TXN is refused, nothing
written) and rises (to the current release's level, at least 2) only once every member runs the
current one; then a TXN commits, and
every acknowledged write of the whole upgrade is there. A COMPACT in the mixed cluster is proposed
under the first rule (the one both releases apply); once the cluster version reaches level 8, one
keeps the changes at its revision, and a watch from exactly it gets them.

Needs git and the repository's history (`.ci/run` runs on a clone of main with it, and unshallows
a shallow one when it can); skipped without them, a failure in CI (CI=true) on a full clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from clusterharness import NodeProc, free_ports

from kvstore import errors
from kvstore.client import Client, Op
from kvstore.node.version import LEVEL_BASE, SUPPORTED_LEVEL

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
TXN_LEVEL_LINE = "SUPPORTED_LEVEL = LEVEL_TRANSACTIONS"


def _shallow() -> bool:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True,
                       text=True, timeout=30, check=False)
    return r.returncode == 0 and r.stdout.strip() == "true"


def _unavailable(reason: str) -> None:
    """Skip where the history cannot be there (no git, not a checkout, a shallow clone: .ci/run
    tries to unshallow first); in CI a full clone that still lacks the release is a failure."""
    if os.environ.get("CI", "").lower() == "true" and shutil.which("git") and (REPO / ".git").exists() and not _shallow():
        pytest.fail(f"the rolling-upgrade test cannot run in CI: {reason}")
    pytest.skip(reason)


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        _unavailable(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def previous_release(dest: Path) -> str:
    """Extract the previous release's `kvstore` package into `dest`; return its commit: on the
    first-parent line before the commit that made TXN need level 2, the newest commit with the
    cluster version (kvstore/node/version.py) and no transactions at all (no storage/txn.py;
    the merge that brought TXN in is skipped: its binary knows TXN)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        _unavailable("not a git checkout of the repository")
    found = _git("log", "--format=%H", "-S", TXN_LEVEL_LINE, "--", "kvstore/node/version.py").split()
    if not found:
        _unavailable(f"no commit in the history adds {TXN_LEVEL_LINE!r} (a shallow clone?)")
    commit = ""
    for c in _git("rev-list", "--first-parent", "-n", "200", f"{found[-1]}^").split():
        has = {p: subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{c}:{p}"], capture_output=True,
                                 timeout=30, check=False).returncode == 0
               for p in ("kvstore/node/version.py", "kvstore/storage/txn.py")}
        if has["kvstore/node/version.py"] and not has["kvstore/storage/txn.py"]:
            commit = c
            break
    if not commit:
        _unavailable("no release with the cluster version and without transactions in the history")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "kvstore"], capture_output=True,
                             timeout=60, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    text = (dest / "kvstore" / "node" / "version.py").read_text()
    assert "SUPPORTED_LEVEL = LEVEL_BASE" in text, f"{commit} does not support level 1 only"
    return commit


class Writer(threading.Thread):
    """Puts unique keys one after another; records each acknowledged one (key -> value)."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(daemon=True)
        self.endpoints = endpoints
        self.acked: dict[bytes, bytes] = {}
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.endpoints, timeout=3.0) as c:
            i = 0
            while not self.stop.is_set():
                key, value = f"up/{i:06d}".encode(), f"v{i}".encode()
                i += 1
                try:
                    c.put(key, value)
                    self.acked[key] = value
                except errors.KVError:
                    self.failed += 1  # definite or indeterminate: either way not counted as acknowledged
                time.sleep(0.01)


def _status_levels(node: NodeProc) -> tuple[int, int] | None:
    st = node.status(timeout=2.0)
    return (st.cluster_version, st.supported_level) if st is not None else None


def _wait(cond: object, what: str, timeout: float = 30.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_rolling_upgrade_from_the_previous_release_raises_the_cluster_version_last(tmp_path: Path) -> None:
    old_tree = tmp_path / "previous-release"
    commit = previous_release(old_tree)
    old_env = {"PYTHONPATH": str(old_tree)}
    ports = free_ports(3)
    peers = ",".join(f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(ports))
    nodes: dict[int, NodeProc] = {}
    for i, port in enumerate(ports, start=1):
        args = ["--id", str(i), "--data-dir", str(tmp_path / f"n{i}"), "--listen", f"127.0.0.1:{port}",
                "--peers", peers, "--tick-ms", "50", "--replication", "3", "--insecure"]
        nodes[i] = NodeProc(i, f"127.0.0.1:{port}", tmp_path / f"n{i}", tmp_path / f"n{i}.log", args,
                            env=old_env, cwd=tmp_path)
    endpoints = [n.address for n in nodes.values()]
    writer = Writer(endpoints)
    try:
        for n in nodes.values():
            n.start()
        _wait(lambda: all(_status_levels(n) == (LEVEL_BASE, LEVEL_BASE) for n in nodes.values()),
              f"the previous release ({commit[:10]}) serving at level 1")
        writer.start()
        _wait(lambda: len(writer.acked) >= 20, "the writer's first acknowledged writes")
        for step, (nid, node) in enumerate(sorted(nodes.items()), start=1):
            acked_before = len(writer.acked)
            assert node.terminate(timeout=20) == 0, node.log_text()[-3000:]
            node.env = None  # the current release, same data directory
            node.start()
            _wait(lambda node=node: (lv := _status_levels(node)) is not None and lv[1] == SUPPORTED_LEVEL,
                  f"node {nid} serving the current release")
            _wait(lambda before=acked_before: len(writer.acked) >= before + 20, "writes going on after the restart")
            if step < len(nodes):
                views = [lv for n in nodes.values() if (lv := _status_levels(n)) is not None]
                assert views and all(cv == LEVEL_BASE for cv, _ in views), views
                with Client([node.address], timeout=3.0) as c:  # refused, whichever node leads
                    with pytest.raises(errors.KVError) as refused:
                        c.txn([], [Op.put(b"txn/early", b"x")])
                    assert not refused.value.indeterminate, refused.value
                    assert c.get(b"txn/early") is None
                    if step == 1:  # a COMPACT in the mixed cluster: the first rule, which both releases apply alike
                        c.put(b"cmp/a", b"1")
                        at = c.put(b"cmp/a", b"2")
                        assert c.compact(at) == at
        _wait(lambda: all(_status_levels(n) == (SUPPORTED_LEVEL, SUPPORTED_LEVEL) for n in nodes.values()),
              "the cluster version rising to the current release's level once every member runs it")
        with Client(endpoints, timeout=5.0) as c:
            res = c.txn([], [Op.put(b"txn/after", b"ok")])
            assert res.succeeded
            assert c.get(b"txn/after") == b"ok"
            # At level 8 compaction keeps the changes at its revision: a watch from exactly it gets them.
            at = c.put(b"cmp/b", b"kept")
            assert c.compact(at) == at
            first = next(iter(c.watch(prefix=b"cmp/", start_revision=at)))
            assert (first.revision, first.key, first.value) == (at, b"cmp/b", b"kept")
        writer.stop.set()
        writer.join(timeout=30)
        assert len(writer.acked) >= 80
        with Client(endpoints, timeout=5.0) as c:
            got = dict(c.scan(b"up/"))
        lost = {k: v for k, v in writer.acked.items() if got.get(k) != v}
        assert not lost, f"{len(lost)} acknowledged writes lost or changed, e.g. {sorted(lost)[:3]}"
    finally:
        writer.stop.set()
        for n in nodes.values():
            n.terminate(timeout=10)
