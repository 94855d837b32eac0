// Checks the forward kernels of shaders/cuda/s2_forward.cu on the CPU, compiled by g++ over emu.h and sm90.h (a
// std::thread per CUDA thread; CTAs run one after the other): the sm_90 wgmma kernel (USE_WGMMA=1, the default
// build: warp specialised, TMA, mbarriers, named barriers, wgmma; 384 threads, the persistent grid's CTAs each
// walking their work items) and the mma.sync kernel (USE_WGMMA=0 with BLOCK_Q and WARPS as the planner builds it:
// ldmatrix, mma.sync m16n8k16, cp.async; one CTA per (tile, head, sequence)). Both run against an f64 reference
// attention over the token mask of checks.h's block rule. MergeQ row lists (tiles of BLOCK_Q rows, both row-mask
// forms) are built from that rule as src/plan/mergeq.rs builds them (checks.h); for the wgmma kernel K and V come
// through tensor maps encoded as the host encodes them (src/cuda/forward.rs: dims {D, kv_heads, seq, batch}, box
// {64, 1, 64, 1}, 128B swizzle, rows past the end zero-filled); dynamic shared memory is what the host allocates
// (`wgmma_smem_bytes` and `smem_bytes`, src/cuda/plan.rs). 4 heads in 2 patterns over 2 KV heads (GQA).
// Arguments (key=value): seq (tokens, default 421: a partial last block and a last tile whose second
// warpgroup has no row), batch (1), block (layout block size, 64 or 128: two query blocks per tile, or two key
// chunks per block), ctas (3: the persistent CTAs of the wgmma kernel, the items dealt to them as the host deals
// them), qscale (1: Q is scaled by it, so that with 12 rows' maxima jump far along their walks and the lazy O
// rescale is exercised), and the flags noncausal (one query block of pattern 1 then has no key: O 0, LSE -inf)
// and strided (token strides past heads * D: the padding must stay untouched). Inputs are random and never
// zero; O, LSE and guard regions around them are poisoned first. Exit status 1 on an emulation error (sm90.h), a
// relative error of O above 5e-3, an LSE off by more than 1e-3, an unwritten or stray element, or a set
// non-finite flag. Build and run all configurations with run.sh.
#include "emu.h"
#include "sm90.h"
#include "checks.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <cmath>
#include <string>
#include <algorithm>
#ifndef USE_WGMMA
#define USE_WGMMA 1
#endif
#if USE_WGMMA
#define BLOCK_Q 128
#define WARPS 8
#define MIN_BLOCKS 1
#endif
#define BLOCK_K 64
namespace F {
#include "k_fwd.cu"
}

static const u32 H = 4, HK = 2, GROUP = H / HK, HPP = 2, PATTERNS = H / HPP, D = HEAD_DIM, TILE = BLOCK_Q;
static u32 SEQ = 421, BATCH = 1, BS = 64, CTAS = 3, QSCALE = 1;
static bool CAUSAL = true, STRIDED = false;

