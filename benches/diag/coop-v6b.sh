#!/usr/bin/env bash
# benches/diag/coop-v6b.sh (GPU host): correctness (test-forward_coop, test-backward_coop) and the machine code of
# the STAGE build (vk_pipeline_stats --dump), then the coop forward and forward+backward of the OLD stage against
# STAGE on the paper shape, and the lone-workgroup problem (see coop-v6.sh). DIAGS="16 ..." adds ablations.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OLD=${OLD:-.s1}; NEW=${STAGE:-.s2}
mkdir -p $OUT/r
( source $NEW/env.sh
  S2ATTN_BACKEND=vulkan timeout 150 test-forward_coop > $OUT/r/test-fwd.log 2>&1; t "new test-forward_coop rc=$? $(grep -a 'test result' $OUT/r/test-fwd.log)"
  S2ATTN_BACKEND=vulkan timeout 200 test-backward_coop > $OUT/r/test-bwd.log 2>&1; t "new test-backward_coop rc=$? $(grep -a 'test result' $OUT/r/test-bwd.log)"
  timeout 100 vk_pipeline_stats --dump $OUT/r/dump > $OUT/r/stats.txt 2>&1; t "stats rc=$?"; grep -a '^| ' $OUT/r/stats.txt | cut -c1-120 )
for which in ${WHICH:-old new}; do
  ( [ $which = old ] && source $OLD/env.sh || source $NEW/env.sh
    S2ATTN_AUTOTUNE=0 timeout 100 s2attn-bench $paper --seq 16k,128k --vert-stride 16,64 --iters 5 --warmup 2 --json $OUT/r/$which-paper.jsonl > $OUT/r/$which-paper.log 2>&1
    t "$which fwd rc=$? ms: $(ms $OUT/r/$which-paper.jsonl) err: $(ms $OUT/r/$which-paper.jsonl max_rel_err)"
    S2ATTN_AUTOTUNE=0 timeout 60 s2attn-bench $lone --iters 20 --warmup 3 --json $OUT/r/$which-lone.jsonl > /dev/null 2>&1; t "$which lone ms: $(ms $OUT/r/$which-lone.jsonl)"
    S2ATTN_AUTOTUNE=0 timeout 120 s2attn-bench $paper --mode fwd+bwd --seq 64k,128k --vert-stride 16 --iters 3 --warmup 1 --json $OUT/r/$which-bwd.jsonl > $OUT/r/$which-bwd.log 2>&1
    t "$which fwd+bwd rc=$? ms: $(ms $OUT/r/$which-bwd.jsonl) bwd: $(ms $OUT/r/$which-bwd.jsonl bwd_ms) err: $(ms $OUT/r/$which-bwd.jsonl max_rel_err)" )
done
source $NEW/env.sh
for d in ${DIAGS:-}; do
  S2ATTN_COOP_DIAG=$d S2ATTN_AUTOTUNE=0 timeout 60 s2attn-bench $paper --seq 128k --vert-stride 16 --check-seq 0 --iters 5 --warmup 2 --json $OUT/r/diag$d.jsonl > /dev/null 2>&1
  t "diag $d: 128k vs16 $(ms $OUT/r/diag$d.jsonl) ms"
done
cd $OUT && tar czf all.tgz --remove-files r
