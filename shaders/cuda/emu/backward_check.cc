// Checks the backward kernels of shaders/cuda/s2_backward.cu on the CPU, each compiled by g++ over emu.h and sm90.h
// as NVRTC compiles it (s2_forward.cu's text, then s2_backward.cu's; run.sh builds k_bwd.cu) and run one CTA after
// the other. USE_WGMMA=1 (default): the sm_90 wgmma passes, the dQ pass (PASS 3, s2_backward_dq_wgmma, which also
// writes the LSE * log2(e) and D = rowsum(dO * O) scratch) and then the dK/dV pass (PASS 2, s2_backward_dkdv_wgmma,
// which reads that scratch by bulk copies), on a persistent grid of a few CTAs of 384 threads. USE_WGMMA=0: the
// mma.sync passes in the planner's shapes (src/cuda/backward.rs) for blocks of CHUNK keys or more (CHUNK = min(64,
// block), a build define): the dQ pass (PASS 0, s2_backward_dq: 64-row tiles of 4 warps, CHUNK-key chunks, grid
// (tiles, heads, batch)) and the dK/dV pass (PASS 1, s2_backward_dkdv: CHUNK-key tiles of CHUNK / 16 warps, 64-row
// steps, grid (key tiles, KV heads, batch)).
// The result is compared with an f64 reference: the analytic gradients of softmax attention over the token mask of
// checks.h's block rule, at the kernels' softmax scale 1 / sqrt(D). The forward's O (rounded to the storage type)
// and natural-log LSE, which the dQ pass reads, come from the same f64 attention. Lists and schedules are built as
// the host builds them: MergeQ row lists (wgmma: 128-row tiles, mma.sync: 64; both row-mask forms) for the dQ pass,
// column lists of 64-row query tiles (checks.h) for the dK/dV pass, the wgmma passes' work items head by head,
// longest walk first, the dK/dV pass's pairing two key tiles (`wgmma_dq_schedule`, `wgmma_schedule` in
// src/cuda/backward.rs); for wgmma, Q, dO, K and V
// come through tensor maps encoded as `tile_tensor_map` encodes them (dims {D, heads, seq, batch}, box {64, 1, 64,
// 1}, 128B swizzle, rows past the end zero-filled); dynamic shared memory is what the host allocates. 4 query
// heads over 2 KV heads (GQA: the dK/dV pass walks two heads' column lists per item).
// Arguments (key=value): seq (tokens, default 333: a partial last block and last tile), batch (1), block (wgmma: 64
// or 128; mma.sync: CHUNK, or 128 with CHUNK 64), ctas (wgmma: 3, items wrap around the persistent CTAs), hpp
// (query heads per pattern, 1 or 2; default 1, so the two heads of a KV head walk different lists), and the flag
// noncausal (the layout also attends the next block, and one query block of pattern 1 has no key: its dQ is 0,
// its scratch LSE +inf).
// Inputs are random and never zero; dQ, dK, dV and the scratch, with guard regions around each, are poisoned
// (NaN) first. Exit status 1 on an emulation error (sm90.h), a relative error ||g - ref|| / ||ref|| of dQ, dK or
// dV above 5e-3 (fp16) or 1.5e-2 (bf16), a scratch value off, an unwritten or stray element, a changed input, or
// a set non-finite flag. Build and run all configurations with run.sh.
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
#include <tuple>
#ifndef USE_WGMMA
#define USE_WGMMA 1
#endif
#define MIN_BLOCKS 1
#if USE_WGMMA
#define BLOCK_Q 128
#define BLOCK_K 64
#define WARPS 8
namespace BQ {
#define PASS 3
#include "k_bwd.cu"
#undef PASS
}  // namespace BQ
namespace BK {
#define PASS 2
#include "k_bwd.cu"
#undef PASS
}  // namespace BK
static const unsigned DQ_TILE = 128;
#else
#ifndef CHUNK
#define CHUNK 64
#endif
// The dQ pass: 64 query rows on 4 warps, chunks of CHUNK keys.
#define BLOCK_Q 64
#define BLOCK_K CHUNK
#define WARPS 4
namespace BQ {
#define PASS 0
#include "k_bwd.cu"
#undef PASS
}  // namespace BQ
#undef BLOCK_Q
#undef BLOCK_K
#undef WARPS
// The dK/dV pass: CHUNK keys, 16 a warp, steps of 64 query rows.
#define BLOCK_Q CHUNK
#define BLOCK_K 64
#define WARPS (CHUNK / 16)
namespace BK {
#define PASS 1
#include "k_bwd.cu"
#undef PASS
}  // namespace BK
static const unsigned DQ_TILE = 64;
#endif

