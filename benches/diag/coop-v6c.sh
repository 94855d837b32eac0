#!/usr/bin/env bash
# benches/diag/coop-v6c.sh (GPU host): test-forward_coop and machine code of STAGE; the coop forward of OLD against
# STAGE (paper shape, lone workgroups); the backward's passes alone (S2ATTN_BWD_DIAG_SKIP) at 64k.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OLD=${OLD:-.s2}; NEW=${STAGE:-.s3}
mkdir -p $OUT/r
( source $NEW/env.sh
  S2ATTN_BACKEND=vulkan timeout 150 test-forward_coop > $OUT/r/test-fwd.log 2>&1; t "new test-forward_coop rc=$? $(grep -a 'test result' $OUT/r/test-fwd.log)"
  timeout 100 vk_pipeline_stats --dump $OUT/r/dump > $OUT/r/stats.txt 2>&1; t "stats rc=$? $(grep -a '^| forward v3' $OUT/r/stats.txt)" )
for which in old new; do
  ( [ $which = old ] && source $OLD/env.sh || source $NEW/env.sh
    S2ATTN_AUTOTUNE=0 timeout 100 s2attn-bench $paper --seq 16k,64k,128k --vert-stride 16,64 --iters 5 --warmup 2 --json $OUT/r/$which-paper.jsonl > $OUT/r/$which-paper.log 2>&1
    t "$which fwd rc=$? ms: $(ms $OUT/r/$which-paper.jsonl) err: $(ms $OUT/r/$which-paper.jsonl max_rel_err)"
    S2ATTN_AUTOTUNE=0 timeout 60 s2attn-bench $lone --iters 20 --warmup 3 --json $OUT/r/$which-lone.jsonl > /dev/null 2>&1; t "$which lone ms: $(ms $OUT/r/$which-lone.jsonl)" )
done
source $NEW/env.sh
for skip in none dq dkdv; do
  S2ATTN_BWD_DIAG_SKIP=$skip S2ATTN_AUTOTUNE=0 timeout 100 s2attn-bench $paper --mode fwd+bwd --seq 64k --vert-stride 16 --check-seq 0 --iters 3 --warmup 1 --json $OUT/r/skip-$skip.jsonl > /dev/null 2>&1
  t "bwd skip $skip: fwd+bwd $(ms $OUT/r/skip-$skip.jsonl) bwd $(ms $OUT/r/skip-$skip.jsonl bwd_ms)"
done
cd $OUT && tar czf all.tgz --remove-files r
