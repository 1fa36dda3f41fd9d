#!/usr/bin/env bash
# Device call E: the GPU tests call D did not reach (op vs float64 on CUDA, CUDA-graph / max-autotune
# training, the parallel kernel), then the issue-6 training benchmark at T=2048 (based, fla).
export PYTHONUNBUFFERED=1
BENCH="" timeout 300 bash scripts/gpu_check.sh -rf --tb=short tests/test_op.py tests/test_parallel.py 2>&1 | grep -v "^DEBUG" | grep -v "Warning\|warn" | tail -25
[ -d /tmp/pkg ] && export PYTHONPATH=/tmp/pkg:/tmp/site
timeout 230 python3 benchmarks/e2e.py --out "$OUT" --modes train --lengths 2048 --variants based,fla --reps 5 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -12
python3 benchmarks/e2e.py --out "$OUT" --report 2>&1 | tail -10
