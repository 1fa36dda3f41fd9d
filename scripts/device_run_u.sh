#!/usr/bin/env bash
# Device call U: GPU time of one e2e training step at T=2048, B=16 by kernel class, based against Inductor
# (feature-map spelling, torch 2.11's Inductor CantSplit crash worked around); benchmarks/results/e2e_u_profile.txt.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 500 python3 scripts/profile_step.py --variants based,inductor --fix-inductor-cantsplit 2>&1 \
  | grep -v "^DEBUG\|Warning\|warn" | tail -80
