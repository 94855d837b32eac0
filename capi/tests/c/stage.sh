#!/usr/bin/env bash
# Builds the C test programs (smoke.c: host memory; buffers.c: device buffers) against the static library,
# so that a machine without a Rust toolchain or a C compiler (a GPU host) can run them:
#   capi/tests/c/stage.sh OUTDIR [cargo args, e.g. --features cuda]   then there: OUTDIR/smoke && OUTDIR/buffers
# Each program prints its checks and exits non-zero when one fails (capi/tests/c_api.rs runs the same sources
# under `cargo test`).
set -euo pipefail
out=${1:?usage: capi/tests/c/stage.sh OUTDIR [cargo args]}; shift
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
cargo build --release -p s2attn-capi --lib "$@"
mkdir -p "$out"
for prog in smoke buffers; do
    "${CC:-cc}" -std=c11 -O1 -Wall -Wextra -Werror -I capi/include "capi/tests/c/$prog.c" -o "$out/$prog" \
        target/release/libs2attn_capi.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
    strip "$out/$prog" 2>/dev/null || true
done
ls -la "$out"
