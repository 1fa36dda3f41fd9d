#!/usr/bin/env bash
# Device call D (session 3, first call): every GPU test (kernels, op, CUDA graphs, the rewritten LM on
# CUDA), then the op-overhead / compiled-modes benchmark of issue 4. Carry .whl (fla-core wheel).
export PYTHONUNBUFFERED=1
BENCH="" timeout 330 bash scripts/gpu_check.sh 2>&1 | grep -v "^DEBUG" | tail -12
[ -d /tmp/pkg ] && export PYTHONPATH=/tmp/pkg:/tmp/site
timeout 180 python3 benchmarks/op.py --out "$OUT" --no-crossover --profile 2>&1 | grep -v "^DEBUG" | tail -50
