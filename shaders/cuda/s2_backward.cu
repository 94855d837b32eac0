// S2-Attention backward on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async double buffering; on sm_90 wgmma
// with TMA), fp16 or bf16 with f32 accumulation. Compiled by NVRTC after the text of s2_forward.cu
// (src/cuda/backward.rs concatenates the two), whose primitives it uses: cp_async16, ldmatrix_x4(_trans),
// mma16816, pack2, fast_exp2, row_attends / rows_attend, Walk / next_chunk / step_chunk, load_rows, and the tile
// macros (NT, NK, KK, ND, KD, LDS, CPR, KV_STAGE) derived from the same defines; on wgmma also its PTX pieces,
// make_desc, issue_rs_mn and pack_frags. PASS picks the kernel:
//
// PASS 0, s2_backward_dq: one CTA per (query tile of BLOCK_Q = 16 * WARPS rows, head, batch) walking the
//   forward's MergeQ row list in chunks of BLOCK_K keys. First writes D = rowsum(dO * O) and LSE * log2(e)
//   (+inf for rows without keys or past the end, so that P vanishes there without masking) into padded
//   scratch rows for the dK/dV pass; then per chunk S = Q K^T, dP = dO V^T, dS = P (dP - D), dQ += dS K.
// PASS 1, s2_backward_dkdv: one CTA per (key tile of BLOCK_Q = 16 * WARPS keys, KV head, batch) walking,
//   for every query head of the GQA group in turn, the column list of its KV block (query tiles of BLOCK_K
//   = 64 rows; src/plan/column.rs) with Q, dO, LSE and D prefetched a step ahead; per step (transposed)
//   S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q. Each warp owns 16 keys and skips the steps
//   its keys don't take part in.
// PASS 2, s2_backward_dkdv_wgmma, and PASS 3, s2_backward_dq_wgmma (sm_90a, head dims 64 and 128, blocks of 64
//   keys or more; compiled over the forward's wgmma configuration, USE_WGMMA=1): the same two passes on wgmma,
//   warp specialised (a producer thread loads every tile by TMA into mbarrier rings, two consumer warpgroups
//   compute) and persistent over host-sorted work items, longest walks first; the dK/dV pass's items pair two
//   key tiles whose column lists mostly agree. See their sections below.
// Deterministic: no atomics; every output row is written once by one CTA that sums in a fixed order.
// Non-finite inputs: the epilogues set `flag` when a gradient they write is non-finite (a masked pair's
// P = 0 times a non-finite value inside an MMA is NaN); the exact kernel launched after both passes
// (s2_exact.cu) then redoes dQ, dK and dV, reading the D / LSE scratch the dQ pass wrote.

#ifndef PASS
#define PASS 0
#endif
#if PASS < 2 && GROUP_ROWS != 16
#error "the mma.sync backward kernels give each warp 16 rows (BLOCK_Q = 16 * WARPS)"
#endif
#if PASS >= 1 && BLOCK_K != 64
#error "the dK/dV passes walk query tiles of 64 rows, the wgmma dQ pass key chunks of 64"
#endif
#if PASS >= 2 && !USE_WGMMA
#error "the wgmma passes build on the forward's wgmma configuration (USE_WGMMA=1)"
#endif

#define POS_INF __int_as_float(0x7f800000)
#define LOG2E_F 1.4426950408889634f

struct BwdParams {
    const u16* q;            // [batch, seq, heads, D], contiguous
    const u16* k;            // [batch, seq, kv_heads, D]
    const u16* v;
    const u16* o;            // forward output, like q
    const u16* d_o;          // dL/dO, like q
    u16* dq;                 // like q
    u16* dk;                 // like k
    u16* dv;
    const float* lse;        // forward's natural-log LSE, [batch, heads, seq]
    float* lse2;             // scratch [batch, heads, seq_pad]: LSE * log2(e), +inf where P must vanish
    float* delta;            // scratch [batch, heads, seq_pad]: rowsum(dO * O)
    const u32* row_ptr;      // MergeQ lists (dQ pass): patterns * q_tiles + 1 offsets
    const u32* row_entries;  // [kv_block, rowmask] pairs
    const u32* col_ptr;      // column lists (dK/dV pass): patterns * kv_blocks + 1 offsets
    const u32* col_entries;  // [q_tile, rowmask] pairs
    u32* flag;               // set to 1 by an epilogue that writes a non-finite gradient (s2_exact.cu redoes the op)
    long long q_tok, q_batch;
    long long kv_tok, kv_batch;
    long long lse_batch;
    u32 seq_len;
    u32 seq_pad;             // seq rounded up to 64 (rows of the scratch buffers)
    u32 num_heads;
    u32 kv_group;
    u32 heads_per_pattern;
    u32 q_tiles;
    u32 kv_blocks;
    u32 block_size;
    u32 causal;
    float scale_log2;
    float scale;
    // The wgmma dK/dV pass (PASS 2) only: its persistent schedule and the TMA maps of its tiles.
    const u32* sched;        // work items as word pairs: (key tile, KV head, batch), the partner key tile (or
                             // NO_TILE); KV head by KV head, longest walks first within one; CTA c takes items c,
                             // c + grid, ...
    const u32* dq_sched;     // the wgmma dQ pass's (PASS 3) work items (query tile, head, batch), head by head,
                             // longest first within one
    u32 items;
    u32 dq_items;
    u32 key_tiles;           // 64-key tiles per sequence
    TensorMap q_map, do_map; // Q and dO as [batch][seq][heads][D] u16, boxes of 64 x 64, 128B swizzle
    TensorMap k_map, v_map;  // K and V as [batch][seq][kv_heads][D]
};

// The PTX pieces (here and in the wgmma passes' section); shaders/cuda/emu/sm90.h gives them C++ semantics for the
// CPU emulation (S2_EMU), as it does s2_forward.cu's.
#ifndef S2_EMU
__device__ __forceinline__ float to_f32(u16 x) {
#if IS_BF16
    return __uint_as_float((u32)x << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(x));
    return f;
#endif
}
#endif

__device__ __forceinline__ float dot2(u32 a, u32 b) {
    return to_f32((u16)(a & 0xffffu)) * to_f32((u16)(b & 0xffffu)) + to_f32((u16)(a >> 16)) * to_f32((u16)(b >> 16));
}

// acc[16 x 8 NK] = A[rows a_row0.. of a_s] . B[8 NK rows of b_s]^T over HEAD_DIM (both smem, stride LDS).
__device__ __forceinline__ void mma_abt(float (&acc)[NK][4], u32 a_base, u32 a_row0, u32 b_base, int lane) {
#pragma unroll
    for (int n = 0; n < NK; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
#pragma unroll
    for (int kd = 0; kd < KD; ++kd) {
        u32 a[4];
        ldmatrix_x4(a, a_base + ((a_row0 + (lane % 16)) * LDS + kd * 16 + (lane / 16) * 8) * 2);
#pragma unroll
        for (int np = 0; np < NK / 2; ++np) {
            u32 bf[4];
            u32 row = np * 16 + (lane % 8) + (lane / 16) * 8;
            u32 col = kd * 16 + ((lane / 8) % 2) * 8;
            ldmatrix_x4(bf, b_base + (row * LDS + col) * 2);
            mma16816(acc[2 * np], a, bf[0], bf[1]);
            mma16816(acc[2 * np + 1], a, bf[2], bf[3]);
        }
    }
}

// acc[16 x HEAD_DIM] += P[16 x 8 NK] (f32 registers in the accumulator layout) . B[8 NK rows of b_s].
__device__ __forceinline__ void mma_pb(float (&acc)[ND][4], const float (&s)[NK][4], u32 b_base, int lane) {
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
        u32 pa[4];
        pa[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < ND / 2; ++dp) {
            u32 bf[4];
            u32 row = kk * 16 + (lane % 16);
            u32 col = dp * 16 + (lane / 16) * 8;
            ldmatrix_x4_trans(bf, b_base + (row * LDS + col) * 2);
            mma16816(acc[2 * dp], pa, bf[0], bf[1]);
            mma16816(acc[2 * dp + 1], pa, bf[2], bf[3]);
        }
    }
}

