#!/usr/bin/env bash
# benches/gpu.sh SUITE...: the GPU runs behind BENCHMARKS.md, on one GPU host, from the repository root.
#
# Binaries: either a staged folder (built on another machine, e.g. `../shared/gpu/stage.sh --features cuda`, which
# puts release examples, bins and test binaries in .gpu/bin, the Vulkan/EGL loader packages and the peer script
# torch_peers.py in .gpu/; then `source .gpu/env.sh` on the GPU host), or a local `cargo build --release --bins
# --examples --features cuda` (target/release is searched when s2attn-bench is not on PATH; the tests suite then
# runs `cargo test --release`).
#
# Suites (each writes JSON lines to $OUT_DIR/<suite>.jsonl, its logs to $OUT_DIR/<suite>*.log):
#   tests     every test binary with a GPU path (wgpu ones on Vulkan, CUDA ones on CUDA) and the quickstart example;
#             one line per binary in summary.txt; a wait (wgpu or CUDA) past WAIT_TIMEOUT fails its test
#             (Error::Timeout), and a binary past TEST_TIMEOUT has its threads' states logged (tests-NAME.log.threads)
#             before it is killed
#   forward   S2 forward, 32 heads, head dim 128, block 64, local 16, batch 1: 16k/64k/128k x vert_stride 16/64,
#             fp16 on every backend of BACKENDS (dense rows of this library up to 16k), and bf16 on CUDA
#   backward  forward + backward (dQ, dK, dV) at the same shape, vert_stride 16, 16k/64k/128k, fp16 on every
#             backend of BACKENDS, and bf16 on CUDA
#   decode    one query token per sequence against 32k/128k tokens of paged S2 cache, 8 and 32 KV heads,
#             batch 1 and 16 (--preset decode); then the decode_bench example on each backend of BACKENDS (the
#             device's copy bandwidth, each step against its KV read time at that bandwidth, windows of 1 and 4
#             query tokens) and the decode_loop example
#   peers     FlashAttention-2 and cuDNN (dense causal, PyTorch SDPA) and FlexAttention with the S2 mask, through
#             torch_peers.py, at the points of the other suites named in the same run (of all of them if alone)
#   fuzz      the differential test (tests/differential.rs) on every backend of BACKENDS: FUZZ_CASES random problems
#             (default 400) from FUZZ_SEED (default 1), then its regression cases; one line per backend in summary.txt
#   sanitize  the CUDA forward, backward and decode under compute-sanitizer (memcheck, racecheck, synccheck) on
#             small shapes
#   paper     the paper's points: fp16, 32 heads, head dim 128, block 64, local 16, batch 1, 16k/32k/64k/128k at
#             vert_stride 16 and 64, our Vulkan and CUDA paths and FlashAttention-2 and FlexAttention in one run
#             (its peer rows go to paper.jsonl itself: `s2attn-bench report paper.jsonl` stands alone)
#   validate  the wgpu test binaries (forward, backward, their coop kernels, inference, errors) under the Khronos
#             Vulkan validation layer that benches/stage-validation.sh stages in .gpu/vklayer/ (errors, warnings and
#             synchronization validation to the logs); one line per binary with its message counts
#   e2e       the decode example (`decode` of s2attn-model) at model sizes with random f16 weights: PRESET
#             phi3-small and llama-7b (E2E_PRESETS), prompts 8k/32k/128k (E2E_PROMPTS), all-dense vs hybrid S2,
#             on each of BACKENDS (Vulkan: the wgpu model; CUDA: its CUDA twin): prefill time, decode tokens/s,
#             KV bytes as JSON lines in e2e.jsonl (not in report.md)
#   llama     llama.cpp's Vulkan flash attention (GGML_OP_FLASH_ATTN_EXT), dense causal, 32 heads, head dim 128, f16
#             K/V, batch 1: prefill (query rows = KV length) and decode (one query row) at LLAMA_SEQ (default 4k, 8k,
#             16k, 32k), through benches/peers/llama_cpp_json.py and the test-backend-ops that
#             benches/peers/llama_cpp_vulkan.sh stages (xz-packed, after stage.sh) in .gpu/peers/llama-cpp/; first
#             the path ggml-vulkan picks (impl llama.cpp-vulkan: coopmat2 on NVIDIA, scalar for decode), then for
#             each of LLAMA_PATHS (default coopmat1) the prefill with the paths above it disabled (impl
#             llama.cpp-vulkan-coopmat1: GGML_VK_DISABLE_COOPMAT2=1, the KHR cooperative-matrix shader other
#             vendors run; llama.cpp-vulkan-scalar: GGML_VK_DISABLE_COOPMAT2=1 GGML_VK_DISABLE_COOPMAT=1)
#
# Environment: OUT_DIR (default $OUT, else bench-out/<date-time>), BACKENDS (default vulkan,cuda), PEERS (path of
# torch_peers.py; default .gpu/peers/torch_peers.py), LLAMA (llama.cpp's test-backend-ops; default
# .gpu/peers/llama-cpp/test-backend-ops), LLAMA_SEQ, LLAMA_PATHS, TEST_TIMEOUT (seconds per test binary, default 300),
# WAIT_TIMEOUT (seconds the tests' contexts wait for the GPU, as S2ATTN_WAIT_TIMEOUT; default 120),
# CARGO_FEATURES (for the cargo fallback, default "--features cuda").
# At the end every log is packed into $OUT_DIR/logs.tar.gz, and report.md holds the tables of
# `s2attn-bench report FILE...` (one per device and mode, ours against the peers of the same run; the paper
# suite's in a section of its own).
set -uo pipefail
usage="usage: benches/gpu.sh SUITE... (tests fuzz sanitize validate forward backward decode e2e peers paper llama)"
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
for s in "$@"; do
    case $s in tests | fuzz | sanitize | validate | forward | backward | decode | e2e | peers | paper | llama) ;; *) echo "unknown suite '$s'; $usage" >&2; exit 2 ;; esac
