#!/usr/bin/env bash
# Regenerate the Python code for bench/etcdpb/etcd.proto (the etcd v3 API subset the benchmark
# uses) into bench/etcdpb/ (committed). tests/integration/test_bench_smoke.py checks it is current.
#   bench/gen_proto.sh [OUT_DIR]     (default: the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I. \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  bench/etcdpb/etcd.proto
