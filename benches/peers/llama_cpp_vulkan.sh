#!/usr/bin/env bash
# benches/peers/llama_cpp_vulkan.sh [OUT_DIR]: builds llama.cpp's `test-backend-ops` with the Vulkan backend, the
# benchmark's peer for dense flash attention (GGML_OP_FLASH_ATTN_EXT: its scalar, KHR cooperative-matrix and NV
# cooperative-matrix-2 shaders), as one stripped binary for a GPU host without a compiler: libstdc++ and libgcc
# linked in, libvulkan.so.1 loaded at run time (the staged loader of .gpu/env.sh). It writes the binary, xz-packed
# (test-backend-ops.xz, about 6 MiB: the SPIR-V of every ggml-vulkan shader makes the binary itself about 46 MiB),
# and a VERSION file to OUT_DIR (default .gpu/peers/llama-cpp at the repository root; run ../shared/gpu/stage.sh
# first, as it empties .gpu/). benches/gpu.sh's `llama` suite runs it through benches/peers/llama_cpp_json.py, which
# unpacks it beside itself on first use.
#
# Usage, from anywhere, as root on Debian 12 (it apt-get installs what is missing):
#   benches/peers/llama_cpp_vulkan.sh [OUT_DIR]
# Environment: BUILD_DIR (sources, tools and build tree; default ~/.cache/s2attn-llama-cpp; keep it outside the
# repository), JOBS (parallel compile jobs, default 2), GLSLC (a glslc that knows GL_NV_cooperative_matrix2 and
# GL_KHR_cooperative_matrix; default: built here from the shaderc sources of the shaderc-sys crate), PACK (xz: only
# test-backend-ops.xz, the default; plain: only the binary; both).
# Idempotent: downloads are checked against their sha256 and kept, the glslc and the build tree are reused.
#
# What it fetches, each pinned to a version and its sha256, with the registries' own clients:
# - llama.cpp: the vendor/llama.cpp of the llama-cpp-python sdist (pip download; 0.3.36 carries llama.cpp
#   0c1e57098, ggml 0.25.3).
# - Vulkan headers 1.4.309: Debian 13's libvulkan-dev (apt-get download from the Debian mirror this machine's apt
#   uses, suite trixie, into a private list folder; unpacked here, not installed). Debian 12's headers (1.3.239)
#   lack VK_KHR_cooperative_matrix and VK_NV_cooperative_matrix2, without which ggml compiles both paths out.
# - glslc: Debian 12's (shaderc 2023.2, glslang 12) cannot compile the cooperative-matrix shaders either; the
#   shaderc-sys 0.10.1 crate (cargo fetch) ships the sources of shaderc 2025.3, glslang 15.3, SPIRV-Tools 2025.3
#   and SPIRV-Headers (its glslc calls itself v2023.8: no git metadata). About 10 minutes on 2 cores, once.
#
# One change to llama.cpp's tests/test-backend-ops.cpp (applied by the Python below, never kept): its flash-attention
# perf cases draw a random mask, so a perf case class with a causal mask is added (0 where the key position is at
# most the query's, the queries being the last nb positions, -inf elsewhere: ggml-vulkan then skips the fully masked
# tiles as llama.cpp's own prefill does), with f16 K/V and f32 accumulation (what llama.cpp sets), its params ending in
# `causal=1`. Its shapes come from FA_CAUSAL_CASES="hs:nh:nr:kv:nb,..." at run time (head dim, KV heads, query heads
# per KV head, KV length, query rows), by default head dim 128, 32 heads, kv 4k/8k/16k/32k with nb = kv (prefill)
# and nb = 1 (decode). Select them with `test-backend-ops perf -o FLASH_ATTN_EXT -b Vulkan0 -p causal=1`.
set -euo pipefail

SDIST_VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_COMMIT=0c1e57098
VKH_VERSION=1.4.309.0-1
VKH_DEB=libvulkan-dev_${VKH_VERSION}_amd64.deb
VKH_SHA256=8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a
SHADERC_CRATE=shaderc-sys-0.10.1
SHADERC_SHA256=bdceb85b2c6d2c27b95ffe2d341063dfded0aca8046f7f60c544bbeaeaf8bcae

