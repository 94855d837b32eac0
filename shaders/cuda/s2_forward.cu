// S2-Attention forward on tensor cores: mma.sync m16n8k16 with ldmatrix and cp.async (sm_80+), or, with
// USE_WGMMA=1, Hopper's warpgroup MMA (sm_90a: wgmma.mma_async, Q and P as register operands, K and V read
// by the tensor cores straight from shared memory through matrix descriptors).
// Compiled at run time by NVRTC (src/cuda/compile.rs); specialised by the defines below, which the host
// passes as -D options (src/cuda/forward.rs). Self-contained: no CUDA headers, so NVRTC needs no include
// path. f32 accumulation, base-2 online softmax, O and natural-log LSE out.
//
// One CTA per (query tile, head, batch); tiles in reverse order (longest lists first). The CTA walks its
// MergeQ tile list (`row_ptr`, `entries` = [kv_block, rowmask] pairs, src/plan/mergeq.rs) in chunks of
// BLOCK_K keys, prefetching the next chunk's K and V (cp.async, two stages) while it computes this one.
// Each warp owns ROWS_PER_WARP consecutive query rows, so it can skip a chunk that its rows don't attend
// (row masks, causality) and only masks chunks that need it (causal diagonal, partial block, row masks).

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BLOCK_Q
#define BLOCK_Q 128
#endif
#ifndef BLOCK_K
#define BLOCK_K 64
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef IS_BF16
#define IS_BF16 0
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 2
#endif
#ifndef USE_WGMMA
#define USE_WGMMA 0
#endif
#ifndef RESCALE_VOTE
#define RESCALE_VOTE 1
#endif
#ifndef TREE_REDUCE
#define TREE_REDUCE 1
#endif

#define NT (WARPS * 32)
#if USE_WGMMA
// Two warpgroups of 64 rows; each warp holds the accumulators of 16 of its warpgroup's rows.
#define GROUP_ROWS 64
#define MT 1
#define KV_STAGE (BLOCK_K * HEAD_DIM)  // K/V chunk in core-matrix order (8 rows x 16 bytes each)
#if WARPS != 8 || BLOCK_Q != 128 || BLOCK_K != 64 || (HEAD_DIM != 64 && HEAD_DIM != 128)
#error "the wgmma kernel is built for 8 warps, 128 x 64 tiles and head dims 64 / 128"
#endif
#else
#define ROWS_PER_WARP (BLOCK_Q / WARPS)
#define GROUP_ROWS ROWS_PER_WARP
#define MT (ROWS_PER_WARP / 16)     // 16-row mma tiles per warp
#define KV_STAGE (BLOCK_K * LDS)
#endif
#define NK (BLOCK_K / 8)            // 8-key score tiles per chunk
#define ND (HEAD_DIM / 8)           // 8-wide output tiles
#define KD (HEAD_DIM / 16)          // k-steps of Q K^T
#define KK (BLOCK_K / 16)           // k-steps of P V
#define LDS (HEAD_DIM + 8)          // smem row stride (elements): 16 B of padding keeps ldmatrix conflict-free
#define CPR (HEAD_DIM / 8)          // 16-byte chunks per row

#if (GROUP_ROWS % 16) != 0 || MT < 1 || MT > 2
#error "BLOCK_Q / WARPS must be 16 or 32"
#endif
#if (HEAD_DIM % 16) != 0 || (BLOCK_K % 16) != 0
#error "HEAD_DIM and BLOCK_K must be multiples of 16"
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define ROWMASK_BITS 0x80000000u

#if IS_BF16
#define MMA_TYPE "bf16"
#else
#define MMA_TYPE "f16"
#endif

