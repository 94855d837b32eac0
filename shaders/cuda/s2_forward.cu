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
//
// Non-finite inputs: not exact here (a masked P = 0 times a non-finite V inside an MMA is NaN; a row whose
// keys all score -inf comes out 0). The epilogue sets `flag` when it writes a non-finite O or LSE, or a row
// with a key has a sum that is not > 0; the exact kernel launched after this one (s2_exact.cu) then redoes the
// op. Nothing is added to the main loop.

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

#if USE_WGMMA
// Warp specialised: WARPS = 8 consumer warps (two warpgroups of 64 rows; each warp holds the accumulators of
// 16 of its warpgroup's rows) plus a producer warpgroup (a whole warpgroup so that setmaxnreg can move its
// registers to the consumers): its 4 warps stage Q with cp.async, one of its threads stages K/V by TMA.
#define NT (WARPS * 32 + 128)
#define PRODUCER_REGS 40
#define CONSUMER_REGS 232  // 4 SM sub-partitions x 16K registers: 1 producer + 2 consumer warps each
#define GROUP_ROWS 64
#define MT 1
#define KV_STAGE (BLOCK_K * HEAD_DIM)  // K/V chunk, 128-byte swizzled
#if WARPS != 8 || BLOCK_Q != 128 || BLOCK_K != 64 || (HEAD_DIM != 64 && HEAD_DIM != 128)
#error "the wgmma kernel is built for 8 consumer warps, 128 x 64 tiles and head dims 64 / 128"
#endif
#define STAGES 4       // K/V ring depth (>= 3: a warpgroup holds chunk j - 1 for its P V while it computes j)
#define Q_BUFS 2       // persistent: the producer stages the next work item's Q while the consumers finish this one
#define PT 128         // producer threads (the whole producer warpgroup)
#else
#define NT (WARPS * 32)
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

// An opaque CUtensorMap (cuTensorMapEncodeTiled on the host; 64-byte aligned in the parameter block).
struct __align__(64) TensorMap {
    u64 opaque[16];
};

struct Params {
    const u16* q;          // [batch, seq, heads, D] (token stride q_tok, batch stride q_batch), elements
    const u16* k;          // [batch, seq, kv_heads, D]
    const u16* v;
    u16* o;                // [batch, seq, heads, D]
    float* lse;            // [batch, heads, seq]
    const u32* row_ptr;    // patterns * tiles + 1
    const u32* entries;    // [kv_block, rowmask] pairs
    u32* flag;             // set to 1 by an epilogue that writes a non-finite O or LSE (s2_exact.cu redoes the op)
    const u32* sched;      // wgmma kernel: work items (item_of's numbering) CTA by CTA, each CTA's in ascending order
    const u32* cta_ptr;    // wgmma kernel: CTA c takes sched[cta_ptr[c] .. cta_ptr[c + 1]] (gridDim.x + 1 offsets)
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
    TensorMap k_map, v_map; // wgmma kernel: K and V as [batch][seq][kv_heads][D] u16, boxes of 64 x 64, 128B swizzle
};

// The PTX pieces; shaders/cuda/emu/sm90.h gives them C++ semantics for the CPU emulation (S2_EMU).
#ifndef S2_EMU
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
#endif

