#!/usr/bin/env bash
# Set up a virtualenv if needed and run the Raft core as a simulated 3-node cluster under faults,
# printing the trace of one run and then a batch of seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVSTORE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
fi
"$VENV/bin/python" -m chaos.sim --seed "${SEED:-1}" --trace | grep -vE 'APP|HEARTBEAT' | tail -n 40
"$VENV/bin/python" -m chaos.sim --seeds "${SEEDS:-50}" --nodes 3
