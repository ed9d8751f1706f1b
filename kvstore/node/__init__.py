"""kvstore.node: one node's logic, synchronous and deterministic, with everything that touches the
world injected (clock, randomness, storage, transport), so that the same code runs in the server
and under the deterministic simulator (issue 14, as FoundationDB and TigerBeetle run their real
server code under simulation); `kvstore.server` wraps it in asyncio and gRPC.

Modules: `host` (the multi-raft host and its Ready cycle), `inbound` (admission of other nodes'
messages), `tracker` (the node's view of the shard map), `logic` (`NodeLogic`: start and
bootstrap, reconcile with the map, ticks and peer liveness), `moves` (`MoveCoordinator`: the
range-move protocol as a generator of requests, fed their outcomes), `store` (the `NodeStore` protocol: a
node's durable state, every Raft group's log, hard state and state machine, behind the calls the
node makes; `GroupWrite` and `ApplyBatch`, what one Ready cycle hands it), `memstore`
(`MemoryNodeStore`, the in-memory implementation for the simulator, with an honest durability
model and injectable disk faults), `reads` (`NodeReads`: read points at every consistency level on
leaders and replicas, staleness evidence from probes; the clock and rng handed in). The LMDB
implementation is `kvstore.storage.store.LmdbNodeStore`.

`store` and `memstore` are STANDARD LIBRARY ONLY (a test walks their imports): the simulator's
storage never loads LMDB or gRPC.
"""
