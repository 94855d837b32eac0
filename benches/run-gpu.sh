#!/usr/bin/env bash
# The device runs behind BENCHMARKS.md, on a tree staged with `../shared/gpu/stage.sh --features cuda`
# (STAGE names the staged folder, default .gpu). Run on the H100 (2026-11-25) and the H200 (2026-12-01).
# On the GPU host, from the project root: `bash benches/run-gpu.sh <part>`; logs and JSON go to $OUT.
#   paper    issue 3's run: torch_peers.py at the paper preset's lengths (4k..128k; FlashAttention-2, cuDNN,
#            FlexAttention-S2 at vert_stride 16, FlexAttention-S2 at 64), then `s2attn-bench --preset paper` on
#            Vulkan and CUDA with --peers, JSON, plot and markdown; then the GL adapter and multi-device
#   final    the 2026-12-01 H200 closing call: every test binary, the coop forward v4 / dK-dV v2 variants (tests and
#            timing against the defaults), quickstart, GL, multi-device, the decode measurement
#            (benches/h200-decode/run.sh) and the fwd+bwd peers
#   pending      what the 2026-12-01 session could not run for lack of device time (~7 min): tests/multi (it
#                hung there twice; issue 8), the C test programs (issue 10; stage them first with
#                `tests/c/stage.sh $STAGE/c --features cuda`), the decode measurement with a 240 s bench budget
#                (the CUDA 128k rows; issue 7)
#   pending-bwd  (~5 min) the coop backward tests (dK/dV v3 has never run), forward+backward of dK/dV v2, v3
#                and `slices` (DKDV_EXTRA overrides the extra ones) with FlashAttention-2 and FlexAttention-S2
#                at 64k and 128k in the same call (issue 6)
#   cuda-final  (~2.5 min on a warm Triton cache, more cold) issue 5's closing measurement: test-cuda_wgmma and
#                test-cuda, the CUDA forward (planner default) in fp16 and bf16 at 16k/64k/128k x vert_stride 16/64,
#                then FlexAttention-S2 in fp16 and bf16 at the required points in one process (benches/flex_peers.py);
#                stage with ONLY="test-cuda test-cuda_wgmma s2attn-bench" and copy benches/flex_peers.py into $STAGE
#   fwd      torch_peers.py (FlashAttention-2, cuDNN, FlexAttention-S2) then s2attn-bench on Vulkan and CUDA,
#            paper settings (32 heads, head dim 128, block 64, local 16), 16k/64k/128k, vert_stride 16 and 64
#   both     fwd then bf16 in one call
#   bf16     the same for the CUDA backend in bf16 against FlexAttention-S2 in bf16
#   fwdbwd   forward+backward against the peers' autograd
#   decode   decode against the peers' decode, and the decode loop example
#   extra    test binaries (wgpu and CUDA), quickstart, multi-device (Vulkan + GL of the same GPU)
#   v6-final  (~7 min) the coop kernels after the v6 load fixes (issues 4 and 6): the WGSL forward at 16k/64k/128k x
#            vert_stride 16/64 (128k vs64 in three processes: its time has been bimodal), WGSL and CUDA forward+backward at
#            64k/128k, torch_peers.py forward (FlashAttention-2 dense, FlexAttention-S2 at both strides) and
#            forward+backward (FlashAttention-2, FlexAttention-S2), then the coop/CUDA gradient and forward tests; stage
#            with ONLY="s2attn-bench test-forward_coop test-backward_coop test-backward test-cuda_backward" --features cuda
#            and copy benches/flex_peers.py into $STAGE
set -uo pipefail
part=${1:?usage: run-gpu.sh paper|final|pending|pending-bwd|cuda-final|v6-final|fwd|bf16|fwdbwd|decode|extra}
source ${STAGE:-.gpu}/env.sh
export XDG_RUNTIME_DIR=/tmp PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
peers=${STAGE:-.gpu}/peers/torch_peers.py
paper="--heads 32 --kv-heads 32 --head-dim 128 --block 64 --local 16"
coop="$paper --dtype f16 --backend vulkan --no-dense"   # the WGSL tensor-core rows of the variant timings
T0=$SECONDS; t() { echo "[t=$((SECONDS-T0))s] $*" | tee -a $OUT/summary.txt; }   # progress lines
case $part in
v6-final)
    export S2ATTN_AUTOTUNE=0   # the planner's untuned default tiles (coop forward 128x32), as in the earlier rows
    v=$OUT/ours   # --json truncates its file: one per command
    timeout 60 s2attn-bench $coop --seq 16k,64k,128k --vert-stride 16,64 --iters 5 --warmup 2 -v --json $v-fwd.jsonl > $OUT/ours.log 2>&1
    t "wgsl fwd rc=$?"
    for rep in 2 3; do
        timeout 30 s2attn-bench $coop --seq 128k --vert-stride 64 --iters 5 --warmup 2 --json $v-fwd$rep.jsonl >> $OUT/ours.log 2>&1
        t "wgsl fwd 128k vs64 process $rep rc=$?"
    done
    timeout 90 s2attn-bench $coop --mode fwd+bwd --seq 64k,128k --vert-stride 16 --iters 3 --warmup 1 -v --json $v-fwdbwd.jsonl >> $OUT/ours.log 2>&1
    t "wgsl fwd+bwd rc=$?"
    timeout 60 s2attn-bench $paper --dtype f16 --backend cuda --no-dense --mode fwd+bwd --seq 64k,128k --vert-stride 16 \
        --iters 3 --warmup 1 -v --json $v-cuda-fwdbwd.jsonl >> $OUT/ours.log 2>&1
    t "cuda fwd+bwd rc=$?"
    grep -ao '"impl":"[^"]*","mode":"[^"]*"\|"seq":[0-9]*\|"vert_stride":[0-9]*\|"ms":[0-9.]*\|"bwd_ms":[0-9.]*' $v-*.jsonl | paste -sd' ' \
        | sed 's/"impl"/\n"impl"/g' | tee -a $OUT/summary.txt
    timeout 60 python3 $peers --mode fwd --seq 131072 --vert-stride 16 --impls torch-flash --iters 5 > $OUT/peers.jsonl 2> $OUT/peers.err
    t "peers fwd FA2 rc=$?"
    timeout 150 python3 ${STAGE:-.gpu}/flex_peers.py fp16:16:131072 fp16:64:131072 >> $OUT/peers.jsonl 2>> $OUT/peers.err
    t "peers fwd Flex rc=$?"
    timeout 200 python3 $peers --mode fwd+bwd --seq 65536 131072 --vert-stride 16 --impls torch-flash flex-s2 --iters 3 \
        >> $OUT/peers.jsonl 2>> $OUT/peers.err
    t "peers fwd+bwd rc=$?"; grep -ao '"impl":"[^"]*"\|"mode":"[^"]*"\|"seq":[0-9]*\|"vert_stride":[0-9]*\|"ms":[0-9.]*' $OUT/peers.jsonl \
        | paste -sd' ' | sed 's/"impl"/\n"impl"/g' | tee -a $OUT/summary.txt
    for b in test-forward_coop test-cuda_backward test-backward_coop test-backward; do
        be=vulkan; [ $b = test-cuda_backward ] && be=cuda
        S2ATTN_BACKEND=$be timeout 90 $b >> $OUT/tests.log 2>&1; t "$b rc=$? $(grep -a 'test result' $OUT/tests.log | tail -1)"
    done
    ;;
