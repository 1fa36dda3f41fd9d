#!/usr/bin/env bash
# Device call W (fourth session): GPU tests after the op's backward argument checks and the graph pass's
# in-place-write fix: every gpu-marked test of test_op, test_e2e and test_buffer_guard.
timeout 560 bash scripts/gpu_check.sh tests/test_op.py tests/test_e2e.py tests/test_buffer_guard.py 2>&1 | tail -15