root=$(cd "$(dirname "$0")/../.." && pwd)
OUT_DIR=$(mkdir -p "${1:-$root/.gpu/peers/llama-cpp}" && cd "${1:-$root/.gpu/peers/llama-cpp}" && pwd)
BUILD_DIR=${BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/s2attn-llama-cpp}
JOBS=${JOBS:-2}
mkdir -p "$BUILD_DIR/dl"
cd "$BUILD_DIR"
T0=$SECONDS
say() { echo "[llama_cpp_vulkan $((SECONDS - T0))s] $*" >&2; }

# Debian packages: the compilers, cmake, and the loader's libvulkan.so to link against (its headers are replaced).
need=()
for p in cmake make g++ python3 python3-pip ca-certificates libvulkan-dev binutils xz-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    say "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

have() {  # have SHA256 FILE: the file is there with that sum
    [ -f "dl/$2" ] && echo "$1  dl/$2" | sha256sum -c --quiet - 2>/dev/null
}
check() {  # check SHA256 FILE: or stop
    have "$1" "$2" || { echo "missing, or sha256 mismatch: $BUILD_DIR/dl/$2" >&2; exit 1; }
}
sdist=llama_cpp_python-$SDIST_VERSION.tar.gz
if ! have "$SDIST_SHA256" "$sdist"; then
    say "pip download llama-cpp-python==$SDIST_VERSION (sdist)"
    rm -f "dl/$sdist"
    python3 -m pip download -q --no-binary :all: --no-deps -d dl "llama-cpp-python==$SDIST_VERSION"
fi
check "$SDIST_SHA256" "$sdist"
if ! have "$VKH_SHA256" "$VKH_DEB"; then
    # Debian 13 (trixie) from the mirror of this machine's Debian 12 sources, in lists of our own.
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' | awk '$2 == "bookworm" { print $1; exit }')
    [ -n "$mirror" ] || { echo "no Debian 12 (bookworm) source in apt's configuration" >&2; exit 1; }
    mkdir -p apt/lists/partial apt/cache/archives/partial
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > apt/sources.list
    o=(-o "Dir::Etc::SourceList=$BUILD_DIR/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o "Dir::State::Lists=$BUILD_DIR/apt/lists" -o "Dir::Cache=$BUILD_DIR/apt/cache" -o Debug::NoLocking=1
       -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o APT::Sandbox::User=root)
    say "apt-get download libvulkan-dev=$VKH_VERSION (Debian 13)"
    apt-get "${o[@]}" update -qq
    (cd dl && apt-get "${o[@]}" download -qq "libvulkan-dev=$VKH_VERSION")
fi
check "$VKH_SHA256" "$VKH_DEB"

# Vulkan headers (include/vulkan, include/vk_video) unpacked beside the build.
if [ ! -f vkheaders/usr/include/vulkan/vulkan.hpp ]; then
    rm -rf vkheaders && dpkg-deb -x "dl/$VKH_DEB" vkheaders
fi

# glslc with the cooperative-matrix extensions.
if [ -z "${GLSLC:-}" ]; then
    GLSLC=$BUILD_DIR/shaderc/build/shaderc/glslc/glslc
    if [ ! -x "$GLSLC" ]; then
        if ! have "$SHADERC_SHA256" "$SHADERC_CRATE.crate"; then
            # cargo's own download of the crate, through a manifest that depends on it
            say "cargo fetch $SHADERC_CRATE"
            mkdir -p crate-fetch/src && touch crate-fetch/src/lib.rs
            printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nshaderc-sys = "=%s"\n' \
                "${SHADERC_CRATE#shaderc-sys-}" > crate-fetch/Cargo.toml
            (cd crate-fetch && cargo fetch -q)
            cp "$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$SHADERC_CRATE.crate" | head -1)" dl/
        fi
        check "$SHADERC_SHA256" "$SHADERC_CRATE.crate"
        mkdir -p shaderc
        [ -f "shaderc/$SHADERC_CRATE/build/CMakeLists.txt" ] || tar xzf "dl/$SHADERC_CRATE.crate" -C shaderc
        say "building glslc (shaderc-sys 0.10.1's shaderc) with $JOBS jobs"
        cmake -S "shaderc/$SHADERC_CRATE/build" -B shaderc/build -DCMAKE_BUILD_TYPE=Release -DSHADERC_SKIP_TESTS=ON \
            -DSHADERC_SKIP_EXAMPLES=ON -DSHADERC_SKIP_COPYRIGHT_CHECK=ON -DSPIRV_SKIP_TESTS=ON -DSPIRV_SKIP_EXECUTABLES=ON \
            -DSPIRV_WERROR=OFF -DENABLE_GLSLANG_BINARIES=OFF -DENABLE_SPVREMAPPER=OFF -DGLSLANG_TESTS=OFF >/dev/null
        cmake --build shaderc/build --target glslc_exe -j "$JOBS" >/dev/null
    fi
