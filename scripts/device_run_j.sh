#!/usr/bin/env bash
# Device call J: T=2048 training with the polynomial spelling of the naive mixers (Inductor 2.11 failed to
# compile the feature-map spelling for training: CantSplit), Inductor and based in one run; MQAR compiled
# with backend="based"; the op benchmark again (the eager shortcut in based_attention is new).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 230 python3 benchmarks/e2e.py --out "$OUT" --modes train --tokens 32768 --reps 5 --lengths 2048 --variants inductor,based --attention-form polynomial 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -5 | cut -c1-300
timeout 150 python3 examples/train_mqar.py 2>&1 | grep -v "^DEBUG\|Warn\|warn" | tail -5 | cut -c1-200
timeout 110 python3 benchmarks/op.py --out "$OUT" --no-crossover 2>&1 | grep -v "^DEBUG" | tail -11
