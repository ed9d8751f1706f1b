"""Benchmarks. `python -m bench.compare --help`: kvstore side by side with etcd (see bench/README.md)."""
