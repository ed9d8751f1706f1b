"""What the one-flush design of issue 20 assumes of LMDB (docs/ARCHITECTURE.md, "Durability today,
and the write-ahead log"): after `env.sync(True)`, a read transaction held open on that snapshot
keeps every page of it from being reused, so however many unsynced (`sync=False`) commits follow,
putting the checkpoint's two meta pages back gives exactly the checkpointed state. Without the
pinned reader the same restore is garbage: that is why an unsynced LMDB can be corrupted by a
machine crash, and why the checkpoint must pin its snapshot.

This checks LMDB (its MVCC page reuse and its file layout: meta pages 0 and 1), not kvstore code:
if a new LMDB breaks it, the design must change."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import lmdb


def _run(tmp: Path, pin: bool) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    rng = random.Random(7)
    env = lmdb.open(str(tmp / "env"), map_size=1 << 30, sync=False, metasync=False)
    try:

        def batch(tag: bytes) -> None:
            with env.begin(write=True) as txn:
                for _ in range(1500):
                    key = b"k%05d" % rng.randrange(8000)
                    if rng.random() < 0.3:
                        txn.delete(key)
                    else:
                        txn.put(key, tag + rng.randbytes(rng.randrange(10, 300)))

        for _ in range(10):
            batch(b"before")
        env.sync(True)  # the checkpoint
        with env.begin() as txn:
            checkpoint = dict(txn.cursor())
        psize = env.stat()["psize"]
        metas = (tmp / "env" / "data.mdb").read_bytes()[: 2 * psize]
        reader = env.begin() if pin else None
        for _ in range(20):
            batch(b"after")  # unsynced commits: pages freed and, unless pinned, reused
        (tmp / "restored").mkdir()
        shutil.copy(tmp / "env" / "data.mdb", tmp / "restored" / "data.mdb")
        with open(tmp / "restored" / "data.mdb", "r+b") as f:
            f.write(metas)
        if reader is not None:
            reader.abort()
    finally:
        env.close()
    restored_env = lmdb.open(str(tmp / "restored"), readonly=True, lock=False)
    try:
        with restored_env.begin() as txn:
            try:
                restored = dict(txn.cursor())
            except lmdb.Error:
                restored = {}
    finally:
        restored_env.close()
    return checkpoint, restored


def test_pinned_checkpoint_survives_later_unsynced_commits(tmp_path: Path) -> None:
    checkpoint, restored = _run(tmp_path, pin=True)
    assert len(checkpoint) > 4000
    assert restored == checkpoint


def test_without_the_pin_the_checkpoint_is_overwritten(tmp_path: Path) -> None:
    checkpoint, restored = _run(tmp_path, pin=False)
    assert restored != checkpoint
