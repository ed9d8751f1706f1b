#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up a virtualenv if needed, then run
# the linters, the type checker and the test suite (arguments: run only those pytest arguments
# instead of the whole suite), with 500 seeds of the simulator (whole nodes, 3 and 5 nodes) in the
# background at idle priority; exits non-zero if any of them failed.
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
# The simulator (whole nodes: 350 seeds x 3 nodes, 150 seeds x 5 nodes, scripts/sim-seeds.sh)
# runs in the background while the linters and tests run, at the lowest CPU priority: in a
# session of its own whose autogroup is at nice 19 (the kernel weighs sessions' autogroups
# against each other before nice counts, and the nodes the tests start have sessions of their
# own), itself at nice 19 and SCHED_IDLE. It takes the CPU the cluster tests leave idle (they
# mostly wait on their nodes), ~4 minutes of wall time saved; its verdict is read after them.
SIMDIR=$(mktemp -d)
stop_sim() {
  if [ -s "$SIMDIR/pid" ]; then kill -- "-$(cat "$SIMDIR/pid")" 2>/dev/null || true; fi
  rm -rf "$SIMDIR"
}
trap stop_sim EXIT
# shellcheck disable=SC2016  # expanded by the inner shell
setsid --wait bash -c 'echo 19 >/proc/self/autogroup 2>/dev/null || true; echo $$ >"$0/pid"
  idle=(); if command -v chrt >/dev/null; then idle=(chrt --idle 0); fi
  exec nice -n 19 "${idle[@]}" bash scripts/sim-seeds.sh' "$SIMDIR" >"$SIMDIR/out" 2>&1 & SIM=$!
echo "== simulator: started in the background at idle priority (its results follow the tests)"
sim_verdict() {  # waits for the simulator, prints its output; fails if a seed failed
  local rc=0 p pg
  # The tests are done: what is left of the simulator runs at normal priority (as root; else it
  # stays idle), so a machine busy with other work delays it no more than it did in the foreground.
  pg=$(cat "$SIMDIR/pid" 2>/dev/null || true)
  if [ -n "$pg" ] && [ "$(id -u)" -eq 0 ]; then
    for p in $(pgrep -g "$pg" || true); do
      echo 0 >"/proc/$p/autogroup" 2>/dev/null || true
      renice -n 0 -p "$p" >/dev/null 2>&1 || true
      chrt --all-tasks --other -p 0 "$p" >/dev/null 2>&1 || true
    done
  fi
  wait "$SIM" || rc=1
  echo "== simulator (whole nodes): 350 seeds x 3 nodes, 150 seeds x 5 nodes"
  cat "$SIMDIR/out"
  : >"$SIMDIR/pid"  # ended: nothing for the exit trap to stop
  return "$rc"
}
echo "== ruff"
"$VENV/bin/ruff" check .
echo "== mypy"
"$VENV/bin/mypy"
if [ "$#" -gt 0 ]; then  # the tests named on the command line, as pytest would run them
  echo "== pytest $*"
  PYRC=0
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "$@" || PYRC=$?
  SIMRC=0
  sim_verdict || SIMRC=1
  exit $(( PYRC != 0 || SIMRC != 0 ))
fi
# The unit and simulation tests are CPU-bound and independent: one worker per core (pytest-xdist).
# The rest start real clusters, network namespaces and containers and wait on them: one at a time.
echo "== pytest: unit and simulation tests, one worker per core"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=10 -n auto tests/unit tests/simulation
echo "== pytest: integration, chaos and container tests"
PYRC=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=25 tests \
  --ignore=tests/unit --ignore=tests/simulation || PYRC=$?
SIMRC=0
sim_verdict || SIMRC=1
exit $(( PYRC != 0 || SIMRC != 0 ))
