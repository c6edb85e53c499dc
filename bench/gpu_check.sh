#!/usr/bin/env bash
# The GPU checks of issue 13 in one run, for a machine with a CUDA device and
# CuPy (the device tool's H100/H200 image has both; nothing is downloaded).
# Under 8 minutes: the GPU tests, then bench/bench_gpu.py, whose JSON and PNG
# land in bench/results/ (and in $OUT when that is set, as on the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# cp3d.kernels is a package only once installed (setuptools maps it to kernels/).
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
timeout 300 python3 bench/bench_gpu.py 2>&1 | tee "${OUT:-/tmp}/bench_gpu.log"
if [ -n "${OUT:-}" ]; then
  cp bench/results/gpu.json bench/results/gpu.png "$OUT"/
fi
