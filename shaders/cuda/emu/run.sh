#!/usr/bin/env bash
# Runs, on the CPU (g++ over emu.h; needs g++ 12 or newer for _Float16 and std::barrier), fp16 and bf16, with
# finite and with non-finite inputs:
# - decode_check.cc over the decode kernels (general PASS 0, narrow PASS 1, tensor-core PASS 2 at head dims 128
#   and 64, ring depths 3 and 2) with their fused combine;
# - exact_check.cc over the exact forward and backward (s2_exact.cu) at head dims 32, 64, 96 and 128,
#   causal and not;
# - forward_check.cc over the sm_90 wgmma forward (s2_forward.cu built with USE_WGMMA=1, its PTX emulated by
#   sm90.h) at head dims 128 and 64: causal and not, one and two sequences, blocks of 64 and 128, strided tokens, 2
#   or 3 persistent CTAs, and Q scaled up 12x (scores whose row maxima jump far along a walk: the lazy O rescale);
#   and over the mma.sync forward (USE_WGMMA=0) in the planner's tile shapes (128 rows on 4 or 8 warps, 64 on 4);
# - backward_check.cc over the sm_90 wgmma backward (s2_backward.cu's dQ pass PASS 3, then its dK/dV pass
#   PASS 2, each compiled after s2_forward.cu's text as the host compiles them) at head dims 128 and 64: causal and
#   not, blocks of 64 and 128, one and two sequences, one and two query heads per pattern, 2 or 3 persistent CTAs;
#   and over the mma.sync backward (PASS 0, then PASS 1; USE_WGMMA=0) in the planner's shapes at head dims 32, 64, 96
#   and 128, blocks of 16 to 128.
# - append_check.cc over the KV append (kv_append.cu): a batch of appends with strided sources, shuffled pages and
#   a block no future query needs.
# `bash shaders/cuda/emu/run.sh`; the builds run on all cores.
set -e
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# NVRTC-only pieces replaced by emu.h: the PTX conversions and the dynamic shared memory declaration.
sed -e '/^__device__ __forceinline__ float to_f32(u16 x) {/,/^}/d' -e '/^__device__ __forceinline__ u16 from_f32(float f) {/,/^}/d' \
    -e 's/^typedef unsigned short u16;//' -e 's/extern __shared__ uint4 smem\[\];/uint4* smem = g_dyn;/' \
    "$here/../s2_decode.cu" > "$tmp/k_emu.cu"
# The exact kernels take their conversions from emu.h under EXACT_EMU.
cp "$here/../s2_exact.cu" "$tmp/k_exact.cu"
# The forward's PTX functions are in `#ifndef S2_EMU` blocks (emu.h defines S2_EMU; sm90.h has their emulations); in the
# kernel body, the two setmaxnreg statements go and the dynamic shared memory declaration points into g_dyn.
sed -e '/asm volatile("setmaxnreg\./d' \
    -e 's/extern __shared__ __align__(1024) unsigned char smem_raw_\[\];/unsigned char* smem_raw_ = emu_dyn_smem();/' \
    -e 's/extern __shared__ __align__(16) unsigned char smem_raw\[\];/unsigned char* smem_raw = emu_dyn_smem();/' \
    "$here/../s2_forward.cu" > "$tmp/k_fwd.cu"
if ! grep -q 'smem_raw_ = emu_dyn_smem();' "$tmp/k_fwd.cu" || ! grep -q 'smem_raw = emu_dyn_smem();' "$tmp/k_fwd.cu" ||
   grep -q 'asm volatile("setmaxnreg' "$tmp/k_fwd.cu"; then
  echo "run.sh: s2_forward.cu no longer has the lines its emulation edits" >&2
  exit 1
fi
# The backward as the host compiles it (s2_forward.cu, then s2_backward.cu), edited the same way; its kernels lose
# `extern "C"` (the check holds two passes' builds, each with the forward's kernel, in two namespaces).
{ cat "$here/../s2_forward.cu"; echo '#line 1 "s2_backward.cu"'; cat "$here/../s2_backward.cu"; } |
  sed -e '/asm volatile("setmaxnreg\./d' \
      -e 's/extern __shared__ __align__(1024) unsigned char smem_raw_\[\];/unsigned char* smem_raw_ = emu_dyn_smem();/' \
      -e 's/extern __shared__ __align__(16) unsigned char smem_raw\[\];/unsigned char* smem_raw = emu_dyn_smem();/' \
      -e 's/^extern "C" __global__/__global__/' > "$tmp/k_bwd.cu"
if [ "$(grep -c 'smem_raw_ = emu_dyn_smem();' "$tmp/k_bwd.cu")" != 3 ] ||
   [ "$(grep -c 'smem_raw = emu_dyn_smem();' "$tmp/k_bwd.cu")" != 3 ] || grep -q 'asm volatile("setmaxnreg' "$tmp/k_bwd.cu"; then
  echo "run.sh: s2_backward.cu no longer has the lines its emulation edits" >&2
  exit 1
fi
cp "$here/../kv_append.cu" "$here/append_check.cc" "$tmp/"
cp "$here/emu.h" "$here/sm90.h" "$here/checks.h" "$here/decode_check.cc" "$here/exact_check.cc" "$here/forward_check.cc" \
   "$here/backward_check.cc" "$tmp/"
