"""Publishing a node's client address (`--client-listen`) in the shard map, as etcd members
publish their client URLs through Raft after they start.

Each node, and only it, writes its own entry of `ShardMap.clients`: when the map lists the node
(`ShardMap.nodes`, kept by the coordinator from the membership) and its entry differs from the
address the node serves clients on, the node proposes a compare-and-swap of the map with its
entry set (or removed, when it runs without a client port any more). The compare-and-swap makes
racing writers (the coordinator, other nodes publishing theirs) harmless: the loser sees a newer
map and decides again. Synchronous and deterministic (the asyncio loop that proposes is
`kvstore.server.clientaddr`).
"""

from __future__ import annotations

from kvstore.shard.shardmap import SHARD_MAP_KEY, ShardMap
from kvstore.storage import commands

__all__ = ["publish_command"]


def publish_command(m: ShardMap | None, raw: bytes, node: int, address: str) -> bytes | None:
    """The metadata-group command that makes `m` (encoded as `raw`) carry `address` as node
    `node`'s client address, or None when there is nothing to do: no map yet, the map does not
    list the node yet (the coordinator adds it once its membership is applied), or the entry is
    already right. `address` "" removes the entry; it must otherwise be a valid HOST:PORT (the
    node's configuration was validated at start)."""
    if m is None or node not in m.nodes or m.clients.get(node, "") == address:
        return None
    new = m.with_client(node, address)
    new.check()
    return commands.encode_cas(SHARD_MAP_KEY, False, raw, new.encode())