pending)
    S2ATTN_BACKEND=vulkan timeout 60 test-multi > $OUT/multi-test.log 2>&1; t "test-multi rc=$?"
    for c in smoke buffers; do timeout 60 ${STAGE:-.gpu}/c/$c > $OUT/c-$c.log 2>&1; t "C $c rc=$?"; done
    BENCH_S=240 bash benches/h200-decode/run.sh > $OUT/decode-run.log 2>&1; t "decode done"
    ;;
pending-bwd)
    S2ATTN_BACKEND=vulkan timeout 120 test-backward_coop --nocapture > $OUT/bwd-coop-test.log 2>&1
    t "backward_coop rc=$? ($(grep -ac '^ok ' $OUT/bwd-coop-test.log) ok lines)"
    for k in v2 ${DKDV_EXTRA:-v3 slices}; do
        S2ATTN_AUTOTUNE=0 S2ATTN_BWD_DKDV=$k timeout 60 s2attn-bench $coop --mode fwd+bwd --vert-stride 16 --seq 64k,128k \
            --iters 3 --warmup 1 -v --json $OUT/bwd-$k.jsonl > $OUT/bwd-$k.log 2>&1; t "bwd $k rc=$?"
    done
    timeout 200 python3 $peers --mode fwd+bwd --seq 65536 131072 --vert-stride 16 --impls torch-flash flex-s2 \
        --iters 3 > $OUT/bwd-peers.jsonl 2>/dev/null; t "bwd peers rc=$?"
    ;;
