#!/usr/bin/env bash
# benches/diag/coop-sass.sh (on the GPU host, STAGE = a tree staged with ONLY="s2attn-bench vk_pipeline_stats"):
# the NVIDIA machine code of the coop kernels (vk_pipeline_stats --dump, the driver's GLCache, benches/diag/sass.py)
# and a residency timing: the coop forward at 66 / 132 / 264 / 528 workgroups of the same per-workgroup work
# (local-only rows: vert_stride 256 > blocks), v3 at 128x32, 64x32 and 64x16, and v5 at 64x32.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source ${STAGE:-.gpu}/env.sh
export __GL_SHADER_DISK_CACHE_PATH=$OUT/glcache __GL_SHADER_DISK_CACHE_SKIP_CLEANUP=1; mkdir -p $OUT/glcache
timeout 120 vk_pipeline_stats --dump $OUT/dump --json $OUT/stats.jsonl > $OUT/stats.txt 2>&1; t "vk_pipeline_stats rc=$?"
cp -r ~/.cache/nvidia $OUT/home-nvidia-cache 2>/dev/null
ls -la $OUT/dump | head -40 > $OUT/dump-ls.txt
NVDISASM=$(command -v nvdisasm || echo /usr/local/cuda/bin/nvdisasm) timeout 120 python3 benches/diag/sass.py $OUT/dump $OUT/glcache $OUT/home-nvidia-cache > $OUT/sass-summary.txt 2>&1
t "sass.py rc=$?"; head -c 6000 $OUT/sass-summary.txt
b="--kv-heads 1 --head-dim 128 --block 64 --local 16 --vert-stride 256 --dtype f16 --backend vulkan --no-dense --check-seq 0 --iters 20 --warmup 3"
# CFGS="variant tile rows;..." (empty: no residency timing)
IFS=';' read -ra cfgs <<< "${CFGS-v3 128x32 128;v3 64x32 64;v3 64x16 64;v5 64x32 64}"
for cfg in "${cfgs[@]}"; do
    set -- $cfg
    # rows per workgroup tile = $3; 132 row tiles per head; heads 1/2/4 -> 132/264/528 workgroups, half the tiles -> 66
    for hs in "66 1" "132 1" "264 2" "528 4"; do
        set -- $cfg $hs; n=$(( $4 / $5 * $3 )); h=$5
        S2ATTN_AUTOTUNE=0 S2ATTN_COOP_FWD=$1 S2ATTN_TILE=$2 timeout 60 s2attn-bench $b --heads $h --seq $n -v \
            --json $OUT/res-$1-$2-$4.jsonl > $OUT/res-$1-$2-$4.log 2>&1
        t "residency $1 $2 wgs=$4 (seq $n heads $h) rc=$? $(grep -ao '"ms":[0-9.]*' $OUT/res-$1-$2-$4.jsonl | head -1) $(grep -a -m1 -o 'plan:.*' $OUT/res-$1-$2-$4.log | cut -c1-100)"
    done
done
# a device call returns few files: everything in one archive
cd $OUT && tar czf all.tgz --remove-files dump glcache home-nvidia-cache res-* stats* sass-summary.txt dump-ls.txt 2>/dev/null; ls -la $OUT
