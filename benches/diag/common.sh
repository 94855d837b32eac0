# benches/diag/common.sh: sourced by the diagnostic scripts beside it (each one device call of the 2026-12-01 v6
# work, run from the project root on the GPU host): strict mode, lavapipe/NVIDIA runtime dir, the progress line
# `t` (seconds since start, also appended to $OUT/summary.txt), `ms FILE [FIELD]` (a JSON field of every row,
# "ms" by default) and the two problem shapes: `paper` (32 heads, d128, block 64, local 16, f16, Vulkan coop) and
# `lone` (66 workgroups of 128 local-only rows: the per-workgroup latency problem).
set -uo pipefail
export XDG_RUNTIME_DIR=/tmp
T0=$SECONDS; t() { echo "[t=$((SECONDS-T0))s] $*" | tee -a $OUT/summary.txt; }
ms() { grep -ao "\"${2:-ms}\":[0-9.]*" "$1" | cut -d: -f2 | tr '\n' ' '; }
paper="--heads 32 --kv-heads 32 --head-dim 128 --block 64 --local 16 --dtype f16 --backend vulkan --no-dense"
lone="--heads 1 --kv-heads 1 --head-dim 128 --block 64 --local 16 --vert-stride 256 --dtype f16 --backend vulkan --no-dense --check-seq 0 --seq 8448"
