#!/usr/bin/env bash
# Set up a virtualenv if needed and run a local 3-node cluster in the foreground (Ctrl-C stops it).
# Clients: .venv/bin/kvctl put hello world; .venv/bin/kvctl get hello
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVSTORE_VENV:-.venv}
if [ ! -x "$VENV/bin/kvstore" ]; then
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
fi
exec "$VENV/bin/kvstore" dev "$@"
