# benches/diag/common.sh: sourced by the diagnostic scripts beside it (each one device call of the 2026-12-01 v6
# work, run from the project root on the GPU host): strict mode, lavapipe/NVIDIA runtime dir, the progress line
# `t` (seconds since start, also appended to $OUT/summary.txt), `ms FILE [FIELD]` (a JSON field of every row,
# "ms" by default) and the two problem shapes: `paper` (32 heads, d128, block 64, local 16, f16, Vulkan coop) and
# `lone` (66 workgroups of 128 local-only rows: the per-workgroup latency problem).
# The coop-v7.sh .. coop-v11.sh calls also share `worst_twin`, `peers` and `clocks_start` / `clocks_stop` (below).
set -uo pipefail
export XDG_RUNTIME_DIR=/tmp
T0=$SECONDS; t() { echo "[t=$((SECONDS-T0))s] $*" | tee -a $OUT/summary.txt; }
ms() { grep -ao "\"${2:-ms}\":[0-9.]*" "$1" | cut -d: -f2 | tr '\n' ' '; }
paper="--heads 32 --kv-heads 32 --head-dim 128 --block 64 --local 16 --dtype f16 --backend vulkan --no-dense"
lone="--heads 1 --kv-heads 1 --head-dim 128 --block 64 --local 16 --vert-stride 256 --dtype f16 --backend vulkan --no-dense --check-seq 0 --seq 8448"
# `worst_twin LOG...`: the largest kernel-against-CPU-twin error the coop GPU tests printed, one summary line.
worst_twin() {
    grep -aho 'vs twin [0-9.e-]*' "$@" | sort -t' ' -k3 -g | tail -1 | sed 's/^/worst forward /' | tee -a $OUT/summary.txt
}
# `peers SEQ...`: FlashAttention-2 dense causal (torch_peers.py, paper shape) at those lengths and FlexAttention-S2
# at 128k for vert_stride 16 and 64, to $OUT/peers.jsonl (stderr to peers.err), with one summary line.
peers() {
    timeout 120 python3 ${STAGE:-.gpu}/peers/torch_peers.py --mode fwd --seq "$@" --vert-stride 16 --impls torch-flash \
        --iters 5 > $OUT/peers.jsonl 2> $OUT/peers.err
    t "peers FA2 rc=$?"
    timeout 150 python3 ${STAGE:-.gpu}/flex_peers.py fp16:16:131072 fp16:64:131072 >> $OUT/peers.jsonl 2>> $OUT/peers.err
    t "peers Flex rc=$?"
    grep -ao '"impl": "[^"]*"\|"ms": [0-9.]*\|"seq": [0-9]*\|"vert_stride": [0-9]*' $OUT/peers.jsonl | paste -sd' ' \
        | tee -a $OUT/summary.txt
}
# `clocks_start` / `clocks_stop`: nvidia-smi's SM clock (and memory clock, power, temperature) every 100 ms to
# $OUT/clocks.csv in between; the stop adds the most frequent SM clocks to the summary.
clocks_start() {
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader -lms 100 \
        > $OUT/clocks.csv 2>&1 &
    CLOCKS_PID=$!
}
clocks_stop() {
    kill $CLOCKS_PID 2>/dev/null
    awk -F', ' '{print $2}' $OUT/clocks.csv | sort | uniq -c | sort -rn | head -5 | paste -sd' ' \
        | sed 's/^/SM clocks (samples MHz): /' | tee -a $OUT/summary.txt
}
