#!/usr/bin/env bash
# benches/diag/tests-gpu.sh (on the GPU host, one device call, ~3 min): the test binaries whose paths run on the GPU
# (the planner picks the coop kernels there for f16), each under a timeout, and the README's main example, so that
# a change to a default kernel is checked across the library on a GPU, not only in the coop tests.
# Stage: ONLY="quickstart test-forward test-forward_coop test-backward test-backward_coop test-inference
# test-embedding test-model test-errors test-multi test-mergeq" bash benches/stage.sh .tg, then run with carry
# [".tg"]: `STAGE=.tg bash benches/diag/tests-gpu.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.gpu}/env.sh
export S2ATTN_AUTOTUNE=0
for b in forward forward_coop backward backward_coop inference embedding model errors mergeq multi; do
    lim=120; [ $b = multi ] && lim=40  # test-multi hung in an earlier session (benches/results/*-multi-hang.txt)
    timeout $lim test-$b > $OUT/test-$b.log 2>&1
    t "test-$b rc=$? $(grep -a 'test result' $OUT/test-$b.log | paste -sd' ')"
    grep -a -m3 -e 'FAILED' -e 'panicked' $OUT/test-$b.log | sed "s/^/  $b: /" | tee -a $OUT/summary.txt
done
timeout 60 quickstart > $OUT/quickstart.log 2>&1
t "quickstart rc=$? $(tail -3 $OUT/quickstart.log | paste -sd' ' | cut -c1-300)"
cd $OUT && tar czf all.tgz --remove-files test-*.log quickstart.log; ls -la $OUT
