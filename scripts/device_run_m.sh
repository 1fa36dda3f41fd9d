#!/usr/bin/env bash
# Device call M: the op's eager path after cutting its host work (raw dispatch-key bits, spec arguments
# computed once, one output from the eager autograd.Function, no zeros for z's gradient): the op's CUDA
# value/gradient tests, then the op benchmark, its eager rows timed in alternating blocks.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 200 python3 -P -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/test_op.py \
  -k "matches_float64 or opcheck_cuda or autocast" 2>&1 | tail -3
timeout 300 python3 benchmarks/op.py --out "$OUT" --no-crossover 2>&1 | grep -v "^DEBUG" | tail -11