struct Params {
    const u16* q;          // [batch, seq, heads, D] (token stride q_tok, batch stride q_batch), elements
    const u16* k;          // [batch, seq, kv_heads, D]
    const u16* v;
    u16* o;                // [batch, seq, heads, D]
    float* lse;            // [batch, heads, seq]
    const u32* row_ptr;    // patterns * tiles + 1
    const u32* entries;    // [kv_block, rowmask] pairs
    long long q_tok, q_batch;
    long long kv_tok, kv_batch;
    long long o_tok, o_batch;
    long long lse_batch;   // elements between batches of LSE (heads * seq when contiguous)
    u32 seq_len;
    u32 num_heads;
    u32 kv_group;          // query heads per KV head
    u32 heads_per_pattern;
    u32 tiles;
    u32 block_size;
    u32 causal;
    float scale_log2;      // softmax scale * log2(e)
};

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    int bytes = valid ? 16 : 0;  // 0: zero-fill the destination
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if IS_BF16
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two f32 -> one register of two 16-bit values, `lo` in the low half.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fast_log2(float x) {
    float y;
    asm("lg2.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

#if USE_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Pins accumulator registers at this point, so that no access to them moves across an async MMA's issue/wait.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory matrix descriptor, no swizzle: 8 x 16-byte core matrices, `lbo` bytes apart along K and
// `sbo` bytes apart along M/N (the roles the PTX ISA gives them for K-major and, with the transpose bit,
// MN-major operands in the interleaved layout).
__device__ __forceinline__ u64 make_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)((lbo >> 4) & 0x3FFFu) << 16) | ((u64)((sbo >> 4) & 0x3FFFu) << 32);
}

// D[64 x 64] (+)= A[64 x 16] (registers, mma.sync A layout per warp) * B[16 x 64] (shared memory,
// descriptor); `accumulate` 0 overwrites D. Asynchronous: fence before, commit + wait after.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_n64(float* d, const u32 (&a)[4], u64 desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPE "." MMA_TYPE " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
}

// D[64 x 128] (+)= A[64 x 16] (registers, mma.sync A layout per warp) * B[16 x 128] (shared memory,
// descriptor); `accumulate` 0 overwrites D. Asynchronous: fence before, commit + wait after.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_n128(float* d, const u32 (&a)[4], u64 desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));
}
#endif

#define NEG_INF __int_as_float(0xff800000)

// Max / sum over one row's 2 * CNT scores (score tiles LO .. LO + CNT - 1, row half h). With TREE_REDUCE a
// pairwise tree (log2 dependent steps instead of 2 * CNT: the softmax row reductions were latency-bound),
// else left to right.
template <int LO, int CNT>
__device__ __forceinline__ float row_max(const float (&s)[NK][4], int h) {
    if constexpr (CNT == 1) {
        return fmaxf(s[LO][2 * h], s[LO][2 * h + 1]);
    } else if constexpr (TREE_REDUCE) {
        return fmaxf(row_max<LO, CNT / 2>(s, h), row_max<LO + CNT / 2, CNT / 2>(s, h));
    } else {
        return fmaxf(row_max<LO, CNT - 1>(s, h), row_max<LO + CNT - 1, 1>(s, h));
    }
}
template <int LO, int CNT>
__device__ __forceinline__ float row_sum(const float (&s)[NK][4], int h) {
    if constexpr (CNT == 1) {
        return s[LO][2 * h] + s[LO][2 * h + 1];
    } else if constexpr (TREE_REDUCE) {
        return row_sum<LO, CNT / 2>(s, h) + row_sum<LO + CNT / 2, CNT / 2>(s, h);
    } else {
        return row_sum<LO, CNT - 1>(s, h) + row_sum<LO + CNT - 1, 1>(s, h);
    }
}

// Whether tile row `r` attends the entry's block (before causality).
__device__ __forceinline__ bool row_attends(u32 rm, u32 r, u32 bs) {
    return (rm & ROWMASK_BITS) ? ((rm >> (r / bs)) & 1u) : (r < rm);
}

// Rows [r0, r0 + n) against a row mask: bit 0 = some row attends, bit 1 = every row attends.
__device__ __forceinline__ int rows_attend(u32 rm, u32 r0, u32 n, u32 bs) {
    if (rm & ROWMASK_BITS) {
        u32 lo = r0 / bs, hi = (r0 + n - 1) / bs;
        u32 want = ((hi >= 31u) ? 0x7fffffffu : ((1u << (hi + 1)) - 1u)) & ~((1u << lo) - 1u);
        u32 got = rm & want;
        return (got != 0u ? 1 : 0) | (got == want ? 2 : 0);
    }
    return (r0 < rm ? 1 : 0) | (r0 + n <= rm ? 2 : 0);
}