#if USE_WGMMA
#ifndef S2_EMU
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
template <int N>
__device__ __forceinline__ void fence_u32(u32* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// mbarriers (shared-memory u64): init by one thread before a CTA barrier; arrive has release, try_wait acquire
// semantics at CTA scope. A wait on the parity of the phase before the current one returns at once.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` (without raising its expected count) once all cp.async of this thread issued so far landed.
__device__ __forceinline__ void mbar_arrive_cp_async(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` and raises the bytes its phase waits for by `bytes` (the TMA copies complete them).
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// One TMA box of the 4-d tensor map `map` (a __grid_constant__ parameter) at coordinates c0.. (innermost
// first) to shared `dst`, completing `bar` with its byte count.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TensorMap* map, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
__device__ __forceinline__ bool mbar_test(u32 bar, u32 parity) {
    u32 ok;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    return ok != 0;
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    while (!mbar_test(bar, parity)) {
    }
}
// Makes the generic proxy's writes to shared memory that this thread has seen (its stores, its landed cp.async)
// visible to the async proxy (wgmma operands, TMA).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Named barriers over `n` threads (multiples of 32): sync waits, arrive only counts.
__device__ __forceinline__ void named_sync(u32 id, u32 n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_arrive(u32 id, u32 n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
// Pins accumulator registers at this point, so that no access to them moves across an async MMA's issue/wait.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
#endif

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor") of a 128-byte-swizzled operand: start address,
// leading / stride byte offsets (each >> 4), base offset 0 (every swizzle atom is 1024-byte aligned), layout
// type 1 (128-byte swizzle) in bits 62-63. K-major: rows of 128 bytes, `sbo` = 1024 between 8-row groups, `lbo`
// unused (1); MN-major: `lbo` between 64-column atoms along N, `sbo` = 1024 between 8-row groups along K.
// A descriptor's start address field: the shared address in 16-byte units (14 bits).
__device__ __forceinline__ u32 desc_start(u32 addr) { return (addr & 0x3FFFFu) >> 4; }
// The descriptor at start address `start` (desc_start units). A chain's k-steps take `desc_start(base) + bytes / 16`
// with constant bytes: one 32-bit add each (the start stays below 2^14 inside the shared window, so the sum never
// reaches the LBO field), the high word a constant.
__device__ __forceinline__ u64 desc_from(u32 start, u32 lbo, u32 sbo) {
    return (u64)(start + (((lbo >> 4) & 0x3FFFu) << 16)) | ((u64)(((sbo >> 4) & 0x3FFFu) | (1u << 30)) << 32);
}
__device__ __forceinline__ u64 make_desc(u32 addr, u32 lbo, u32 sbo) { return desc_from(desc_start(addr), lbo, sbo); }

#ifndef S2_EMU
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
#endif  // S2_EMU
#endif

#define NEG_INF __int_as_float(0xff800000)

// Max / sum over one row's 2 * CNT scores (score tiles LO .. LO + CNT - 1, row half h) as a pairwise tree
// (log2 dependent steps instead of 2 * CNT: the softmax row reductions are latency-bound).
template <int LO, int CNT>
__device__ __forceinline__ float row_max(const float (&s)[NK][4], int h) {
    if constexpr (CNT == 1) {
        return fmaxf(s[LO][2 * h], s[LO][2 * h + 1]);
    } else {
        return fmaxf(row_max<LO, CNT / 2>(s, h), row_max<LO + CNT / 2, CNT / 2>(s, h));
    }
}
template <int LO, int CNT>
__device__ __forceinline__ float row_sum(const float (&s)[NK][4], int h) {
    if constexpr (CNT == 1) {
        return s[LO][2 * h] + s[LO][2 * h + 1];
    } else {
        return row_sum<LO, CNT / 2>(s, h) + row_sum<LO + CNT / 2, CNT / 2>(s, h);
    }
}

// log2 of a block size (a power of two, src/layout): tile rows to query blocks by a shift, not a division (~35
// instructions a chunk on the bit-mask entries' path); loop-invariant, so the compiler hoists it.
__device__ __forceinline__ u32 block_shift(u32 bs) { return (u32)__ffs(bs) - 1u; }

// Whether tile row `r` attends the entry's block (before causality).
__device__ __forceinline__ bool row_attends(u32 rm, u32 r, u32 bs) {
    return (rm & ROWMASK_BITS) ? ((rm >> (r >> block_shift(bs))) & 1u) : (r < rm);
}

// Rows [r0, r0 + n) against a row mask: bit 0 = some row attends, bit 1 = every row attends.
__device__ __forceinline__ int rows_attend(u32 rm, u32 r0, u32 n, u32 bs) {
    if (rm & ROWMASK_BITS) {
        const u32 sh = block_shift(bs);
        u32 lo = r0 >> sh, hi = (r0 + n - 1) >> sh;
        u32 want = ((hi >= 31u) ? 0x7fffffffu : ((1u << (hi + 1)) - 1u)) & ~((1u << lo) - 1u);
        u32 got = rm & want;
        return (got != 0u ? 1 : 0) | (got == want ? 2 : 0);
    }
    return (r0 < rm ? 1 : 0) | (r0 + n <= rm ? 2 : 0);
}

struct Walk {
    u32 e, e_end, c;  // entry, end, sub-chunk within the entry's block
};

// The walk over tile list `slot` (pattern * tiles + tile), before its first chunk.
__device__ __forceinline__ Walk walk_start(const Params& p, u32 slot) {
    Walk w;
    w.e = p.row_ptr[slot];
    w.e_end = p.row_ptr[slot + 1];
    w.c = 0;
    return w;
}

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
template <int ROWS, int THREADS = NT>
__device__ __forceinline__ void load_rows(u16* dst, const u16* base, long long tok_stride, u32 tok0, u32 seq,
                                          int tid) {
    constexpr int N = ROWS * CPR;
    if constexpr (THREADS % CPR == 0) {
        // Each thread copies one 16-byte column `c` of rows r, r + THREADS / CPR, ...
        constexpr int STEP = THREADS / CPR;
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
        for (int i = tid; i < N; i += THREADS) {
            int r = i / CPR, c = i % CPR;
            u32 tok = tok0 + r;
            bool ok = tok < seq;
            const u16* src = base + (ok ? (long long)tok * tok_stride : 0) + c * 8;
            cp_async16(smem_addr(dst + r * LDS + c * 8), src, ok);
        }
    }
}

// ---- Pieces shared by both kernels (per warp: MT 16-row tiles, rows g and g + 8 of each per thread) ----

// Sets the scores of keys a row must not see to -inf: row masks, keys past the end, causality.
__device__ __forceinline__ void mask_scores(float (&s)[MT][NK][4], const Params& p, u32 rm, u32 wr0, u32 row0,
                                            u32 k0, int g, int t) {
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
                    bool ok = row_ok && kj < p.seq_len && !(p.causal && kj > qi);
                    if (!ok) s[mt][n][2 * h + e] = NEG_INF;
                }
        }
}

// How far (base 2) a row's maximum may rise above the one its P, sum and O are kept relative to before they are
// rescaled: P then stays below 2^8 (f16, bf16 and the f32 sums hold that with room to spare), and after the first
// chunks of a long list the rescale of O, which a new maximum of any of a warp's rows costs every time, is rare.
#define RESCALE_SLACK 8.f

// Online softmax step (base 2, scale folded in): the scores become probabilities relative to the running maxima
// (each raised only once the row's maximum exceeds it by RESCALE_SLACK), the row sums are updated, `alpha` gets each
// row's rescale factor of O; returns whether any of this thread's running maxima moved.
__device__ __forceinline__ bool softmax_step(float (&s)[MT][NK][4], float (&row_m)[MT][2], float (&row_l)[MT][2],
                                             float (&alpha)[MT][2], float scale_log2) {
    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = row_max<0, NK>(s[mt], h);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(row_m[mt][h], mx * scale_log2);
            if (!(m_new > row_m[mt][h] + RESCALE_SLACK)) m_new = row_m[mt][h];
            float m_use = (m_new == NEG_INF) ? 0.f : m_new;
            alpha[mt][h] = fast_exp2(row_m[mt][h] - m_use);
            rescale |= m_new != row_m[mt][h];
            row_m[mt][h] = m_new;
#pragma unroll
            for (int n = 0; n < NK; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) s[mt][n][2 * h + e] = fast_exp2(fmaf(s[mt][n][2 * h + e], scale_log2, -m_use));
            float sum = row_sum<0, NK>(s[mt], h);
            row_l[mt][h] = row_l[mt][h] * alpha[mt][h] + sum;
        }
    return rescale;
}

// O *= alpha per row. Once the running maxima settle (most chunks of a long list), alpha is 1 for every row
// of the warp and the rescale is skipped (a warp-uniform branch).
__device__ __forceinline__ void rescale_o(float (&o)[MT][ND][4], const float (&alpha)[MT][2], bool rescale) {
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    o[mt][n][2 * h] *= alpha[mt][h];
                    o[mt][n][2 * h + 1] *= alpha[mt][h];
                }
    }
}

// Whether a float is NaN or +-inf (a bit test, so that no float assumption can drop a NaN).
__device__ __forceinline__ bool nonfinite(float x) { return (__float_as_uint(x) & 0x7fffffffu) >= 0x7f800000u; }

// Whether tile row `tr` (token `qi`) of list `slot` has a key: the epilogue's check of a row whose sum is 0,
// which is either a row without keys (O 0, LSE -inf) or one whose keys all scored -inf (NaN). Rare, so a
// walk over the list; scalars, not Params, so that the caller's parameters stay where they are.
__device__ __noinline__ bool row_has_key(const u32* row_ptr, const u32* entries, u32 slot, u32 tr, u32 qi, u32 seq,
                                         u32 bs, u32 causal) {
    for (u32 e = row_ptr[slot]; e < row_ptr[slot + 1]; ++e) {
        const u32 k0 = entries[2 * e] * bs;
        if (k0 < seq && !(causal && k0 > qi) && row_attends(entries[2 * e + 1], tr, bs)) return true;
    }
    return false;
}

// Epilogue, first half: O / l of this warp's rows into smem (`o_s`, row stride LDS, tile rows) and LSE. Sets
// `p.flag` where a row of the sequence comes out non-finite or with a sum that is not > 0 while it has a key:
// the exact kernel (s2_exact.cu) then redoes the op, as IEEE softmax gives non-finite inputs.
__device__ __forceinline__ void finish_rows(u16* o_s, const float (&o)[MT][ND][4], const float (&row_m)[MT][2],
                                            const float (&row_l)[MT][2], const Params& p, u32 wr0, u32 row0,
                                            u32 head, u32 b, int g, int t) {
    bool bad = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = row_l[mt][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            float inv = l > 0.f ? 1.f / l : 0.f;
            u32 tr = wr0 + mt * 16 + g + h * 8;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < ND; ++n) {
                sum += o[mt][n][2 * h] + o[mt][n][2 * h + 1];
                u32 v2 = pack2(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
                *(u32*)(o_s + tr * LDS + n * 8 + 2 * t) = v2;
            }
            u32 qi = row0 + tr;
            if (qi < p.seq_len) {
                // A NaN or inf accumulator or sum is a non-finite output; a zero sum is one where the row has a key.
                if (nonfinite(sum) || nonfinite(l)) {
                    bad = true;
                } else if (!(l > 0.f)) {
                    bad |= row_has_key(p.row_ptr, p.entries, (head / p.heads_per_pattern) * p.tiles + row0 / BLOCK_Q,
                                       tr, qi, p.seq_len, p.block_size, p.causal);
                }
                if (t == 0) {
                    float lse = l > 0.f ? (row_m[mt][h] + fast_log2(l)) * 0.6931471805599453f : NEG_INF;
                    p.lse[(long long)b * p.lse_batch + (long long)head * p.seq_len + qi] = lse;
                }
            }
        }
    if (bad) *p.flag = 1u;
}

// Epilogue, second half: ROWS staged rows from `o_s` (tile rows r0 ..) to global memory, 16 bytes a thread.
template <int ROWS, int THREADS>
__device__ __forceinline__ void store_tile_rows(const u16* o_s, u16* og, long long o_tok, u32 row0, u32 r0, u32 seq,
                                                int tid) {
#pragma unroll
    for (int j = 0; j < (ROWS * CPR + THREADS - 1) / THREADS; ++j) {
        int i = tid + j * THREADS;
        if (ROWS * CPR % THREADS != 0 && i >= ROWS * CPR) break;
        u32 r = r0 + i / CPR, c = i % CPR;
        u32 tok = row0 + r;
        if (tok < seq) {
            uint4 x = *(const uint4*)(o_s + r * LDS + c * 8);
            *(uint4*)(og + (long long)tok * o_tok + c * 8) = x;
        }
    }
}

#if !USE_WGMMA
// ---- mma.sync kernel: 4 (or 8) warps, each ROWS_PER_WARP rows, two cp.async stages, CTA-wide barriers ----
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
    Walk cur = walk_start(p, slot);
    bool has_cur = next_chunk(cur, p, row_last);

    // Per-thread state: rows g and g+8 of each of the warp's MT tiles.
    const int g = lane / 4, t = lane % 4;
    const u32 wr0 = warp * ROWS_PER_WARP;        // first tile row of this warp
    const u32 gr0 = wr0;
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
        load_rows<BLOCK_K>(k_s, kg, p.kv_tok, k0, seq, tid);
        load_rows<BLOCK_K>(v_s, vg, p.kv_tok, k0, seq, tid);
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
    while (has_cur) {
        // Prefetch the next chunk into the other stage (its last readers passed the barrier below).
        if (has_nxt) {
            u32 k1 = p.entries[2 * nxt.e] * p.block_size + nxt.c * BLOCK_K;
            load_rows<BLOCK_K>(k_s + (stage ^ 1) * KV_STAGE, kg, p.kv_tok, k1, seq, tid);
            load_rows<BLOCK_K>(v_s + (stage ^ 1) * KV_STAGE, vg, p.kv_tok, k1, seq, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        const u32 rm = p.entries[2 * cur.e + 1];
        const u32 k0 = p.entries[2 * cur.e] * p.block_size + cur.c * BLOCK_K;
        // Skip decisions are uniform over the warp's rows gr0.. .
        const u32 gq0 = row0 + gr0;  // first query token of the group
        int att = rows_attend(rm, gr0, GROUP_ROWS, p.block_size);
        bool skip = (att & 1) == 0 || gq0 >= seq || (p.causal && k0 > gq0 + GROUP_ROWS - 1u);
        if (!skip) {
            bool need_mask = (att & 2) == 0 || k0 + BLOCK_K > seq || (p.causal && k0 + BLOCK_K - 1u > gq0);
            const u32 k_base = smem_addr(k_s + stage * KV_STAGE);
            const u32 v_base = smem_addr(v_s + stage * KV_STAGE);

            // S = Q K^T for this warp's rows.
            float s[MT][NK][4];
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

            if (need_mask) mask_scores(s, p, rm, wr0, row0, k0, g, t);
            float alpha[MT][2];
            bool rescale = softmax_step(s, row_m, row_l, alpha, p.scale_log2);
            rescale_o(o_acc, alpha, rescale);

            // O += P V.
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
    finish_rows(q_s, o_acc, row_m, row_l, p, wr0, row0, head, b, g, t);
    __syncthreads();
    u16* og = p.o + (long long)b * p.o_batch + (long long)head * HEAD_DIM;
    store_tile_rows<BLOCK_Q, NT>(q_s, og, p.o_tok, row0, 0, seq, tid);
}
#else
// ---- wgmma kernel (sm_90a), warp specialised (FA3-style), persistent ----
// Warps 0-7: two consumer warpgroups of 64 rows each. Warps 8-11: the producer warpgroup. Its 128 threads
// stage Q (Q_BUFS buffers) with cp.async, each its share of the rows, ending with
// cp.async.mbarrier.arrive.noinc on `q_full`; its thread 0 stages the K/V chunks into a ring of STAGES by TMA
// (cp.async.bulk.tensor from the tensor maps in Params), completing `full` by transaction bytes. Consumers
// release stages on `empty` mbarriers (one arrival per consumer warp), so the main loop has no CTA-wide
// barrier. Within a warpgroup S_j = Q K_j^T is issued before P_{j-1} V_{j-1}, so the softmax of S_j runs
// while that P V is on the tensor cores; the warpgroups take turns issuing their GEMMs (ping-pong, named
// barriers 1 and 2), so one's softmax overlaps the other's GEMMs. Grid = SMs: each CTA walks the work items the
// host dealt it (`sched`, `cta_ptr`: in the plain grid's order, each to the CTA with the least work so far, so the
// CTAs finish together). The tile walk, skips and masks are the mma.sync kernel's, per warpgroup (64 rows).

struct Item {
    u32 tile, head, b;
};

// Work item w in the plain grid's order (tile fastest, reversed: longest lists first; then head; batch).
__device__ __forceinline__ Item item_of(u32 w, const Params& p) {
    Item it;
    const u32 per_b = p.tiles * p.num_heads;
    it.b = w / per_b;
    const u32 r = w - it.b * per_b;
    it.head = r / p.tiles;
    it.tile = p.tiles - 1u - (r - it.head * p.tiles);
    return it;
}

// acc += A B over 64 rows of B: A = KK register fragments of 16 columns (P for O += P V; in the backward P^T or dS
// and dS^T), B = 64 rows x HEAD_DIM in shared memory read transposed (N-major, transpose bit: V, or dO, Q, K): a
// k-step of 16 rows is 16 x 128 bytes (2048 bytes), LBO = one 64-column atom (BLOCK_K * 128 bytes), SBO = 8 rows
// (1024). Issue only; commit by caller.
__device__ __forceinline__ void issue_rs_mn(float (&acc)[ND][4], const u32 (&a)[KK][4], u32 b_base) {
    const u32 b0 = desc_start(b_base);
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
#if HEAD_DIM == 128
        wgmma_n128<1>(&acc[0][0], a[kk], desc_from(b0 + kk * 16 * 128 / 16, BLOCK_K * 128, 1024), 1);
#else
        wgmma_n64<1>(&acc[0][0], a[kk], desc_from(b0 + kk * 16 * 128 / 16, BLOCK_K * 128, 1024), 1);
#endif
    }
}

// The accumulators of a 64-column score tile (NK 8-column tiles, a warp's 16 rows) as KK wgmma A fragments of 16
// columns each, rounded to the storage type.
__device__ __forceinline__ void pack_frags(u32 (&a)[KK][4], const float (&s)[NK][4]) {
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
        a[kk][0] = pack2(s[2 * kk][0], s[2 * kk][1]);
        a[kk][1] = pack2(s[2 * kk][2], s[2 * kk][3]);
        a[kk][2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[kk][3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

/// One P V product issued and waited for at once (no chunk left to overlap it with), then its K/V stage handed
/// back to the producer: the tail of a skipped chunk's pending P V and the last chunk. Issue and wait stay in
/// one branch (split by a barrier, ptxas serialises every wgmma: C7518).
__device__ __forceinline__ void pv_now_and_release(float (&o)[MT][ND][4], u32 (&pa)[KK][4], u32 v_base,
                                                   u32 empty_bar, int lane) {
    wgmma_fence();
    issue_rs_mn(o[0], pa, v_base);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<ND * 4>(&o[0][0][0]);
    fence_u32<KK * 4>(&pa[0][0]);
    __syncwarp();
    if (lane == 0) mbar_arrive(empty_bar);
}

#if (BLOCK_Q * LDS * 2) % 1024 != 0 || (KV_STAGE * 2) % 1024 != 0
#error "Q buffers and K/V stages must keep the 1024-byte alignment of the swizzle atoms"
#endif
// 168 registers a thread at entry (384 threads, 1 CTA per SM); setmaxnreg then gives the producer
// warpgroup PRODUCER_REGS and the consumers CONSUMER_REGS (FA3's split).
extern "C" __global__ void __launch_bounds__(NT, 1) s2_forward(const __grid_constant__ Params p) {
    extern __shared__ __align__(1024) unsigned char smem_raw_[];
    // Swizzle atoms must be 1024-byte aligned in the shared window (the host adds 1 KB of slack); Q_BUFS Q
    // buffers are multiples of 1024 bytes, so every K / V stage is too.
    unsigned char* smem_raw = smem_raw_ + ((1024u - (smem_addr(smem_raw_) & 1023u)) & 1023u);
    u16* q_s = (u16*)smem_raw;                   // [Q_BUFS][BLOCK_Q][LDS]
    u16* k_s = q_s + Q_BUFS * BLOCK_Q * LDS;     // [STAGES][KV_STAGE]
    u16* v_s = k_s + STAGES * KV_STAGE;          // [STAGES][KV_STAGE]
    u64* bars = (u64*)(v_s + STAGES * KV_STAGE); // full[STAGES], empty[STAGES], q_full[Q_BUFS], q_empty[Q_BUFS]
    const u32 full0 = smem_addr(bars), empty0 = full0 + 8 * STAGES;
    const u32 qfull0 = empty0 + 8 * STAGES, qempty0 = qfull0 + 8 * Q_BUFS;

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const u32 seq = p.seq_len;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);          // the TMA issuer's arrival (plus the stage's bytes)
            mbar_init(empty0 + 8 * s, WARPS);     // one arrival per consumer warp
        }
        for (int s = 0; s < Q_BUFS; ++s) {
            mbar_init(qfull0 + 8 * s, PT);        // one arrival per producer thread
            mbar_init(qempty0 + 8 * s, WARPS);
        }
    }
    __syncthreads();  // the only CTA-wide barrier

    if (warp >= WARPS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
        // Always true (NT threads); the bound narrows the compiler's index arithmetic of the Q copies.
        if (tid < NT) {
            // Producer: every thread walks the same items and chunks, copying its share (ptid) of every Q buffer;
            // thread 0 also issues the K/V stages' TMA copies.
            const int ptid = tid - WARPS * 32;
            u32 i = 0, n = 0;
            const u32 j_end = p.cta_ptr[blockIdx.x + 1];
            for (u32 j = p.cta_ptr[blockIdx.x]; j < j_end; ++j, ++n) {
                const Item it = item_of(p.sched[j], p);
                const u32 kvh = it.head / p.kv_group;
                const u32 row0 = it.tile * BLOCK_Q;
                const u32 row_last = min(row0 + BLOCK_Q, seq) - 1u;
                const u16* qg = p.q + (long long)it.b * p.q_batch + (long long)it.head * HEAD_DIM;
                const u32 qb = n % Q_BUFS;
                mbar_wait(qempty0 + 8 * qb, ((n / Q_BUFS) & 1u) ^ 1u);
                load_rows<BLOCK_Q, PT>(q_s + qb * BLOCK_Q * LDS, qg, p.q_tok, row0, seq, ptid);
                mbar_arrive_cp_async(qfull0 + 8 * qb);

                const u32 slot = (it.head / p.heads_per_pattern) * p.tiles + it.tile;
                Walk wk = walk_start(p, slot);
                bool has = next_chunk(wk, p, row_last);
                while (has) {
                    const u32 s = i % STAGES;
                    mbar_wait(empty0 + 8 * s, ((i / STAGES) & 1u) ^ 1u);
                    const u32 k0 = p.entries[2 * wk.e] * p.block_size + wk.c * BLOCK_K;
                    // One box per 64-column atom of K and of V (BLOCK_K rows x 128 bytes, 1024-byte aligned), written
                    // 128-byte swizzled (the 16-byte chunk c of row r lands at chunk c ^ (r % 8) of that row), the
                    // layout the descriptors read; rows past seq come back zero.
                    if (ptid == 0) {
                        mbar_arrive_expect_tx(full0 + 8 * s, 2 * KV_STAGE * 2);
#pragma unroll
                        for (int a = 0; a < HEAD_DIM / 64; ++a) {
                            const u32 off = a * BLOCK_K * 128;
                            tma_load_4d(smem_addr(k_s + s * KV_STAGE) + off, &p.k_map, a * 64, kvh, k0, it.b,
                                        full0 + 8 * s);
                            tma_load_4d(smem_addr(v_s + s * KV_STAGE) + off, &p.v_map, a * 64, kvh, k0, it.b,
                                        full0 + 8 * s);
                        }
                    }
                    ++i;
                    step_chunk(wk, p);
                    has = next_chunk(wk, p, row_last);
                }
            }
            cp_async_wait<0>();
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
        // Consumer warpgroups.
        const int wg = warp / 4;
        const int g = lane / 4, t = lane % 4;
        const u32 gr0 = wg * GROUP_ROWS;             // first tile row of this warpgroup
        const u32 wr0 = gr0 + (warp % 4) * 16;       // first tile row of this warp's accumulators
        if (wg == 1) named_arrive(1, 2 * 128);       // warpgroup 0 issues first
        u32 i = 0, n = 0;
        const u32 j_end = p.cta_ptr[blockIdx.x + 1];
        for (u32 j = p.cta_ptr[blockIdx.x]; j < j_end; ++j, ++n) {
            const Item it = item_of(p.sched[j], p);
            const u32 row0 = it.tile * BLOCK_Q;
            const u32 row_last = min(row0 + BLOCK_Q, seq) - 1u;
            const u32 gq0 = row0 + gr0;              // first query token of the warpgroup
            const u32 qb = n % Q_BUFS;
            u16* qbuf = q_s + qb * BLOCK_Q * LDS;

            float o_acc[MT][ND][4];
            float row_m[MT][2], row_l[MT][2];
#pragma unroll
            for (int nd = 0; nd < ND; ++nd)
#pragma unroll
                for (int e = 0; e < 4; ++e) o_acc[0][nd][e] = 0.f;
            row_m[0][0] = row_m[0][1] = NEG_INF;
            row_l[0][0] = row_l[0][1] = 0.f;

            mbar_wait(qfull0 + 8 * qb, (n / Q_BUFS) & 1u);
            u32 qa[KD][4];                           // this warp's Q rows as wgmma A fragments
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) {
                u32 row = wr0 + (lane % 16);
                u32 col = kd * 16 + (lane / 16) * 8;
                ldmatrix_x4(qa[kd], smem_addr(qbuf) + (row * LDS + col) * 2);
            }

            const u32 slot = (it.head / p.heads_per_pattern) * p.tiles + it.tile;
            Walk cur = walk_start(p, slot);
            bool has = next_chunk(cur, p, row_last);

            bool have_p = false;  // P of an earlier chunk waits for its P V
            u32 p_stage = 0;
            u32 pp[KK][4];        // that P; zeros while there is none
#pragma unroll
            for (int kk = 0; kk < KK; ++kk)
#pragma unroll
                for (int e = 0; e < 4; ++e) pp[kk][e] = 0u;
            while (has) {
                const u32 s = i % STAGES;
                const u32 rm = p.entries[2 * cur.e + 1];
                const u32 k0 = p.entries[2 * cur.e] * p.block_size + cur.c * BLOCK_K;
                const int att = rows_attend(rm, gr0, GROUP_ROWS, p.block_size);
                const bool skip = (att & 1) == 0 || gq0 >= seq || (p.causal && k0 > gq0 + GROUP_ROWS - 1u);
                const bool need_mask =
                    (att & 2) == 0 || k0 + BLOCK_K > seq || (p.causal && k0 + BLOCK_K - 1u > gq0);
                mbar_wait(full0 + 8 * s, (i / STAGES) & 1u);
                if (skip) {
                    // Never hold a stage across a skipped chunk (the producer may need it next): finish a pending
                    // P V.
                    if (have_p) {
                        fence_regs<ND * 4>(&o_acc[0][0][0]);
                        pv_now_and_release(o_acc, pp, smem_addr(v_s + p_stage * KV_STAGE), empty0 + 8 * p_stage, lane);
                        have_p = false;
#pragma unroll
                        for (int kk = 0; kk < KK; ++kk)
#pragma unroll
                            for (int e = 0; e < 4; ++e) pp[kk][e] = 0u;
                    }
                    named_sync(1 + wg, 2 * 128);
                    named_arrive(2 - wg, 2 * 128);
                    __syncwarp();
                    if (lane == 0) mbar_arrive(empty0 + 8 * s);
                } else {
                    const u32 k_base = smem_addr(k_s + s * KV_STAGE);
                    float sc[MT][NK][4];
                    // The P V of the previous chunk goes right after S; on a tile's first chunk (or after a
                    // flush) it is a P V of zeros against this chunk's V, which keeps the wgmma sequence
                    // unconditional (a conditional issue makes ptxas serialise every wgmma: C7520).
                    if (!have_p) p_stage = s;
                    fence_regs<NK * 4>(&sc[0][0][0]);
                    fence_regs<ND * 4>(&o_acc[0][0][0]);
                    fence_u32<KK * 4>(&pp[0][0]);
                    named_sync(1 + wg, 2 * 128);
                    wgmma_fence();
                    // S = Q K^T; K chunk as B (K-major): a k-step of 16 columns advances the start 32 bytes inside
                    // a 128-byte row (the hardware applies the XOR to the resulting addresses), every 4 k-steps
                    // the next 64-column atom (BLOCK_K * 128 bytes); SBO = 8 rows (1024), LBO unused (16).
                    const u32 k16 = desc_start(k_base);
#pragma unroll
                    for (int kd = 0; kd < KD; ++kd)
                        wgmma_n64<0>(&sc[0][0][0], qa[kd],
                                     desc_from(k16 + ((kd / 4) * (BLOCK_K * 128) + (kd % 4) * 32) / 16, 16, 1024), kd > 0);
                    wgmma_commit();
                    issue_rs_mn(o_acc[0], pp, smem_addr(v_s + p_stage * KV_STAGE));
                    wgmma_commit();
                    named_arrive(2 - wg, 2 * 128);
                    wgmma_wait<1>();
                    fence_regs<NK * 4>(&sc[0][0][0]);

                    if (need_mask) mask_scores(sc, p, rm, wr0, row0, k0, g, t);
                    float alpha[MT][2];
                    const bool rescale = softmax_step(sc, row_m, row_l, alpha, p.scale_log2);
                    wgmma_wait<0>();
                    fence_regs<ND * 4>(&o_acc[0][0][0]);
                    fence_u32<KK * 4>(&pp[0][0]);
                    if (have_p) {
                        __syncwarp();
                        if (lane == 0) mbar_arrive(empty0 + 8 * p_stage);
                    }
                    rescale_o(o_acc, alpha, rescale);
                    // P straight into the registers the previous P V has finished reading (no copy per chunk).
                    pack_frags(pp, sc[0]);
                    p_stage = s;
                    have_p = true;
                }
                ++i;
                step_chunk(cur, p);
                has = next_chunk(cur, p, row_last);
            }
            // The last chunk's P V.
            fence_u32<KK * 4>(&pp[0][0]);
            fence_regs<ND * 4>(&o_acc[0][0][0]);
            named_sync(1 + wg, 2 * 128);
            if (have_p) {
                pv_now_and_release(o_acc, pp, smem_addr(v_s + p_stage * KV_STAGE), empty0 + 8 * p_stage, lane);
            }
            named_arrive(2 - wg, 2 * 128);

            // Epilogue: this warp's rows of O / l into its own rows of the Q buffer (its Q is in registers),
            // then the warpgroup's 64 rows out; the buffer is released to the producer after every warp's reads.
            finish_rows(qbuf, o_acc, row_m, row_l, p, wr0, row0, it.head, it.b, g, t);
            named_sync(3 + wg, 128);
            u16* og = p.o + (long long)it.b * p.o_batch + (long long)it.head * HEAD_DIM;
            store_tile_rows<GROUP_ROWS, 128>(qbuf, og, p.o_tok, row0, gr0, seq, tid % 128);
            __syncwarp();
            if (lane == 0) mbar_arrive(qempty0 + 8 * qb);
        }
        if (wg == 0) named_sync(1, 2 * 128);          // warpgroup 1's last turn hand-over
    }
}
#endif