// Sets `flag` if one of this thread's accumulators of the rows below `valid` (0, 1 or 2 of rows g, g + 8)
// is NaN or inf: a non-finite gradient, which the exact kernel (s2_exact.cu) recomputes as IEEE gives it
// (a masked pair's 0 times a non-finite value is NaN inside an MMA). One sum per row, at the end only.
__device__ __forceinline__ void flag_nonfinite(u32* flag, const float (&acc)[ND][4], int valid) {
    bool bad = false;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < ND; ++n) sum += acc[n][2 * h] + acc[n][2 * h + 1];
        bad |= h < valid && nonfinite(sum);
    }
    if (bad) *flag = 1u;
}

// Writes a warp's 16 accumulator rows (times `mul`) into smem rows r0.. of `dst` (stride LDS).
__device__ __forceinline__ void stage_rows(u16* dst, u32 r0, const float (&acc)[ND][4], float mul, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int n = 0; n < ND; ++n)
            *(u32*)(dst + (r0 + g + h * 8) * LDS + n * 8 + 2 * t) =
                pack2(acc[n][2 * h] * mul, acc[n][2 * h + 1] * mul);
}

// Stores smem rows [0, ROWS) of `src` to tokens tok0.. of `dst` (token stride `tok`), rows < seq only.
template <int ROWS>
__device__ __forceinline__ void store_rows(u16* dst, long long tok, const u16* src, u32 tok0, u32 seq, int tid) {
#pragma unroll
    for (int j = 0; j < (ROWS * CPR + NT - 1) / NT; ++j) {
        int i = tid + j * NT;
        if (ROWS * CPR % NT != 0 && i >= ROWS * CPR) break;
        int r = i / CPR, c = i % CPR;
        if (tok0 + r < seq) *(uint4*)(dst + (long long)(tok0 + r) * tok + c * 8) = *(const uint4*)(src + r * LDS + c * 8);
    }
}

// D = rowsum(dO * O) and LSE * log2(e) of a warp's 16 rows wr0.. of the tile at row0 (of `head`, sequence b): lanes
// 2r and 2r + 1 take row r's halves, `drow` being this lane's half of dO row wr0 + lane / 2 (in shared or global
// memory). Writes both into the scratch rows the dK/dV pass reads (+inf LSE past the end and for rows without keys,
// so that P vanishes there without masking) and returns each thread's rows g and g + 8 in delta_r / lse_r.
__device__ __forceinline__ void warp_row_stats(const BwdParams& p, long long q_off, const u16* drow, u32 b, u32 head,
                                               u32 row0, u32 wr0, int lane, float (&delta_r)[2], float (&lse_r)[2]) {
    const u32 r = wr0 + lane / 2;
    const u32 tok = row0 + r;
    float acc = 0.f, l2 = POS_INF;
    if (tok < p.seq_len) {
        const u16* orow = p.o + q_off + (long long)tok * p.q_tok + (lane % 2) * (HEAD_DIM / 2);
#pragma unroll
        for (int c = 0; c < HEAD_DIM / 2; c += 8) {
            const uint4 ov = *(const uint4*)(orow + c);
            const uint4 dv = *(const uint4*)(drow + c);
            acc += dot2(ov.x, dv.x) + dot2(ov.y, dv.y) + dot2(ov.z, dv.z) + dot2(ov.w, dv.w);
        }
        const float l = p.lse[(long long)b * p.lse_batch + (long long)head * p.seq_len + tok];
        if (l != NEG_INF) l2 = l * LOG2E_F;
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (lane % 2 == 0) {
        const long long at = ((long long)b * p.num_heads + head) * p.seq_pad + row0 + r;
        p.lse2[at] = l2;
        p.delta[at] = acc;
    }
    const int g = lane / 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        delta_r[h] = __shfl_sync(0xffffffffu, acc, 2 * g + 16 * h);
        lse_r[h] = __shfl_sync(0xffffffffu, l2, 2 * g + 16 * h);
    }
}

