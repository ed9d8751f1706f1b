"""The kvstore client library.

    from kvstore.client import Client, AsyncClient

    with Client(["127.0.0.1:2379", "127.0.0.1:2380", "127.0.0.1:2381"]) as kv:
        kv.put(b"k", b"v")
        assert kv.get(b"k") == b"v"

`AsyncClient` (`async_client.py`) is the client; `Client` (`client.py`) runs it on a private
event loop. Results are kvstore types (`types.py`), never wire messages.
"""

from kvstore.client.async_client import AsyncClient
from kvstore.client.checks import DEFAULT_MAX_KEY_SIZE, DEFAULT_MAX_VALUE_SIZE
from kvstore.client.client import Client
from kvstore.client.types import (
    AdminResult,
    Alarm,
    Compare,
    Consistency,
    GroupInfo,
    GroupStatus,
    KeyValue,
    Member,
    NodeStatus,
    Op,
    OpResponse,
    Progress,
    ReadPreference,
    ReadResult,
    ShardOpResult,
    Status,
    TxnResponse,
    group_status,
)
from kvstore.client.watches import WatchBatch, WatchEvent

__all__ = [
    "DEFAULT_MAX_KEY_SIZE",
    "DEFAULT_MAX_VALUE_SIZE",
    "AdminResult",
    "Alarm",
    "AsyncClient",
    "Client",
    "Compare",
    "Consistency",
    "GroupInfo",
    "GroupStatus",
    "KeyValue",
    "Member",
    "NodeStatus",
    "Op",
    "OpResponse",
    "Progress",
    "ReadPreference",
    "ReadResult",
    "ShardOpResult",
    "Status",
    "TxnResponse",
    "WatchBatch",
    "WatchEvent",
    "group_status",
]
