#!/usr/bin/env bash
# Runs the default test suite. pytest's exit code 5 (no tests collected) counts as failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline WANDB_SILENT=true
# a crash in native code (Ray, gloo, torch threads) prints every thread's Python stack
export PYTHONFAULTHANDLER=1
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/raptor-ray}"
mkdir -p "$RAY_TMPDIR"
.venv/bin/python -m pytest --durations=30 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