int main(int argc, char** argv) {
    if (!parse_args(argc, argv, {{"seq", &SEQ}, {"batch", &BATCH}, {"block", &BS}, {"ctas", &CTAS}, {"qscale", &QSCALE}},
                    {{"noncausal", &CAUSAL, false}, {"strided", &STRIDED, true}}))
        return 2;
    if (BS % BLOCK_K != 0 || (TILE > BS && TILE / BS > 31)) {
        fprintf(stderr, "block %u: the kernel walks blocks in chunks of %u keys\n", BS, BLOCK_K);
        return 2;
    }
    const u32 tiles = (SEQ + TILE - 1) / TILE;

    // MergeQ row lists of 128-row tiles (checks.h).
    const EmuLists rows = mergeq_lists(CAUSAL, PATTERNS, SEQ, BS, TILE);
    const std::vector<u32>& row_ptr = rows.ptr;
    const std::vector<u32>& entries = rows.entries;
    const u32 prefix_entries = rows.prefix, bit_entries = rows.bits;

    // Inputs, token strides past heads * D when strided (the padding holds NaN: a read of it would show).
    const u32 q_tok = H * D + (STRIDED ? 8 : 0), kv_tok = HK * D + (STRIDED ? 24 : 0),
              o_tok = H * D + (STRIDED ? 16 : 0);
    const size_t nq = (size_t)BATCH * SEQ * q_tok, nkv = (size_t)BATCH * SEQ * kv_tok;
    NonZero nonzero(5 + D + SEQ);
    std::vector<u16> q(nq, 0xffff), k(nkv, 0xffff), v(nkv, 0xffff);
    auto qi = [&](u32 b, u32 t, u32 h, u32 c) { return ((size_t)b * SEQ + t) * q_tok + h * D + c; };
    auto ki = [&](u32 b, u32 t, u32 h, u32 c) { return ((size_t)b * SEQ + t) * kv_tok + h * D + c; };
    auto oi = [&](u32 b, u32 t, u32 h, u32 c) { return ((size_t)b * SEQ + t) * o_tok + h * D + c; };
    for (u32 b = 0; b < BATCH; b++)
        for (u32 t = 0; t < SEQ; t++) {
            for (u32 h = 0; h < H; h++)
                for (u32 c = 0; c < D; c++) q[qi(b, t, h, c)] = from_f32(to_f32(nonzero()) * (float)QSCALE);
            for (u32 h = 0; h < HK; h++)
                for (u32 c = 0; c < D; c++) k[ki(b, t, h, c)] = nonzero(), v[ki(b, t, h, c)] = nonzero();
        }
    // Outputs with guard regions before and after, all poisoned (NaN).
    const size_t GUARD = 256, no = (size_t)BATCH * SEQ * o_tok, nl = (size_t)BATCH * H * SEQ;
    std::vector<u16> o_buf(no + 2 * GUARD, 0xffff);
    std::vector<float> lse_buf(nl + 2 * GUARD, NAN);
    u16* o = o_buf.data() + GUARD;
    float* lse = lse_buf.data() + GUARD;
    u32 flag = 0;

    const float scale = 1.f / sqrtf((float)D);
    F::Params p{};
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = o; p.lse = lse;
    p.row_ptr = row_ptr.data(); p.entries = entries.data(); p.flag = &flag;
    p.q_tok = q_tok; p.q_batch = (long long)SEQ * q_tok; p.kv_tok = kv_tok; p.kv_batch = (long long)SEQ * kv_tok;
    p.o_tok = o_tok; p.o_batch = (long long)SEQ * o_tok; p.lse_batch = (long long)H * SEQ;
    p.seq_len = SEQ; p.num_heads = H; p.kv_group = GROUP; p.heads_per_pattern = HPP; p.tiles = tiles;
    p.block_size = BS; p.causal = CAUSAL; p.scale_log2 = scale * 1.4426950408889634f;
    const u32 items = tiles * H * BATCH;
#if USE_WGMMA
    // The work items dealt to the CTAs as the host deals them: an item's cost is its tile's chunks and two more.
    std::vector<unsigned long long> costs;
    for (u32 w = 0; w < items; w++) {
        const u32 r = w % (tiles * H), head = r / tiles, tile = tiles - 1 - r % tiles, slot = (head / HPP) * tiles + tile;
        costs.push_back(2 + (unsigned long long)std::max(1u, BS / 64) * (row_ptr[slot + 1] - row_ptr[slot]));
    }
    const u32 ctas = std::min(items, CTAS);
    std::vector<u32> sched, cta_ptr;
    deal_items(costs, ctas, sched, cta_ptr);
    p.sched = sched.data(); p.cta_ptr = cta_ptr.data();
    // The host's tensor maps (kv_tensor_map): [batch][seq][kv_heads][D] u16, boxes of 64 columns x 64 tokens.
    const u64 dims[4] = {D, HK, SEQ, BATCH}, strides[3] = {D * 2ull, kv_tok * 2ull, (u64)SEQ * kv_tok * 2};
    const u32 box[4] = {64, 1, 64, 1};
    emu_tensor_map_4d(p.k_map, k.data(), dims, strides, box, 2, 128);
    emu_tensor_map_4d(p.v_map, v.data(), dims, strides, box, 2, 128);
    // wgmma_smem_bytes(head_dim, WGMMA_STAGES = 4, WGMMA_Q_BUFS = 2).
    g_smem_bytes = (2 * 128 * (D + 8) + 4 * 2 * 64 * D) * 2 + 8 * 2 * (4 + 2) + 1024;
    const dim3 grid{ctas, 1, 1};
#else
    // smem_bytes(tile_q, tile_kv, head_dim); the plain grid (tiles, heads, sequences).
    g_smem_bytes = (BLOCK_Q + 4 * BLOCK_K) * (D + 8) * 2;
    const dim3 grid{tiles, H, BATCH};
    const u32 ctas = tiles * H * BATCH;
#endif
    sm90_install();
    const auto t0 = std::chrono::steady_clock::now();
    launch(grid, NT, [&] { F::s2_forward(p); });
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    // Reference, f64: softmax attention over the active pairs (block rule, causality, the sequence's end).
    auto f = [](u16 x) { return (double)to_f32(x); };
    double num = 0, den = 0, lse_err = 0;
    size_t unwritten = 0, stray = 0, keyless = 0, keyless_bad = 0;
    for (u32 b = 0; b < BATCH; b++)
        for (u32 h = 0; h < H; h++)
            for (u32 i = 0; i < SEQ; i++) {
                std::vector<u32> keys;
                std::vector<double> s;
                const double m = row_scores(CAUSAL, h / HPP, BS, SEQ, i, scale, [&](u32 j) {
                    double x = 0;
                    for (u32 c = 0; c < D; c++) x += f(q[qi(b, i, h, c)]) * f(k[ki(b, j, h / GROUP, c)]);
                    return x;
                }, keys, s);
                double l = 0;
                for (double x : s) l += exp(x - m);
                const float got_lse = lse[(size_t)b * H * SEQ + (size_t)h * SEQ + i];
                if (keys.empty()) {
                    keyless++;
                    bool ok = got_lse == -INFINITY;
                    for (u32 c = 0; c < D; c++) ok &= o[oi(b, i, h, c)] == 0 || o[oi(b, i, h, c)] == 0x8000;
                    keyless_bad += !ok;
                    continue;
                }
                for (u32 c = 0; c < D; c++) {
                    double want = 0;
                    for (size_t n = 0; n < keys.size(); n++)
                        want += exp(s[n] - m) / l * f(v[ki(b, keys[n], h / GROUP, c)]);
                    const double got = f(o[oi(b, i, h, c)]);
                    if (!std::isfinite(got)) {
                        unwritten++;
                        continue;
                    }
                    num += (got - want) * (got - want);
                    den += want * want;
                }
                if (!std::isfinite(got_lse)) unwritten++;
                else lse_err = std::max(lse_err, fabs(got_lse - (m + log(l))));
            }
    // Nothing written outside the tensors' elements: the guards and the token padding keep their poison.
    for (size_t i = 0; i < GUARD; i++) {
        stray += o_buf[i] != 0xffff || o_buf[GUARD + no + i] != 0xffff;
        stray += !std::isnan(lse_buf[i]) || !std::isnan(lse_buf[GUARD + nl + i]);
    }
    for (size_t r = 0; r < (size_t)BATCH * SEQ; r++)
        for (u32 c = H * D; c < o_tok; c++) stray += o[r * o_tok + c] != 0xffff;

    const double rel = sqrt(num / (den > 0 ? den : 1));
    printf("%s %s D %u, seq %u, batch %u, block %u, %s%s, Q x %u, %u CTAs for %u items (entries: %u prefix, %u bit-mask; "
           "%zu keyless rows): rel err %.2e, LSE max err %.2e, unwritten %zu, stray writes %zu, keyless rows wrong "
           "%zu, flag %u, emulation errors %u, %.1f s\n",
           USE_WGMMA ? "wgmma" : (WARPS == 4 ? "mma.sync 4 warps" : "mma.sync 8 warps"), IS_BF16 ? "bf16" : "f16", D, SEQ, BATCH, BS, CAUSAL ? "causal" : "non-causal", STRIDED ? ", strided" : "",
           QSCALE, ctas, items, prefix_entries, bit_entries, keyless, rel, lse_err, unwritten, stray, keyless_bad, flag,
           g_emu_errors.load(), secs);
    const bool ok = g_emu_errors.load() == 0 && rel < 5e-3 && lse_err < 1e-3 && unwritten == 0 && stray == 0 &&
                    keyless_bad == 0 && flag == 0;
    printf("  %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
