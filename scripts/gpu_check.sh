#!/usr/bin/env bash
# One device call: install this working tree without touching the preinstalled
# torch/triton, run the GPU tests, then the benchmarks named in $BENCH (default: none).
# Usage on the device machine:  bash scripts/gpu_check.sh [pytest args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then   # carried wheels (fla-core for the benchmarks)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# Editable install (registers the torch_dynamo_backends entry point); if the device's
# Python lacks setuptools, fall back to a copy of the package tree on PYTHONPATH.
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
  rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r based_compile /tmp/pkg/ && cp -r kernels /tmp/pkg/based_compile/kernels
  export PYTHONPATH="/tmp/pkg:${PYTHONPATH:-}"
fi
python3 -c "import torch, triton, based_compile; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -P -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_gpu.log"
rc=${PIPESTATUS[0]}
for b in ${BENCH:-}; do python3 "$b" --out "$OUT" 2>&1 | tee "$OUT/$(basename "$b" .py).log"; done
exit $rc