struct Walk {
    u32 e, e_end, c;  // entry, end, sub-chunk within the entry's block
};

// Advances `w` (inclusive) to the next chunk this tile computes; false when the list is exhausted.
__device__ __forceinline__ bool next_chunk(Walk& w, const Params& p, u32 row_last) {
    while (w.e < w.e_end) {
        u32 kb = p.entries[2 * w.e];
        u32 k0 = kb * p.block_size + w.c * BLOCK_K;
        if (k0 < p.seq_len && !(p.causal && k0 > row_last)) return true;
        // Later sub-chunks of this block lie further right: skip to the next entry.
        w.e++;
        w.c = 0;
    }
    return false;
}

__device__ __forceinline__ void step_chunk(Walk& w, const Params& p) {
    if (++w.c == p.block_size / BLOCK_K) {
        w.c = 0;
        w.e++;
    }
}

// Stages rows [tok0, tok0 + rows) of one head into smem (row stride LDS); rows past seq are zero-filled.
template <int ROWS>
__device__ __forceinline__ void load_rows(u16* dst, const u16* base, long long tok_stride, u32 tok0, u32 seq,
                                          int tid) {
    constexpr int N = ROWS * CPR;
    if constexpr (NT % CPR == 0) {
        // Each thread copies one 16-byte column `c` of rows r, r + NT / CPR, ...
        constexpr int STEP = NT / CPR;
        constexpr int ITERS = (ROWS + STEP - 1) / STEP;
        const int c = tid % CPR, r = tid / CPR;
        u32 tok = tok0 + r;
        const u16* src = base + (long long)tok * tok_stride + c * 8;
        u32 dst_addr = smem_addr(dst + r * LDS + c * 8);
#pragma unroll 4
        for (int j = 0; j < ITERS; ++j) {
            if (ROWS % STEP == 0 || r + j * STEP < ROWS) cp_async16(dst_addr, tok < seq ? src : base, tok < seq);
            tok += STEP;
            src += STEP * tok_stride;
            dst_addr += STEP * LDS * 2;
        }
    } else {
#pragma unroll 1
        for (int i = tid; i < N; i += NT) {
            int r = i / CPR, c = i % CPR;
            u32 tok = tok0 + r;
            bool ok = tok < seq;
            const u16* src = base + (ok ? (long long)tok * tok_stride : 0) + c * 8;
            cp_async16(smem_addr(dst + r * LDS + c * 8), src, ok);
        }
    }
}

#if USE_WGMMA
// Stages ROWS key rows of one head in core-matrix order: the 16-byte chunk (row r, column chunk c) lands at
// chunk index ((r / 8) * CPR + c) * 8 + r % 8, so each 8 x 16-byte core matrix is 128 contiguous bytes.
// Thread i copies chunk i of that order: writes are contiguous, and the 8 rows of one core matrix are read
// by 8 neighbouring lanes. Rows past seq are zero-filled.
template <int ROWS>
__device__ __forceinline__ void load_kv(u16* dst, const u16* base, long long tok_stride, u32 tok0, u32 seq,
                                        int tid) {
    constexpr int N = ROWS * CPR;
    static_assert(N % NT == 0, "whole chunks per thread");
#pragma unroll
    for (int j = 0; j < N / NT; ++j) {
        int i = tid + j * NT;
        int r = (i / (8 * CPR)) * 8 + i % 8, c = (i / 8) % CPR;
        u32 tok = tok0 + r;
        bool ok = tok < seq;
        const u16* src = base + (ok ? (long long)tok * tok_stride : 0) + c * 8;
        cp_async16(smem_addr(dst + i * 8), src, ok);
    }
}
#else
template <int ROWS>
__device__ __forceinline__ void load_kv(u16* dst, const u16* base, long long tok_stride, u32 tok0, u32 seq,
                                        int tid) {
    load_rows<ROWS>(dst, base, tok_stride, tok0, seq, tid);
}
#endif

extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) s2_forward(const Params p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* q_s = (u16*)smem_raw;                   // [BLOCK_Q][LDS]
    u16* k_s = q_s + BLOCK_Q * LDS;              // [2][KV_STAGE]
    u16* v_s = k_s + 2 * KV_STAGE;               // [2][KV_STAGE]

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const u32 tile = p.tiles - 1u - blockIdx.x;
    const u32 head = blockIdx.y;
    const u32 b = blockIdx.z;
    const u32 kvh = head / p.kv_group;
    const u32 pattern = head / p.heads_per_pattern;
    const u32 row0 = tile * BLOCK_Q;
    const u32 seq = p.seq_len;
    const u32 row_last = min(row0 + BLOCK_Q, seq) - 1u;

    const u16* qg = p.q + (long long)b * p.q_batch + (long long)head * HEAD_DIM;
    const u16* kg = p.k + (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;
    const u16* vg = p.v + (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;

    const u32 slot = pattern * p.tiles + tile;
    Walk cur;
    cur.e = p.row_ptr[slot];
    cur.e_end = p.row_ptr[slot + 1];
    cur.c = 0;
    bool has_cur = next_chunk(cur, p, row_last);

    // Per-thread state: rows g and g+8 of each of the warp's MT tiles.
    const int g = lane / 4, t = lane % 4;
#if USE_WGMMA
    const u32 gr0 = (warp / 4) * GROUP_ROWS;     // first tile row of this warp's warpgroup
    const u32 wr0 = gr0 + (warp % 4) * 16;       // first tile row of this warp's accumulators
    u32 qa[KD][4];                               // this warp's Q rows as wgmma A fragments
#else
    const u32 wr0 = warp * ROWS_PER_WARP;        // first tile row of this warp
    const u32 gr0 = wr0;
#endif
    float o_acc[MT][ND][4];
    float row_m[MT][2], row_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < ND; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) o_acc[mt][n][i] = 0.f;
        row_m[mt][0] = row_m[mt][1] = NEG_INF;
        row_l[mt][0] = row_l[mt][1] = 0.f;
    }

    load_rows<BLOCK_Q>(q_s, qg, p.q_tok, row0, seq, tid);
    if (has_cur) {
        u32 k0 = p.entries[2 * cur.e] * p.block_size + cur.c * BLOCK_K;
        load_kv<BLOCK_K>(k_s, kg, p.kv_tok, k0, seq, tid);
        load_kv<BLOCK_K>(v_s, vg, p.kv_tok, k0, seq, tid);
    }
    cp_async_commit();

    Walk nxt = cur;
    bool has_nxt = false;
    if (has_cur) {
        step_chunk(nxt, p);
        has_nxt = next_chunk(nxt, p, row_last);
    }

    const u32 q_base = smem_addr(q_s);
    int stage = 0;
#if USE_WGMMA
    bool first = true;
#endif
    while (has_cur) {
        // Prefetch the next chunk into the other stage (its last readers passed the barrier below).
        if (has_nxt) {
            u32 k1 = p.entries[2 * nxt.e] * p.block_size + nxt.c * BLOCK_K;
            load_kv<BLOCK_K>(k_s + (stage ^ 1) * KV_STAGE, kg, p.kv_tok, k1, seq, tid);
            load_kv<BLOCK_K>(v_s + (stage ^ 1) * KV_STAGE, vg, p.kv_tok, k1, seq, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
#if USE_WGMMA
        // cp.async wrote through the generic proxy; the tensor cores read through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
        __syncthreads();
#if USE_WGMMA
        if (first) {
            first = false;
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) {
                u32 row = wr0 + (lane % 16);
                u32 col = kd * 16 + (lane / 16) * 8;
                ldmatrix_x4(qa[kd], q_base + (row * LDS + col) * 2);
            }
        }
#endif

        const u32 rm = p.entries[2 * cur.e + 1];
        const u32 k0 = p.entries[2 * cur.e] * p.block_size + cur.c * BLOCK_K;
        // Skip decisions are uniform over the group (warp, or warpgroup for wgmma) of rows gr0.. .
        const u32 gq0 = row0 + gr0;  // first query token of the group
        int att = rows_attend(rm, gr0, GROUP_ROWS, p.block_size);
        bool skip = (att & 1) == 0 || gq0 >= seq || (p.causal && k0 > gq0 + GROUP_ROWS - 1u);
        if (!skip) {
            bool need_mask = (att & 2) == 0 || k0 + BLOCK_K > seq || (p.causal && k0 + BLOCK_K - 1u > gq0);
            const u32 k_base = smem_addr(k_s + stage * KV_STAGE);
            const u32 v_base = smem_addr(v_s + stage * KV_STAGE);

            // S = Q K^T for this warp's rows.
            float s[MT][NK][4];
#if USE_WGMMA
            // K chunk as B (K-major): 16-byte chunks of one key row are 128 bytes apart along d (LBO), key
            // groups of 8 are CPR * 128 bytes apart (SBO); each k-step of 16 columns advances 256 bytes.
            fence_regs<NK * 4>(&s[0][0][0]);
            wgmma_fence();
#pragma unroll
            for (int kd = 0; kd < KD; ++kd)
                wgmma_n64<0>(&s[0][0][0], qa[kd], make_desc(k_base + kd * 256, 128, CPR * 128), kd > 0);
            wgmma_commit();
            wgmma_wait();
            fence_regs<NK * 4>(&s[0][0][0]);
#else
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NK; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) s[mt][n][i] = 0.f;
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    u32 row = wr0 + mt * 16 + (lane % 16);
                    u32 col = kd * 16 + (lane / 16) * 8;
                    ldmatrix_x4(a[mt], q_base + (row * LDS + col) * 2);
                }
#pragma unroll
                for (int np = 0; np < NK / 2; ++np) {
                    u32 bf[4];
                    u32 key = np * 16 + (lane % 8) + (lane / 16) * 8;
                    u32 col = kd * 16 + ((lane / 8) % 2) * 8;
                    ldmatrix_x4(bf, k_base + (key * LDS + col) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(s[mt][2 * np], a[mt], bf[0], bf[1]);
                        mma16816(s[mt][2 * np + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }

#endif

            if (need_mask) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        u32 tr = wr0 + mt * 16 + g + h * 8;
                        u32 qi = row0 + tr;
                        bool row_ok = row_attends(rm, tr, p.block_size);
#pragma unroll
                        for (int n = 0; n < NK; ++n)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                u32 kj = k0 + n * 8 + 2 * t + e;
                                bool ok = row_ok && kj < seq && !(p.causal && kj > qi);
                                if (!ok) s[mt][n][2 * h + e] = NEG_INF;
                            }
                    }
            }

            // Online softmax (base 2, scale folded in), then P V.
            float alpha[MT][2];
            bool rescale = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float mx = row_max<0, NK>(s[mt], h);
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    float m_new = fmaxf(row_m[mt][h], mx * p.scale_log2);
                    float m_use = (m_new == NEG_INF) ? 0.f : m_new;
                    alpha[mt][h] = fast_exp2(row_m[mt][h] - m_use);
                    rescale |= m_new != row_m[mt][h];
                    row_m[mt][h] = m_new;
#pragma unroll
                    for (int n = 0; n < NK; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            float x = fast_exp2(fmaf(s[mt][n][2 * h + e], p.scale_log2, -m_use));
                            s[mt][n][2 * h + e] = x;
                        }
                    float sum = row_sum<0, NK>(s[mt], h);
                    row_l[mt][h] = row_l[mt][h] * alpha[mt][h] + sum;
                }
            // Once the running maxima settle (most chunks of a long list), alpha is 1 for every row of the
            // warp and the rescale of O is skipped (a warp-uniform branch).
            if (!RESCALE_VOTE || __any_sync(0xffffffffu, rescale)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int n = 0; n < ND; ++n) {
                            o_acc[mt][n][2 * h] *= alpha[mt][h];
                            o_acc[mt][n][2 * h + 1] *= alpha[mt][h];
                        }
            }

