"""etcd Maintenance.Snapshot's files in a node's data directory (`kvstore/server/etcd/maintenance.py`):
what a crash mid-Snapshot leaves is removed at the next start (`remove_snapshot_leftovers`,
called where the node opens its data directory: tests/integration/test_etcd_node.py starts a
node over them), and a stopped save is heard in its lease loop
too (`backup.save.save_from`), its partial file removed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.backup.save import save_from
from kvstore.server.etcd.maintenance import SNAPSHOT_PREFIX, SaveStopped, remove_snapshot_leftovers
from kvstore.v1 import kv_pb2


def test_a_crashed_snapshots_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    backup = tmp_path / f"{SNAPSHOT_PREFIX}abc123.kvbackup"
    part = tmp_path / f".{backup.name}.xyz.part"
    keep = [tmp_path / "db", tmp_path / "audit.key", tmp_path / ".other.part", tmp_path / "etcd-snapshot-x"]
    for p in [backup, part, *keep]:
        p.write_bytes(b"x" * 10)
    (tmp_path / f"{SNAPSHOT_PREFIX}dir").mkdir()  # never a directory
    assert sorted(remove_snapshot_leftovers(tmp_path)) == sorted([backup, part])
    assert not backup.exists() and not part.exists()
    assert all(p.exists() for p in keep) and (tmp_path / f"{SNAPSHOT_PREFIX}dir").is_dir()
    assert remove_snapshot_leftovers(tmp_path) == []


class _Source:
    """No keys, many leases: a save spends its time in the lease loop."""

    def __init__(self) -> None:
        self.asked = 0

    def export_auth(self) -> bytes:
        return b""

    def shard_map(self) -> None:
        return None

    def choose_revision(self, timeout: float) -> int:
        return 1

    def scan_at(self, revision: int, timeout: float) -> Iterator[kv_pb2.KeyValue]:
        return iter(())

    def lease_list(self, timeout: float) -> list[int]:
        return list(range(1, 10_001))

    def lease_time_to_live(self, lease_id: int, timeout: float) -> kv_pb2.LeaseTimeToLiveResponse:
        self.asked += 1
        return kv_pb2.LeaseTimeToLiveResponse(id=lease_id, ttl=10, granted_ttl=10)


def test_a_stopped_save_stops_in_its_lease_loop_and_leaves_no_file(tmp_path: Path) -> None:
    src = _Source()
    stopped = [False]

    def progress(_keys: int, _size: int) -> None:
        if src.asked >= 3:
            stopped[0] = True
        if stopped[0]:
            raise SaveStopped("the Snapshot call ended")

    with pytest.raises(SaveStopped):
        save_from(src, tmp_path / "out.kvbackup", timeout=1.0, progress=progress)
    assert src.asked == 3  # not the 10,000 leases
    assert list(tmp_path.iterdir()) == []
