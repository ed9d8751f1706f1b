#!/usr/bin/env bash
# The test command's simulator seeds (scripts/test.sh runs this in the background): 350 seeds of
# 3 nodes and 150 of 5 nodes (whole nodes, seeds from 1000), as two processes of about equal
# work, one per core (a 5-node seed costs ~1.5 3-node seeds): seeds 1000-1286 of 3 nodes; and
# 1000-1149 of 5 nodes, then 1287-1349 of 3 nodes. Prints each run's summary (a line per
# failing seed, then `seeds: N, violations: V`); exits non-zero if any seed failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYBIN=${KVSTORE_VENV:-.venv}/bin/python
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
"$PYBIN" -m chaos.sim --seeds 287 --start 1000 --nodes 3 >"$LOGS/3" 2>&1 & A=$!
( rc=0
  "$PYBIN" -m chaos.sim --seeds 150 --start 1000 --nodes 5 >"$LOGS/5" 2>&1 || rc=1
  "$PYBIN" -m chaos.sim --seeds 63 --start 1287 --nodes 3 >"$LOGS/3b" 2>&1 || rc=1
  exit "$rc" ) & B=$!
RC=0
wait "$A" || RC=1
wait "$B" || RC=1
echo "-- 3 nodes, seeds 1000-1286"; cat "$LOGS/3"
echo "-- 3 nodes, seeds 1287-1349"; cat "$LOGS/3b"
echo "-- 5 nodes, seeds 1000-1149"; cat "$LOGS/5"
exit "$RC"
