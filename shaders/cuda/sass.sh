#!/usr/bin/env bash
# shaders/cuda/sass.sh KERNEL ARCH [NAME=VALUE...]: compiles one of the CUDA kernels as the host does (NVRTC, the
# same options; s2_backward.cu after the text of s2_forward.cu) for ARCH (e.g. sm_90a, sm_80) with the given
# defines, prints ptxas's report (registers, spills, stack) and writes the machine code (SASS) to
# $OUT_DIR/<kernel>-<arch>.sass, for reading where a kernel's instructions went without a GPU (where the wgmma waits
# sit against the softmax, what spills inside a loop).
# KERNEL is s2_forward, s2_backward, s2_decode, s2_exact or kv_append; the defines are those src/cuda builds the kernel with,
# for instance the wgmma forward at head dim 128:
#   shaders/cuda/sass.sh s2_forward sm_90a HEAD_DIM=128 BLOCK_Q=128 BLOCK_K=64 WARPS=8 IS_BF16=0 MIN_BLOCKS=1 USE_WGMMA=1
# and the wgmma dK/dV pass: s2_backward sm_90a ... PASS=2 (with the forward's wgmma defines).
# Needs no GPU and no CUDA install: NVIDIA's NVRTC, cuobjdump and nvdisasm wheels from PyPI (pip download, once)
# go to TOOLS_DIR (default ~/.cache/s2attn-cuda-tools). Environment: OUT_DIR (default /tmp).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
kernel=$1 arch=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
tools=${TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/s2attn-cuda-tools}
out=${OUT_DIR:-/tmp}
case $kernel in s2_forward | s2_backward | s2_decode | s2_exact | kv_append) ;; *) echo "unknown kernel '$kernel'" >&2; exit 2 ;; esac
if [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
    mkdir -p "$tools"
    python3 -m pip download -q --no-deps -d "$tools" nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    for w in "$tools"/*.whl; do (cd "$tools" && python3 -m zipfile -e "$w" .); done
    chmod +x "$tools"/nvidia/cu13/bin/*
fi
cubin="$out/$kernel-$arch.cubin"
LD_LIBRARY_PATH="$tools/nvidia/cu13/lib" python3 - "$here" "$kernel" "$arch" "$cubin" "$@" <<'EOF'
import ctypes, sys
here, kernel, arch, cubin, defines = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
src = open(f"{here}/{kernel}.cu").read()
if kernel == "s2_backward":  # as src/cuda/backward.rs concatenates it
    src = open(f"{here}/s2_forward.cu").read() + '\n#line 1 "s2_backward.cu"\n' + src
nvrtc = ctypes.CDLL("libnvrtc.so.13")
opts = [f"--gpu-architecture={arch}", "-std=c++17", "--fmad=true", "--ptxas-options=-v"] + [f"-D{d}" for d in defines]
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{kernel}.cu".encode(), 0, None, None) == 0
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
n = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
nvrtc.nvrtcGetProgramLog(prog, log)
print(log.value.decode(errors="replace").strip())
if rc != 0:
    sys.exit(f"NVRTC could not compile {kernel} for {arch} (status {rc})")
nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(n))
code = ctypes.create_string_buffer(n.value)
nvrtc.nvrtcGetCUBIN(prog, code)
open(cubin, "wb").write(code.raw)
EOF
PATH="$tools/nvidia/cu13/bin:$PATH" cuobjdump -sass "$cubin" > "$out/$kernel-$arch.sass"
echo "SASS: $out/$kernel-$arch.sass ($(grep -c '/\*[0-9a-f]\{4\}\*/' "$out/$kernel-$arch.sass") instructions)"
