#!/usr/bin/env bash
# Regenerate the Python code for proto/kvstore/v1/*.proto into kvstore/v1/, and for etcd's v3 API
# (proto/etcd/: packages etcdserverpb, mvccpb, authpb, v3lockpb and v3electionpb, mapped to the import path kvstore/etcdpb/) into
# kvstore/etcdpb/ (all committed). tests/unit/test_proto_current.py fails if the committed code
# differs from what this produces.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  proto/kvstore/v1/raft.proto proto/kvstore/v1/kv.proto proto/kvstore/v1/admin.proto \
  proto/kvstore/v1/shard.proto proto/kvstore/v1/auth.proto
"$PY" -m grpc_tools.protoc -Ikvstore/etcdpb=proto/etcd \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  proto/etcd/mvccpb/kv.proto proto/etcd/authpb/auth.proto proto/etcd/etcdserverpb/rpc.proto \
  proto/etcd/v3lockpb/v3lock.proto proto/etcd/v3electionpb/v3election.proto
