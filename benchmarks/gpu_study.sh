#!/usr/bin/env bash
# The accuracy study on one GPU machine with many cores: the two suites side by side, several runs
# at a time (one process each). Core rows first (short, then long budget), then the ablations.
# Interrupt it at any time; re-running continues (finished runs are kept, runs in flight resume).
#   usage: bash benchmarks/gpu_study.sh [JOBS_DEMO] [JOBS_ICON]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
JD=${1:-4}; JI=${2:-7}
export STUDY_THREADS=1 PYTHONUNBUFFERED=1
study() { $PY benchmarks/study.py --device cuda --no-report "$@"; }
( for b in short long; do study --suite iconshift --core --budgets $b --jobs "$JI"; done
  study --suite iconshift --budgets long short --jobs "$JI" ) &
( for b in short long; do study --suite demo --core --budgets $b --jobs "$JD" --workers 2; done
  study --suite demo --budgets short long --jobs "$JD" --workers 2 ) &
wait
