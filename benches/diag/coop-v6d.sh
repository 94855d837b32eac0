#!/usr/bin/env bash
# benches/diag/coop-v6d.sh (GPU host): test-backward_coop and machine code of STAGE (.s4); the backward's passes
# alone at 64k for STAGE against PREV (.s3); the forward at 128k vs16/vs64 of .s2 and .s3, each twice, alternating.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NEW=${STAGE:-.s4}; PREV=${PREV:-.s3}
mkdir -p $OUT/r
( source $NEW/env.sh
  S2ATTN_BACKEND=vulkan timeout 200 test-backward_coop > $OUT/r/test-bwd.log 2>&1; t "new test-backward_coop rc=$? $(grep -a 'test result' $OUT/r/test-bwd.log)"
  timeout 100 vk_pipeline_stats --dump $OUT/r/dump > $OUT/r/stats.txt 2>&1; t "stats rc=$? $(grep -a '^| dK/dV v2' $OUT/r/stats.txt)" )
for st in $NEW $PREV; do
  ( source $st/env.sh
  for skip in none dq; do
    S2ATTN_BWD_DIAG_SKIP=$skip S2ATTN_AUTOTUNE=0 timeout 100 s2attn-bench $paper --mode fwd+bwd --seq 64k --vert-stride 16 --iters 3 --warmup 1 --json $OUT/r/skip-$skip$st.jsonl > /dev/null 2>&1
    t "$st bwd skip $skip: fwd+bwd $(ms $OUT/r/skip-$skip$st.jsonl) bwd $(ms $OUT/r/skip-$skip$st.jsonl bwd_ms) err $(ms $OUT/r/skip-$skip$st.jsonl max_rel_err)"
  done )
done
for rep in 1 2; do for st in .s2 .s3; do
  ( source $st/env.sh
    S2ATTN_AUTOTUNE=0 timeout 100 s2attn-bench $paper --seq 128k --vert-stride 64,16 --check-seq 0 --iters 5 --warmup 2 --json $OUT/r/fwd$st-$rep.jsonl > /dev/null 2>&1
    t "fwd $st rep $rep 128k vs64,vs16: $(ms $OUT/r/fwd$st-$rep.jsonl)" )
done; done
cd $OUT && tar czf all.tgz --remove-files r
