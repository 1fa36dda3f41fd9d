#!/usr/bin/env bash
# One device call: install this working tree without touching the preinstalled
# torch/triton, run the GPU tests, then the benchmarks named in $BENCH (default: none).
# Usage on the device machine:  bash scripts/gpu_check.sh [pytest args...]
set -uo pipefail
export PYTHONUNBUFFERED=1
. scripts/gpu_install.sh
python3 -P -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_gpu.log"
rc=${PIPESTATUS[0]}
for b in ${BENCH:-}; do python3 "$b" --out "$OUT" 2>&1 | tee "$OUT/$(basename "$b" .py).log"; done
exit $rc
