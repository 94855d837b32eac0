#!/usr/bin/env bash
# benches/diag/coop-v8.sh (on the GPU host, one device call, ~4 min; written 2026-12-01 before it was run): v7 with
# the cheaper K/V addressing and the scale folded into the exponent (both also in v3), and v7's split staging
# (S2ATTN_COOP_STRAIGHT=7: V staged after the chunk's first barrier, the next K after its second), with the peers
# in the same call.
#   1. machine code: vk_pipeline_stats --only "forward v" --dump for STRAIGHT 3 and 7 (sass.py runs here: the GPU
#      host has no zstd);
#   2. correctness: test-forward_coop for v3, v7 and v7 split (each also held against the CPU twin), and
#      test-backward_coop for the default kernels (the dQ pass shares the new K/V fetch);
#   3. timing at 128k, vert_stride 16 and 64: v3, v7 (3) and v7 split (7), then two more processes of both v7
#      forms at vs64, and both at the 64x32 tile;
#   4. peers in the same call: FlashAttention-2 dense (torch_peers.py) and FlexAttention-S2 at both strides.
# The split form was removed after this call (v8 in shaders/NOTES-coop.md): S2ATTN_COOP_STRAIGHT=7 is now refused.
# Stage: ONLY="s2attn-bench vk_pipeline_stats test-forward_coop test-backward_coop" bash benches/stage.sh .v8, copy
# benches/flex_peers.py into .v8, then run with carry [".v8"]: `STAGE=.v8 bash benches/diag/coop-v8.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.gpu}/env.sh
export S2ATTN_AUTOTUNE=0 PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}

for bits in 3 7; do
    S2ATTN_COOP_FWD=v7 S2ATTN_COOP_STRAIGHT=$bits timeout 60 vk_pipeline_stats --seq 131072 --stride 64 \
        --only "forward v" --dump $OUT/dump$bits > $OUT/stats$bits.txt 2>&1
    t "pipeline stats straight=$bits rc=$? $(grep -a '^| forward v[37]' $OUT/stats$bits.txt | cut -d'|' -f2,8)"
done

S2ATTN_BACKEND=vulkan timeout 120 test-forward_coop --nocapture > $OUT/test-v3.log 2>&1
t "test-forward_coop v3 rc=$? $(grep -a 'test result' $OUT/test-v3.log)"
for bits in 3 7; do
    S2ATTN_BACKEND=vulkan S2ATTN_COOP_FWD=v7 S2ATTN_COOP_STRAIGHT=$bits timeout 120 test-forward_coop --nocapture \
        > $OUT/test-v7-$bits.log 2>&1
    t "test-forward_coop v7 straight $bits rc=$? $(grep -a 'test result' $OUT/test-v7-$bits.log)"
done
worst_twin $OUT/test-v*.log
S2ATTN_BACKEND=vulkan timeout 150 test-backward_coop --nocapture > $OUT/test-bwd.log 2>&1
t "test-backward_coop rc=$? $(grep -a 'test result' $OUT/test-bwd.log)"

run() {  # run NAME STRAIGHT FORM STRIDES [TILE]
    S2ATTN_TILE=${5:-} S2ATTN_COOP_STRAIGHT=$2 S2ATTN_COOP_FWD=$3 timeout 60 s2attn-bench $paper --seq 128k \
        --vert-stride $4 --iters 5 --warmup 2 -v --json $OUT/fwd-$1.jsonl > $OUT/fwd-$1.log 2>&1
    t "fwd $1 (form $3 straight $2 tile ${5:-default}, vs $4) rc=$? ms: $(ms $OUT/fwd-$1.jsonl)"
}
run v3 "" v3 16,64
run v7-s3 3 v7 16,64
run v7-s7 7 v7 16,64
for rep in 2 3; do run v7-s3-vs64-$rep 3 v7 64; run v7-s7-vs64-$rep 7 v7 64; done
run v7-s3-64x32 3 v7 16,64 64x32
run v7-s7-64x32 7 v7 16,64 64x32

peers 131072

# a device call returns few files: everything in one archive beside the summary
cd $OUT && tar czf all.tgz --remove-files dump? stats?.txt test-*.log fwd-* peers.* 2>/dev/null; ls -la $OUT
