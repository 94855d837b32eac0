#!/usr/bin/env bash
# Runs decode_check.cc over the split kernels (general PASS 0, narrow PASS 2) and the combine, fp16 and
# bf16, with finite and with non-finite inputs, on the CPU: `bash shaders/cuda/emu/run.sh` (needs g++ 12 or newer for _Float16 and std::barrier).
set -e
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# NVRTC-only pieces replaced by emu.h: the PTX conversions and the dynamic shared memory declaration.
sed -e '/^__device__ __forceinline__ float to_f32(u16 x) {/,/^}/d' -e '/^__device__ __forceinline__ u16 from_f32(float f) {/,/^}/d' \
    -e 's/^typedef unsigned short u16;//' -e 's/extern __shared__ uint4 smem\[\];/uint4* smem = g_dyn;/' \
    "$here/../s2_decode.cu" > "$tmp/k_emu.cu"
cp "$here/emu.h" "$here/decode_check.cc" "$tmp/"
for nf in 0 1; do
  for bf in 0 1; do
    for cfg in "4 1 2" "1 1 2" "4 2 2" "2 1 2" "4 1 0" "8 2 0" "1 1 0" "16 1 0"; do
      set -- $cfg
      g++ -std=c++20 -O1 -w -pthread -DIS_BF16=$bf -DROWS=$1 -DNTOK=$2 -DSPLIT_PASS=$3 -DNONFINITE=$nf \
        "$tmp/decode_check.cc" -o "$tmp/check"
      "$tmp/check"
    done
  done
done