#if PASS == 0
extern "C" __global__ void __launch_bounds__(NT, 2) s2_backward_dq(const BwdParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* q_s = (u16*)smem_raw;        // [BLOCK_Q][LDS]
    u16* do_s = q_s + BLOCK_Q * LDS;  // [BLOCK_Q][LDS]
    u16* k_s = do_s + BLOCK_Q * LDS;  // [2][BLOCK_K][LDS]
    u16* v_s = k_s + 2 * KV_STAGE;    // [2][BLOCK_K][LDS]

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const u32 tile = p.q_tiles - 1u - blockIdx.x;
    const u32 head = blockIdx.y, b = blockIdx.z;
    const u32 kvh = head / p.kv_group;
    const u32 pattern = head / p.heads_per_pattern;
    const u32 seq = p.seq_len;
    const u32 row0 = tile * BLOCK_Q;
    const u32 row_last = min(row0 + BLOCK_Q, seq) - 1u;
    const u32 wr0 = warp * 16;

    const long long q_off = (long long)b * p.q_batch + (long long)head * HEAD_DIM;
    const long long kv_off = (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;
    const u16* kg = p.k + kv_off;
    const u16* vg = p.v + kv_off;

    // The forward's walk over the row list, through a Params that carries what it reads.
    Params wp = {};
    wp.entries = p.row_entries;
    wp.seq_len = seq;
    wp.block_size = p.block_size;
    wp.causal = p.causal;

    const u32 slot = pattern * p.q_tiles + tile;
    Walk cur;
    cur.e = p.row_ptr[slot];
    cur.e_end = p.row_ptr[slot + 1];
    cur.c = 0;
    bool has_cur = next_chunk(cur, wp, row_last);

    load_rows<BLOCK_Q>(q_s, p.q + q_off, p.q_tok, row0, seq, tid);
    load_rows<BLOCK_Q>(do_s, p.d_o + q_off, p.q_tok, row0, seq, tid);
    cp_async_commit();
    if (has_cur) {
        u32 k0 = p.row_entries[2 * cur.e] * p.block_size + cur.c * BLOCK_K;
        load_rows<BLOCK_K>(k_s, kg, p.kv_tok, k0, seq, tid);
        load_rows<BLOCK_K>(v_s, vg, p.kv_tok, k0, seq, tid);
    }
    cp_async_commit();

    // D = rowsum(dO * O) and LSE * log2(e) of this warp's 16 rows: lanes 2r and 2r + 1 take row r's halves.
    cp_async_wait<1>();
    __syncthreads();
    float delta_r[2], lse_r[2];
    warp_row_stats(p, q_off, do_s + (wr0 + lane / 2) * LDS + (lane % 2) * (HEAD_DIM / 2), b, head, row0, wr0, lane,
                   delta_r, lse_r);

    float dq[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dq[n][i] = 0.f;

    Walk nxt = cur;
    bool has_nxt = false;
    if (has_cur) {
        step_chunk(nxt, wp);
        has_nxt = next_chunk(nxt, wp, row_last);
    }
    const u32 q_base = smem_addr(q_s), do_base = smem_addr(do_s);
    int stage = 0;
    while (has_cur) {
        if (has_nxt) {
            u32 k1 = p.row_entries[2 * nxt.e] * p.block_size + nxt.c * BLOCK_K;
            load_rows<BLOCK_K>(k_s + (stage ^ 1) * KV_STAGE, kg, p.kv_tok, k1, seq, tid);
            load_rows<BLOCK_K>(v_s + (stage ^ 1) * KV_STAGE, vg, p.kv_tok, k1, seq, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        const u32 rm = p.row_entries[2 * cur.e + 1];
        const u32 k0 = p.row_entries[2 * cur.e] * p.block_size + cur.c * BLOCK_K;
        const u32 gq0 = row0 + wr0;
        const int att = rows_attend(rm, wr0, 16, p.block_size);
        const bool skip = (att & 1) == 0 || gq0 >= seq || (p.causal && k0 > gq0 + 15u);
        if (!skip) {
            const bool need_mask = (att & 2) == 0 || k0 + BLOCK_K > seq || (p.causal && k0 + BLOCK_K - 1u > gq0);
            const u32 k_base = smem_addr(k_s + stage * KV_STAGE);
            const u32 v_base = smem_addr(v_s + stage * KV_STAGE);
            float s[NK][4], dp[NK][4];
            mma_abt(s, q_base, wr0, k_base, lane);
            mma_abt(dp, do_base, wr0, v_base, lane);
            if (need_mask) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 tr = wr0 + g + h * 8;
                    const u32 qi = row0 + tr;
                    const bool row_ok = row_attends(rm, tr, p.block_size);
#pragma unroll
                    for (int n = 0; n < NK; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            u32 kj = k0 + n * 8 + 2 * t + e;
                            bool ok = row_ok && kj < seq && !(p.causal && kj > qi);
                            if (!ok) s[n][2 * h + e] = NEG_INF;
                        }
                }
            }
            // dS = P (dP - D), into s.
#pragma unroll
            for (int n = 0; n < NK; ++n)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float pr = fast_exp2(fmaf(s[n][2 * h + e], p.scale_log2, -lse_r[h]));
                        s[n][2 * h + e] = pr * (dp[n][2 * h + e] - delta_r[h]);
                    }
            mma_pb(dq, s, k_base, lane);
        }
        __syncthreads();  // every warp is done with this stage before it is refilled

        cur = nxt;
        has_cur = has_nxt;
        if (has_nxt) {
            step_chunk(nxt, wp);
            has_nxt = next_chunk(nxt, wp, row_last);
        }
        stage ^= 1;
    }
    cp_async_wait<0>();
    __syncthreads();
    {
        const u32 r = row0 + wr0 + g;
        flag_nonfinite(p.flag, dq, r >= seq ? 0 : r + 8u >= seq ? 1 : 2);
    }
    stage_rows(q_s, wr0, dq, p.scale, lane);
    __syncthreads();
    store_rows<BLOCK_Q>(p.dq + q_off, p.q_tok, q_s, row0, seq, tid);
}
#endif

#if PASS == 1
struct ColWalk {
    u32 hh, e, e_end;  // query head within the GQA group, entry, end of that head's column list
};

__device__ __forceinline__ void col_head(ColWalk& w, const BwdParams& p, u32 kvh, u32 kv_block) {
    const u32 head = kvh * p.kv_group + w.hh;
    const u32 slot = (head / p.heads_per_pattern) * p.kv_blocks + kv_block;
    w.e = p.col_ptr[slot];
    w.e_end = p.col_ptr[slot + 1];
}

// Advances `w` (inclusive) to the next query tile with work for the key tile at key0: across the group's
// heads, past tiles that causality masks whole. False when every list is exhausted.
__device__ __forceinline__ bool next_col(ColWalk& w, const BwdParams& p, u32 kvh, u32 kv_block, u32 key0) {
    for (;;) {
        for (; w.e < w.e_end; ++w.e) {
            const u32 q0 = p.col_entries[2 * w.e] * BLOCK_K;
            if (!p.causal || min(q0 + BLOCK_K, p.seq_len) - 1u >= key0) return true;
        }
        if (w.hh + 1u >= p.kv_group) return false;
        ++w.hh;
        col_head(w, p, kvh, kv_block);
    }
}

extern "C" __global__ void __launch_bounds__(NT, 2) s2_backward_dkdv(const BwdParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* k_s = (u16*)smem_raw;               // [BLOCK_Q][LDS]: this CTA's keys
    u16* v_s = k_s + BLOCK_Q * LDS;          // [BLOCK_Q][LDS]
    u16* q_s = v_s + BLOCK_Q * LDS;          // [2][BLOCK_K][LDS]: query tile
    u16* do_s = q_s + 2 * KV_STAGE;          // [2][BLOCK_K][LDS]
    float* stat_s = (float*)(do_s + 2 * KV_STAGE);  // [2][2][BLOCK_K]: lse2, delta per stage

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const u32 kvh = blockIdx.y, b = blockIdx.z;
    const u32 seq = p.seq_len;
    const u32 key0 = blockIdx.x * BLOCK_Q;
    const u32 kv_block = key0 / p.block_size;
    const u32 wk0 = warp * 16;     // this warp's first key row in the tile
    const u32 kw0 = key0 + wk0;    // and its token

    const long long kv_off = (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;
    load_rows<BLOCK_Q>(k_s, p.k + kv_off, p.kv_tok, key0, seq, tid);
    load_rows<BLOCK_Q>(v_s, p.v + kv_off, p.kv_tok, key0, seq, tid);

    // Stages query tile `w` (Q, dO, lse2, delta of its head) into stage `st`.
    auto load_step = [&](const ColWalk& w, int st) {
        const u32 head = kvh * p.kv_group + w.hh;
        const u32 q0 = p.col_entries[2 * w.e] * BLOCK_K;
        const long long off = (long long)b * p.q_batch + (long long)head * HEAD_DIM;
        load_rows<BLOCK_K>(q_s + st * KV_STAGE, p.q + off, p.q_tok, q0, seq, tid);
        load_rows<BLOCK_K>(do_s + st * KV_STAGE, p.d_o + off, p.q_tok, q0, seq, tid);
        if (tid < 2 * (BLOCK_K / 4)) {
            const int which = tid / (BLOCK_K / 4), c = tid % (BLOCK_K / 4);
            const float* src = (which ? p.delta : p.lse2) + ((long long)b * p.num_heads + head) * p.seq_pad + q0 + c * 4;
            cp_async16(smem_addr(stat_s + (st * 2 + which) * BLOCK_K + c * 4), src, true);
        }
    };

    ColWalk cur;
    cur.hh = 0;
    col_head(cur, p, kvh, kv_block);
    bool has_cur = next_col(cur, p, kvh, kv_block, key0);
    if (has_cur) load_step(cur, 0);
    cp_async_commit();
    ColWalk nxt = cur;
    bool has_nxt = false;
    if (has_cur) {
        ++nxt.e;
        has_nxt = next_col(nxt, p, kvh, kv_block, key0);
    }

    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk[n][i] = dv[n][i] = 0.f;

    const u32 k_base = smem_addr(k_s), v_base = smem_addr(v_s);
    int stage = 0;
    while (has_cur) {
        if (has_nxt) load_step(nxt, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        const u32 rm = p.col_entries[2 * cur.e + 1];
        const u32 q0 = p.col_entries[2 * cur.e] * BLOCK_K;
        const int att = rows_attend(rm, 0, BLOCK_K, p.block_size);
        const bool skip = (att & 1) == 0 || kw0 >= seq || (p.causal && kw0 > min(q0 + BLOCK_K, seq) - 1u);
        if (!skip) {
            const bool need_mask =
                (att & 2) == 0 || q0 + BLOCK_K > seq || kw0 + 16u > seq || (p.causal && kw0 + 15u > q0);
            const u32 qs_base = smem_addr(q_s + stage * KV_STAGE);
            const u32 dos_base = smem_addr(do_s + stage * KV_STAGE);
            const float* lse_s = stat_s + (stage * 2) * BLOCK_K;
            const float* dl_s = lse_s + BLOCK_K;
            float s[NK][4], dp[NK][4];
            mma_abt(s, k_base, wk0, qs_base, lane);    // S^T: rows keys, columns queries
            mma_abt(dp, v_base, wk0, dos_base, lane);  // dP^T
            if (need_mask) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 kj = kw0 + g + h * 8;
#pragma unroll
                    for (int n = 0; n < NK; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const u32 r = n * 8 + 2 * t + e;
                            const u32 qi = q0 + r;
                            bool ok = row_attends(rm, r, p.block_size) && qi < seq && kj < seq && !(p.causal && kj > qi);
                            if (!ok) s[n][2 * h + e] = NEG_INF;
                        }
                }
            }
            // P^T into s, dS^T into dp.
#pragma unroll
            for (int n = 0; n < NK; ++n) {
                const float2 l2 = *(const float2*)(lse_s + n * 8 + 2 * t);
                const float2 dl = *(const float2*)(dl_s + n * 8 + 2 * t);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float p0 = fast_exp2(fmaf(s[n][2 * h], p.scale_log2, -l2.x));
                    float p1 = fast_exp2(fmaf(s[n][2 * h + 1], p.scale_log2, -l2.y));
                    s[n][2 * h] = p0;
                    s[n][2 * h + 1] = p1;
                    dp[n][2 * h] = p0 * (dp[n][2 * h] - dl.x);
                    dp[n][2 * h + 1] = p1 * (dp[n][2 * h + 1] - dl.y);
                }
            }
            mma_pb(dv, s, dos_base, lane);  // dV += P^T dO
            mma_pb(dk, dp, qs_base, lane);  // dK += dS^T Q
        }
        __syncthreads();  // every warp is done with this stage before it is refilled

        cur = nxt;
        has_cur = has_nxt;
        if (has_nxt) {
            ++nxt.e;
            has_nxt = next_col(nxt, p, kvh, kv_block, key0);
        }
        stage ^= 1;
    }
    cp_async_wait<0>();
    __syncthreads();
    {
        const u32 kj = kw0 + g;
        const int valid = kj >= seq ? 0 : kj + 8u >= seq ? 1 : 2;
        flag_nonfinite(p.flag, dk, valid);
        flag_nonfinite(p.flag, dv, valid);
    }
    stage_rows(k_s, wk0, dk, p.scale, lane);
    stage_rows(v_s, wk0, dv, 1.f, lane);
    __syncthreads();
    store_rows<BLOCK_Q>(p.dk + kv_off, p.kv_tok, k_s, key0, seq, tid);
    store_rows<BLOCK_Q>(p.dv + kv_off, p.kv_tok, v_s, key0, seq, tid);
}
#endif