builds=("append_check.cc run_append")
for cfg in "0 128" "1 128" "0 64" "1 64"; do
  set -- $cfg
  builds+=("forward_check.cc run_wgmma_$1_$2 -DIS_BF16=$1 -DHEAD_DIM=$2")
  builds+=("backward_check.cc run_bwd_$1_$2 -DIS_BF16=$1 -DHEAD_DIM=$2")
done
# mma.sync backward builds: IS_BF16, HEAD_DIM, CHUNK (min(64, block)).
for cfg in "0 128 64" "1 64 64" "0 32 32" "1 96 16"; do
  set -- $cfg
  builds+=("backward_check.cc run_bwd_mma_$1_$2_$3 -DUSE_WGMMA=0 -DIS_BF16=$1 -DHEAD_DIM=$2 -DCHUNK=$3")
done
# mma.sync forward builds: IS_BF16, HEAD_DIM, BLOCK_Q, WARPS, MIN_BLOCKS (src/cuda/forward.rs's rule).
for cfg in "0 128 128 4 2" "1 64 128 4 2" "0 64 64 4 3" "1 128 128 8 1"; do
  set -- $cfg
  builds+=("forward_check.cc run_mma_$1_$2_$3_$4 -DUSE_WGMMA=0 -DIS_BF16=$1 -DHEAD_DIM=$2 -DBLOCK_Q=$3 -DWARPS=$4 -DMIN_BLOCKS=$5")
done
for nf in 0 1; do
  for bf in 0 1; do
    for cfg in "4 1 1" "1 1 1" "4 2 1" "2 1 1" "4 1 0" "8 2 0" "1 1 0" "16 1 0" "1 1 2" "4 1 2" "8 2 2" "16 1 2" \
               "4 1 2 64" "16 2 2 64" "4 1 2 128 2" "16 1 2 64 2"; do
      set -- $cfg
      d=${4:-128}
      st=${5:-3}
      builds+=("decode_check.cc run_decode_${nf}_${bf}_$1_$2_$3_${d}_$st -DIS_BF16=$bf -DROWS=$1 -DNTOK=$2 -DSPLIT_PASS=$3 -DNONFINITE=$nf -DHEAD_DIM=$d -DSTAGES=$st")
    done
  done
done
for cfg in "0 64" "1 128" "1 32" "0 96"; do
  set -- $cfg
  builds+=("exact_check.cc run_exact_$1_$2 -DIS_BF16=$1 -DHEAD_DIM=$2")
done
printf '%s\n' "${builds[@]}" | (cd "$tmp" && xargs -P "$(nproc)" -L 1 sh -c 'out=$1; shift; g++ -std=c++20 -O1 -w -Wno-psabi -pthread "$0" -o "$out" "$@"')
cd "$tmp"
./run_append
for b in run_decode_*; do ./"$b"; done
for b in run_exact_*; do
  for args in "" nonfinite "nonfinite noncausal"; do ./"$b" $args; done
done
# Binary (IS_BF16, HEAD_DIM[, BLOCK_Q, WARPS]), then forward_check.cc's arguments.
while read -r b args; do ./"$b" $args </dev/null; done <<'EOF'
run_wgmma_0_128
run_wgmma_0_128 seq=600 batch=2 ctas=2 strided
run_wgmma_0_128 block=128 seq=700 noncausal
run_wgmma_1_128 noncausal strided
run_wgmma_1_128 seq=600 batch=2 ctas=2
run_wgmma_0_64 noncausal strided
run_wgmma_0_64 block=128 seq=300 ctas=2
run_wgmma_1_64 seq=640
run_wgmma_1_64 seq=130 batch=2 noncausal
run_wgmma_0_128 seq=1000 qscale=12
run_wgmma_1_64 seq=1000 qscale=12 noncausal
run_mma_0_128_128_4 seq=600 batch=2 strided
run_mma_0_128_128_4 seq=1000 qscale=12
run_mma_1_64_128_4 block=128 seq=700 noncausal qscale=12
run_mma_0_64_64_4 seq=421 noncausal strided
run_mma_1_128_128_8 seq=600 qscale=12
EOF
# Binary (wgmma: IS_BF16, HEAD_DIM; mma.sync: IS_BF16, HEAD_DIM, CHUNK), then backward_check.cc's arguments.
while read -r b args; do ./"$b" $args </dev/null; done <<'EOF'
run_bwd_0_128
run_bwd_0_128 noncausal
run_bwd_1_128 block=128 seq=421 batch=2 ctas=2
run_bwd_1_128 noncausal seq=130 batch=2
run_bwd_0_64 seq=520 batch=2 hpp=2 ctas=2
run_bwd_0_64 noncausal block=128 seq=560 hpp=2 ctas=2
run_bwd_1_64 block=128 seq=200 ctas=2
run_bwd_1_64 noncausal seq=333 batch=2 hpp=2
run_bwd_0_64 seq=130 ctas=4
run_bwd_mma_0_128_64
run_bwd_mma_0_128_64 noncausal block=128 seq=300 hpp=2
run_bwd_mma_1_64_64 seq=520 batch=2 hpp=2
run_bwd_mma_1_64_64 block=128 seq=300 noncausal
run_bwd_mma_0_32_32 block=32 seq=277 batch=2
run_bwd_mma_0_32_32 block=32 seq=200 noncausal hpp=2
run_bwd_mma_1_96_16 block=16 seq=150
run_bwd_mma_1_96_16 block=16 seq=97 noncausal hpp=2 batch=2
EOF
