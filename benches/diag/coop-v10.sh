#!/usr/bin/env bash
# benches/diag/coop-v10.sh (on the GPU host, one device call, ~3 min; written 2026-12-01 before it was run): which
# of v7's straight-line parts is fastest now that masked scores are -inf (v3 gained 7% from that, v7 1%), with
# s2attn-bench's time-based warm-up (--warmup-ms, default 200: the 128k vs64 rows of coop-v9.sh were 25 ms at
# their fastest and 48-50 ms at their median in two of three processes, min..max 25.0..58.4 inside one: GPU clocks
# still ramping after two 25 ms warm-ups is the suspect), the SM clock logged by nvidia-smi throughout.
#   1. correctness: test-forward_coop with S2ATTN_COOP_STRAIGHT=2 (v7 keeping the per-subgroup skips);
#   2. timing at 128k, vert_stride 16 and 64: v7 with STRAIGHT 3 (the default), 2 and 1, and v3; two more
#      processes at vs64 of STRAIGHT 3 and 2; one process of the default with the old warm-up (--warmup-ms 0);
#   3. peers in the same call: FlashAttention-2 dense (torch_peers.py) and FlexAttention-S2 at both strides.
# Stage: ONLY="s2attn-bench test-forward_coop" bash benches/stage.sh .v10, copy benches/flex_peers.py into .v10,
# then run with carry [".v10"]: `STAGE=.v10 bash benches/diag/coop-v10.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.gpu}/env.sh
export S2ATTN_AUTOTUNE=0 PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
clocks_start

S2ATTN_BACKEND=vulkan S2ATTN_COOP_STRAIGHT=2 timeout 120 test-forward_coop --nocapture > $OUT/test-s2.log 2>&1
t "test-forward_coop v7 straight 2 rc=$? $(grep -a 'test result' $OUT/test-s2.log)"
worst_twin $OUT/test-s2.log

run() {  # run NAME STRAIGHT FORM STRIDES [bench flags]
    local name=$1 bits=$2 form=$3 vs=$4; shift 4
    S2ATTN_COOP_STRAIGHT=$bits S2ATTN_COOP_FWD=$form timeout 60 s2attn-bench $paper --seq 128k --vert-stride $vs \
        --iters 10 --warmup 2 "$@" -v --json $OUT/fwd-$name.jsonl > $OUT/fwd-$name.log 2>&1
    t "fwd $name (form ${form:-default} straight ${bits:-default}, vs $vs $*) rc=$? ms: $(ms $OUT/fwd-$name.jsonl) min: $(ms $OUT/fwd-$name.jsonl min_ms) max: $(ms $OUT/fwd-$name.jsonl max_ms)"
}
run s3 "" "" 16,64
run s2 2 "" 16,64
run s1 1 "" 16,64
run v3 "" v3 16,64
for rep in 2 3; do run s3-vs64-$rep "" "" 64; run s2-vs64-$rep 2 "" 64; done
run s3-oldwarm "" "" 64 --warmup-ms 0

peers 131072
clocks_stop

cd $OUT && tar czf all.tgz --remove-files test-*.log fwd-* peers.* clocks.csv 2>/dev/null; ls -la $OUT
