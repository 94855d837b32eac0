#!/usr/bin/env bash
# benches/diag/clocks.sh (GPU host; STAGE staged with s2attn-bench): the SM / memory clocks and P-state that
# nvidia-smi reports while the Vulkan coop forward runs (128k vs16, ~5 s) and while the CUDA forward runs.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.gpu}/env.sh
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=timestamp,pstate,clocks.sm,clocks.max.sm,clocks.mem,power.draw,utilization.gpu,clocks_event_reasons.active \
    --format=csv -lms 100 > $OUT/smi.csv 2>&1 &
smi=$!
sleep 1; t "idle"
b="--heads 32 --kv-heads 32 --head-dim 128 --block 64 --local 16 --dtype f16 --no-dense --check-seq 0 --seq 128k --vert-stride 16"
S2ATTN_AUTOTUNE=0 timeout 120 s2attn-bench $b --backend vulkan --iters 40 --warmup 3 > $OUT/vk.log 2>&1; t "vulkan rc=$? $(tail -1 $OUT/vk.log)"
sleep 1
timeout 120 s2attn-bench $b --backend cuda --iters 100 --warmup 3 > $OUT/cuda.log 2>&1; t "cuda rc=$? $(tail -1 $OUT/cuda.log)"
sleep 1; kill $smi
python3 - $OUT/smi.csv $OUT/summary.txt <<'PY'
import sys, csv, collections
rows = list(csv.reader(open(sys.argv[1])))
print(rows[0])
g = collections.Counter()
for r in rows[1:]:
    if len(r) > 6: g[(r[1].strip(), r[2].strip(), r[4].strip(), r[6].strip(), r[7].strip())] += 1
for k, v in sorted(g.items(), key=lambda x: -x[1])[:25]: print(v, k)
PY