#if PASS >= 2
// ---- Shared by the wgmma passes ----

#ifndef S2_EMU
// D[64 x 64] (+)= A[64 x 16] * B[16 x 64], both from shared memory (descriptors, K-major).
__device__ __forceinline__ void wgmma_ss_n64(float* d, u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPE "." MMA_TYPE " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// A bulk copy of `bytes` (a multiple of 16, 16-byte aligned) from global `src` to shared `dst`, completing `bar`
// with its byte count.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
#endif

// Bytes from a K-major 64-row tile's start (keys of K / V, queries of Q / dO) to k-step kd of HEAD_DIM: 32 bytes
// further inside the 128-byte rows per step, the next 64-column atom every 4 steps; SBO = 8 rows.
#define TILE_STEP(kd) (((kd) / 4) * (64 * 128) + ((kd) % 4) * 32)

// acc = A B^T over HEAD_DIM for two 64-row tiles in shared memory (S = Q K^T, dP = dO V^T, or transposed with the
// keys as A). Issue only; commit by caller.
__device__ __forceinline__ void issue_ss_products(float (&acc)[NK][4], u32 a_base, u32 b_base) {
    const u32 a0 = desc_start(a_base), b0 = desc_start(b_base);
#pragma unroll
    for (int kd = 0; kd < KD; ++kd)
        wgmma_ss_n64(&acc[0][0], desc_from(a0 + TILE_STEP(kd) / 16, 16, 1024), desc_from(b0 + TILE_STEP(kd) / 16, 16, 1024),
                     kd > 0);
}
#endif

#if PASS == 2
// ---- dK/dV pass on wgmma (sm_90a): warp specialised, TMA, persistent ----
// Work item = two tiles of KT = 64 keys of one KV head and sequence whose column lists mostly agree (the host pairs
// them: two stripe blocks vert_stride apart, two neighbouring local blocks; `wgmma_schedule` in
// src/cuda/backward.rs), or one tile (its partner NO_TILE). Warpgroup t owns tile t: its K and V, and its dK and dV
// summed in registers. The CTA walks the union of the two tiles' column lists for every query head of the GQA
// group (query tiles of QT = 64 rows, ascending per head); each step's Q and dO tile is loaded once and used by
// every warpgroup whose list holds it, so a pair reads the Q / dO stream of one tile, not of two (the pass is bound
// by those reads). Warps 8-11: the producer warpgroup, whose thread 0 loads the item's K and V tiles and, per step,
// the Q and dO tiles (TMA, 128-byte swizzled) and the tile's LSE * log2(e) and D rows (bulk copies) into a ring of
// BW_STAGES stages. Per step and warpgroup, on tensor cores: S^T = K Q^T and dP^T = V dO^T (both operands from
// shared memory), then P^T = exp2(S^T * scale * log2(e) - LSE) and dS^T = P^T (dP^T - D) in registers,
// dV += P^T dO and dK += dS^T Q (register A operands, Q and dO read transposed). Each warpgroup sums its tile's
// steps in walk order and writes its own rows: deterministic.
#define KT 64                      // keys per tile (one per warpgroup)
#define QT BLOCK_K                 // query rows per step: the column plan's tile
#define BW_STAGES 3                // Q / dO ring (both warpgroups read each stage)
#define QD_TILE (QT * HEAD_DIM)    // elements of one staged Q (or dO) tile: HEAD_DIM / 64 atoms of 64 rows x 128 B
#define KV_TILE (KT * HEAD_DIM)    // elements of one K (or V) tile, same layout
#define NO_TILE 0xffffffffu        // an item's missing second tile
#define BW_PRODUCER_REGS 24        // the producer only issues copies from one thread
#define BW_CONSUMER_REGS 240       // dK and dV (2 x HEAD_DIM / 2 f32), S^T and dP^T (2 x 32) per thread
#if (QD_TILE * 2) % 1024 != 0 || (KV_TILE * 2) % 1024 != 0
#error "the tiles must keep the 1024-byte alignment of the swizzle atoms"
#endif

struct BwdItem {
    u32 kt[2], kvh, b;  // key tiles (kt[1] may be NO_TILE), KV head, sequence
};

__device__ __forceinline__ BwdItem bwd_item(const BwdParams& p, u32 w) {
    const u32 x = p.sched[2 * w];
    const u32 kv_heads = p.num_heads / p.kv_group;
    BwdItem it;
    it.kt[0] = x % p.key_tiles;
    it.kt[1] = p.sched[2 * w + 1];
    it.kvh = (x / p.key_tiles) % kv_heads;
    it.b = x / (p.key_tiles * kv_heads);
    return it;
}

// The merged walk of a pair's column lists: for query head hh of the group, a cursor into each tile's list.
struct PairWalk {
    u32 hh;
    u32 e[2], end[2];  // each tile's entry and list end (equal for a missing tile)
    u32 q_tile;        // the step's query tile
    u32 in;            // bit t: tile t's list holds the step, at entry e[t]
};

__device__ __forceinline__ void pair_head(PairWalk& w, const BwdParams& p, u32 kvh, const u32 (&blk)[2]) {
    const u32 head = kvh * p.kv_group + w.hh;
    const u32 base = (head / p.heads_per_pattern) * p.kv_blocks;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        const bool has = blk[t] != NO_TILE;
        w.e[t] = has ? p.col_ptr[base + blk[t]] : 0u;
        w.end[t] = has ? p.col_ptr[base + blk[t] + 1] : 0u;
    }
}

