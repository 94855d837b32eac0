#!/usr/bin/env bash
# benches/diag/coop-v6.sh (GPU host): the coop forward before (OLD stage, default .s1) and after (STAGE) the v6
# changes, the v6 kernel's correctness test, its machine code, and the S2ATTN_COOP_DIAG ablations (each leaves one
# stage out: 1 Q, 2 QK^T, 4 softmax, 8 PV, 16 K/V fetch+stash, 32 O write, 64 S store) on the paper shape at 128k
# vs16 and on the lone-workgroup problem (66 workgroups of 128 rows, local-only rows: vert_stride 256).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OLD=${OLD:-.s1}; NEW=${STAGE:-.s2}
mkdir -p $OUT/r
( source $NEW/env.sh
  S2ATTN_BACKEND=vulkan timeout 150 test-forward_coop > $OUT/r/test.log 2>&1; t "new test-forward_coop rc=$? $(grep -a 'test result' $OUT/r/test.log)"
  timeout 100 vk_pipeline_stats --dump $OUT/r/dump > $OUT/r/stats.txt 2>&1; t "stats rc=$? $(grep -a 'forward v3' $OUT/r/stats.txt | head -2)" )
for which in old new; do
  ( [ $which = old ] && source $OLD/env.sh || source $NEW/env.sh
    S2ATTN_AUTOTUNE=0 timeout 100 s2attn-bench $paper --seq 16k,128k --vert-stride 16,64 --iters 5 --warmup 2 --json $OUT/r/$which-paper.jsonl > $OUT/r/$which-paper.log 2>&1
    t "$which paper rc=$? ms: $(ms $OUT/r/$which-paper.jsonl) err: $(grep -ao '"max_rel_err":[0-9.e-]*' $OUT/r/$which-paper.jsonl | cut -d: -f2 | tr '\n' ' ')"
    S2ATTN_AUTOTUNE=0 timeout 60 s2attn-bench $lone --iters 20 --warmup 3 --json $OUT/r/$which-lone.jsonl > /dev/null 2>&1; t "$which lone ms: $(ms $OUT/r/$which-lone.jsonl)" )
done
source $NEW/env.sh
for d in 1 2 4 8 16 32 64 6 14 30 62 127; do
  S2ATTN_COOP_DIAG=$d S2ATTN_AUTOTUNE=0 timeout 60 s2attn-bench $paper --seq 128k --vert-stride 16 --check-seq 0 --iters 5 --warmup 2 --json $OUT/r/diag$d.jsonl > /dev/null 2>&1
  S2ATTN_COOP_DIAG=$d S2ATTN_AUTOTUNE=0 timeout 60 s2attn-bench $lone --iters 20 --warmup 3 --json $OUT/r/diag$d-lone.jsonl > /dev/null 2>&1
  t "diag $d: 128k vs16 $(ms $OUT/r/diag$d.jsonl) ms; lone $(ms $OUT/r/diag$d-lone.jsonl) ms"
done
cd $OUT && tar czf all.tgz --remove-files r
