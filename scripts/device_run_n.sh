#!/usr/bin/env bash
# Device call N (run with carry [".whl"], the fla-core wheel): e2e training and prefill at T=2048 on the
# naive model as written (feature-map spelling), with torch 2.11's Inductor CantSplit crash worked around
# (benchmarks/inductor_cantsplit.py) for every compiled entry: Inductor, based, fla and fla + Inductor in
# one run, B=16.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 400 python3 benchmarks/e2e.py --out "$OUT" --fix-inductor-cantsplit --modes train --tokens 32768 --reps 5 \
  --lengths 2048 --variants inductor,based,fla,fla_inductor 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -6 | cut -c1-300
timeout 190 python3 benchmarks/e2e.py --out "$OUT" --fix-inductor-cantsplit --modes prefill --tokens 32768 --reps 5 \
  --lengths 2048 --variants inductor,based,fla,fla_inductor 2>&1 | grep -v "^DEBUG" | grep "^  \|^|\|Error\|error" | tail -14 | cut -c1-300
