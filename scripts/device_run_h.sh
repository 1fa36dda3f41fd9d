#!/usr/bin/env bash
# Device call H: the issue-6 training benchmark in one run: T=2048 (eager, Inductor, based, fla) and
# T=8192 (the same; Inductor and eager are expected to run out of memory), 49152 tokens a step
# (B=24 / B=6). Carry .whl (fla-core wheel).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
E2E="python3 benchmarks/e2e.py --out $OUT --modes train --tokens 49152 --reps 5"
timeout 330 $E2E --lengths 2048 --variants based,fla,inductor,eager 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -10
timeout 190 $E2E --lengths 8192 --variants based,fla,inductor,eager --min-batch 6 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -10
python3 benchmarks/e2e.py --out "$OUT" --report 2>&1 | tail -14