done
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-${OUT:-bench-out/$(date +%Y-%m-%d-%H%M%S)}}
mkdir -p "$OUT_DIR"
BACKENDS=${BACKENDS:-vulkan,cuda}
PEERS=${PEERS:-.gpu/peers/torch_peers.py}
LLAMA=${LLAMA:-.gpu/peers/llama-cpp/test-backend-ops}
LLAMA_SEQ=${LLAMA_SEQ:-4096 8192 16384 32768}
LLAMA_PATHS=${LLAMA_PATHS:-coopmat1}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-120}
CARGO_FEATURES=${CARGO_FEATURES:---features cuda}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} PYTHONUNBUFFERED=1
for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break   # NVRTC for the cuda backend
done
# A stage compressed to fit what travels (`tar cf - -C .gpu/bin . | xz > .gpu/bin.tar.xz`, then .gpu/bin removed)
# unpacks here, once.
if [ -f .gpu/bin.tar.xz ] && [ ! -d .gpu/bin ]; then
    mkdir -p .gpu/bin && xz -dc .gpu/bin.tar.xz | tar xf - -C .gpu/bin && export PATH="$PWD/.gpu/bin:$PATH"
fi
command -v s2attn-bench >/dev/null || export PATH="$PWD/target/release:$PWD/target/release/examples:$PATH"
command -v s2attn-bench >/dev/null || { echo "no s2attn-bench: stage .gpu/ and source .gpu/env.sh, or cargo build --release" >&2; exit 2; }

