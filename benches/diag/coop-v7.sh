#!/usr/bin/env bash
# benches/diag/coop-v7.sh (on the GPU host, one device call, ~7 min; written 2026-12-01 before it was run): the v7
# coop forward (v3 in straight-line form, shaders/NOTES-coop.md "v7") against v3, and the straight-line dQ pass
# (S2ATTN_BWD_DQ=straight) against the plain one, with the peers in the same call.
#   1. machine code: vk_pipeline_stats --only "forward v,dQ" --dump for S2ATTN_COOP_STRAIGHT = 1, 2, 3 (v3 and the
#      plain dQ in each; the straight dQ with 3), sass.py's loop lines per pipeline (instructions and register
#      moves per chunk);
#   2. correctness: test-forward_coop with v3 (the default) and v7 (both now also held against the CPU twin),
#      test-backward_coop for the default dK/dV kernel with the plain and the straight dQ (held against its twin);
#   3. timing at 128k, vert_stride 16 and 64: v3 and v7 with each STRAIGHT setting, one process each, then two more
#      processes of v3 and v7 at vs64 (its time has been bimodal); the v4, v4-nopipe and v5 forms once each;
#   4. forward+backward at 64k vs16 with the plain and the straight dQ pass;
#   5. peers in the same call: FlashAttention-2 dense (torch_peers.py) and FlexAttention-S2 at both strides.
# Stage: ONLY="s2attn-bench vk_pipeline_stats test-forward_coop test-backward_coop" bash benches/stage.sh .v7, copy
# benches/flex_peers.py into .v7, then run with carry [".v7"]: `STAGE=.v7 bash benches/diag/coop-v7.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.gpu}/env.sh
export S2ATTN_AUTOTUNE=0 PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvd=$(command -v nvdisasm || echo /usr/local/cuda/bin/nvdisasm)

for bits in 1 2 3; do
    dq=""; [ $bits = 3 ] && dq=straight
    S2ATTN_BWD_DQ=$dq S2ATTN_COOP_STRAIGHT=$bits timeout 60 vk_pipeline_stats --seq 131072 --stride 64 \
        --only "forward v,dQ" --dump $OUT/dump$bits > $OUT/stats$bits.txt 2>&1
    t "pipeline stats straight=$bits rc=$?"
    NVDISASM=$nvd timeout 60 python3 benches/diag/sass.py $OUT/dump$bits > $OUT/sass$bits.txt 2>&1
    grep -a -A1 -e 'forward_v[37].*loop' -e 'dQ.*loop' $OUT/sass$bits.txt | sed "s/^/straight=$bits /" | tee -a $OUT/summary.txt
done

S2ATTN_BACKEND=vulkan timeout 120 test-forward_coop --nocapture > $OUT/test-v3.log 2>&1
t "test-forward_coop v3 rc=$? $(grep -a 'test result' $OUT/test-v3.log)"
S2ATTN_BACKEND=vulkan S2ATTN_COOP_FWD=v7 timeout 120 test-forward_coop --nocapture > $OUT/test-v7.log 2>&1
t "test-forward_coop v7 rc=$? $(grep -a 'test result' $OUT/test-v7.log)"
worst_twin $OUT/test-v3.log $OUT/test-v7.log
S2ATTN_BACKEND=vulkan S2ATTN_BWD_COOP_ONLY=v4 timeout 150 test-backward_coop --nocapture > $OUT/test-bwd.log 2>&1
t "test-backward_coop (v4) rc=$? $(grep -a 'test result' $OUT/test-bwd.log)"
S2ATTN_BACKEND=vulkan S2ATTN_BWD_COOP_ONLY=v4 S2ATTN_BWD_DQ=straight timeout 150 test-backward_coop --nocapture > $OUT/test-bwd-dqs.log 2>&1
t "test-backward_coop (v4, dQ straight) rc=$? $(grep -a 'test result' $OUT/test-bwd-dqs.log)"

run() {  # run NAME STRAIGHT FORM STRIDES
    S2ATTN_COOP_STRAIGHT=$2 S2ATTN_COOP_FWD=$3 timeout 60 s2attn-bench $paper --seq 128k --vert-stride $4 --iters 5 \
        --warmup 2 -v --json $OUT/fwd-$1.jsonl > $OUT/fwd-$1.log 2>&1
    t "fwd $1 (form $3 straight $2, vs $4) rc=$? ms: $(ms $OUT/fwd-$1.jsonl) $(grep -a -m1 -o 'plan:.*' $OUT/fwd-$1.log | cut -c1-80)"
}
run v3 "" v3 16,64
for bits in 1 2 3; do run v7-s$bits $bits v7 16,64; done
for rep in 2 3; do run v3-vs64-$rep "" v3 64; run v7-vs64-$rep "" v7 64; done
# the opt-in v4 / v4-nopipe / v5 forms run the v6 code but were not timed after it
for f in v4 v4-nopipe v5; do run $f "" $f 16,64; done

for dq in v1 straight; do
    S2ATTN_BWD_DQ=$dq timeout 90 s2attn-bench $paper --mode fwd+bwd --seq 64k --vert-stride 16 --iters 3 --warmup 1 -v \
        --json $OUT/fwdbwd-$dq.jsonl > $OUT/fwdbwd-$dq.log 2>&1
    t "fwd+bwd 64k dQ $dq rc=$? ms: $(ms $OUT/fwdbwd-$dq.jsonl) bwd: $(ms $OUT/fwdbwd-$dq.jsonl bwd_ms)"
done

peers 131072

# a device call returns few files: everything in one archive beside the summary
cd $OUT && tar czf all.tgz --remove-files dump? stats?.txt sass?.txt test-*.log fwd-* fwdbwd-* peers.* 2>/dev/null; ls -la $OUT