// Finds the walk's next step from the cursors on (inclusive): the lowest query tile either list holds, past the
// tiles that causality masks whole for that list's keys (key0), across the group's heads. False when every list
// is exhausted.
__device__ __forceinline__ bool pair_next(PairWalk& w, const BwdParams& p, u32 kvh, const u32 (&blk)[2],
                                          const u32 (&key0)[2]) {
    for (;;) {
        u32 q[2];
#pragma unroll
        for (int t = 0; t < 2; ++t) {
            q[t] = NO_TILE;
            for (; w.e[t] < w.end[t]; ++w.e[t]) {
                const u32 qt = p.col_entries[2 * w.e[t]];
                if (!p.causal || min(qt * QT + QT, p.seq_len) - 1u >= key0[t]) {
                    q[t] = qt;
                    break;
                }
            }
        }
        const u32 m = min(q[0], q[1]);
        if (m != NO_TILE) {
            w.q_tile = m;
            w.in = (q[0] == m ? 1u : 0u) | (q[1] == m ? 2u : 0u);
            return true;
        }
        if (w.hh + 1u >= p.kv_group) return false;
        ++w.hh;
        pair_head(w, p, kvh, blk);
    }
}

__device__ __forceinline__ void pair_advance(PairWalk& w) {
    w.e[0] += w.in & 1u;
    w.e[1] += w.in >> 1;
}

// The item's tiles as the walk reads them: KV block and first key of each (NO_TILE where missing).
__device__ __forceinline__ void item_tiles(const BwdParams& p, const BwdItem& it, u32 (&blk)[2], u32 (&key0)[2]) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        const bool has = it.kt[t] != NO_TILE;
        key0[t] = has ? it.kt[t] * KT : 0u;
        blk[t] = has ? key0[t] / p.block_size : NO_TILE;
    }
}

// Element offset of (key row r, column col) in the epilogue's 16-bit staging tile: 16-byte chunks XOR r % 8, so
// that the accumulator writes and the row reads are conflict-free.
__device__ __forceinline__ u32 red_off(u32 r, u32 col) { return r * HEAD_DIM + (((col / 8) ^ (r % 8)) * 8) + col % 8; }

