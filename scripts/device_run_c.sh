#!/usr/bin/env bash
# Device call C: the CUDA-graph training tests, then the issue-6 end-to-end training benchmark.
# Carry .whl (git-ignored) holding fla-core, fetched here first with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
BENCH="" timeout 100 bash scripts/gpu_check.sh tests/test_op.py -k "compile_modes" 2>&1 | grep -v "^DEBUG" | tail -4
timeout 250 python3 benchmarks/e2e.py --out "$OUT" --modes train --lengths 2048 --variants fla,based,inductor --reps 5 2>&1 | grep -v "^DEBUG" | grep "^  \|Error" | tail -8
timeout 130 python3 benchmarks/e2e.py --out "$OUT" --modes train --lengths 8192 --variants based,inductor --reps 3 --min-batch 4 2>&1 | grep -v "^DEBUG" | grep "^  \|Error" | tail -8
python3 benchmarks/e2e.py --out "$OUT" --report 2>&1 | tail -14
