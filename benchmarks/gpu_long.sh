#!/usr/bin/env bash
# One GPU call of the accuracy study with a deadline: IconShift-dev's long budget (core rows) with many runs
# at a time, and beside it the CustomKD rows of the short budgets (IconShift-dev, demo). Finished results
# are kept; whatever is unfinished at the deadline is left for the next call (runs resume).
#   usage: bash benchmarks/gpu_long.sh DEADLINE_S [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEADLINE=${1:-540}; OUT=${2:-benchmarks/results/study}
export STUDY_THREADS=1 PYTHONUNBUFFERED=1
END=$((SECONDS + DEADLINE))
s() { timeout $((END - SECONDS)) $PY benchmarks/study.py --device cuda --no-report "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1; nproc >> "$OUT/gpu.txt"
( s --suite iconshift --core --budgets long --jobs 13 ) > "$OUT/icon-long.log" 2>&1 &
( s --suite iconshift --rows customkd --budgets short --jobs 2 && s --suite demo --rows customkd --budgets short --jobs 2 --workers 2 ) > "$OUT/short-customkd.log" 2>&1 &
wait
