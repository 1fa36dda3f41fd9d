#!/usr/bin/env bash
# Device call L: the parallel-kernel GPU tests after rounding their inputs to the kernel dtype, and the op
# benchmark with the plan cache (checked arguments and kernel remembered per shape).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 150 python3 -P -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/test_parallel.py 2>&1 | tail -3
timeout 150 python3 benchmarks/op.py --out "$OUT" --no-crossover 2>&1 | grep -v "^DEBUG" | tail -11
