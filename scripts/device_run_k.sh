#!/usr/bin/env bash
# Device call K: the issue-6 prefill benchmark in one run (T=2048 and 8192, 49152 tokens, all entries).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 340 python3 benchmarks/e2e.py --out "$OUT" --modes prefill --tokens 49152 --reps 5 --lengths 2048,8192 --variants based,fla,inductor,eager 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -10 | cut -c1-250
python3 benchmarks/e2e.py --out "$OUT" --report 2>&1 | tail -12
