#!/usr/bin/env bash
# Device call Q (carry [".whl"]): how much of a training step at T=2048 is attention, measured rather than
# estimated: e2e --attention-share for based and fla + Inductor (B=16, feature-map spelling, workaround on).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 400 python3 benchmarks/e2e.py --out "$OUT" --fix-inductor-cantsplit --attention-share --modes train,prefill \
  --tokens 32768 --reps 5 --lengths 2048 --variants based,fla_inductor 2>&1 | grep -v "^DEBUG" | grep "^  \|Error\|error" | tail -8 | cut -c1-300
python3 -c "
import json; d = json.load(open('$OUT/e2e.json'))
for r in d['results']:
    print(r['mode'], r['seq_len'], r['variant'], r.get('status'), round(r.get('ms', 0), 1), 'gpu', round(r.get('gpu_ms', 0), 1), 'attention', round(r.get('attention_gpu_ms', 0), 2))
"
