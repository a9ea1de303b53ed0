#!/usr/bin/env bash
# One deadline-bound GPU call of the accuracy study: IconShift-dev's long budget (core rows) with many runs
# at a time, and beside it the CustomKD rows of the short budgets. Finished results are kept; whatever is
# unfinished at the deadline resumes on the next call. Everything the call produced (result JSONs, run
# logs, the GPU's name) is packed into ONE tarball, so a machine that returns few files loses nothing.
#   usage: bash benchmarks/gpu_long.sh DEADLINE_S TARBALL      e.g. bash benchmarks/gpu_long.sh 520 $OUT/study.tgz
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEADLINE=${1:-540}; TARBALL=${2:-study-gpu.tgz}
export STUDY_THREADS=1 PYTHONUNBUFFERED=1
END=$((SECONDS + DEADLINE))
STAMP=$(mktemp); LOGS=$(mktemp -d)
s() { timeout $((END - SECONDS)) $PY benchmarks/study.py --device cuda --no-report "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$LOGS/gpu.txt" 2>&1; nproc >> "$LOGS/gpu.txt"
( s --suite iconshift --core --budgets long --jobs 13 ) > "$LOGS/icon-long.log" 2>&1 &
( s --suite iconshift --rows customkd --budgets short --jobs 2 && s --suite demo --rows customkd --budgets short --jobs 2 --workers 2 ) > "$LOGS/short-customkd.log" 2>&1 &
wait
cp "$LOGS"/* benchmarks/results/study/
tar czf "$TARBALL" $(find benchmarks/results/study -type f -newer "$STAMP")
echo "packed $(tar tzf "$TARBALL" | wc -l) files into $TARBALL"