final)
    for x in $(ls ${STAGE:-.gpu}/bin/ | grep '^test-' | grep -v -e bench_cli -e c_api -e cuda_decode -e inference); do
        echo "== $x"; S2ATTN_BACKEND=vulkan timeout 90 $x 2>&1 | grep -aE "test result|FAILED|panicked|skip" | head -8
    done > $OUT/tests.log 2>&1; t tests; grep -B1 -aE "FAILED|panicked|[1-9][0-9]* failed" $OUT/tests.log | head -20
    S2ATTN_COOP_FWD=v4 timeout 60 test-forward_coop --nocapture > $OUT/fwd-v4-test.log 2>&1; t "fwd v4 test rc=$?"
    S2ATTN_BWD_DKDV=v2 timeout 60 test-backward 2>&1 | tail -3 > $OUT/bwd-v2-test.log; t "bwd v2 test: $(grep -a 'test result' $OUT/bwd-v2-test.log)"
    for f in v3 v4 v4-nopipe; do
        S2ATTN_AUTOTUNE=0 S2ATTN_COOP_FWD=$f timeout 60 s2attn-bench $coop --seq 16k,128k --vert-stride 16,64 --iters 5 \
            --warmup 2 -v --json $OUT/fwd-$f.jsonl > $OUT/fwd-$f.log 2>&1; t "fwd $f rc=$?"
    done
    for k in v1 v2; do
        S2ATTN_AUTOTUNE=0 S2ATTN_BWD_DKDV=$k timeout 60 s2attn-bench $coop --mode fwd+bwd --vert-stride 16 --seq 64k,128k \
            --iters 3 --warmup 1 -v --json $OUT/bwd-$k.jsonl > $OUT/bwd-$k.log 2>&1; t "bwd $k rc=$?"
    done
    quickstart > $OUT/quickstart.log 2>&1; t "quickstart rc=$?"
    S2ATTN_BACKEND=gl timeout 30 quickstart > $OUT/gl.log 2>&1; t "gl rc=$?: $(tail -1 $OUT/gl.log | cut -c1-200)"
    SEQ=16384 ITERS=5 timeout 60 multi_device > $OUT/multi.log 2>&1; t "multi rc=$?"
    bash benches/h200-decode/run.sh > $OUT/decode-run.log 2>&1; t "decode done"
    timeout $((560 - (SECONDS-T0))) python3 $peers --mode fwd+bwd --seq 65536 131072 --vert-stride 16 \
        --impls torch-flash flex-s2 --iters 3 > $OUT/bwd-peers.jsonl 2>/dev/null; t "bwd peers rc=$?"
    ;;
paper)
    seqs="4096 8192 16384 32768 65536 131072"
    python3 $peers --seq $seqs --vert-stride 16 | tee $OUT/peers.jsonl
    python3 $peers --seq $seqs --vert-stride 64 --impls flex-s2 | tee -a $OUT/peers.jsonl
    s2attn-bench --preset paper --backend vulkan,cuda --peers $OUT/peers.jsonl --json $OUT/paper.jsonl \
        --plot $OUT/paper.svg --markdown 2>&1 | tee $OUT/paper.log
    # the GL adapter of the same GPU alone, then every device together (issue 8)
    S2ATTN_BACKEND=gl quickstart 2>&1 | tail -4 | tee $OUT/multi.log
    SEQ=16384 ITERS=5 multi_device 2>&1 | tee -a $OUT/multi.log
    ;;
fwd)
    python3 $peers --seq 16384 65536 131072 --vert-stride 16 | tee $OUT/peers.jsonl
    python3 $peers --seq 16384 65536 131072 --vert-stride 64 --impls flex-s2 | tee -a $OUT/peers.jsonl
    s2attn-bench $paper --seq 16k,64k,128k --vert-stride 16,64 --dtype f16 --backend vulkan,cuda \
        --iters 10 --warmup 2 --dense-max-seq 16384 --peers $OUT/peers.jsonl --json $OUT/fwd.jsonl \
        --plot $OUT/fwd.svg --markdown 2>&1 | tee $OUT/fwd.log
    ;;