extern "C" __global__ void __launch_bounds__(NT, 1) s2_backward_dkdv_wgmma(const __grid_constant__ BwdParams p) {
    extern __shared__ __align__(1024) unsigned char smem_raw_[];
    unsigned char* smem_raw = smem_raw_ + ((1024u - (smem_addr(smem_raw_) & 1023u)) & 1023u);
    u16* k_s = (u16*)smem_raw;                          // [2][KV_TILE]: tile t's K
    u16* v_s = k_s + 2 * KV_TILE;                       // [2][KV_TILE]
    u16* q_s = v_s + 2 * KV_TILE;                       // [BW_STAGES][QD_TILE]
    u16* do_s = q_s + BW_STAGES * QD_TILE;              // [BW_STAGES][QD_TILE]
    u16* out_s = do_s + BW_STAGES * QD_TILE;            // [2][2][KT * HEAD_DIM]: each warpgroup's dK, dV staging
    float* stat_s = (float*)(out_s + 4 * KT * HEAD_DIM);  // [BW_STAGES][2][QT]: LSE * log2(e), D
    u64* bars = (u64*)(stat_s + BW_STAGES * 2 * QT);    // full[BW_STAGES], empty[BW_STAGES], kv_full, kv_empty
    const u32 full0 = smem_addr(bars), empty0 = full0 + 8 * BW_STAGES;
    const u32 kv_full = empty0 + 8 * BW_STAGES, kv_empty = kv_full + 8;

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const u32 seq = p.seq_len;

    if (tid == 0) {
        for (int s = 0; s < BW_STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);      // the producer's arrival (plus the stage's bytes)
            mbar_init(empty0 + 8 * s, WARPS); // every consumer warp, once it is done with the step (or skips it)
        }
        mbar_init(kv_full, 1);
        mbar_init(kv_empty, WARPS);           // every consumer warp, after its last step of the item
    }
    __syncthreads();  // the only CTA-wide barrier

    if (warp >= WARPS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(BW_PRODUCER_REGS));
        if (tid == WARPS * 32) {
            u32 i = 0, n = 0;
            for (u32 w = blockIdx.x; w < p.items; w += gridDim.x, ++n) {
                const BwdItem it = bwd_item(p, w);
                u32 blk[2], key0[2];
                item_tiles(p, it, blk, key0);
                const u32 tiles = it.kt[1] == NO_TILE ? 1u : 2u;
                mbar_wait(kv_empty, (n & 1u) ^ 1u);
                mbar_arrive_expect_tx(kv_full, tiles * 2 * KV_TILE * 2);
                for (u32 t = 0; t < tiles; ++t)
#pragma unroll
                    for (int a = 0; a < HEAD_DIM / 64; ++a) {
                        const u32 off = a * KT * 128;
                        tma_load_4d(smem_addr(k_s + t * KV_TILE) + off, &p.k_map, a * 64, it.kvh, key0[t], it.b, kv_full);
                        tma_load_4d(smem_addr(v_s + t * KV_TILE) + off, &p.v_map, a * 64, it.kvh, key0[t], it.b, kv_full);
                    }
                PairWalk wk;
                wk.hh = 0;
                pair_head(wk, p, it.kvh, blk);
                while (pair_next(wk, p, it.kvh, blk, key0)) {
                    const u32 s = i % BW_STAGES;
                    mbar_wait(empty0 + 8 * s, ((i / BW_STAGES) & 1u) ^ 1u);
                    const u32 head = it.kvh * p.kv_group + wk.hh;
                    const u32 q0 = wk.q_tile * QT;
                    const u32 full = full0 + 8 * s;
                    mbar_arrive_expect_tx(full, 2 * QD_TILE * 2 + 2 * QT * 4);
#pragma unroll
                    for (int a = 0; a < HEAD_DIM / 64; ++a) {
                        tma_load_4d(smem_addr(q_s + s * QD_TILE) + a * QT * 128, &p.q_map, a * 64, head, q0, it.b, full);
                        tma_load_4d(smem_addr(do_s + s * QD_TILE) + a * QT * 128, &p.do_map, a * 64, head, q0, it.b, full);
                    }
                    const long long at = ((long long)it.b * p.num_heads + head) * p.seq_pad + q0;
                    bulk_load(smem_addr(stat_s + s * 2 * QT), p.lse2 + at, QT * 4, full);
                    bulk_load(smem_addr(stat_s + s * 2 * QT + QT), p.delta + at, QT * 4, full);
                    ++i;
                    pair_advance(wk);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(BW_CONSUMER_REGS));
        const u32 wg = warp / 4;
        const int g = lane / 4, t = lane % 4;
        const u32 wk0 = (warp % 4) * 16;  // this warp's first key row in its tile
        const u32 k_base = smem_addr(k_s + wg * KV_TILE), v_base = smem_addr(v_s + wg * KV_TILE);
        u32 i = 0, n = 0;
        for (u32 w = blockIdx.x; w < p.items; w += gridDim.x, ++n) {
            const BwdItem it = bwd_item(p, w);
            u32 blk[2], key0[2];
            item_tiles(p, it, blk, key0);
            // (Selects, not indexing by wg, which would put the arrays in local memory.)
            const u32 my_key0 = wg ? key0[1] : key0[0];
            const bool mine = (wg ? it.kt[1] : it.kt[0]) != NO_TILE;
            const u32 kw0 = my_key0 + wk0;
            float dk[ND][4], dv[ND][4];
#pragma unroll
            for (int nd = 0; nd < ND; ++nd)
#pragma unroll
                for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;
            // Every warp waits for the item's tiles, a warpgroup without one too: its arrivals on kv_empty must not
            // count towards the previous item's.
            mbar_wait(kv_full, n & 1u);

            PairWalk wk;
            wk.hh = 0;
            pair_head(wk, p, it.kvh, blk);
            while (pair_next(wk, p, it.kvh, blk, key0)) {
                const u32 s = i % BW_STAGES;
                // A warpgroup whose list skips the step waits for the stage all the same, so that its arrival on the
                // stage's empty barrier belongs to this round of the ring.
                mbar_wait(full0 + 8 * s, (i / BW_STAGES) & 1u);
                if ((wk.in >> wg) & 1u) {
                    const u32 rm = p.col_entries[2 * (wg ? wk.e[1] : wk.e[0]) + 1];
                    const u32 q0 = wk.q_tile * QT;
                    const int att = rows_attend(rm, 0, QT, p.block_size);
                    const bool need_mask =
                        (att & 2) == 0 || q0 + QT > seq || kw0 + 16u > seq || (p.causal && kw0 + 15u > q0);
                    const u32 qs_base = smem_addr(q_s + s * QD_TILE), dos_base = smem_addr(do_s + s * QD_TILE);
                    const float* lse_s = stat_s + s * 2 * QT;
                    const float* dl_s = lse_s + QT;

                    float st[NK][4], dpt[NK][4];
                    fence_regs<NK * 4>(&st[0][0]);
                    fence_regs<NK * 4>(&dpt[0][0]);
                    wgmma_fence();
                    issue_ss_products(st, k_base, qs_base);
                    issue_ss_products(dpt, v_base, dos_base);
                    wgmma_commit();
                    wgmma_wait<0>();
                    fence_regs<NK * 4>(&st[0][0]);
                    fence_regs<NK * 4>(&dpt[0][0]);

                    if (need_mask) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const u32 kj = kw0 + g + h * 8;
#pragma unroll
                            for (int c = 0; c < NK; ++c)
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    const u32 r = c * 8 + 2 * t + e;
                                    const u32 qi = q0 + r;
                                    const bool ok = row_attends(rm, r, p.block_size) && qi < seq && kj < seq &&
                                                    !(p.causal && kj > qi);
                                    if (!ok) st[c][2 * h + e] = NEG_INF;
                                }
                        }
                    }
                    // P^T into st, dS^T into dpt; then both as wgmma A fragments (rounded to the storage type).
                    u32 pa[KK][4], da[KK][4];
#pragma unroll
                    for (int c = 0; c < NK; ++c) {
                        const float2 l2 = *(const float2*)(lse_s + c * 8 + 2 * t);
                        const float2 dl = *(const float2*)(dl_s + c * 8 + 2 * t);
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const float p0 = fast_exp2(fmaf(st[c][2 * h], p.scale_log2, -l2.x));
                            const float p1 = fast_exp2(fmaf(st[c][2 * h + 1], p.scale_log2, -l2.y));
                            st[c][2 * h] = p0;
                            st[c][2 * h + 1] = p1;
                            dpt[c][2 * h] = p0 * (dpt[c][2 * h] - dl.x);
                            dpt[c][2 * h + 1] = p1 * (dpt[c][2 * h + 1] - dl.y);
                        }
                    }
                    pack_frags(pa, st);
                    pack_frags(da, dpt);
                    fence_regs<ND * 4>(&dv[0][0]);
                    fence_regs<ND * 4>(&dk[0][0]);
                    wgmma_fence();
                    // dV += P^T dO and dK += dS^T Q: a k-step is 16 query rows (2048 bytes), B read transposed
                    // (N = head dim across the 64-column atoms, LBO = one atom).
                    issue_rs_mn(dv, pa, dos_base);
                    issue_rs_mn(dk, da, qs_base);
                    wgmma_commit();
                    wgmma_wait<0>();
                    fence_regs<ND * 4>(&dv[0][0]);
                    fence_regs<ND * 4>(&dk[0][0]);
                    fence_u32<KK * 4>(&pa[0][0]);
                    fence_u32<KK * 4>(&da[0][0]);
                }
                __syncwarp();
                if (lane == 0) mbar_arrive(empty0 + 8 * s);
                ++i;
                pair_advance(wk);
            }
            // This warp is done with the item's K and V: the producer may load the next item's.
            __syncwarp();
            if (lane == 0) mbar_arrive(kv_empty);
            if (!mine) continue;

            // Epilogue: the warpgroup stages its tile's dK and dV in 16 bits, then its 128 threads store the rows
            // below seq.
            u16* dk_st = out_s + wg * 2 * KT * HEAD_DIM;
            u16* dv_st = dk_st + KT * HEAD_DIM;
            const u32 kj = kw0 + g;
            const int valid = kj >= seq ? 0 : kj + 8u >= seq ? 1 : 2;
            flag_nonfinite(p.flag, dk, valid);
            flag_nonfinite(p.flag, dv, valid);
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    const u32 r = wk0 + g + h * 8, col = nd * 8 + 2 * t;
                    *(u32*)(dk_st + red_off(r, col)) = pack2(dk[nd][2 * h] * p.scale, dk[nd][2 * h + 1] * p.scale);
                    *(u32*)(dv_st + red_off(r, col)) = pack2(dv[nd][2 * h], dv[nd][2 * h + 1]);
                }
            named_sync(1 + wg, 128);
            const long long kv_off = (long long)it.b * p.kv_batch + (long long)it.kvh * HEAD_DIM;
