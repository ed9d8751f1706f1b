"""The audit log: its MAC chain, rotation, the head in the store, crash recovery, and `verify`
detecting every kind of tampering (changed, removed, reordered, truncated lines; removed files)
while reporting a crash's unconfirmed tail as such, not as tampering."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.node.memstore import MemoryNodeStore
from kvstore.node.store import AuditHead
from kvstore.security.audit import (
    AuditLog,
    AuditOpenError,
    AuditSettings,
    KeyFileError,
    LineError,
    load_or_create_key,
    open_line,
    read_key,
    seal,
    verify,
)
from kvstore.security.audit.chain import GENESIS, MAX_FIELD, check_mac
from kvstore.security.audit.files import log_files
from kvstore.storage.store import LmdbNodeStore, read_audit_head

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
LOG = "audit.log"


def write_log(d: Path, n: int, store: MemoryNodeStore | LmdbNodeStore | None = None, *, max_bytes: int = 4096,
              keep: int = 50, key: bytes = KEY) -> tuple[Path, MemoryNodeStore | LmdbNodeStore]:
    """A log of `n` events written by the real writer, flushed (head recorded) and closed."""
    store = store if store is not None else MemoryNodeStore()
    log = AuditLog(AuditSettings(d / LOG, max_bytes=max_bytes, keep=keep), key, store, node_id=7)
    log.open()
    for i in range(n):
        log.record("Admin.TransferLeader", f"user{i % 3}", f"ipv4:127.0.0.1:{5000 + i}", "ok", to=i % 5,
                   groups="all")
    assert log.flush()
    log.close()
    return d / LOG, store


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for f in log_files(path) for x in f.read_bytes().splitlines()]


# --- the chain -------------------------------------------------------------------------------------


def test_seal_and_open_are_inverse_and_the_mac_chains() -> None:
    line, mac = seal(KEY, 1, GENESIS, {"op": "x", "identity": "a\nb\"c", "n": 3, "none": None}, first_in_file=True)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # a newline in a value cannot split a line
    parsed = open_line(line[:-1])
    assert (parsed.seq, parsed.mac, parsed.prev) == (1, mac, GENESIS)
    assert parsed.fields == {"op": "x", "identity": "a\nb\"c", "n": 3, "none": None}
    assert check_mac(KEY, GENESIS, parsed)
    assert not check_mac(OTHER_KEY, GENESIS, parsed)
    nxt, _ = seal(KEY, 2, mac, {"op": "y"}, first_in_file=False)
    p2 = open_line(nxt[:-1])
    assert p2.prev is None and check_mac(KEY, mac, p2) and not check_mac(KEY, GENESIS, p2)


def test_seal_cuts_long_values_and_ignores_reserved_names() -> None:
    line, _ = seal(KEY, 5, GENESIS, {"op": "x" * 10_000, "seq": 99, "mac": "forged"}, first_in_file=False)
    parsed = open_line(line[:-1])
    assert parsed.seq == 5 and isinstance(parsed.fields["op"], str) and len(parsed.fields["op"]) == MAX_FIELD


def test_open_line_refuses_a_non_canonical_line_that_json_would_read_the_same() -> None:
    line, _ = seal(KEY, 1, GENESIS, {"op": "x"}, first_in_file=True)
    spaced = line[:-1].replace(b'"op":', b'"op": ')
    assert json.loads(spaced) == json.loads(line)
    with pytest.raises(LineError, match="canonical"):
        open_line(spaced)


@given(st.binary(max_size=300))
def test_open_line_is_total(raw: bytes) -> None:
    with contextlib.suppress(LineError):
        open_line(raw)


@given(st.text(max_size=200))
def test_open_line_is_total_on_text(text: str) -> None:
    with contextlib.suppress(LineError):
        open_line(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=3), st.booleans())
def test_verify_is_total_on_any_file_contents(contents: list[bytes], with_head: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        names = [LOG] + [f"{LOG}.{i}" for i in range(1, len(contents))]
        for name, data in zip(names, contents, strict=True):
            (d / name).write_bytes(data)
        report = verify(d / LOG, KEY, AuditHead(3, bytes(32), 1) if with_head else None)
        assert report.ok == (report.problem is None)
        if with_head:
            assert not report.ok  # no random bytes reach a head only the key could have made


# --- writing, rotation, the head ------------------------------------------------------------------------


def test_a_written_log_verifies_across_rotated_files(tmp_path: Path) -> None:
    path, store = write_log(tmp_path, 120)
    files = log_files(path)
    assert len(files) >= 3, "the log must have rotated"
    assert all(f.stat().st_size <= 4096 for f in files)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    lines = lines_of(path)
    assert [x["seq"] for x in lines] == list(range(1, 121))
    assert lines[0]["prev"] == GENESIS.hex()
    assert lines[0]["node"] == 7 and lines[0]["op"] == "Admin.TransferLeader" and lines[0]["result"] == "ok"
    for f in files:  # each file's first line names the line before it
        assert "prev" in json.loads(f.read_bytes().splitlines()[0])
    head = store.audit_head()
    assert head is not None and head.seq == 120 and head.mac.hex() == lines[-1]["mac"] and head.floor == 1
    report = verify(path, KEY, head)
    assert report.ok, report.problem
    assert (report.lines, report.first_seq, report.last_seq, report.unconfirmed) == (120, 1, 120, 0)


def test_the_chain_continues_after_a_restart(tmp_path: Path) -> None:
    path, store = write_log(tmp_path, 10)
    write_log(tmp_path, 10, store)
    assert [x["seq"] for x in lines_of(path)] == list(range(1, 21))
    assert verify(path, KEY, store.audit_head()).ok


def test_rotation_keeps_k_files_and_records_the_floor_before_deleting(tmp_path: Path) -> None:
    path, store = write_log(tmp_path, 200, keep=3)
    files = log_files(path)
    assert [f.name for f in files] == [f"{LOG}.2", f"{LOG}.1", LOG]
    head = store.audit_head()
    assert head is not None and head.seq == 200 and head.floor > 1
    assert lines_of(path)[0]["seq"] == head.floor
    report = verify(path, KEY, head)
    assert report.ok, report.problem
    assert report.first_seq == head.floor


def test_keep_one_file(tmp_path: Path) -> None:
    path, store = write_log(tmp_path, 100, keep=1)
    assert log_files(path) == [path]
    assert verify(path, KEY, store.audit_head()).ok


def test_a_log_of_another_key_is_refused(tmp_path: Path) -> None:
    path, _ = write_log(tmp_path, 5)
    log = AuditLog(AuditSettings(path), OTHER_KEY, MemoryNodeStore(), 1)
    with pytest.raises(AuditOpenError, match="audit key"):
        log.open()


def test_the_head_is_recorded_after_at_most_sync_lines(tmp_path: Path) -> None:
    store = MemoryNodeStore()
    log = AuditLog(AuditSettings(tmp_path / LOG, sync_lines=5, sync_ms=3_600_000), KEY, store, 1)
    log.open()
    try:
        for _ in range(12):
            log.record("Admin.Snapshot", "a", "b", "ok")
        assert log.flush()
        # flush confirms everything; before it, the head moved every 5 lines at most
        head = store.audit_head()
        assert head is not None and head.seq == 12
    finally:
        log.close()


def test_events_past_the_queue_bound_are_counted_in_the_chain(tmp_path: Path) -> None:
    store = MemoryNodeStore()
    log = AuditLog(AuditSettings(tmp_path / LOG, max_pending=3), KEY, store, 1)
    log.open()
    with log._cond:  # hold the writer off while the events arrive
        for _ in range(10):
            log.record("KV.Put", "a", "b", "ok")
    assert log.flush()
    log.close()
    lines = lines_of(tmp_path / LOG)
    dropped = [x for x in lines if x["op"] == "audit.dropped"]
    kept = [x for x in lines if x["op"] == "KV.Put"]
    assert len(kept) + sum(int(x["count"]) for x in dropped) == 10  # type: ignore[call-overload]
    assert dropped and verify(tmp_path / LOG, KEY, store.audit_head()).ok


# --- crashes: unconfirmed, never tampered ------------------------------------------------------------------


def test_lines_after_the_head_are_unconfirmed_not_tampering(tmp_path: Path) -> None:
    path, _store = write_log(tmp_path, 30)
    lines = lines_of(path)
    # a crash after the file's fsync, before the head's update: the store still has an older head
    old = AuditHead(25, bytes.fromhex(str(lines[24]["mac"])), 1)
    report = verify(path, KEY, old)
    assert report.ok, report.problem
    assert report.unconfirmed == 5
    assert "the last 5 line(s) after the recorded head are unconfirmed" in report.summary()


def test_a_torn_last_line_is_unconfirmed_and_cut_at_restart(tmp_path: Path) -> None:
    path, store = write_log(tmp_path, 30)
    with path.open("ab") as f:
        f.write(b'{"identity":"x","mac":"00')  # a crash in the middle of a write
    report = verify(path, KEY, store.audit_head())
    assert report.ok and report.torn, report.problem
    assert "torn" in report.summary()
    write_log(tmp_path, 3, store)  # a restart cuts the torn line and goes on
    report = verify(path, KEY, store.audit_head())
    assert report.ok and not report.torn and report.last_seq == 33


def test_a_head_lost_in_a_crash_is_rebuilt_from_the_file(tmp_path: Path) -> None:
    store = MemoryNodeStore(sync=False)  # head updates not durable: a crash loses them
    path, _ = write_log(tmp_path, 20, store)
    store = store.crash()
    assert store.audit_head() is None
    assert verify(path, KEY, None).ok
    write_log(tmp_path, 5, store)
    assert [x["seq"] for x in lines_of(path)] == list(range(1, 26))
    assert verify(path, KEY, store.audit_head()).ok


def test_lines_missing_at_restart_stay_visible(tmp_path: Path) -> None:
    path, store = write_log(tmp_path, 30, max_bytes=1 << 20)
    raw = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(raw[:-4]))  # someone removed the last 4 lines while the node was down
    write_log(tmp_path, 2, store)  # the chain goes on from the head (seq 30)
    report = verify(path, KEY, store.audit_head())
    assert not report.ok and report.problem is not None
    assert "lines 27..30 missing" in report.problem


# --- tampering: each kind named --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AuditHead]:
    d = tmp_path_factory.mktemp("golden")
    path, store = write_log(d, 60, max_bytes=4096)
    head = store.audit_head()
    assert head is not None
    return path, head


@pytest.fixture()
def copy(golden: tuple[Path, AuditHead], tmp_path: Path) -> Iterator[tuple[Path, AuditHead]]:
    path, head = golden
    for f in log_files(path):
        shutil.copy2(f, tmp_path / f.name)
    yield tmp_path / LOG, head


def _rewrite(f: Path, fn: object) -> None:
    lines = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(b"".join(fn(lines)))  # type: ignore[operator]


def test_a_changed_field_is_detected(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    _rewrite(path, lambda ls: [ls[0].replace(b'"result":"ok"', b'"result":"no"'), *ls[1:]])
    report = verify(path, KEY, head)
    assert not report.ok and report.problem is not None
    assert f"{path}:1" in report.problem and "MAC mismatch" in report.problem


def test_a_removed_line_is_detected(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    f = log_files(path)[1]
    _rewrite(f, lambda ls: ls[:2] + ls[3:])
    report = verify(path, KEY, head)
    assert not report.ok and report.problem is not None
    assert f"{f}:3" in report.problem and "missing" in report.problem


def test_swapped_lines_are_detected(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    f = log_files(path)[0]
    _rewrite(f, lambda ls: [ls[0], ls[2], ls[1], *ls[3:]])
    report = verify(path, KEY, head)
    assert not report.ok and report.problem is not None and f"{f}:2" in report.problem


def test_a_truncated_end_is_detected_thanks_to_the_head(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    _rewrite(path, lambda ls: ls[:-1])
    assert verify(path, KEY, None).ok  # without the head, a shorter log looks complete
    report = verify(path, KEY, head)
    assert not report.ok and report.problem is not None and "truncated" in report.problem


def test_a_removed_middle_file_is_detected(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    files = log_files(path)
    assert len(files) >= 3
    files[1].unlink()
    report = verify(path, KEY, head)
    assert not report.ok and report.problem is not None
    assert str(files[2]) in report.problem and "missing" in report.problem


def test_a_removed_oldest_file_is_detected_thanks_to_the_floor(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    log_files(path)[0].unlink()
    assert verify(path, KEY, AuditHead(head.seq, head.mac, 10_000)).ok  # had rotation dropped it
    report = verify(path, KEY, head)
    assert not report.ok and report.problem is not None and "removed" in report.problem


def test_lines_removed_from_the_start_are_detected(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    _rewrite(log_files(path)[0], lambda ls: ls[1:])
    report = verify(path, KEY, AuditHead(head.seq, head.mac, 10_000))
    assert not report.ok and report.problem is not None and "not the first line of its file" in report.problem


def test_a_replaced_log_does_not_match_the_head(copy: tuple[Path, AuditHead], tmp_path: Path) -> None:
    path, head = copy
    for f in log_files(path):
        f.unlink()
    write_log(tmp_path, 60, max_bytes=4096)  # a whole new chain under the same key, same length
    report = verify(path, KEY, head)
    assert not report.ok and report.problem is not None and "not the one the recorded head names" in report.problem


def test_the_wrong_key_fails(copy: tuple[Path, AuditHead]) -> None:
    path, head = copy
    report = verify(path, OTHER_KEY, head)
    assert not report.ok and report.problem is not None and "MAC mismatch" in report.problem


Mutation = tuple[str, int, int, int]


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["change", "delete", "swap", "truncate"]))
    return kind, draw(st.integers(0, 10_000)), draw(st.integers(0, 10_000)), draw(st.integers(0, 255))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations())
def test_any_single_line_mutation_deletion_swap_or_truncation_is_detected(
    golden: tuple[Path, AuditHead], m: Mutation
) -> None:
    src, head = golden
    kind, a, b, byte = m
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = [d / f.name for f in log_files(src)]
        for f in log_files(src):
            shutil.copy2(f, d / f.name)
        per_file = [f.read_bytes().splitlines(keepends=True) for f in files]
        flat = [(fi, li) for fi, ls in enumerate(per_file) for li in range(len(ls))]
        fi, li = flat[a % len(flat)]
        if kind == "change":
            line = per_file[fi][li]
            pos = b % (len(line) - 1)  # any byte but the newline
            new = byte if byte != line[pos] else (byte + 1) % 256
            per_file[fi][li] = line[:pos] + bytes([new]) + line[pos + 1:]
        elif kind == "delete":
            del per_file[fi][li]
        elif kind == "swap":
            fj, lj = flat[b % len(flat)]
            if (fj, lj) == (fi, li):
                fj, lj = flat[(b + 1) % len(flat)]
            per_file[fi][li], per_file[fj][lj] = per_file[fj][lj], per_file[fi][li]
        else:  # truncate: the last k lines of the newest file
            k = 1 + a % len(per_file[-1])
            per_file[-1] = per_file[-1][:-k]
        for f, ls in zip(files, per_file, strict=True):
            f.write_bytes(b"".join(ls))
        report = verify(d / LOG, KEY, head)
        assert not report.ok, f"{m} was not detected: {report.summary()}"
        assert report.unconfirmed == 0


# --- the key and the store -----------------------------------------------------------------------------------


def test_the_key_is_made_once_with_mode_0600_and_refused_if_others_can_read_it(tmp_path: Path) -> None:
    p = tmp_path / "audit.key"
    k = load_or_create_key(p)
    assert len(k) == 32 and load_or_create_key(p) == k == read_key(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match="other users"):
        read_key(p)
    os.chmod(p, 0o600)
    p.write_text("not hex")
    with pytest.raises(KeyFileError, match="hex"):
        read_key(p)


def _head_from_another_process(db: Path) -> str:
    code = "import sys; from kvstore.storage.store import read_audit_head; print(read_audit_head(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_the_lmdb_store_keeps_the_head_and_verify_reads_it_while_the_node_runs(tmp_path: Path) -> None:
    store = LmdbNodeStore(tmp_path / "db")
    try:
        assert store.audit_head() is None
        assert _head_from_another_process(tmp_path / "db") == "None"
        path, _ = write_log(tmp_path, 20, store)
        head = store.audit_head()
        assert head is not None and head.seq == 20
        assert _head_from_another_process(tmp_path / "db") == repr(head)  # read-only, beside the open store
        assert verify(path, KEY, head).ok
    finally:
        store.close()
    assert read_audit_head(tmp_path / "db") == head
    again = LmdbNodeStore(tmp_path / "db")
    try:
        assert again.audit_head() == head
    finally:
        again.close()


# --- the command line -------------------------------------------------------------------------------------


def test_verify_command_exit_codes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvstore.cli.server import cli

    path, _ = write_log(tmp_path, 10)
    (tmp_path / "key").write_text(KEY.hex())
    os.chmod(tmp_path / "key", 0o600)
    run = CliRunner().invoke
    ok = run(cli, ["audit", "verify", str(path), "--key-file", str(tmp_path / "key")])
    assert ok.exit_code == 0 and "OK: 10 lines" in ok.output and "cannot be detected" in ok.output
    assert run(cli, ["audit", "verify", str(path)]).exit_code == 2  # no key given
    missing = run(cli, ["audit", "verify", str(path), "--key-file", str(tmp_path / "nokey")])
    assert missing.exit_code == 2 and "no audit key" in missing.output
    nostore = run(cli, ["audit", "verify", str(path), "--key-file", str(tmp_path / "key"), "--data-dir", str(tmp_path)])
    assert nostore.exit_code == 2 and "no node store" in nostore.output
    _rewrite(path, lambda ls: ls[1:])
    bad = run(cli, ["audit", "verify", str(path), "--key-file", str(tmp_path / "key")])
    assert bad.exit_code == 1 and "TAMPERED" in bad.output and f"{path}:1" in bad.output


def test_serve_refuses_audit_writes_without_an_audit_log(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvstore.cli.server import cli

    r = CliRunner().invoke(cli, ["serve", "--id", "1", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:1",
                                 "--peers", "1=127.0.0.1:1", "--audit-writes"])
    assert r.exit_code == 2 and "--audit-writes needs --audit-log" in r.output
