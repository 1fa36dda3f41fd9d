#!/usr/bin/env bash
# Device call I: T=2048 training with Inductor at 32768 tokens (B=16; at B=24 Inductor 2.11 failed to
# compile the naive model: CantSplit), with based and fla in the same run; then MQAR (compiled and
# eager) and the long-context prefill sweep. Carry .whl (fla-core wheel).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 260 python3 benchmarks/e2e.py --out "$OUT" --modes train --tokens 32768 --reps 5 --lengths 2048 --variants inductor,based,fla 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -6
python3 benchmarks/e2e.py --out "$OUT" --report 2>&1 | grep "^| train" | tail -4
timeout 130 python3 examples/train_mqar.py --compare 2>&1 | grep -v "^DEBUG" | tail -12 | cut -c1-200
timeout 160 python3 examples/long_context.py --lengths 1024,8192,32768,65536 --json "$OUT/long_context.json" 2>&1 | grep -v "^DEBUG" | tail -22 | cut -c1-200