T0=$SECONDS
say() { echo "[t=$((SECONDS - T0))s] $*" | tee -a "$OUT_DIR/summary.txt"; }
has() { [[ ",$BACKENDS," == *",$1,"* ]]; }
# The paper's shape; every suite but decode uses it.
shape="--heads 32 --kv-heads 32 --head-dim 128 --block 64 --local 16"
bench() {  # bench SUITE FLAGS...: one s2attn-bench run appending to SUITE.jsonl, its output to SUITE.log
    local suite=$1; shift
    local tmp="$OUT_DIR/.$suite.part.jsonl"
    s2attn-bench "$@" -v --json "$tmp" >> "$OUT_DIR/$suite.log" 2>&1
    local rc=$?
    cat "$tmp" >> "$OUT_DIR/$suite.jsonl" 2>/dev/null; rm -f "$tmp"
    say "$suite: s2attn-bench $* -> rc=$rc"
}
# `peers SUITE LINE...`: each LINE is one torch_peers.py command line; all run in one Python process (one torch
# import, Triton's compile cache shared) and append their JSON lines to SUITE.jsonl, their log to SUITE-peers.log.
peers() {
    local suite=$1 log=$1-peers.log; shift
    [ "$suite" = peers ] && log=peers.log
    [ -f "$PEERS" ] || { say "$suite: no peers: no $PEERS (set PEERS to torch_peers.py)"; return; }
    python3 - "$PEERS" "$@" >> "$OUT_DIR/$suite.jsonl" 2>> "$OUT_DIR/$log" <<'PY'
import importlib.util, shlex, sys
spec = importlib.util.spec_from_file_location("torch_peers", sys.argv[1])
torch_peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_peers)
for line in sys.argv[2:]:
    print("peers:", line, file=sys.stderr, flush=True)
    sys.argv = ["torch_peers.py", *shlex.split(line)]
    try:
        torch_peers.main()
    except (Exception, SystemExit) as e:
        print(f"peers: {line}: {e!r}", file=sys.stderr, flush=True)
    sys.stdout.flush()
PY
    say "$suite: torch_peers.py, $# command lines -> rc=$? ($(grep -c '"ms": ' "$OUT_DIR/$suite.jsonl") peer rows in $suite.jsonl)"
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1; s2attn-bench --list -v 2>&1; } \
    > "$OUT_DIR/device.log"
say "suites: $* (OUT_DIR=$OUT_DIR, BACKENDS=$BACKENDS); $(head -2 "$OUT_DIR/device.log" | tail -1)"

# watched SECS LOG CMD...: runs CMD with its output in LOG and kills it after SECS seconds; a run that
# outlives them first appends its threads' states to LOG.threads (name, scheduler state, user and system
# ticks, kernel wait channel, and backtraces where gdb exists), twice 5 s apart, so a hang shows whether
# it spins on a CPU (a driver's compiler, a host loop) or sleeps waiting on the GPU. Returns CMD's status
# (124 when killed).
watched() {
    local secs=$1 log=$2; shift 2
    "$@" > "$log" 2>&1 &
    local pid=$! t=0
    while kill -0 "$pid" 2>/dev/null && [ "$t" -lt "$secs" ]; do
        sleep 1; t=$((t + 1))
        if [ "$t" -eq $((secs - 6)) ] || [ "$t" -eq $((secs - 1)) ]; then
            {
                echo "== $* at ${t}s"
                for d in /proc/"$pid"/task/*; do
                    echo "$(cat "$d/comm" 2>/dev/null) $(awk '{print "state=" $3, "utime=" $14, "stime=" $15}' "$d/stat" 2>/dev/null) wchan=$(cat "$d/wchan" 2>/dev/null)"
                done
                command -v gdb >/dev/null && timeout 30 gdb -batch -p "$pid" -ex "thread apply all bt 16" 2>&1 | grep -aE '^(#|Thread)'
            } >> "$log.threads" 2>&1
        fi
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid"; wait "$pid" 2>/dev/null; return 124
    fi
    wait "$pid"
}

suite_tests() {
    local bin dir
    dir=$(dirname "$(command -v s2attn-bench)")
    if ls "$dir"/test-* >/dev/null 2>&1; then
        for bin in "$dir"/test-*; do
            local name=${bin##*/} be=vulkan
            case $name in test-bench_cli | test-c_api | test-differential) continue ;; test-cuda*) be=cuda ;; esac
            S2ATTN_BACKEND=$be S2ATTN_WAIT_TIMEOUT=$WAIT_TIMEOUT watched "$TEST_TIMEOUT" "$OUT_DIR/tests-${name#test-}.log" "$bin"
            say "tests: $name rc=$? $(grep -a 'test result' "$OUT_DIR/tests-${name#test-}.log" | tail -1)"
        done
    elif command -v cargo >/dev/null; then
        # shellcheck disable=SC2086
        cargo test --release $CARGO_FEATURES --no-fail-fast > "$OUT_DIR/tests-cargo.log" 2>&1
        say "tests: cargo test --release $CARGO_FEATURES rc=$? $(grep -ac '^test result: ok' "$OUT_DIR/tests-cargo.log") binaries ok"
    else
        say "tests: no test binaries next to s2attn-bench and no cargo"
    fi
    timeout 120 quickstart > "$OUT_DIR/tests-quickstart.log" 2>&1
    say "tests: quickstart rc=$? $(tail -2 "$OUT_DIR/tests-quickstart.log" | paste -sd' ' | cut -c1-200)"
}

