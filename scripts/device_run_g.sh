#!/usr/bin/env bash
# Device call G: diagnose the fused_chunk bf16 stall seen in test_op (calls D-F), then the GPU tests of
# the op (each test named, with durations) and the parallel kernel.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 90 python3 scripts/diagnose_fused_chunk.py 2>&1 | grep -v "^DEBUG" | tail -40
timeout 290 python3 -P -m pytest -m gpu -v -rf --tb=short --durations=8 -p no:cacheprovider tests/test_op.py 2>&1 | grep "PASS\|FAIL\|ERROR\|Error\|^E \|passed\|failed\|s call" | tail -30
timeout 150 python3 -P -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider tests/test_parallel.py 2>&1 | tail -4
