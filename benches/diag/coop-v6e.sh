#!/usr/bin/env bash
# benches/diag/coop-v6e.sh (GPU host, STAGE .s4): after the stall fixes, the coop forward's forms and tiles again
# (v3 at 128x32/128x16/64x32/64x16, v4, v4-nopipe, v5) at 128k vs64/vs16, the DIAG ablations at 128k vs64, the
# lone-workgroup problem at local 16 and 8 (the per-workgroup fixed cost), and the dK/dV forms at 64k (dQ skipped).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.s4}/env.sh
export S2ATTN_AUTOTUNE=0
mkdir -p $OUT/r
for f in "v3 128x32" "v3 128x16" "v3 64x32" "v3 64x16" "v4 -" "v4-nopipe -" "v5 -"; do
  set -- $f; tile=$2; [ $tile = - ] && tile=""
  S2ATTN_COOP_FWD=$1 S2ATTN_TILE=$tile timeout 60 s2attn-bench $paper --seq 128k --vert-stride 64,16 --check-seq 0 --iters 5 --warmup 2 -v --json $OUT/r/form-$1-$2.jsonl > $OUT/r/form-$1-$2.log 2>&1
  t "form $1 $2: 128k vs64,vs16 $(ms $OUT/r/form-$1-$2.jsonl) | $(grep -a -m1 -o 'tile [0-9]*q x [0-9]*kv' $OUT/r/form-$1-$2.log)"
done
for d in 1 2 4 8 16 32 64; do
  S2ATTN_COOP_DIAG=$d timeout 60 s2attn-bench $paper --seq 128k --vert-stride 64 --check-seq 0 --iters 5 --warmup 2 --json $OUT/r/diag$d.jsonl > /dev/null 2>&1
  t "diag $d: 128k vs64 $(ms $OUT/r/diag$d.jsonl)"
done
for loc in 16 8 4; do
  timeout 60 s2attn-bench --heads 1 --kv-heads 1 --head-dim 128 --block 64 --local $loc --vert-stride 256 --dtype f16 --backend vulkan --no-dense --check-seq 0 --seq 8448 --iters 20 --warmup 3 --json $OUT/r/lone$loc.jsonl > /dev/null 2>&1
  t "lone local $loc: $(ms $OUT/r/lone$loc.jsonl)"
done
for k in v2 v4 v5 v5-recompute; do
  S2ATTN_BWD_DKDV=$k S2ATTN_BWD_DIAG_SKIP=dq timeout 100 s2attn-bench $paper --mode fwd+bwd --seq 64k --vert-stride 16 --check-seq 0 --iters 3 --warmup 1 --json $OUT/r/dkdv-$k.jsonl > /dev/null 2>&1
  t "dkdv $k (dq skipped): bwd $(ms $OUT/r/dkdv-$k.jsonl bwd_ms)"
done
cd $OUT && tar czf all.tgz --remove-files r