#pragma unroll 4
            for (int j = tid % 128; j < 2 * KT * CPR; j += 128) {
                const int which = j / (KT * CPR), r = (j / CPR) % KT, c = j % CPR;
                if (my_key0 + r < seq) {
                    const u16* src = (which ? dv_st : dk_st) + red_off(r, c * 8);
                    u16* dst = (which ? p.dv : p.dk) + kv_off + (long long)(my_key0 + r) * p.kv_tok + c * 8;
                    *(uint4*)dst = *(const uint4*)src;
                }
            }
            named_sync(1 + wg, 128);  // the staging area is free for the warpgroup's next item
        }
    }
}
#endif

#if PASS == 3
// ---- dQ pass on wgmma (sm_90a): warp specialised, TMA, persistent ----
// Work item = one tile of BLOCK_Q = 128 query rows of one head and sequence, walking the forward's MergeQ row list
// in 64-key chunks, as PASS 0 does. Warps 0-7: two consumer warpgroups of 64 rows each (warp w % 4 owns 16); at an
// item's start each writes D = rowsum(dO * O) and LSE * log2(e) of its rows into the scratch rows the dK/dV pass
// reads (+inf past the end and for rows without keys, so that P vanishes there). Per chunk it takes part in:
// S = Q K^T and dP = dO V^T (operands from shared memory), dS = P (dP - D) with P = exp2(S * scale * log2(e) - LSE)
// in registers, dQ += dS K (K read transposed). Warps 8-11: the producer warpgroup, whose thread 0 loads each
// item's Q and dO tiles (DQ_QBUFS buffers, so the next item's load under this item's last chunks) and the K / V
// chunks (a ring of DQ_STAGES), all by TMA, 128-byte swizzled. A warpgroup releases every chunk (skipped or
// computed) once its products are done, so no stage is held across chunks.
#define DQ_STAGES 2
#define DQ_QBUFS 2
#define ROWS_TILE (BLOCK_Q * HEAD_DIM)  // Q (or dO) of one item: per warpgroup its 64 rows, HEAD_DIM / 64 atoms
#define GROUP_TILE (64 * HEAD_DIM)      // one warpgroup's part
#define KC_TILE (BLOCK_K * HEAD_DIM)    // one 64-key chunk of K (or V)
#define DQ_PRODUCER_REGS 24
#define DQ_CONSUMER_REGS 240
#if BLOCK_Q != 128
#error "the wgmma dQ pass runs two warpgroups of 64 rows"
#endif

// Element offset of (row r, column col) in a warpgroup's part of a Q / dO buffer: the TMA's 128-byte-swizzled layout
// (64-column atoms of 64 rows, 16-byte chunk c of row r at c ^ (r % 8)).
__device__ __forceinline__ u32 group_off(u32 r, u32 col) {
    return (col / 64) * 64 * 64 + r * 64 + ((((col % 64) / 8) ^ (r % 8)) * 8) + col % 8;
}