both)
    bash "$0" fwd && mv $OUT/peers.jsonl $OUT/peers-fp16.jsonl && bash "$0" bf16
    ;;
bf16)
    python3 $peers --seq 16384 65536 131072 --vert-stride 16 --dtype bf16 --impls flex-s2 | tee $OUT/peers.jsonl
    python3 $peers --seq 16384 65536 131072 --vert-stride 64 --dtype bf16 --impls flex-s2 | tee -a $OUT/peers.jsonl
    s2attn-bench $paper --seq 16k,64k,128k --vert-stride 16,64 --dtype bf16 --backend cuda --no-dense \
        --iters 10 --warmup 2 --peers $OUT/peers.jsonl --json $OUT/bf16.jsonl --markdown 2>&1 | tee $OUT/bf16.log
    ;;
fwdbwd)
    python3 $peers --mode fwd+bwd --seq 16384 65536 --vert-stride 16 | tee $OUT/peers.jsonl
    python3 $peers --mode fwd+bwd --seq 131072 --vert-stride 16 --impls flex-s2 | tee -a $OUT/peers.jsonl
    s2attn-bench $paper --mode fwd+bwd --seq 16k,64k,128k --vert-stride 16 --dtype f16 --backend cuda \
        --iters 5 --warmup 1 --dense-max-seq 16384 --json $OUT/fwdbwd-cuda.jsonl 2>&1 | tee $OUT/fwdbwd.log
    if [ -z "${SKIP_VULKAN:-}" ]; then
        s2attn-bench $paper --mode fwd+bwd --seq 16k --vert-stride 16 --dtype f16 --backend vulkan \
            --iters 3 --warmup 1 --budget-s 20 --json $OUT/fwdbwd-vulkan.jsonl 2>&1 | tee -a $OUT/fwdbwd.log
    fi
    s2attn-bench --from $OUT/fwdbwd-cuda.jsonl --peers $OUT/peers.jsonl --markdown 2>&1 | tee -a $OUT/fwdbwd.log
    ;;
decode)
    python3 $peers --mode decode --seq 32768 131072 --kv-heads 8 --batch 1 | tee $OUT/peers.jsonl
    python3 $peers --mode decode --seq 32768 131072 --kv-heads 8 --batch 16 | tee -a $OUT/peers.jsonl
    s2attn-bench --preset decode --backend vulkan --peers $OUT/peers.jsonl --json $OUT/decode.jsonl \
        --markdown 2>&1 | tee $OUT/decode.log
    for p in 32768; do
        PROMPT=$p LAYERS=4 TOKENS=64 HEADS=32 KV_HEADS=8 HEAD_DIM=128 decode_loop 2>&1 | tee -a $OUT/decode_loop.log
    done
    ;;
extra)
    for t in $(ls ${STAGE:-.gpu}/bin/test-* | grep -v -e bench_cli -e c_api); do
        echo "== $t"; S2ATTN_BACKEND=vulkan $t 2>&1 | tail -3
    done | tee $OUT/tests.log
    quickstart 2>&1 | tee $OUT/quickstart.log
    SEQ=16384 ITERS=3 multi_device 2>&1 | tee $OUT/multi.log
    ;;
cuda-final)
    timeout 20 test-cuda_wgmma > $OUT/t-wgmma.log 2>&1; t "test-cuda_wgmma rc=$? $(grep -a 'test result' $OUT/t-wgmma.log)"
    timeout 20 test-cuda > $OUT/t-cuda.log 2>&1; t "test-cuda rc=$? $(grep -a 'test result' $OUT/t-cuda.log)"
    for d in f16 bf16; do
        timeout 30 s2attn-bench $paper --backend cuda --no-dense --seq 16k,64k,128k --vert-stride 16,64 --iters 10 \
            --warmup 2 -v --dtype $d --json $OUT/ours-$d.jsonl > $OUT/ours-$d.log 2>&1; t "ours $d rc=$?"
    done
    timeout 150 python3 ${STAGE:-.gpu}/flex_peers.py fp16:16:16384,65536,131072 fp16:64:131072 bf16:16:16384,65536,131072 \
        bf16:64:131072 > $OUT/peers.jsonl 2> $OUT/peers.err; t "flex rc=$? $(grep -c '"ms"' $OUT/peers.jsonl) rows"
    ;;
*) echo "unknown part $part"; exit 2 ;;
esac