static const u32 H = 4, HK = 2, GROUP = H / HK, D = HEAD_DIM, COL_TILE = 64, KEY_TILE = USE_WGMMA ? 64 : BLOCK_Q;
static u32 SEQ = 333, BATCH = 1, BS = 64, CTAS = 3, HPP = 1;
static bool CAUSAL = true;

// Fills either pass's parameter block (the two namespaces' BwdParams have one layout).
template <class P>
void fill(P& p, const P& from) {
    static_assert(sizeof(P) == sizeof(from), "");
    memcpy((void*)&p, (const void*)&from, sizeof(P));
}

int main(int argc, char** argv) {
    if (!parse_args(argc, argv, {{"seq", &SEQ}, {"batch", &BATCH}, {"block", &BS}, {"ctas", &CTAS}, {"hpp", &HPP}},
                    {{"noncausal", &CAUSAL, false}}))
        return 2;
    if ((USE_WGMMA ? (BS != 64 && BS != 128) : std::min(BS, 64u) != BLOCK_Q || (BS != 16 && BS != 32 && BS != 64 && BS != 128)) ||
        (HPP != 1 && HPP != 2)) {
        fprintf(stderr, "block %u, hpp %u: the wgmma build runs blocks of 64 or 128, the mma.sync build blocks of which "
                "%u is min(64, block); hpp 1 or 2\n", BS, HPP, (unsigned)(USE_WGMMA ? 64 : BLOCK_Q));
        return 2;
    }
    const u32 PATTERNS = H / HPP;
    const u32 nb = (SEQ + BS - 1) / BS, q_tiles = (SEQ + DQ_TILE - 1) / DQ_TILE;
    const u32 key_tiles = (SEQ + KEY_TILE - 1) / KEY_TILE, seq_pad = q_tiles * DQ_TILE;

    // MergeQ row lists of 128-row tiles (the dQ pass) and column lists of 64-row query tiles (the dK/dV pass).
    const EmuLists rows = mergeq_lists(CAUSAL, PATTERNS, SEQ, BS, DQ_TILE);
    const EmuLists cols = column_lists(CAUSAL, PATTERNS, SEQ, BS, COL_TILE);
    const std::vector<u32>& row_ptr = rows.ptr;
    const std::vector<u32>& col_ptr = cols.ptr;
    // The persistent passes' work items, one head (of a sequence) after another and within it the longest walk first
    // (stable sorts, as the host's). The dK/dV pass's items pair two key tiles of a KV head as `wgmma_schedule` does
    // (then `snake_rounds` reverses every other round):
    // the tiles sorted by the last, then the first query tile of their column list (of the KV head's first query
    // head), neighbours paired (the odd one out with NO_TILE); an item's walk is the union of its tiles' lists.
    std::vector<std::pair<u32, u32>> dq_items;
    for (u32 b = 0; b < BATCH; b++)
        for (u32 h = 0; h < H; h++)
            for (u32 t = 0; t < q_tiles; t++) {
                const u32 slot = (h / HPP) * q_tiles + t;
                dq_items.push_back({row_ptr[slot + 1] - row_ptr[slot], (b * H + h) * q_tiles + t});
            }
    auto longest_first = [](std::vector<std::pair<u32, u32>>& items, u32 per_head) {
        for (size_t i = 0; i < items.size(); i += per_head)
            std::stable_sort(items.begin() + i, items.begin() + i + per_head,
                             [](auto& a, auto& b) { return a.first > b.first; });
        std::vector<u32> out;
        for (auto& it : items) out.push_back(it.second);
        return out;
    };
    const std::vector<u32> dq_sched = longest_first(dq_items, q_tiles);
    auto col_tiles = [&](u32 head, u32 kt) {  // the query tiles of a key tile's column list
        std::vector<u32> out;
        const u32 slot = (head / HPP) * nb + kt * KEY_TILE / BS;
        for (u32 e = col_ptr[slot]; e < col_ptr[slot + 1]; e++) out.push_back(cols.entries[2 * e]);
        return out;
    };
    std::vector<u32> sched;  // word pairs
#if USE_WGMMA
    std::vector<std::vector<std::pair<u32, std::pair<u32, u32>>>> head_pairs(HK);  // (cost, (tile, partner))
    for (u32 kvh = 0; kvh < HK; kvh++) {
        std::vector<std::tuple<u32, u32, u32>> order;
        for (u32 kt = 0; kt < key_tiles; kt++) {
            const std::vector<u32> c = col_tiles(kvh * GROUP, kt);
            order.push_back({c.empty() ? 0 : c.back(), c.empty() ? 0 : c.front(), kt});
        }
        std::sort(order.begin(), order.end());
        for (size_t i = 0; i < order.size(); i += 2) {
            const u32 a = std::get<2>(order[i]), partner = i + 1 < order.size() ? std::get<2>(order[i + 1]) : NO_TILE;
            u32 cost = 0;
            for (u32 hh = 0; hh < GROUP; hh++) {
                std::vector<u32> u = col_tiles(kvh * GROUP + hh, a);
                if (partner != NO_TILE) {
                    const std::vector<u32> c = col_tiles(kvh * GROUP + hh, partner);
                    u.insert(u.end(), c.begin(), c.end());
                }
                std::sort(u.begin(), u.end());
                cost += std::unique(u.begin(), u.end()) - u.begin();
            }
            head_pairs[kvh].push_back({cost, {a, partner}});
        }
        std::stable_sort(head_pairs[kvh].begin(), head_pairs[kvh].end(),
                         [](auto& x, auto& y) { return x.first > y.first; });
    }
    for (u32 b = 0; b < BATCH; b++)
        for (u32 kvh = 0; kvh < HK; kvh++)
            for (auto& it : head_pairs[kvh]) {
                sched.push_back((b * HK + kvh) * key_tiles + it.second.first);
                sched.push_back(it.second.second);
            }
    // Every other round of as many items as CTAs reversed (`snake_rounds`).
    const size_t round = std::min<size_t>(sched.size() / 2, CTAS);
    for (size_t r = round; r < sched.size() / 2; r += 2 * round) {
        const size_t end = std::min(r + round, sched.size() / 2);
        for (size_t a = r, z = end - 1; a < z; a++, z--) {
            std::swap(sched[2 * a], sched[2 * z]);
            std::swap(sched[2 * a + 1], sched[2 * z + 1]);
        }
    }
#endif

    // Inputs, contiguous as the host lays them out: Q, dO, O [batch][seq][heads][D], K, V [batch][seq][kv_heads][D].
    const u32 q_tok = H * D, kv_tok = HK * D;
    const size_t nq = (size_t)BATCH * SEQ * q_tok, nkv = (size_t)BATCH * SEQ * kv_tok;
    NonZero nonzero(7 + D + SEQ + BS);
    std::vector<u16> q(nq), k(nkv), v(nkv), d_o(nq), o(nq);
    for (auto& x : q) x = nonzero();
    for (auto& x : k) x = nonzero();
    for (auto& x : v) x = nonzero();
    for (auto& x : d_o) x = nonzero();
    auto qi = [&](u32 b, u32 t, u32 h, u32 c) { return ((size_t)b * SEQ + t) * q_tok + h * D + c; };
    auto ki = [&](u32 b, u32 t, u32 h, u32 c) { return ((size_t)b * SEQ + t) * kv_tok + h * D + c; };

    // The forward and the reference backward in f64 over the active pairs (block rule, causality, the end).
    const float scale = 1.f / sqrtf((float)D);
    auto f = [](u16 x) { return (double)to_f32(x); };
    std::vector<double> rdq(nq, 0), rdk(nkv, 0), rdv(nkv, 0), rlse((size_t)BATCH * H * SEQ), rdelta((size_t)BATCH * H * SEQ);
    std::vector<float> lse((size_t)BATCH * H * SEQ);
    size_t keyless = 0;
    for (u32 b = 0; b < BATCH; b++)
        for (u32 h = 0; h < H; h++)
            for (u32 i = 0; i < SEQ; i++) {
                const u32 kvh = h / GROUP;
                std::vector<u32> keys;
                std::vector<double> s;
                const double m = row_scores(CAUSAL, h / HPP, BS, SEQ, i, scale, [&](u32 j) {
                    double x = 0;
                    for (u32 c = 0; c < D; c++) x += f(q[qi(b, i, h, c)]) * f(k[ki(b, j, kvh, c)]);
                    return x;
                }, keys, s);
                const size_t li = ((size_t)b * H + h) * SEQ + i;
                if (keys.empty()) {
                    keyless++;
                    for (u32 c = 0; c < D; c++) o[qi(b, i, h, c)] = from_f32(0.f);
                    lse[li] = -INFINITY;
                    rlse[li] = -INFINITY;
                    rdelta[li] = 0;
                    continue;
                }
                double l = 0;
                for (double x : s) l += exp(x - m);
                const double L = m + log(l);
                std::vector<double> pr(keys.size()), ro(D, 0.0);
                for (size_t n = 0; n < keys.size(); n++) pr[n] = exp(s[n] - L);
                for (u32 c = 0; c < D; c++) {
                    for (size_t n = 0; n < keys.size(); n++) ro[c] += pr[n] * f(v[ki(b, keys[n], kvh, c)]);
                    o[qi(b, i, h, c)] = from_f32((float)ro[c]);
                }
                lse[li] = (float)L;
                rlse[li] = L;
                double dl = 0;
                for (u32 c = 0; c < D; c++) dl += f(d_o[qi(b, i, h, c)]) * ro[c];
                rdelta[li] = 0;  // D as the dQ pass computes it: from the stored (rounded) O
                for (u32 c = 0; c < D; c++) rdelta[li] += f(d_o[qi(b, i, h, c)]) * f(o[qi(b, i, h, c)]);
                for (size_t n = 0; n < keys.size(); n++) {
                    const u32 j = keys[n];
                    double dp = 0;
                    for (u32 c = 0; c < D; c++) dp += f(d_o[qi(b, i, h, c)]) * f(v[ki(b, j, kvh, c)]);
                    const double ds = pr[n] * (dp - dl);
                    for (u32 c = 0; c < D; c++) {
                        rdq[qi(b, i, h, c)] += ds * f(k[ki(b, j, kvh, c)]) * scale;
                        rdk[ki(b, j, kvh, c)] += ds * f(q[qi(b, i, h, c)]) * scale;
                        rdv[ki(b, j, kvh, c)] += pr[n] * f(d_o[qi(b, i, h, c)]);
                    }
                }
            }

    // Outputs and scratch with guard regions before and after, all poisoned (NaN).
    const size_t GUARD = 256, ns = (size_t)BATCH * H * seq_pad;
    std::vector<u16> dq_buf(nq + 2 * GUARD, 0xffff), dk_buf(nkv + 2 * GUARD, 0xffff), dv_buf(nkv + 2 * GUARD, 0xffff);
    std::vector<float> lse2_buf(ns + 2 * GUARD, NAN), delta_buf(ns + 2 * GUARD, NAN);
    u16 *dq = dq_buf.data() + GUARD, *dk = dk_buf.data() + GUARD, *dv = dv_buf.data() + GUARD;
    float *lse2 = lse2_buf.data() + GUARD, *delta = delta_buf.data() + GUARD;
    const std::vector<u16> q0 = q, k0 = k, v0 = v, d_o0 = d_o, o0 = o;
    const std::vector<float> lse0 = lse;
    u32 flag = 0;

    BQ::BwdParams p{};
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = o.data(); p.d_o = d_o.data();
    p.dq = dq; p.dk = dk; p.dv = dv; p.lse = lse.data(); p.lse2 = lse2; p.delta = delta;
    p.row_ptr = row_ptr.data(); p.row_entries = rows.entries.data();
    p.col_ptr = col_ptr.data(); p.col_entries = cols.entries.data(); p.flag = &flag;
    p.q_tok = q_tok; p.q_batch = (long long)SEQ * q_tok; p.kv_tok = kv_tok; p.kv_batch = (long long)SEQ * kv_tok;
    p.lse_batch = (long long)H * SEQ;
    p.seq_len = SEQ; p.seq_pad = seq_pad; p.num_heads = H; p.kv_group = GROUP; p.heads_per_pattern = HPP;
    p.q_tiles = q_tiles; p.kv_blocks = nb; p.block_size = BS; p.causal = CAUSAL;
    p.scale_log2 = scale * 1.4426950408889634f; p.scale = scale;
    p.sched = sched.data(); p.dq_sched = dq_sched.data(); p.items = sched.size() / 2; p.dq_items = dq_sched.size();
    p.key_tiles = key_tiles;
    // The host's tensor maps (tile_tensor_map): [batch][seq][heads][D] u16, boxes of 64 columns x 64 tokens.
    const u32 box[4] = {64, 1, 64, 1};
    const u64 q_dims[4] = {D, H, SEQ, BATCH}, q_strides[3] = {D * 2ull, q_tok * 2ull, (u64)SEQ * q_tok * 2};
    const u64 kv_dims[4] = {D, HK, SEQ, BATCH}, kv_strides[3] = {D * 2ull, kv_tok * 2ull, (u64)SEQ * kv_tok * 2};
    emu_tensor_map_4d(p.q_map, q.data(), q_dims, q_strides, box, 2, 128);
    emu_tensor_map_4d(p.do_map, d_o.data(), q_dims, q_strides, box, 2, 128);
    emu_tensor_map_4d(p.k_map, k.data(), kv_dims, kv_strides, box, 2, 128);
    emu_tensor_map_4d(p.v_map, v.data(), kv_dims, kv_strides, box, 2, 128);
    BK::BwdParams p2;
    fill(p2, *(const BK::BwdParams*)(const void*)&p);

    sm90_install();
    const auto t0 = std::chrono::steady_clock::now();
#if USE_WGMMA
    const u32 dq_ctas = std::min((u32)dq_sched.size(), CTAS), kv_ctas = std::min((u32)sched.size() / 2, CTAS);
    const size_t dq_work = dq_sched.size(), kv_work = sched.size() / 2;
    // wgmma_dq_smem_bytes(D): 2 Q/dO buffers of 128 rows, a 2-stage K/V ring of 64 keys, 8 mbarriers, 1 KB slack.
    g_smem_bytes = (2 * 2 * 128 + 2 * 2 * 64) * D * 2 + 8 * 2 * (2 + 2) + 1024;
    launch(dq_ctas, 384, [&] { BQ::s2_backward_dq_wgmma(p); });
    const unsigned dq_errors = g_emu_errors.load();
    // wgmma_dkdv_smem_bytes(D): two tiles of K and V of 64 keys, a 3-stage Q/dO ring of 64 rows, each warpgroup's
    // 16-bit dK / dV staging, the ring's LSE / D rows, 8 mbarriers, 1 KB slack.
    g_smem_bytes = (2 * 2 * 64 + 2 * 3 * 64 + 2 * 2 * 64) * D * 2 + 3 * 2 * 64 * 4 + 8 * (2 * 3 + 2) + 1024;
    launch(kv_ctas, 384, [&] { BK::s2_backward_dkdv_wgmma(p2); });
#else
    // One CTA per work item; smem_bytes(rows, step, D, stats) in src/cuda/backward.rs: 2 resident tiles of `rows`,
    // 2 stages of 2 tiles of `step` rows, rows padded by 8 elements, the dK/dV pass's LSE / D stages.
    const u32 dq_ctas = q_tiles * H * BATCH, kv_ctas = key_tiles * HK * BATCH;
    const size_t dq_work = dq_ctas, kv_work = kv_ctas;
    g_smem_bytes = (2 * 64 + 4 * CHUNK) * (D + 8) * 2;
    launch(dim3{q_tiles, H, BATCH}, 4 * 32, [&] { BQ::s2_backward_dq(p); });
    const unsigned dq_errors = g_emu_errors.load();
    g_smem_bytes = (2 * CHUNK + 4 * 64) * (D + 8) * 2 + 4 * 64 * 4;
    launch(dim3{key_tiles, HK, BATCH}, CHUNK / 16 * 32, [&] { BK::s2_backward_dkdv(p2); });
#endif
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    // The scratch: LSE * log2(e) (+inf for rows past the end or without keys) and D of every padded row.
    double lse2_err = 0, delta_err = 0;
    size_t scratch_bad = 0;
    for (u32 b = 0; b < BATCH; b++)
        for (u32 h = 0; h < H; h++)
            for (u32 i = 0; i < seq_pad; i++) {
                const size_t at = ((size_t)b * H + h) * seq_pad + i, li = ((size_t)b * H + h) * SEQ + i;
                const float gl = lse2[at], gd = delta[at];
                if (i >= SEQ || rlse[li] == -INFINITY) {
                    scratch_bad += !(gl == INFINITY) || !(gd == 0.f);
                    continue;
                }
                if (!std::isfinite(gl) || !std::isfinite(gd)) {
                    scratch_bad++;
                    continue;
                }
                lse2_err = std::max(lse2_err, fabs(gl - rlse[li] * 1.4426950408889634));
                delta_err = std::max(delta_err, fabs(gd - rdelta[li]) / (1.0 + fabs(rdelta[li])));
            }
    size_t unwritten = 0, stray = 0, inputs_changed = 0;
    auto compare = [&](const u16* got, const std::vector<double>& want) {
        double num = 0, den = 0;
        for (size_t i = 0; i < want.size(); i++) {
            const double g = f(got[i]);
            if (!std::isfinite(g)) {
                unwritten++;
                continue;
            }
            num += (g - want[i]) * (g - want[i]);
            den += want[i] * want[i];
        }
        return sqrt(num / (den > 0 ? den : 1));
    };
    const double e_dq = compare(dq, rdq), e_dk = compare(dk, rdk), e_dv = compare(dv, rdv);
    // Nothing written outside the tensors: the guards keep their poison; the inputs are unchanged.
    for (size_t i = 0; i < GUARD; i++) {
        for (auto* buf : {&dq_buf, &dk_buf, &dv_buf}) stray += (*buf)[i] != 0xffff || (*buf)[buf->size() - 1 - i] != 0xffff;
        for (auto* buf : {&lse2_buf, &delta_buf}) stray += !std::isnan((*buf)[i]) || !std::isnan((*buf)[buf->size() - 1 - i]);
    }
    inputs_changed = (q != q0) + (k != k0) + (v != v0) + (d_o != d_o0) + (o != o0) +
                     memcmp(lse.data(), lse0.data(), lse.size() * 4) != 0;

    const double tol = IS_BF16 ? 1.5e-2 : 5e-3;
    printf("%s %s D %u, seq %u, batch %u, block %u, %s, %u heads per pattern; dQ pass %u CTAs for %zu items (row entries: "
           "%u prefix, %u bit-mask; %zu keyless rows), dK/dV pass %u CTAs for %zu items (column entries: %u prefix, %u bit-mask): rel err "
           "dQ %.2e, dK %.2e, dV %.2e; scratch LSE2 max err %.2e, D max rel err %.2e, wrong %zu; unwritten %zu, stray "
           "writes %zu, inputs changed %zu, flag %u, emulation errors %u (dQ pass %u), %.1f s\n",
           USE_WGMMA ? "wgmma" : "mma.sync", IS_BF16 ? "bf16" : "f16", D, SEQ, BATCH, BS, CAUSAL ? "causal" : "non-causal", HPP, dq_ctas, dq_work,
           rows.prefix, rows.bits, keyless, kv_ctas, kv_work, cols.prefix, cols.bits, e_dq, e_dk, e_dv,
           lse2_err, delta_err, scratch_bad, unwritten, stray, inputs_changed, flag, g_emu_errors.load(), dq_errors,
           secs);
    const bool ok = g_emu_errors.load() == 0 && e_dq < tol && e_dk < tol && e_dv < tol && lse2_err < 1e-3 &&
                    delta_err < 1e-4 && scratch_bad == 0 && unwritten == 0 && stray == 0 && inputs_changed == 0 &&
                    flag == 0;
    printf("  %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
