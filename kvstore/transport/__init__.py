"""gRPC transport between kvstore nodes: one long-lived batching stream per peer, snapshots apart."""
