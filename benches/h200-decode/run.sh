#!/usr/bin/env bash
# Usage (here): ONLY="test-cuda_decode test-inference s2attn-bench" bash benches/stage.sh .stage-decode --features cuda
# then on the device: bash benches/h200-decode/run.sh (carry .stage-decode; STAGE=<dir> for another stage folder).
# Afterwards, here: s2attn-bench --from OUT/ours.jsonl --peers OUT/peers.jsonl --json benches/results/2026-12-01-h200-decode.jsonl --markdown
# The decode measurement of issue 7 in one device call: tests, then s2attn-bench --mode decode (vulkan + cuda; 8/32 KV heads,
# batch 1/16, 32k/128k, dense included), then the copy bandwidth and the peers (one Python process).
STAGE=${STAGE:-.stage-decode}
export STAGE
source $STAGE/env.sh
export XDG_RUNTIME_DIR=/tmp LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$LD_LIBRARY_PATH
start=$SECONDS
timeout 25 test-cuda_decode > $OUT/cuda_decode.log 2>&1; echo "cuda_decode rc=$? t=$((SECONDS-start))" | tee -a $OUT/summary.txt
timeout 15 test-inference > $OUT/inference.log 2>&1; echo "inference rc=$? t=$((SECONDS-start))" | tee -a $OUT/summary.txt
timeout ${BENCH_S:-100} s2attn-bench --preset decode --kv-heads 8,32 --batch 1,16 --seq 32768,131072 --backend vulkan,cuda \
  --json $OUT/ours.jsonl --markdown -v > $OUT/bench.log 2>&1; echo "bench rc=$? t=$((SECONDS-start))" | tee -a $OUT/summary.txt
left=$((${BENCH_S:-100} + 93 - (SECONDS-start)))
timeout $left python3 -u benches/h200-decode/peers_all.py > $OUT/peers.jsonl 2> $OUT/peers.err; echo "peers rc=$? t=$((SECONDS-start))" | tee -a $OUT/summary.txt
grep -a "copy bandwidth" $OUT/peers.err
tail -3 $OUT/cuda_decode.log; tail -3 $OUT/inference.log; grep -E "^\| s2attn" $OUT/bench.log | head -40; cut -c1-110 $OUT/peers.jsonl
