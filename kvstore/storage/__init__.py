"""kvstore.storage: a node's durable state: every Raft group's log in one write-ahead log, every
group's state machine in one LMDB environment.

Modules: `nodelogs` (the Raft logs in the WAL: `wal/`, `walrec`, `walgroups`, `raftwal`;
`walmigrate` moves an old data directory's logs out of LMDB, read by `raftlog`), `lmdb_env` (open,
durability, map growth, full disk), `layout` (keys and encodings), `commands` + `machine` (command encoding and the pure apply
logic, standard library only), `kvstate` (the state machine on LMDB), `snapfile` (snapshot
stream format), `store` (`LmdbNodeStore`, the facade the server uses: the LMDB implementation of
the `kvstore.node.store.NodeStore` protocol; `NodeStore` here is its old name).

Importing this package does not import LMDB: the pure modules (`commands`, `machine`) stay usable by
the deterministic simulator. `NodeStore`, `GroupWrite` and `ApplyBatch` load `store` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .commands import ApplyResult, Command, Op, decode_command, encode_command
from .errors import (
    ReadInvalidatedError,
    SnapshotFormatError,
    StorageClosedError,
    StorageError,
    StorageFullError,
    StorageIOError,
)

if TYPE_CHECKING:
    from .store import ApplyBatch, GroupWrite, LmdbNodeStore, NodeStore

_LAZY = {"NodeStore", "LmdbNodeStore", "GroupWrite", "ApplyBatch"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ApplyBatch",
    "ApplyResult",
    "Command",
    "GroupWrite",
    "LmdbNodeStore",
    "NodeStore",
    "Op",
    "ReadInvalidatedError",
    "SnapshotFormatError",
    "StorageClosedError",
    "StorageError",
    "StorageFullError",
    "StorageIOError",
    "decode_command",
    "encode_command",
]
