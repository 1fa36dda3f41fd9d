#!/bin/bash
# The GPU suite (`pytest -m gpu`) in four pytest processes grouped by file, spread over the GPUs there
# are (two per GPU on two): the tests are bound by compiles on the host. Logs: $OUT/gpu_g*.log.
#   OUT=DIR [LIMIT=seconds per group] bash scripts/gpu_suite.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
. scripts/gpu_install.sh
G0="tests/test_op.py"
G1="tests/test_e2e.py tests/test_buffer_guard.py tests/test_decode.py"
G2="tests/test_attention_with_state.py tests/test_continued_prefill.py tests/test_generate_example.py"
G3=""
for f in tests/test_*.py; do case " $G0 $G1 $G2 " in *" $f "*) ;; *) G3="$G3 $f";; esac; done
NGPU=$(nvidia-smi -L | wc -l); [ "$NGPU" -ge 1 ] || { echo "no GPU"; exit 1; }
run() { CUDA_VISIBLE_DEVICES=$(($1 % NGPU)) timeout ${LIMIT:-540} python3 -P -m pytest -q -m gpu -p no:cacheprovider --durations=8 $3 > $OUT/gpu_$2.log 2>&1; echo "group $2 rc=$?" >> $OUT/gpu_$2.log; }
run 0 g0 "$G0" & run 0 g1 "$G1" & run 1 g2 "$G2" & run 1 g3 "$G3" &
wait
for g in g0 g1 g2 g3; do echo "== $g"; grep -E "passed|failed|error|rc=" $OUT/gpu_$g.log | tail -3; done
grep -h -E "^(FAILED|ERROR)" $OUT/gpu_*.log | head -20
! grep -q -h -E "^(FAILED|ERROR)|rc=[1-9]" $OUT/gpu_*.log
