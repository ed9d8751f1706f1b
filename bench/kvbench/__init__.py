"""kvstore vs etcd benchmark: clusters, adapters, load generator, reports (CLI: bench/compare.py)."""