fi
"$GLSLC" --version | head -1 >&2

# llama.cpp sources, patched.
src=$BUILD_DIR/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp
[ -f "$src/tests/test-backend-ops.cpp" ] || tar xzf "dl/llama_cpp_python-$SDIST_VERSION.tar.gz"
python3 - "$src/tests/test-backend-ops.cpp" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
if "test_flash_attn_ext_causal" in text:
    sys.exit(0)
anchor = ("static std::vector<std::unique_ptr<test_case>> make_test_cases_perf() {\n"
          "    std::vector<std::unique_ptr<test_case>> test_cases;\n")
assert text.count(anchor) == 1, "make_test_cases_perf() not found as expected"
case_class = r'''
// Dense causal attention: mask 0 where the key position is at most the query's (the queries are the last nb of the kv
// positions), -inf elsewhere; f16 K/V, f32 accumulation.
struct test_flash_attn_ext_causal : public test_flash_attn_ext {
    test_flash_attn_ext_causal(int64_t hs, int64_t nh, int64_t nr, int64_t kv, int64_t nb)
        : test_flash_attn_ext(hs, hs, nh, {nr, 1}, kv, nb, true, false, 0.0f, 0.0f, GGML_PREC_F32, GGML_TYPE_F16, GGML_TYPE_F16) {}

    std::string vars() override { return test_flash_attn_ext::vars() + ",causal=1"; }

    uint64_t op_flops(ggml_tensor * t) override {
        GGML_UNUSED(t);
        const uint64_t pairs = (uint64_t) nb * kv - (uint64_t) nb * (nb - 1) / 2;
        return 2 * nh * nr23[0] * (hsk + hsv) * pairs * nr23[1];
    }

    void initialize_tensors(ggml_context * ctx) override {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != NULL; t = ggml_get_next_tensor(ctx, t)) {
            if (strcmp(t->name, "m") != 0) {
                init_tensor_uniform(t);
                continue;
            }
            const int64_t n_kv = t->ne[0], n_q = t->ne[1], rows = ggml_nrows(t), chunk = 256;
            const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
            std::vector<ggml_fp16_t> buf(chunk * n_kv);
            for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
                const int64_t n = std::min(chunk, rows - r0);
                for (int64_t r = 0; r < n; r++) {
                    const int64_t pos = n_kv - n_q + (r0 + r) % n_q;
                    for (int64_t j = 0; j < n_kv; j++) {
                        buf[r*n_kv + j] = j <= pos ? zero : ninf;
                    }
                }
                ggml_backend_tensor_set(t, buf.data(), r0*n_kv*sizeof(ggml_fp16_t), n*n_kv*sizeof(ggml_fp16_t));
            }
        }
    }
};

'''
cases = r'''
    // Dense causal flash attention: FA_CAUSAL_CASES="hs:nh:nr:kv:nb,..." (head dim, KV heads, query heads per KV head,
    // KV length, query rows), by default head dim 128, 32 heads, prefill (nb = kv) and decode (nb = 1) at 4k..32k.
    {
        std::vector<std::array<long long, 5>> fa_causal;
        if (const char * spec = getenv("FA_CAUSAL_CASES")) {
            std::stringstream ss(spec);
            std::string item;
            while (std::getline(ss, item, ',')) {
                std::array<long long, 5> c{};
                if (sscanf(item.c_str(), "%lld:%lld:%lld:%lld:%lld", &c[0], &c[1], &c[2], &c[3], &c[4]) == 5) {
                    fa_causal.push_back(c);
                } else {
                    fprintf(stderr, "FA_CAUSAL_CASES: ignoring '%s' (want hs:nh:nr:kv:nb)\n", item.c_str());
                }
            }
        } else {
            for (long long kv : {4096, 8192, 16384, 32768}) {
                for (long long nb : {kv, 1LL}) {
                    fa_causal.push_back({128, 32, 1, kv, nb});
                }
            }
        }
        for (const auto & c : fa_causal) {
            test_cases.emplace_back(new test_flash_attn_ext_causal(c[0], c[1], c[2], c[3], c[4]));
        }
    }
'''
open(path, "w").write(text.replace(anchor, case_class + anchor + cases))
PY

