"""The kvstore client library.

    from kvstore.client import Client, AsyncClient

    with Client(["127.0.0.1:2379", "127.0.0.1:2380", "127.0.0.1:2381"]) as kv:
        kv.put(b"k", b"v")
        assert kv.get(b"k") == b"v"
"""

from kvstore.client.client import (
    DEFAULT_MAX_KEY_SIZE,
    DEFAULT_MAX_VALUE_SIZE,
    AsyncClient,
    Client,
    Consistency,
    NodeStatus,
    ReadPreference,
    ReadResult,
    group_status,
)

__all__ = [
    "DEFAULT_MAX_KEY_SIZE",
    "DEFAULT_MAX_VALUE_SIZE",
    "AsyncClient",
    "Client",
    "Consistency",
    "NodeStatus",
    "ReadPreference",
    "ReadResult",
    "group_status",
]