#if USE_WGMMA
            // O += P V, V chunk as B with the transpose bit (N-major): key groups of 8 (K) are CPR * 128
            // bytes apart (LBO), d groups of 8 (N) 128 bytes apart (SBO); each k-step of 16 keys advances
            // two key groups.
            // P is packed before the fence: wgmma may read its A registers only after one.
            u32 pa[KK][4];
#pragma unroll
            for (int kk = 0; kk < KK; ++kk) {
                pa[kk][0] = pack2(s[0][2 * kk][0], s[0][2 * kk][1]);
                pa[kk][1] = pack2(s[0][2 * kk][2], s[0][2 * kk][3]);
                pa[kk][2] = pack2(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]);
                pa[kk][3] = pack2(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3]);
                asm volatile("" : "+r"(pa[kk][0]), "+r"(pa[kk][1]), "+r"(pa[kk][2]), "+r"(pa[kk][3])::"memory");
            }
            fence_regs<ND * 4>(&o_acc[0][0][0]);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KK; ++kk) {
#if HEAD_DIM == 128
                wgmma_n128<1>(&o_acc[0][0][0], pa[kk], make_desc(v_base + kk * 2 * CPR * 128, CPR * 128, 128), 1);
#else
                wgmma_n64<1>(&o_acc[0][0][0], pa[kk], make_desc(v_base + kk * 2 * CPR * 128, CPR * 128, 128), 1);
#endif
            }
            wgmma_commit();
            wgmma_wait();
            fence_regs<ND * 4>(&o_acc[0][0][0]);
