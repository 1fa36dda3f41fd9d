#!/usr/bin/env bash
# Device call V (carry [".whl"]): the README's end-to-end table in one call, one model and token count:
# T = 2048 and 8192, 32768 tokens a step, every variant (eager, Inductor, based, fla, fla + Inductor),
# training then prefill, torch 2.11's Inductor CantSplit crash worked around, attention share profiled.
# --min-batch 8: halve an OOM batch at most to 8 (at T = 8192, B = 4: an OOM is reported, not retried).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
common=(--out "$OUT" --fix-inductor-cantsplit --attention-share --tokens 32768 --reps 5 --min-batch 8
        --lengths 2048,8192 --variants eager,inductor,based,fla,fla_inductor)
timeout 340 python3 benchmarks/e2e.py "${common[@]}" --modes train 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | cut -c1-200 | tail -14
timeout 220 python3 benchmarks/e2e.py "${common[@]}" --modes prefill 2>&1 | grep -v "^DEBUG" | grep "^  \|^|\|Error\|error" | cut -c1-200 | tail -30