# Configure and build only test-backend-ops (about 12 minutes on 2 cores) (ggml-base, ggml-cpu, ggml-vulkan, llama, llama-common).
# ggml-vulkan finds SPIRV-Headers as a CMake package: installed (headers and config only) from the shaderc-sys
# sources fetched above, so that no system package is needed. It does not link that package's target, though (the
# Vulkan SDK puts spirv/unified1/spirv.hpp beside vulkan/), so its include folder is passed in CMAKE_CXX_FLAGS. Without
# it, g++ 12 (GCC bug 80753) skips the fallback #include of ggml-vulkan-types.h's __has_include chain without an
# error, and ggml-vulkan.cpp then fails on the undeclared `spv` namespace.
if [ ! -f spirv-headers-install/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake ] ||
   [ ! -f spirv-headers-install/include/spirv/unified1/spirv.hpp ]; then
    cmake -S "shaderc/$SHADERC_CRATE/build/spirv-headers" -B spirv-headers-build -DSPIRV_HEADERS_ENABLE_TESTS=OFF \
        -DCMAKE_INSTALL_PREFIX="$BUILD_DIR/spirv-headers-install" > /dev/null
    cmake --install spirv-headers-build > /dev/null
fi
say "building test-backend-ops with $JOBS jobs"
cmake -S "$src" -B llama-build -DCMAKE_PREFIX_PATH="$BUILD_DIR/spirv-headers-install" -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT" -DLLAMA_BUILD_NUMBER=0 \
    -DVulkan_INCLUDE_DIR="$BUILD_DIR/vkheaders/usr/include" -DVulkan_GLSLC_EXECUTABLE="$GLSLC" \
    -DCMAKE_CXX_FLAGS="-isystem $BUILD_DIR/spirv-headers-install/include" \
    -DCMAKE_EXE_LINKER_FLAGS="-static-libstdc++ -static-libgcc" > llama-configure.log
grep -E "GL_(KHR|NV)_cooperative_matrix2? support|COOPMAT" llama-configure.log >&2 || true
cmake --build llama-build --target test-backend-ops -j "$JOBS" > llama-build.log 2>&1 ||
    { tail -30 llama-build.log >&2; exit 1; }

bin=$(find llama-build -name test-backend-ops -type f -perm -u+x | head -1)
PACK=${PACK:-xz}
strip -o llama-build/test-backend-ops.stripped "$bin"
rm -f "$OUT_DIR/test-backend-ops" "$OUT_DIR/test-backend-ops.xz"
case $PACK in plain | both) cp llama-build/test-backend-ops.stripped "$OUT_DIR/test-backend-ops" ;; esac
case $PACK in xz | both) xz -T"$JOBS" -9 -c llama-build/test-backend-ops.stripped > "$OUT_DIR/test-backend-ops.xz" ;; esac
{
    echo "llama-cpp-python $SDIST_VERSION sdist: llama.cpp $LLAMA_COMMIT, ggml $(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$src/ggml/CMakeLists.txt" | paste -sd.)"
    echo "vulkan headers 1.4.309; glslc $("$GLSLC" --version | head -1) (shaderc-sys 0.10.1 sources unless GLSLC was given)"
    echo "causal FLASH_ATTN_EXT perf cases added (FA_CAUSAL_CASES, params ending in causal=1)"
} > "$OUT_DIR/VERSION"
say "test-backend-ops: $(du -h llama-build/test-backend-ops.stripped | cut -f1) stripped; needs:" \
    "$(readelf -d llama-build/test-backend-ops.stripped | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | paste -sd' ');" \
    "in $OUT_DIR: $(cd "$OUT_DIR" && du -h test-backend-ops* | paste -sd' ')"
