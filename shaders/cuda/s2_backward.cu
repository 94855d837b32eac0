// S2-Attention backward on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async double buffering), fp16 or
// bf16 with f32 accumulation. Compiled by NVRTC after the text of s2_forward.cu (src/cuda/backward.rs
// concatenates the two), whose primitives it uses: cp_async16, ldmatrix_x4(_trans), mma16816, pack2,
// fast_exp2, row_attends / rows_attend, Walk / next_chunk / step_chunk, load_rows, and the tile macros
// (NT, NK, KK, ND, KD, LDS, CPR, KV_STAGE) derived from the same defines. PASS picks the kernel:
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
// Deterministic: no atomics; every output row is written once by one CTA that sums in a fixed order.
// Non-finite inputs: the epilogues set `flag` when a gradient they write is non-finite (a masked pair's
// P = 0 times a non-finite value inside an MMA is NaN); the exact kernel launched after both passes
// (s2_exact.cu) then redoes dQ, dK and dV, reading the D / LSE scratch the dQ pass wrote.

#ifndef PASS
#define PASS 0
#endif
#if GROUP_ROWS != 16
#error "the backward kernels give each warp 16 rows (BLOCK_Q = 16 * WARPS)"
#endif
#if PASS == 1 && BLOCK_K != 64
#error "the dK/dV pass walks query tiles of 64 rows"
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
};

__device__ __forceinline__ float to_f32(u16 x) {
#if IS_BF16
    return __uint_as_float((u32)x << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(x));
    return f;
#endif
}

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
    {
        const u32 r = wr0 + lane / 2;
        const u32 tok = row0 + r;
        float acc = 0.f, l2 = POS_INF;
        if (tok < seq) {
            const u16* orow = p.o + q_off + (long long)tok * p.q_tok + (lane % 2) * (HEAD_DIM / 2);
            const u16* drow = do_s + r * LDS + (lane % 2) * (HEAD_DIM / 2);
#pragma unroll
            for (int c = 0; c < HEAD_DIM / 2; c += 8) {
                uint4 ov = *(const uint4*)(orow + c);
                uint4 dv = *(const uint4*)(drow + c);
                acc += dot2(ov.x, dv.x) + dot2(ov.y, dv.y) + dot2(ov.z, dv.z) + dot2(ov.w, dv.w);
            }
            float l = p.lse[(long long)b * p.lse_batch + (long long)head * seq + tok];
            if (l != NEG_INF) l2 = l * LOG2E_F;
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        if (lane % 2 == 0) {
            long long at = ((long long)b * p.num_heads + head) * p.seq_pad + row0 + r;
            p.lse2[at] = l2;
            p.delta[at] = acc;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            delta_r[h] = __shfl_sync(0xffffffffu, acc, 2 * g + 16 * h);
            lse_r[h] = __shfl_sync(0xffffffffu, l2, 2 * g + 16 * h);
        }
    }

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