#else
#pragma unroll
            for (int kk = 0; kk < KK; ++kk) {
                u32 pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    pa[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < ND / 2; ++dp) {
                    u32 bf[4];
                    u32 key = kk * 16 + (lane % 16);
                    u32 col = dp * 16 + (lane / 16) * 8;
                    ldmatrix_x4_trans(bf, v_base + (key * LDS + col) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(o_acc[mt][2 * dp], pa[mt], bf[0], bf[1]);
                        mma16816(o_acc[mt][2 * dp + 1], pa[mt], bf[2], bf[3]);
                    }
                }
            }
#endif
        }
        __syncthreads();  // every warp is done with this stage before it is refilled

        cur = nxt;
        has_cur = has_nxt;
        if (has_nxt) {
            step_chunk(nxt, p);
            has_nxt = next_chunk(nxt, p, row_last);
        }
        stage ^= 1;
    }
    cp_async_wait<0>();
    __syncthreads();

    // Epilogue: O / l through smem (q_s) for 16-byte stores; LSE from lane t == 0 of each quad.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = row_l[mt][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            float inv = l > 0.f ? 1.f / l : 0.f;
            u32 tr = wr0 + mt * 16 + g + h * 8;
#pragma unroll
            for (int n = 0; n < ND; ++n) {
                u32 v2 = pack2(o_acc[mt][n][2 * h] * inv, o_acc[mt][n][2 * h + 1] * inv);
                *(u32*)(q_s + tr * LDS + n * 8 + 2 * t) = v2;
            }
            u32 qi = row0 + tr;
            if (t == 0 && qi < seq) {
                float lse = l > 0.f ? (row_m[mt][h] + fast_log2(l)) * 0.6931471805599453f : NEG_INF;
                p.lse[(long long)b * p.lse_batch + (long long)head * seq + qi] = lse;
            }
        }
    __syncthreads();
    u16* og = p.o + (long long)b * p.o_batch + (long long)head * HEAD_DIM;
#pragma unroll
    for (int j = 0; j < (BLOCK_Q * CPR + NT - 1) / NT; ++j) {
        int i = tid + j * NT;
        if (BLOCK_Q * CPR % NT != 0 && i >= BLOCK_Q * CPR) break;
        int r = i / CPR, c = i % CPR;
        u32 tok = row0 + r;
        if (tok < seq) {
            uint4 x = *(const uint4*)(q_s + r * LDS + c * 8);
            *(uint4*)(og + (long long)tok * p.o_tok + c * 8) = x;
        }
    }
}