extern "C" __global__ void __launch_bounds__(NT, 1) s2_backward_dq_wgmma(const __grid_constant__ BwdParams p) {
    extern __shared__ __align__(1024) unsigned char smem_raw_[];
    unsigned char* smem_raw = smem_raw_ + ((1024u - (smem_addr(smem_raw_) & 1023u)) & 1023u);
    u16* q_s = (u16*)smem_raw;                        // [DQ_QBUFS][ROWS_TILE]
    u16* do_s = q_s + DQ_QBUFS * ROWS_TILE;           // [DQ_QBUFS][ROWS_TILE]
    u16* k_s = do_s + DQ_QBUFS * ROWS_TILE;           // [DQ_STAGES][KC_TILE]
    u16* v_s = k_s + DQ_STAGES * KC_TILE;             // [DQ_STAGES][KC_TILE]
    u64* bars = (u64*)(v_s + DQ_STAGES * KC_TILE);    // full, empty [DQ_STAGES]; q_full, q_empty [DQ_QBUFS]
    const u32 full0 = smem_addr(bars), empty0 = full0 + 8 * DQ_STAGES;
    const u32 qfull0 = empty0 + 8 * DQ_STAGES, qempty0 = qfull0 + 8 * DQ_QBUFS;

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const u32 seq = p.seq_len;

    if (tid == 0) {
        for (int s = 0; s < DQ_STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, WARPS);  // one arrival per consumer warp, skipped or not
        }
        for (int s = 0; s < DQ_QBUFS; ++s) {
            mbar_init(qfull0 + 8 * s, 1);
            mbar_init(qempty0 + 8 * s, WARPS);
        }
    }
    __syncthreads();  // the only CTA-wide barrier

    // The forward's walk over the row list, through a Params that carries what it reads.
    Params wp = {};
    wp.entries = p.row_entries;
    wp.row_ptr = p.row_ptr;
    wp.seq_len = seq;
    wp.block_size = p.block_size;
    wp.causal = p.causal;

    if (warp >= WARPS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(DQ_PRODUCER_REGS));
        if (tid == WARPS * 32) {
            u32 i = 0, n = 0;
            for (u32 w = blockIdx.x; w < p.dq_items; w += gridDim.x, ++n) {
                const u32 x = p.dq_sched[w];
                const u32 tile = x % p.q_tiles, head = (x / p.q_tiles) % p.num_heads, b = x / (p.q_tiles * p.num_heads);
                const u32 row0 = tile * BLOCK_Q;
                const u32 row_last = min(row0 + BLOCK_Q, seq) - 1u;
                const u32 qb = n % DQ_QBUFS;
                mbar_wait(qempty0 + 8 * qb, ((n / DQ_QBUFS) & 1u) ^ 1u);
                mbar_arrive_expect_tx(qfull0 + 8 * qb, 2 * ROWS_TILE * 2);
#pragma unroll
                for (int half = 0; half < 2; ++half)
#pragma unroll
                    for (int a = 0; a < HEAD_DIM / 64; ++a) {
                        const u32 off = (half * GROUP_TILE + a * 64 * 64) * 2;
                        const int r = row0 + half * 64;
                        tma_load_4d(smem_addr(q_s + qb * ROWS_TILE) + off, &p.q_map, a * 64, head, r, b, qfull0 + 8 * qb);
                        tma_load_4d(smem_addr(do_s + qb * ROWS_TILE) + off, &p.do_map, a * 64, head, r, b, qfull0 + 8 * qb);
                    }
                const u32 kvh = head / p.kv_group;
                const u32 slot = (head / p.heads_per_pattern) * p.q_tiles + tile;
                Walk wk;
                wk.e = p.row_ptr[slot];
                wk.e_end = p.row_ptr[slot + 1];
                wk.c = 0;
                bool has = next_chunk(wk, wp, row_last);
                while (has) {
                    const u32 s = i % DQ_STAGES;
                    mbar_wait(empty0 + 8 * s, ((i / DQ_STAGES) & 1u) ^ 1u);
                    const u32 k0 = p.row_entries[2 * wk.e] * p.block_size + wk.c * BLOCK_K;
                    mbar_arrive_expect_tx(full0 + 8 * s, 2 * KC_TILE * 2);
#pragma unroll
                    for (int a = 0; a < HEAD_DIM / 64; ++a) {
                        const u32 off = a * BLOCK_K * 128;
                        tma_load_4d(smem_addr(k_s + s * KC_TILE) + off, &p.k_map, a * 64, kvh, k0, b, full0 + 8 * s);
                        tma_load_4d(smem_addr(v_s + s * KC_TILE) + off, &p.v_map, a * 64, kvh, k0, b, full0 + 8 * s);
                    }
                    ++i;
                    step_chunk(wk, wp);
                    has = next_chunk(wk, wp, row_last);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(DQ_CONSUMER_REGS));
        const u32 wg = warp / 4;
        const int g = lane / 4, t = lane % 4;
        const u32 gr0 = wg * 64;                  // first tile row of this warpgroup
        const u32 wr0 = gr0 + (warp % 4) * 16;    // first tile row of this warp
        u32 i = 0, n = 0;
        for (u32 w = blockIdx.x; w < p.dq_items; w += gridDim.x, ++n) {
            const u32 x = p.dq_sched[w];
            const u32 tile = x % p.q_tiles, head = (x / p.q_tiles) % p.num_heads, b = x / (p.q_tiles * p.num_heads);
            const u32 row0 = tile * BLOCK_Q;
            const u32 row_last = min(row0 + BLOCK_Q, seq) - 1u;
            const u32 gq0 = row0 + gr0;
            const long long q_off = (long long)b * p.q_batch + (long long)head * HEAD_DIM;

            // D and LSE * log2(e) of this warp's 16 rows, dO read from global memory.
            float delta_r[2], lse_r[2];
            const long long do_at = q_off + (long long)(row0 + wr0 + lane / 2) * p.q_tok + (lane % 2) * (HEAD_DIM / 2);
            warp_row_stats(p, q_off, p.d_o + do_at, b, head, row0, wr0, lane, delta_r, lse_r);

            float dq[ND][4];
#pragma unroll
            for (int nd = 0; nd < ND; ++nd)
#pragma unroll
                for (int e = 0; e < 4; ++e) dq[nd][e] = 0.f;
            const u32 qb = n % DQ_QBUFS;
            u16* qpart = q_s + qb * ROWS_TILE + wg * GROUP_TILE;
            const u32 q_base = smem_addr(qpart);
            const u32 do_base = smem_addr(do_s + qb * ROWS_TILE + wg * GROUP_TILE);
            mbar_wait(qfull0 + 8 * qb, (n / DQ_QBUFS) & 1u);

            const u32 slot = (head / p.heads_per_pattern) * p.q_tiles + tile;
            Walk cur;
            cur.e = p.row_ptr[slot];
            cur.e_end = p.row_ptr[slot + 1];
            cur.c = 0;
            bool has = next_chunk(cur, wp, row_last);
            while (has) {
                const u32 s = i % DQ_STAGES;
                const u32 rm = p.row_entries[2 * cur.e + 1];
                const u32 k0 = p.row_entries[2 * cur.e] * p.block_size + cur.c * BLOCK_K;
                const int att = rows_attend(rm, gr0, 64, p.block_size);
                const bool skip = (att & 1) == 0 || gq0 >= seq || (p.causal && k0 > gq0 + 63u);
                const bool need_mask = (att & 2) == 0 || k0 + BLOCK_K > seq || (p.causal && k0 + BLOCK_K - 1u > gq0);
                mbar_wait(full0 + 8 * s, (i / DQ_STAGES) & 1u);
                if (!skip) {
                    const u32 k_base = smem_addr(k_s + s * KC_TILE), v_base = smem_addr(v_s + s * KC_TILE);
                    float sc[NK][4], dp[NK][4];
                    fence_regs<NK * 4>(&sc[0][0]);
                    fence_regs<NK * 4>(&dp[0][0]);
                    wgmma_fence();
                    issue_ss_products(sc, q_base, k_base);
                    issue_ss_products(dp, do_base, v_base);
                    wgmma_commit();
                    wgmma_wait<0>();
                    fence_regs<NK * 4>(&sc[0][0]);
                    fence_regs<NK * 4>(&dp[0][0]);
                    if (need_mask) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const u32 tr = wr0 + g + h * 8;
                            const u32 qi = row0 + tr;
                            const bool row_ok = row_attends(rm, tr, p.block_size);
#pragma unroll
                            for (int c = 0; c < NK; ++c)
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    const u32 kj = k0 + c * 8 + 2 * t + e;
                                    const bool ok = row_ok && kj < seq && !(p.causal && kj > qi);
                                    if (!ok) sc[c][2 * h + e] = NEG_INF;
                                }
                        }
                    }
                    // dS = P (dP - D) as wgmma A fragments, rounded to the storage type.
                    u32 da[KK][4];
#pragma unroll
                    for (int c = 0; c < NK; ++c)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const float pr = fast_exp2(fmaf(sc[c][2 * h + e], p.scale_log2, -lse_r[h]));
                                dp[c][2 * h + e] = pr * (dp[c][2 * h + e] - delta_r[h]);
                            }
                    pack_frags(da, dp);
                    fence_regs<ND * 4>(&dq[0][0]);
                    wgmma_fence();
                    // dQ += dS K: a k-step is 16 keys (2048 bytes), K read transposed (N = head dim).
                    issue_rs_mn(dq, da, k_base);
                    wgmma_commit();
                    wgmma_wait<0>();
                    fence_regs<ND * 4>(&dq[0][0]);
                    fence_u32<KK * 4>(&da[0][0]);
                }
                __syncwarp();
                if (lane == 0) mbar_arrive(empty0 + 8 * s);
                ++i;
                step_chunk(cur, wp);
                has = next_chunk(cur, wp, row_last);
            }

            // Epilogue: dQ * scale into this warpgroup's part of its Q buffer (its products are done), then the
            // warpgroup's 64 rows out; the buffers go back to the producer after every warp's reads.
            {
                const u32 r = row0 + wr0 + g;
                flag_nonfinite(p.flag, dq, r >= seq ? 0 : r + 8u >= seq ? 1 : 2);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int nd = 0; nd < ND; ++nd) {
                    const u32 r = wr0 - gr0 + g + h * 8, col = nd * 8 + 2 * t;
                    *(u32*)(qpart + group_off(r, col)) = pack2(dq[nd][2 * h] * p.scale, dq[nd][2 * h + 1] * p.scale);
                }
            named_sync(3 + wg, 128);
#pragma unroll 4
            for (int j = tid % 128; j < 64 * CPR; j += 128) {
                const u32 r = j / CPR, c = j % CPR;
                const u32 tok = gq0 + r;
                if (tok < seq) {
                    u16* dst = p.dq + q_off + (long long)tok * p.q_tok + c * 8;
                    *(uint4*)dst = *(const uint4*)(qpart + group_off(r, c * 8));
                }
            }
            // The staging writes went through the generic proxy; the next TMA into this buffer goes through the
            // async one.
            fence_proxy_async();
            __syncwarp();
            if (lane == 0) mbar_arrive(qempty0 + 8 * qb);
        }
    }
}
#endif
