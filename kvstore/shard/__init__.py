"""Consistent-hash sharding across Raft groups: the ring, the versioned shard map, range moves."""
