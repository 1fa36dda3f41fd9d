#!/usr/bin/env bash
# Device call O: where the end-to-end ratio to Inductor goes past T=2048: training at T=4096 (feature-map
# spelling, CantSplit workaround), Inductor and based in one run, 32768 tokens a step (halved on OOM).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 560 python3 benchmarks/e2e.py --out "$OUT" --fix-inductor-cantsplit --modes train --tokens 32768 --reps 5 \
  --lengths 4096 --variants inductor,based 2>&1 | grep -v "^DEBUG" | grep "^  \|^|\|Error\|error" | tail -10 | cut -c1-300
