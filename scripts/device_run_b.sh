#!/usr/bin/env bash
# Device call B: the GPU tests not reached in call A, the issue-3 kernel benchmark, the op overhead.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
BENCH="" timeout 200 bash scripts/gpu_check.sh tests/test_op.py tests/test_parallel.py -k "compile_modes or parallel" 2>&1 | grep -v "^DEBUG" | tail -15
python3 benchmarks/op.py --out "$OUT" --no-crossover 2>&1 | tail -9 > "$OUT/op_tail.txt"
python3 benchmarks/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -60
cat "$OUT/op_tail.txt"
