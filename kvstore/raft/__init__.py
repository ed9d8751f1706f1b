"""kvstore.raft: a pure, deterministic Raft core (sans-I/O).

Public surface: `RaftNode` and `Config` (the state machine), the value types in `types`, the
`LogStorage` protocol and the in-memory `MemoryStorage`.
"""

from .core import CAMPAIGN_TRANSFER, Config, RaftNode
from .memstorage import MemoryStorage
from .progress import Progress, ProgressState
from .storage import CompactedError, LogStorage, SnapshotTemporarilyUnavailable, UnavailableError
from .types import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ProposalDropped,
    RaftError,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
    bootstrap_entries,
)

__all__ = [
    "CAMPAIGN_TRANSFER",
    "NONE",
    "CompactedError",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Config",
    "Entry",
    "EntryType",
    "HardState",
    "LogStorage",
    "MemoryStorage",
    "Message",
    "MessageType",
    "Progress",
    "ProgressState",
    "ProposalDropped",
    "RaftError",
    "RaftNode",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotTemporarilyUnavailable",
    "SoftState",
    "UnavailableError",
    "bootstrap_entries",
]