suite_fuzz() {
    local bin be
    bin=$(dirname "$(command -v s2attn-bench)")/test-differential
    [ -x "$bin" ] || { say "fuzz: no $bin"; return; }
    for be in ${BACKENDS//,/ }; do
        S2ATTN_BACKEND=$be S2ATTN_FUZZ_SEED=${FUZZ_SEED:-1} S2ATTN_FUZZ_CASES=${FUZZ_CASES:-400} \
            timeout "$TEST_TIMEOUT" "$bin" --nocapture > "$OUT_DIR/fuzz-$be.log" 2>&1
        say "fuzz: $be rc=$? $(grep -a 'differential sample: .* failed' "$OUT_DIR/fuzz-$be.log" | tail -1)" \
            "$(grep -a 'test result' "$OUT_DIR/fuzz-$be.log" | tail -1)"
    done
}

suite_sanitize() {
    local cs tool run
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    [ -n "$cs" ] || { say "sanitize: no compute-sanitizer"; return; }
    for tool in memcheck racecheck synccheck; do
        for run in "cuda_forward --seq 4096 --stride 16 --dtype f16,bf16 --iters 1" \
            "cuda_backward --seq 4096 --dtype f16 --iters 1" \
            "s2attn-bench --mode decode --backend cuda --dtype f16 --seq 8k --heads 32 --kv-heads 8 --iters 1 --warmup 0 --warmup-ms 0"; do
            local log="$OUT_DIR/sanitize-$tool-${run%% *}.log"
            # shellcheck disable=SC2086
            timeout "$TEST_TIMEOUT" "$cs" --tool "$tool" --error-exitcode 99 $run > "$log" 2>&1
            say "sanitize: $tool $run rc=$? $(grep -a 'ERROR SUMMARY' "$log" | tail -1)"
        done
    done
}

suite_forward() {
    bench forward $shape --mode fwd --seq 16k,64k,128k --vert-stride 16,64 --dtype f16 --backend "$BACKENDS" \
        --iters 10 --warmup 2 --dense-max-seq 16k
    has cuda && bench forward $shape --mode fwd --seq 16k,64k,128k --vert-stride 16,64 --dtype bf16 --backend cuda \
        --iters 10 --warmup 2 --no-dense
}

suite_backward() {
    bench backward $shape --mode fwd+bwd --seq 16k,64k,128k --vert-stride 16 --dtype f16 --backend "$BACKENDS" \
        --iters 5 --warmup 1 --no-dense
    has cuda && bench backward $shape --mode fwd+bwd --seq 16k,64k,128k --vert-stride 16 --dtype bf16 --backend cuda \
        --iters 5 --warmup 1 --no-dense
}

suite_decode() {
    bench decode --preset decode --kv-heads 8,32 --batch 1,16 --seq 32k,128k --backend "$BACKENDS"
    local be
    for be in ${BACKENDS//,/ }; do   # copy bandwidth, the floor ratio and speculative windows of 4 tokens
        S2ATTN_BACKEND=$be timeout 300 decode_bench --window 1,4 --no-dense > "$OUT_DIR/decode-bench-$be.log" 2>&1
        say "decode: decode_bench ($be) rc=$? $(grep -a 'copy bandwidth' "$OUT_DIR/decode-bench-$be.log")"
    done
    PROMPT=32768 LAYERS=4 TOKENS=64 HEADS=32 KV_HEADS=8 HEAD_DIM=128 timeout 300 decode_loop \
        > "$OUT_DIR/decode-loop.log" 2>&1
    say "decode: decode_loop rc=$? $(tail -2 "$OUT_DIR/decode-loop.log" | paste -sd' ' | cut -c1-200)"
}

suite_paper() {
    local seqs="16384 32768 65536 131072"
    peers paper "--mode fwd --seq $seqs --vert-stride 16 --impls torch-flash flex-s2" \
        "--mode fwd --seq $seqs --vert-stride 64 --impls flex-s2"
    bench paper $shape --mode fwd --seq 16k,32k,64k,128k --vert-stride 16,64 --dtype f16 --backend "$BACKENDS" \
        --iters 10 --warmup 2 --no-dense
}

suite_peers() {  # the peers at the points of the suites named with it
    local want=" $* " lines=()
    [[ $want == *" forward "* ]] && lines+=("--mode fwd --seq 16384 65536 131072 --vert-stride 16"
        "--mode fwd --seq 16384 65536 131072 --vert-stride 64 --impls flex-s2"
        "--mode fwd --seq 16384 65536 131072 --vert-stride 16 --dtype bf16 --impls flex-s2"
        "--mode fwd --seq 16384 65536 131072 --vert-stride 64 --dtype bf16 --impls flex-s2")
    [[ $want == *" backward "* ]] && lines+=("--mode fwd+bwd --seq 16384 65536 131072 --vert-stride 16 --iters 3"
        "--mode fwd+bwd --seq 16384 65536 131072 --vert-stride 16 --dtype bf16 --iters 3 --impls torch-flash flex-s2")
    if [[ $want == *" decode "* ]]; then
        local kv b
        for kv in 8 32; do for b in 1 16; do
            lines+=("--mode decode --seq 32768 131072 --kv-heads $kv --batch $b")
        done; done
    fi
    [ ${#lines[@]} -gt 0 ] && peers peers "${lines[@]}"
}

suite_validate() {  # the wgpu test binaries under the Khronos validation layer
    local layers=${VK_LAYERS_DIR:-$PWD/.gpu/vklayer/layers} dir name bin log
    [ -f "$layers/VkLayer_khronos_validation.json" ] ||
        { say "validate: no $layers (benches/stage-validation.sh stages the layer)"; return; }
    dir=$(dirname "$(command -v s2attn-bench)")
    for name in forward backward forward_coop backward_coop inference errors; do
        bin=$dir/test-$name log="$OUT_DIR/validate-$name.log"
        [ -x "$bin" ] || { say "validate: no $bin"; continue; }
        WGPU_DEBUG=0 S2ATTN_BACKEND=vulkan VK_LAYER_PATH="$layers" VK_LAYER_SETTINGS_PATH="$layers" \
            VK_INSTANCE_LAYERS=VK_LAYER_KHRONOS_validation timeout "$TEST_TIMEOUT" "$bin" > "$log" 2>&1
        local rc=$? errors coop other warnings
        # Messages of a layer older than VK_KHR_cooperative_matrix about that extension (its feature struct
        # 1000506000, SPIR-V capability 6022, its own SPIR-V validator), counted apart from the rest.
        local predates='InconsistentSpirv|cooperative_matrix|1000506000|Unhandled OpCapability'
        errors=$(grep -ac 'Validation Error' "$log")
        coop=$(grep -a 'Validation Error' "$log" | grep -acE "$predates")
        other=$(grep -a 'Validation' "$log" | grep -vcE "$predates")
        warnings=$(grep -ac 'Validation Warning' "$log")
        say "validate: $name rc=$rc $errors errors and $warnings warnings, $((errors - coop)) errors and $other" \
            "messages in all not about cooperative matrices (which the layer predates); $(grep -a 'test result' "$log" | tail -1)"
    done
}

suite_e2e() {  # the decode example at model sizes, all-dense vs hybrid S2
    local preset log
    command -v decode >/dev/null || { say "e2e: no decode example (s2attn-model) on PATH"; return; }
    for backend in ${BACKENDS//,/ }; do
        for preset in ${E2E_PRESETS:-phi3-small llama-7b}; do
            log="$OUT_DIR/e2e-$preset-$backend.log"
            PRESET=$preset PROMPT=${E2E_PROMPTS:-8192,32768,131072} TOKENS=${E2E_TOKENS:-32} JSON="$OUT_DIR/e2e.jsonl" \
                S2ATTN_BACKEND=$backend timeout "${E2E_TIMEOUT:-900}" decode > "$log" 2>&1
            say "e2e: $preset on $backend rc=$? $(grep -a '^| [dh]' "$log" | paste -sd' ' | cut -c1-600)"
        done
    done
}

suite_llama() {  # llama.cpp's Vulkan flash attention, dense causal, one test-backend-ops process per case
    [ -x "$LLAMA" ] || [ -f "$LLAMA.xz" ] ||
        { say "llama: no $LLAMA(.xz) (benches/peers/llama_cpp_vulkan.sh builds and stages it)"; return; }
    local conv=benches/peers/llama_cpp_json.py path
    # shellcheck disable=SC2086
    python3 "$conv" --bin "$LLAMA" --seq $LLAMA_SEQ --mode fwd decode --heads 32 --head-dim 128 \
        --log "$OUT_DIR/llama.log" >> "$OUT_DIR/llama.jsonl" 2>> "$OUT_DIR/llama.log"
    say "llama: $conv (the path ggml-vulkan picks) -> rc=$?"
    for path in $LLAMA_PATHS; do
        local env=(GGML_VK_DISABLE_COOPMAT2=1)
        case $path in coopmat1) ;; scalar) env+=(GGML_VK_DISABLE_COOPMAT=1) ;; *) say "llama: unknown path $path"; continue ;; esac
        # shellcheck disable=SC2086
        env "${env[@]}" python3 "$conv" --bin "$LLAMA" --seq $LLAMA_SEQ --mode fwd --heads 32 --head-dim 128 \
            --impl "llama.cpp-vulkan-$path" --log "$OUT_DIR/llama.log" >> "$OUT_DIR/llama.jsonl" 2>> "$OUT_DIR/llama.log"
        say "llama: $conv with ${env[*]} -> rc=$?"
    done
    say "llama: $(grep -c '"ms": ' "$OUT_DIR/llama.jsonl") timed rows, $(grep -c '"error": ' "$OUT_DIR/llama.jsonl") errors;" \
        "$(head -1 "$(dirname "$LLAMA")/VERSION" 2>/dev/null)"
}

others=()
for s in "$@"; do case $s in peers | tests | fuzz | sanitize | validate | e2e | paper | llama) ;; *) others+=("$s") ;; esac; done
for s in "$@"; do
    case $s in
    peers) if [ ${#others[@]} -gt 0 ]; then suite_peers "${others[@]}"; else suite_peers forward backward decode; fi ;;
    *) "suite_$s" ;;
    esac
done

# The tables: the paper suite's file alone (its own peers), the other suites' files together.
rest=$(ls "$OUT_DIR"/*.jsonl 2>/dev/null | grep -v '/paper\.jsonl$\|/e2e\.jsonl$')
{ [ -n "$rest" ] && s2attn-bench report $rest && echo
  [ -f "$OUT_DIR/paper.jsonl" ] && echo "## The paper's points" && echo && s2attn-bench report "$OUT_DIR/paper.jsonl"
} > "$OUT_DIR/report.md" 2>> "$OUT_DIR/summary.txt"
say "report: $OUT_DIR/report.md ($(grep -c '^### ' "$OUT_DIR/report.md") tables)"
# Logs in one archive: a results folder of at most 8 files (jsonl per suite, summary.txt, report.md, logs.tar.gz).
(cd "$OUT_DIR" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tar.gz --remove-files ./*.log)
ls -la "$OUT_DIR"
