#!/usr/bin/env bash
# Wheels of the packages a network-less GPU machine lacks (it has python3 3.12 with torch, torchvision, timm,
# numpy, Pillow and the rest; not zarr, numcodecs or open_clip), at the versions this checkout's .venv runs,
# saved in .whl/ (git ignores it: the line is added to .git/info/exclude). Run here, where PyPI is reachable;
# the device run carries .whl and benchmarks/gpu_bench.sh installs it.
#   usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PKGS="zarr numcodecs donfig google-crc32c open_clip_torch ftfy wcwidth"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
specs=$($PY -c "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $PKGS)
echo "downloading: $specs"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $specs
ls -la .whl
