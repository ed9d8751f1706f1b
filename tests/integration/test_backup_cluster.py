"""Backup and restore on real clusters: `kvctl snapshot save` while writes run, `kvctl snapshot
status`, `kvstore restore` into a new cluster with another number of groups, and damaged files."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from clusterharness import Cluster

from kvstore.cli.kvctl import cli as kvctl_cli
from kvstore.client import Client
from kvstore.errors import Compacted, KVError, PermissionDenied
from kvstore.v1 import auth_pb2, auth_pb2_grpc

pytestmark = pytest.mark.timeout(120)

KEYS = [f"k{i:03d}".encode() for i in range(120)]


def kvctl(endpoints: list[str], *args: str, user: str = "root", password: str = "rootpw") -> tuple[int, str, str]:
    r = CliRunner().invoke(kvctl_cli, ["--endpoints", ",".join(endpoints), "--timeout", "20", "--user", user,
                                       "--password", password, *args],
                           catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def kvstore_restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore.cli.server", "restore", *args],
                          capture_output=True, text=True, timeout=60)


Op = auth_pb2.AuthChangeRequest
ROOT = {"user": "root", "password": "rootpw"}
AUTH_CHANGES = [
    Op(op=Op.USER_ADD, user="root", password="rootpw"),
    Op(op=Op.USER_ADD, user="alice", password="s3cret-pw"),
    Op(op=Op.ROLE_ADD, role="reader"),
    Op(op=Op.ROLE_GRANT, role="reader", permission=auth_pb2.Permission(kind=auth_pb2.READ, key=b"k", range_end=b"l")),
    Op(op=Op.USER_GRANT_ROLE, user="alice", role="reader"),
    Op(op=Op.ENABLE),
]


def auth_view(c: Client) -> tuple[object, ...]:
    st = c.auth_call("Status", auth_pb2.AuthStatusRequest())
    users = sorted((u.name, tuple(u.roles), u.has_password) for u in st.users)
    roles = sorted((r.name, tuple(p.SerializeToString() for p in r.permissions)) for r in st.roles)
    assert ("alice", ("reader",), True) in users and roles
    return st.enabled, users, roles


class Writer(threading.Thread):
    """Puts KEYS round robin with unique values until stopped; records every acknowledged write
    with its revision, and the keys with a write of unknown outcome."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoints, timeout=5, **ROOT)
        self.stop = threading.Event()
        self.acked: list[tuple[bytes, bytes, int]] = []
        self.unknown: dict[bytes, set[bytes]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                key, value = KEYS[i % len(KEYS)], f"w{i}".encode()
                try:
                    self.acked.append((key, value, self.client.put(key, value)))
                except KVError:
                    self.unknown.setdefault(key, set()).add(value)
                i += 1
        except BaseException as err:  # pragma: no cover - reported by the test
            self.error = err
        finally:
            self.client.close()

    def wait_writes(self, n: int) -> None:
        """Until `n` more writes are acknowledged (a condition, not a sleep)."""
        target = len(self.acked) + n
        done = threading.Event()
        while len(self.acked) < target and self.is_alive():
            done.wait(0.01)


def test_save_while_writing_restore_into_new_cluster(tmp_path: Path) -> None:
    old = Cluster(tmp_path / "old", 3, extra_args=["--groups", "2"])
    backup = tmp_path / "backup.kvbk"
    w: Writer | None = None
    try:
        old.start()
        with Client(old.endpoints, timeout=10) as c:
            for k in KEYS[:60]:
                c.put(k, b"initial")
            c.put(b"solo", b"\x00binary\xff")
            for req in AUTH_CHANGES:
                c.auth_call("Change", req)
        with Client(old.endpoints, timeout=10, **ROOT) as c:
            auth_before = auth_view(c)
        with grpc.insecure_channel(old.endpoints[0]) as ch:
            old_token = auth_pb2_grpc.AuthStub(ch).Authenticate(
                auth_pb2.AuthenticateRequest(user="root", password="rootpw"), timeout=10).token
            st = auth_pb2_grpc.AuthStub(ch).Status(
                auth_pb2.AuthStatusRequest(), metadata=[("authorization", f"Bearer {old_token}")], timeout=10)
            assert st.identity and st.admin  # the token works where it was issued
        code, _, err = kvctl(old.endpoints, "snapshot", "save", str(backup), user="alice", password="s3cret-pw")
        assert code == 2 and "admin permission" in err and not backup.exists()
        w = Writer(old.endpoints)
        w.start()
        w.wait_writes(50)
        code, out, err = kvctl(old.endpoints, "-o", "json", "snapshot", "save", str(backup))
        assert code == 0, err
        saved = json.loads(out)
        w.wait_writes(50)
        w.stop.set()
        w.join(30)
        assert w.error is None
        rev = saved["revision"]
        assert saved["verified"] and saved["has_auth"] and saved["groups"] == 2
        # The writes ran across the save: some acknowledged at or below R, some above.
        assert any(r <= rev for _, _, r in w.acked) and any(r > rev for _, _, r in w.acked)

        code, out, err = kvctl(old.endpoints, "-o", "json", "snapshot", "status", str(backup))
        assert code == 0, err
        status = json.loads(out)
        assert status == saved
        assert not list(tmp_path.glob(".backup.kvbk.*"))  # the temporary file was renamed

        # The file holds exactly the state at R: against the history of acknowledged writes ...
        from kvstore.backup.format import BackupReader

        with open(backup, "rb") as f:
            r = BackupReader(f)
            got = {k.key: (k.value, k.mod_revision, k.version) for k in r.entries()}
        latest: dict[bytes, tuple[bytes, int]] = {}
        for key, value, r_ in w.acked:
            if r_ <= rev and r_ > latest.get(key, (b"", 0))[1]:
                latest[key] = (value, r_)
        assert len(got) == status["keys"]
        for key in KEYS:
            if key in w.unknown:
                assert got[key][0] in w.unknown[key] | {latest.get(key, (b"initial", 0))[0]}
            elif key in latest:
                assert got[key][:2] == latest[key], key
            elif key in got:
                assert got[key][0] == b"initial", key  # untouched by the writer before R
        assert got[b"solo"][0] == b"\x00binary\xff"
        # ... and against a read of every key at R on the old cluster
        with Client(old.endpoints, timeout=10, **ROOT) as c:
            at_r = {kv.key: (kv.value, kv.mod_revision, kv.version) for kv in c.scan_kvs(revision=rev)}
        assert at_r == got
    finally:
        if w is not None:
            w.stop.set()
        old.stop()

    # A NEW cluster of 3 groups (the old one had 2): every member restored from the same file.
    new = Cluster(tmp_path / "new", 3)
    peers = new._peer_arg()
    for nid, node in new.nodes.items():
        res = kvstore_restore(str(backup), "--data-dir", str(node.data_dir), "--id", str(nid), "--peers", peers,
                              "--groups", "3")
        assert res.returncode == 0, res.stderr
        assert f"{status['keys']} keys in 3 data groups" in res.stdout
    res = kvstore_restore(str(backup), "--data-dir", str(new.nodes[1].data_dir), "--id", "1", "--peers", peers)
    assert res.returncode == 2 and "not empty" in res.stderr
    try:
        for node in new.nodes.values():  # (not `new.start()`: its leader check is an unauthenticated Status)
            node.start()
        with Client(new.endpoints, timeout=20, **ROOT) as c:
            restored = {kv.key: (kv.value, kv.mod_revision, kv.version) for kv in c.scan_kvs()}
            smap = c.shard_map(refresh=True)
            assert smap is not None and len(smap.groups) == 3
            assert restored == got
            assert c.get(b"solo") == b"\x00binary\xff"
            assert auth_view(c) == auth_before  # users (with passwords) and roles came along
            at_r_new = {kv.key: (kv.value, kv.mod_revision, kv.version) for kv in c.scan_kvs(revision=rev)}
            assert at_r_new == got  # a read at R is the backup; below R the history is gone
            with pytest.raises(Compacted):
                list(c.scan_kvs(revision=rev - 1))
            assert c.put(b"after", b"restore") > rev  # later revisions are above R
            assert c.put(KEYS[0], b"again") > rev
        with grpc.insecure_channel(new.endpoints[0]) as ch:  # the new cluster has a token key of its own
            with pytest.raises(grpc.RpcError) as refused:
                auth_pb2_grpc.AuthStub(ch).Status(
                    auth_pb2.AuthStatusRequest(), metadata=[("authorization", f"Bearer {old_token}")], timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(new.endpoints, timeout=20, user="alice", password="s3cret-pw") as c:
            assert c.get(KEYS[1]) == got[KEYS[1]][0]  # alice's password and read permission came along
            with pytest.raises(PermissionDenied):
                c.put(KEYS[1], b"not allowed")
    finally:
        new.stop()


def test_damaged_backup_is_refused(tmp_path: Path) -> None:
    from kvstore.backup.format import BackupInfo, BackupKey, BackupWriter

    good = tmp_path / "good.kvbk"
    with open(good, "wb") as f:
        w = BackupWriter(f, BackupInfo(5 << 12, 0, 1, 3, 16))
        for i in range(50):
            w.add(BackupKey(f"key{i:02d}".encode(), b"v" * i, 4096, 4096 + 1, 1))
        w.finish()
    code, out, _ = kvctl(["127.0.0.1:1"], "snapshot", "status", str(good))
    assert code == 0 and "50 keys" in out and "verified" in out
    code, _, err = kvctl(["127.0.0.1:1"], "--timeout", "1", "snapshot", "save", str(tmp_path / "none.kvbk"))
    assert code == 2 and err.startswith("kvctl: ")  # no cluster there: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.kvbk"]
    data = good.read_bytes()
    for name, damaged in [("flipped", data[:100] + bytes([data[100] ^ 1]) + data[101:]),
                          ("truncated", data[:-1]), ("padded", data + b"\x00")]:
        bad = tmp_path / f"{name}.kvbk"
        bad.write_bytes(damaged)
        code, out, err = kvctl(["127.0.0.1:1"], "-o", "json", "snapshot", "status", str(bad))
        assert code == 2 and json.loads(out)["verified"] is False and "damaged" in err, name
        target = tmp_path / f"restore-{name}"
        res = kvstore_restore(str(bad), "--data-dir", str(target), "--id", "1", "--peers", "1=127.0.0.1:1")
        assert res.returncode == 2 and "damaged" in res.stderr, res.stderr
        assert not target.exists()
        assert not list(tmp_path.glob(f".restore-{name}.*"))
