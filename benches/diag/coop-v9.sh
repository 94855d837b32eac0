#!/usr/bin/env bash
# benches/diag/coop-v9.sh (on the GPU host, one device call, ~5 min; written 2026-12-01 before it was run): v7 as
# the default coop forward, now with masked scores -inf (no second select on P) and the scale folded into the
# exponent, measured with the peers in the same call: the run issue 4's numbers come from.
#   1. machine code: vk_pipeline_stats --only "forward v" --dump (sass.py runs off the GPU host: no zstd there);
#   2. correctness: test-forward_coop with the default (v7) and with v3 (both held against the f64 oracle and
#      the CPU twin), test-forward (the portable kernel) and test-backward_coop (the default kernels);
#   3. timing, paper shape (32 heads, d128, block 64, local 16, f16): the default at 16k/64k/128k for
#      vert_stride 16 and 64, then two more processes of 128k vs64; v3 at 128k once for the comparison;
#   4. peers in the same call: FlashAttention-2 dense (torch_peers.py) at 16k/64k/128k and FlexAttention-S2 at
#      128k for both strides.
# Stage: ONLY="s2attn-bench vk_pipeline_stats test-forward_coop test-forward test-backward_coop" bash benches/stage.sh
# .v9, copy benches/flex_peers.py into .v9, then run with carry [".v9"]: `STAGE=.v9 bash benches/diag/coop-v9.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.gpu}/env.sh
export S2ATTN_AUTOTUNE=0 PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}

timeout 60 vk_pipeline_stats --seq 131072 --stride 64 --only "forward v" --dump $OUT/dump > $OUT/stats.txt 2>&1
t "pipeline stats rc=$? $(grep -a '^| forward v[37]' $OUT/stats.txt | cut -d'|' -f2,8 | paste -sd' ')"

S2ATTN_BACKEND=vulkan timeout 120 test-forward_coop --nocapture > $OUT/test-fwd-coop.log 2>&1
t "test-forward_coop (default) rc=$? $(grep -a 'test result' $OUT/test-fwd-coop.log)"
S2ATTN_BACKEND=vulkan S2ATTN_COOP_FWD=v3 timeout 120 test-forward_coop --nocapture > $OUT/test-fwd-coop-v3.log 2>&1
t "test-forward_coop (v3) rc=$? $(grep -a 'test result' $OUT/test-fwd-coop-v3.log)"
worst_twin $OUT/test-fwd-coop*.log
S2ATTN_BACKEND=vulkan timeout 120 test-forward > $OUT/test-fwd.log 2>&1
t "test-forward rc=$? $(grep -a 'test result' $OUT/test-fwd.log | paste -sd' ')"
S2ATTN_BACKEND=vulkan timeout 150 test-backward_coop --nocapture > $OUT/test-bwd-coop.log 2>&1
t "test-backward_coop rc=$? $(grep -a 'test result' $OUT/test-bwd-coop.log)"

run() {  # run NAME SEQ STRIDES [FORM]
    S2ATTN_COOP_FWD=${4:-} timeout 90 s2attn-bench $paper --seq $2 --vert-stride $3 --iters 5 --warmup 2 -v \
        --json $OUT/fwd-$1.jsonl > $OUT/fwd-$1.log 2>&1
    t "fwd $1 (seq $2, vs $3, form ${4:-default}) rc=$? ms: $(ms $OUT/fwd-$1.jsonl) $(grep -a -m1 -o 'coop kernel.*' $OUT/fwd-$1.log | cut -c1-90)"
}
run default 16k,64k,128k 16,64
run default-vs64-2 128k 64
run default-vs64-3 128k 64
run v3 128k 16,64 v3

peers 16384 65536 131072

# a device call returns few files: everything in one archive beside the summary
cd $OUT && tar czf all.tgz --remove-files dump stats.txt test-*.log fwd-* peers.* 2>/dev/null; ls -la $OUT
