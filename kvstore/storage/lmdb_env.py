"""The node's LMDB environment: opening, durability, map-size growth, full-disk handling.

One environment per node (a directory holding `data.mdb` and `lock.mdb`), named sub-databases
(`layout.DB_NAMES`), all Raft groups in it.

Durability: with `sync=True` (the default) every committed write transaction is durable when
`commit()` returns (LMDB fdatasyncs the data pages, then the meta page). `sync=False` skips the
syncs: a process crash still loses nothing that was committed (the OS has the pages), a machine
crash may lose recent transactions but never corrupts the database. Only for tests and benchmarks.
With `checkpointed=True` (`--state-sync checkpoint`) commits skip the syncs too, and the store
makes them durable by checkpoints instead (`lmdbckpt.py`, `store.LmdbNodeStore.checkpoint`):
`sync_all()` flushes everything committed, and `pin(txn)` keeps a read transaction open on the
checkpointed snapshot until the next checkpoint, so LMDB reuses none of its pages. Growing the
map kills that pin with every other reader of the process: `after_grow` (the store's checkpoint)
runs at once, before any later commit could reuse a page of the checkpointed tree. Between
checkpoints, `writeback_interval` starts the kernel's writeback of the file's dirty pages every
few milliseconds (`writeback.py`), so they do not pile up and leave in bursts that stall the
WAL's flushes; it makes nothing durable.

Threading: use an `LmdbEnv` from ONE thread (the node's asyncio loop; its Ready cycles' writes run
on the persist thread), except that `write` may be called from any thread: a lock serializes the
write transactions (the audit log's writer thread records its head with one now and then), so
there is never more than one write transaction, nor a map growth during one; read transactions
may be open while writing.

Map growth: LMDB needs a fixed-size memory map. `write(fn)` never fails because the map is full:
on `MapFullError` it aborts the transaction, grows the map (doubling, up to `max_map_size`) and
re-runs `fn` in a new transaction. Growing (`set_mapsize`) is only legal with no write transaction
open, which holds here since the write was just aborted and writes never nest. It also invalidates
every read transaction open in this process: py-lmdb marks their Python objects dead (no access to
the old mapping is possible), and our long-lived readers (`Reader`, used by streamed scans and
snapshots) notice the map generation changed and raise `ReadInvalidatedError` instead of returning
data from a half-finished view. To make that rare, the map is also grown ahead of need, before a
write, whenever the file uses more than half of it and no long-lived reader is open.

Full disk: an ENOSPC/EDQUOT from LMDB or the OS, or an EIO from a commit while the filesystem has
less than `SHORT_WRITE_FREE_BYTES` free (LMDB reports a short `pwrite` on a full disk as EIO), raises
`StorageFullError` with a clear message and sets `full`. The transaction was aborted, so nothing of
it is visible and the environment stays usable; a later successful write with at least
`FULL_CLEAR_FREE_BYTES` free on the filesystem clears `full`.

`write(fn)` contract: `fn(txn)` may run more than once (after map growth), so it must not change
anything outside the transaction; it returns what the caller needs to update its caches AFTER
`write` returned (i.e. after the commit).
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb

from . import writeback
from .errors import ReadInvalidatedError, StorageClosedError, StorageError, StorageFullError, StorageIOError
from .layout import DB_NAMES
from .writeback import WritebackPacer

if TYPE_CHECKING:
    from typing import TypeAlias

    Txn: TypeAlias = lmdb.Transaction[bytes]
    Db: TypeAlias = lmdb._Database
    Cursor: TypeAlias = lmdb.Cursor[bytes]

T = TypeVar("T")

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SHORT_WRITE_FREE_BYTES = 1 << 20
"""An EIO from LMDB while the filesystem has less free space than this counts as a full disk."""
FULL_CLEAR_FREE_BYTES = 16 << 20
"""`full` is cleared by a successful write when at least this much space is free."""
LMDB_KEY_LIMIT = 511


class Reader:
    """A long-lived read transaction with a consistent view (for streamed scans and snapshots).

    Call `check()` before each use: it raises `ReadInvalidatedError` if the map grew since the
    reader was opened (which killed the transaction). Close it when done; an abandoned reader is
    released when garbage-collected.
    """

    __slots__ = ("__weakref__", "_env", "generation", "txn")

    def __init__(self, env: LmdbEnv) -> None:
        self._env = env
        self.generation = env.generation
        self.txn: Txn | None = env.env.begin()

    def check(self) -> Txn:
        txn = self.txn
        if txn is None:
            raise StorageClosedError("read transaction already closed")
        if self._env.generation != self.generation:
            self.close()
            raise ReadInvalidatedError(
                "the read was cut off: the LMDB map grew (or the store closed) while it was open; retry it"
            )
        return txn

    def close(self) -> None:
        txn, self.txn = self.txn, None
        self._env._readers.discard(self)
        if txn is not None and self._env.generation == self.generation:
            with suppress(lmdb.Error):
                txn.abort()


class LmdbEnv:
    """An open LMDB environment with growth and full-disk handling (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: bool = True,
        map_size: int = 64 << 20,
        max_map_size: int = 1 << 40,
        max_readers: int = 126,
        db_names: Sequence[bytes] = DB_NAMES,
        checkpointed: bool = False,
        writeback_interval: float = 0.0,
    ) -> None:
        """`writeback_interval` (seconds; checkpointed mode, 0 = off): start the writeback of
        `data.mdb`'s dirty pages that often (`writeback.WritebackPacer`: timing only)."""
        self.path = Path(path)
        self.checkpointed = checkpointed
        self.after_grow: Callable[[], None] | None = None
        """Called right after every map growth, and before a write finds no pin, with the write
        lock held and no write transaction open (checkpointed mode: the store's checkpoint, which
        pins again). Invariant, once it is set: no write transaction begins without a pin."""
        self.before_grow: Callable[[], None] | None = None
        """Called before a map growth (the store waits for its background checkpoint: growing
        kills every read transaction of the process, the one it is about to pin too)."""
        self._pin: Txn | None = None
        self._pin_lock = threading.Lock()
        self.max_map_size = max(max_map_size, map_size)
        self.full = False
        self.generation = 0
        self.grow_count = 0
        self._readers: weakref.WeakSet[Reader] = weakref.WeakSet()
        self._closed = False
        self._write_lock = threading.RLock()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(self.path),
                map_size=map_size,
                subdir=True,
                max_dbs=len(db_names) + 2,
                sync=sync and not checkpointed,
                metasync=sync and not checkpointed,
                readahead=False,
                writemap=False,
                max_readers=max_readers,
            )
        except (lmdb.Error, OSError) as err:
            raise self.translate_error(err, "opening the environment") from err
        if self.env.max_key_size() < LMDB_KEY_LIMIT:
            raise StorageError(f"LMDB max key size {self.env.max_key_size()} < {LMDB_KEY_LIMIT}")
        self.psize = self.env.stat()["psize"]

        def create(txn: Txn) -> dict[bytes, Db]:
            return {name: self.env.open_db(name, txn=txn, create=True) for name in db_names}

        self.dbs: dict[bytes, Db] = self.write(create)
        if checkpointed:
            self.sync_all()  # a new file is durable before the first checkpoint names it
        self.pacer: WritebackPacer | None = None
        if checkpointed and writeback_interval > 0 and writeback.available():
            self.pacer = WritebackPacer(self.path / "data.mdb", writeback_interval)

    # --- checkpoints (checkpointed mode) ----------------------------------------------------------
    @property
    def write_lock(self) -> threading.RLock:
        """Held by `write`; a checkpoint holds it so no commit lands between its pin and its sync."""
        return self._write_lock

    def begin_read(self) -> Txn:
        """A raw read transaction on the latest committed snapshot (for `pin`)."""
        self._check_open()
        try:
            return self.env.begin()
        except lmdb.Error as err:
            raise self.translate_error(err, "opening a read transaction") from err

    def sync_all(self) -> None:
        """`env.sync(True)`: every committed page and both meta pages are on disk on return."""
        self._check_open()
        try:
            self.env.sync(True)
        except (lmdb.Error, OSError) as err:
            raise self.translate_error(err, "flushing the environment") from err

    def pin(self, txn: Txn) -> None:
        """Keep `txn` open until the next `pin` (its snapshot's pages are never reused); the
        previous pin is released."""
        with self._pin_lock:
            old, self._pin = self._pin, txn
        if old is not None:
            _abort(old)

    @property
    def pinned(self) -> bool:
        return self._pin is not None

    # --- transactions --------------------------------------------------------------------------
    def write(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn(txn)` in one write transaction and commit it (one fsync with sync=True).

        Retries after growing the map on MapFullError (so `fn` may run more than once). Any
        exception aborts the transaction: nothing of it is visible. Full disk -> StorageFullError;
        other LMDB/OS errors -> StorageIOError; exceptions raised by `fn` itself pass through.
        Thread-safe: write transactions (and map growth) are serialized by a lock.
        """
        with self._write_lock:
            return self._write(fn)

    def _write(self, fn: Callable[[Txn], T]) -> T:
        self._check_open()
        self._maybe_grow()
        if self._pin is None and self.after_grow is not None:
            self.after_grow()  # a checkpoint after a growth failed (full disk): pin before writing
        while True:
            try:
                txn = self.env.begin(write=True)
            except (lmdb.Error, OSError) as err:
                raise self.translate_error(err, "beginning a write transaction") from err
            try:
                result = fn(txn)
                txn.commit()
            except lmdb.MapFullError:
                _abort(txn)
                self._grow()
                continue
            except (lmdb.Error, OSError) as err:
                _abort(txn)
                raise self.translate_error(err, "writing") from err
            except BaseException:
                _abort(txn)
                raise
            if self.full and self.fs_free_bytes() >= FULL_CLEAR_FREE_BYTES:
                self.full = False
            return result

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A short read transaction (do not keep it across a `write`)."""
        self._check_open()
        txn = self.env.begin()
        try:
            yield txn
        finally:
            _abort(txn)

    def get(self, db: Db, key: bytes) -> bytes | None:
        """One point read in its own short read transaction (the hot path of client reads)."""
        self._check_open()
        txn = self.env.begin()
        try:
            return txn.get(key, db=db)
        finally:
            txn.abort()

    def reader(self) -> Reader:
        """A long-lived read transaction; see `Reader`."""
        self._check_open()
        try:
            r = Reader(self)
        except lmdb.Error as err:
            raise self.translate_error(err, "opening a read transaction") from err
        self._readers.add(r)
        return r

    def db(self, name: bytes) -> Db:
        return self.dbs[name]

    # --- growth ---------------------------------------------------------------------------------
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def used_bytes(self) -> int:
        """Bytes of the map in use (high-water mark of the data file's pages)."""
        return (int(self.env.info()["last_pgno"]) + 1) * self.psize

    def _maybe_grow(self) -> None:
        if self._readers:
            return
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.psize
        if used * 2 > info["map_size"] and info["map_size"] < self.max_map_size:
            self._grow(used * 2)

    def _grow(self, min_size: int = 0) -> None:
        cur = self.map_size()
        if cur >= self.max_map_size:
            self.full = True
            raise StorageFullError(
                f"storage full: the LMDB map of {self.path} reached its maximum size of "
                f"{self.max_map_size} bytes; nothing of this write was stored"
            )
        new = min(max(cur * 2, min_size), self.max_map_size)
        new = -(-new // self.psize) * self.psize
        # Kills every read transaction open in this process; long-lived readers see the new
        # generation and raise ReadInvalidatedError instead of touching their dead transaction
        # (a checkpoint prepared before it is dropped: the store checks the generation first).
        self.generation += 1
        if self.before_grow is not None:
            self.before_grow()
        self._readers.clear()
        self.pin_release()  # it would die with the others: `after_grow` pins again
        try:
            self.env.set_mapsize(new)
        except lmdb.Error as err:
            raise self.translate_error(err, "growing the map") from err
        self.grow_count += 1
        if self.after_grow is not None:
            self.after_grow()

    # --- disk -----------------------------------------------------------------------------------
    def fs_free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def disk_usage(self) -> dict[str, int]:
        st = os.statvfs(self.path)
        try:
            file_bytes = (self.path / "data.mdb").stat().st_size
        except OSError:
            file_bytes = 0
        info = self.env.info()
        return {
            "map_size": int(info["map_size"]),
            "used_bytes": (int(info["last_pgno"]) + 1) * self.psize,
            "file_bytes": file_bytes,
            "fs_free_bytes": st.f_bavail * st.f_frsize,
            "fs_total_bytes": st.f_blocks * st.f_frsize,
        }

    def live_bytes(self) -> int:
        """Bytes of the pages the sub-databases hold now (branch, leaf and overflow pages). Unlike
        `used_bytes` (the file's high-water mark, which never shrinks) this falls when keys are
        deleted or the Raft log is compacted: it is what the space quota measures."""
        with self.read() as txn:
            pages = 0
            for db in self.dbs.values():
                st = txn.stat(db)
                pages += int(st["branch_pages"]) + int(st["leaf_pages"]) + int(st["overflow_pages"])
        return pages * self.psize

    def db_entries(self) -> dict[str, int]:
        with self.read() as txn:
            return {name.decode(): int(txn.stat(db)["entries"]) for name, db in self.dbs.items()}

    def translate_error(self, err: BaseException, what: str) -> StorageError:
        """Map an LMDB/OS error to StorageFullError (full disk) or StorageIOError."""
        code: Any = err.errno if isinstance(err, OSError) else getattr(err, "code", None)
        try:
            free = self.fs_free_bytes()
        except OSError:
            free = -1
        short_write = code == errno.EIO and 0 <= free < SHORT_WRITE_FREE_BYTES
        if isinstance(err, lmdb.DiskError) or code in FULL_ERRNOS or short_write:
            self.full = True
            note = " (LMDB reports a short write on a full disk as an I/O error)" if short_write else ""
            return StorageFullError(
                f"storage full: no space left on the device holding {self.path} ({max(free, 0)} bytes "
                f"free) while {what}; nothing of this write was stored: {err}{note}"
            )
        return StorageIOError(f"storage I/O error at {self.path} while {what}: {err}")

    # --- lifecycle ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosedError(f"the store at {self.path} is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pacer is not None:
            self.pacer.close()
        self.generation += 1
        self._readers.clear()
        self.pin_release()
        self.env.close()

    def pin_release(self) -> None:
        with self._pin_lock:
            old, self._pin = self._pin, None
        if old is not None:
            _abort(old)


def _abort(txn: Txn) -> None:
    with suppress(lmdb.Error):
        txn.abort()
