#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up a virtualenv if needed, then run
# the linters, the type checker, a few hundred simulator seeds (Raft cores, whole nodes, range moves)
# and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVSTORE_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[dev]'
echo "== ruff"
"$VENV/bin/ruff" check .
echo "== mypy"
"$VENV/bin/mypy"
echo "== simulator: 200 seeds x 3 nodes, 100 seeds x 5 nodes"
"$VENV/bin/python" -m chaos.sim --seeds 200 --start 1000 --nodes 3
"$VENV/bin/python" -m chaos.sim --seeds 100 --start 1000 --nodes 5
echo "== whole-node simulator: 200 seeds x 3 nodes, 50 seeds x 5 nodes (range moves in half of them)"
"$VENV/bin/python" -m chaos.sim --engine nodes --seeds 200 --start 1000 --nodes 3
"$VENV/bin/python" -m chaos.sim --engine nodes --seeds 50 --start 1000 --nodes 5
echo "== pytest"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
