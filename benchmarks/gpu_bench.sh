#!/usr/bin/env bash
# The GPU set as one command on a GPU machine without network: install the wheels carried in .whl/ (made by
# benchmarks/gpu_wheels.sh), run `bench.py --gpu` within a deadline, and copy its one results pair,
# benchmarks/results/gpu-<device>.{json,md}, to OUT_DIR. The results are written after every part, so a run
# cut short still leaves what it measured.
#   usage: bash benchmarks/gpu_bench.sh [OUT_DIR] [DEADLINE_S]     e.g. bash benchmarks/gpu_bench.sh $OUT 420
#   BENCH_EXTRA="--device cpu --tiny" runs the same command on a CPU with tiny models (a check of this script)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${1:-benchmarks/results}; DEADLINE=${2:-420}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdcache-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/kdcache-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout $((${DEADLINE%.*} + 120)) $PY benchmarks/bench.py --gpu --deadline-s "$DEADLINE" --out benchmarks/results \
  ${BENCH_EXTRA:-}
rc=$?
mkdir -p "$OUT_DIR"
[ "$OUT_DIR" -ef benchmarks/results ] || cp benchmarks/results/gpu-*.json benchmarks/results/gpu-*.md "$OUT_DIR"/
ls -la "$OUT_DIR"
exit $rc
