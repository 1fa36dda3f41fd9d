#!/usr/bin/env bash
# Device call F: op and parallel-kernel GPU tests (durations shown), the op benchmark (eager and
# CUDA-graphed rows), then the fla-core reference of the T=2048 training benchmark. Carry .whl.
export PYTHONUNBUFFERED=1
cp benchmarks/results/e2e.json "$OUT/"   # earlier calls' entries: the report covers them all
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
BENCH="" timeout 250 bash scripts/gpu_check.sh -rf --tb=short --durations=6 tests/test_op.py tests/test_parallel.py 2>&1 | grep -v "^DEBUG" | grep -v "Warning\|warn" | tail -22
[ -d /tmp/pkg ] && export PYTHONPATH=/tmp/pkg:/tmp/site
timeout 130 python3 benchmarks/op.py --out "$OUT" --no-crossover 2>&1 | grep -v "^DEBUG" | tail -12
timeout 150 python3 benchmarks/e2e.py --out "$OUT" --modes train --lengths 2048 --variants fla --reps 5 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -6
