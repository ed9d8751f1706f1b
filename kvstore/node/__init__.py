"""kvstore.node: one node's logic, synchronous, with its clock, randomness, storage and transport
injected (sans-I/O, like the Raft core it drives): the multi-raft host and its Ready cycle
(`host`), admission of other nodes' messages (`inbound`), the node's view of the shard map
(`tracker`) and the logic that keeps the hosted groups in line with it and watches peer
liveness (`logic`). `kvstore.server` wraps it in asyncio and gRPC; the simulator runs it as is.
"""
