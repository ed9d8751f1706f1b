#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up a virtualenv if needed, then run
# the linters, the type checker, 500 seeds of the simulator (whole nodes; 3 and 5 nodes in parallel)
# and the test suite (arguments: run only those pytest arguments instead of the whole suite).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/system-deps.sh  # iptables, podman, etcd, ... from Debian when missing
else
  echo "(not root: system packages are not installed; the tests that need root or them skip or fail)"
fi
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
echo "== simulator (whole nodes): 350 seeds x 3 nodes, 150 seeds x 5 nodes, one process per core"
SIMLOG=$(mktemp -d)
"$VENV/bin/python" -m chaos.sim --seeds 350 --start 1000 --nodes 3 >"$SIMLOG/3" 2>&1 & SIM3=$!
"$VENV/bin/python" -m chaos.sim --seeds 150 --start 1000 --nodes 5 >"$SIMLOG/5" 2>&1 & SIM5=$!
SIMRC=0
wait "$SIM3" || SIMRC=1
wait "$SIM5" || SIMRC=1
cat "$SIMLOG/3" "$SIMLOG/5"
rm -rf "$SIMLOG"
[ "$SIMRC" -eq 0 ]
if [ "$#" -gt 0 ]; then  # the tests named on the command line, as pytest would run them
  echo "== pytest $*"
  exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "$@"
fi
# The unit and simulation tests are CPU-bound and independent: one worker per core (pytest-xdist).
# The rest start real clusters, network namespaces and containers and wait on them: one at a time.
echo "== pytest: unit and simulation tests, one worker per core"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=10 -n auto tests/unit tests/simulation
echo "== pytest: integration, chaos and container tests"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=25 tests \
  --ignore=tests/unit --ignore=tests/simulation
