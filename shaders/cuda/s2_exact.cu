// Exact S2 forward and backward for non-finite inputs: scalar f32 kernels (no tensor cores) that give what
// IEEE softmax attention gives where Q, K, V, dO (or the LSE) hold NaN or +-inf, as the portable WGSL
// kernels do (shaders/shared/nonfinite.wgsl, shaders/shared/backward.wgsl): a row whose active scores hold
// a NaN or +inf is NaN (O and LSE); a -inf score contributes nothing; a row whose active keys all score -inf
// is NaN; a masked (query, key) pair contributes nothing to O, dQ, dK or dV, whatever Q, K, V or dO hold.
//
// The tensor-core kernels (s2_forward.cu, s2_backward.cu) are not exact there (a masked P = 0 times a
// non-finite V inside an MMA is NaN; an all -inf row comes out 0): their epilogues set `flag` when anything
// they write is non-finite (or a row with a key has a sum that is not > 0). These kernels are launched
// after them on every call, a small grid (about 2 CTAs per SM, src/cuda/exact.rs) that reads the flag and
// returns at once when it is clear; when it is set they grid-stride over all the work and overwrite every
// output. Compiled by NVRTC with HEAD_DIM, IS_BF16 and EXACT_PASS (0: the forward kernel, 1: the backward;
// unset: both), EXACT_WARPS (warps per CTA) left at 8; self-contained.
//
// One warp per work item, each lane owning head dims lane, lane + 32, ...: scores 32 keys (or queries) at
// a time, one per lane, into the warp's shared memory, from which every lane reads all 32 (maxima, sums and
// weights in the same order in every lane, so the values agree; few warp barriers, cheap to emulate).
//   s2_exact_forward: item = (query row, head, batch) over the forward's MergeQ row list (tiles of
//     `tile_q` rows): online softmax in base 2, O and natural-log LSE.
//   s2_exact_backward: items [0, rows) are (query row, head, batch): D = rowsum(dO * O) and
//     dQ = scale * sum dS K over the MergeQ row list (tiles of `tile_q`); items [rows, rows + keys) are
//     (key, KV head, batch): dV = sum P dO, dK = scale * sum dS Q over the column lists of every query head
//     of the GQA group (query tiles of `col_tile` rows), reading the LSE * log2(e) and D scratch the
//     tensor-core dQ pass wrote (+inf LSE: a row without keys, which contributes nothing).

typedef unsigned int u32;
typedef unsigned short u16;

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef IS_BF16
#define IS_BF16 0
#endif
#ifndef EXACT_WARPS
#define EXACT_WARPS 8
#endif
#if (HEAD_DIM % 32) != 0
#error "HEAD_DIM must be a multiple of 32"
#endif
#define DL (HEAD_DIM / 32)            // head dims per lane
#define EXACT_ROWMASK_BITS 0x80000000u
#define LOG2E_X 1.4426950408889634f
#define LN2_X 0.6931471805599453f

struct ExactParams {
    const u16* q;            // [batch, seq, heads, D] (token stride q_tok, batch stride q_batch)
    const u16* k;            // [batch, seq, kv_heads, D] (kv_tok, kv_batch)
    const u16* v;
    const u16* o;            // backward: the forward's O, like q
    const u16* d_o;          // backward: dL/dO, like q
    u16* out;                // forward: O [batch, seq, heads, D] (o_tok, o_batch)
    float* out_lse;          // forward: LSE [batch, heads, seq] (lse_batch)
    u16* dq;                 // backward: like q
    u16* dk;                 // backward: like k
    u16* dv;
    const float* lse;        // backward: the forward's LSE (lse_batch)
    const float* lse2;       // backward: scratch [batch, heads, seq_pad], LSE * log2(e), +inf for no key
    const float* delta;      // backward: scratch [batch, heads, seq_pad], rowsum(dO * O)
    const u32* row_ptr;      // MergeQ lists: patterns * q_tiles + 1 offsets
    const u32* row_entries;  // [kv_block, rowmask] pairs
    const u32* col_ptr;      // backward: column lists, patterns * kv_blocks + 1 offsets
    const u32* col_entries;  // [q_tile, rowmask] pairs
    const u32* flag;         // nonzero: a tensor-core kernel wrote a non-finite value; redo everything
    long long q_tok, q_batch;
    long long kv_tok, kv_batch;
    long long o_tok, o_batch;
    long long lse_batch;
    u32 batch;
    u32 seq_len;
    u32 seq_pad;
    u32 num_heads;
    u32 kv_group;            // query heads per KV head
    u32 heads_per_pattern;
    u32 q_tiles;             // tiles of the MergeQ lists
    u32 tile_q;              // their rows
    u32 kv_blocks;           // KV blocks of the column lists
    u32 col_tile;            // query rows per column-list entry
    u32 block_size;
    u32 causal;
    float scale_log2;        // softmax scale * log2(e)
    float scale;
};

#ifndef EXACT_EMU
__device__ __forceinline__ float to_f32(u16 x) {
#if IS_BF16
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(x));
    return f;
#endif
}

__device__ __forceinline__ u16 from_f32(float f) {
    u16 x;
#if IS_BF16
    asm("{ .reg .b16 h; cvt.rn.bf16.f32 h, %1; mov.b16 %0, h; }" : "=h"(x) : "f"(f));
#else
    asm("{ .reg .b16 h; cvt.rn.f16.f32 h, %1; mov.b16 %0, h; }" : "=h"(x) : "f"(f));
#endif
    return x;
}
#endif

// Bit tests, so that no float assumption can drop a NaN.
__device__ __forceinline__ bool x_is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ bool x_is_pinf(float x) { return __float_as_uint(x) == 0x7f800000u; }
__device__ __forceinline__ bool x_is_ninf(float x) { return __float_as_uint(x) == 0xff800000u; }

// Whether tile row `r` attends the entry's block (before causality): a block bit mask or a row count.
__device__ __forceinline__ bool x_row_attends(u32 rm, u32 r, u32 bs) {
    return (rm & EXACT_ROWMASK_BITS) ? ((rm >> (r / bs)) & 1u) : (r < rm);
}

// Per-warp shared memory: two head-dim rows (Q and dO, or K and V), then three 32-lane exchange arrays.
#define WS (2 * HEAD_DIM + 96)

// a (f32, shared) . row (HEAD_DIM 16-bit elements, 16-byte aligned), in order.
__device__ __forceinline__ float dot_row(const float* a, const u16* row) {
    float acc = 0.f;
#pragma unroll 2
    for (int c = 0; c < HEAD_DIM; c += 8) {
        const uint4 w = *(const uint4*)(row + c);
        const u32 x[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc = fmaf(a[c + 2 * i], to_f32((u16)(x[i] & 0xffffu)), acc);
            acc = fmaf(a[c + 2 * i + 1], to_f32((u16)(x[i] >> 16)), acc);
        }
    }
    return acc;
}

__device__ __forceinline__ bool flag_clear(const ExactParams& p) { return *(volatile const u32*)p.flag == 0u; }

__device__ __forceinline__ u32 quiet_nan_bits() { return 0x7fc00000u; }

#if !defined(EXACT_PASS) || EXACT_PASS == 0
// ---- Forward ----

// One query row: O and LSE. `ws`: the warp's shared memory (WS floats).
__device__ __forceinline__ void forward_row(const ExactParams& p, u32 item, float* ws, int lane) {
    float* qs = ws;
    float* s_x = ws + 2 * HEAD_DIM;  // the lanes' scores
    float* p_x = s_x + 32;           // and weights
    const u32 seq = p.seq_len;
    const u32 tok = item % seq, rest = item / seq;
    const u32 head = rest % p.num_heads, b = rest / p.num_heads;
    const u32 kvh = head / p.kv_group, pattern = head / p.heads_per_pattern;
    const u16* qrow = p.q + (long long)b * p.q_batch + (long long)tok * p.q_tok + (long long)head * HEAD_DIM;
    __syncwarp();
    for (int d = lane; d < HEAD_DIM; d += 32) qs[d] = to_f32(qrow[d]) * p.scale_log2;
    __syncwarp();
    const u16* kg = p.k + (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;
    const u16* vg = p.v + (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;
    const u32 tile = tok / p.tile_q, tr = tok % p.tile_q, slot = pattern * p.q_tiles + tile;
    float m = __uint_as_float(0xff800000u), l = 0.f, acc[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) acc[i] = 0.f;
    bool has_key = false, nan_row = false;
    for (u32 e = p.row_ptr[slot]; e < p.row_ptr[slot + 1] && !nan_row; ++e) {
        const u32 rm = p.row_entries[2 * e + 1];
        if (!x_row_attends(rm, tr, p.block_size)) continue;
        const u32 k_lo = p.row_entries[2 * e] * p.block_size;
        u32 k_hi = min(k_lo + p.block_size, seq);
        if (p.causal) k_hi = min(k_hi, tok + 1u);
        for (u32 k0 = k_lo; k0 < k_hi && !nan_row; k0 += 32) {
            const u32 n = min(k_hi - k0, 32u);  // active keys of this step, one per lane
            has_key = true;
            if ((u32)lane < n) s_x[lane] = dot_row(qs, kg + (long long)(k0 + lane) * p.kv_tok);
            __syncwarp();
            float mx = __uint_as_float(0xff800000u);
            for (u32 j = 0; j < n; ++j) {
                const float x = s_x[j];
                nan_row |= x_is_nan(x) || x_is_pinf(x);
                mx = fmaxf(mx, x);
            }
            const float m_new = fmaxf(m, mx);
            // A NaN row is done; while every score so far is -inf there is nothing to add.
            if (!nan_row && !x_is_ninf(m_new)) {
                const float alpha = exp2f(m - m_new);
                if ((u32)lane < n) p_x[lane] = exp2f(s_x[lane] - m_new);
                __syncwarp();
                float sum = 0.f;
#pragma unroll
                for (int i = 0; i < DL; ++i) acc[i] *= alpha;
                for (u32 j = 0; j < n; ++j) {
                    if (x_is_ninf(s_x[j])) continue;  // a -inf score contributes nothing, whatever V holds
                    const float w = p_x[j];
                    sum += w;
                    const u16* vrow = vg + (long long)(k0 + j) * p.kv_tok;
#pragma unroll
                    for (int i = 0; i < DL; ++i) acc[i] = fmaf(w, to_f32(vrow[lane + 32 * i]), acc[i]);
                }
                l = l * alpha + sum;
                m = m_new;
            }
            __syncwarp();  // s_x and p_x are read before the next step writes them
        }
    }
    const bool nan_out = nan_row || (has_key && !(l > 0.f));
    const float inv = l > 0.f ? 1.f / l : 0.f;
    u16* orow = p.out + (long long)b * p.o_batch + (long long)tok * p.o_tok + (long long)head * HEAD_DIM;
#pragma unroll
    for (int i = 0; i < DL; ++i) orow[lane + 32 * i] = from_f32(nan_out ? __uint_as_float(quiet_nan_bits()) : acc[i] * inv);
    if (lane == 0) {
        float lse = __uint_as_float(0xff800000u);
        if (nan_out) lse = __uint_as_float(quiet_nan_bits());
        else if (l > 0.f) lse = (m + log2f(l)) * LN2_X;
        p.out_lse[(long long)b * p.lse_batch + (long long)head * seq + tok] = lse;
    }
}

extern "C" __global__ void __launch_bounds__(EXACT_WARPS * 32) s2_exact_forward(const ExactParams p) {
    if (flag_clear(p)) return;
    __shared__ float sh[EXACT_WARPS][WS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 n = p.seq_len * p.num_heads * p.batch;
    for (u32 it = blockIdx.x * EXACT_WARPS + warp; it < n; it += gridDim.x * EXACT_WARPS) forward_row(p, it, sh[warp], lane);
}

#endif

#if !defined(EXACT_PASS) || EXACT_PASS == 1
// ---- Backward ----

// One query row: D = rowsum(dO * O) and dQ. `ws`: the warp's shared memory (WS floats).
__device__ __forceinline__ void dq_row(const ExactParams& p, u32 item, float* ws, int lane) {
    float* qs = ws;
    float* dos = ws + HEAD_DIM;
    float* ds_x = ws + 2 * HEAD_DIM;  // the lanes' dS
    const u32 seq = p.seq_len;
    const u32 tok = item % seq, rest = item / seq;
    const u32 head = rest % p.num_heads, b = rest / p.num_heads;
    const u32 kvh = head / p.kv_group, pattern = head / p.heads_per_pattern;
    const long long row = (long long)b * p.q_batch + (long long)tok * p.q_tok + (long long)head * HEAD_DIM;
    __syncwarp();
    float dl = 0.f;
    for (int d = lane; d < HEAD_DIM; d += 32) {
        qs[d] = to_f32(p.q[row + d]) * p.scale_log2;
        const float g = to_f32(p.d_o[row + d]);
        dos[d] = g;
        dl = fmaf(g, to_f32(p.o[row + d]), dl);
    }
    ds_x[lane] = dl;
    __syncwarp();
    float delta = 0.f;
    for (int j = 0; j < 32; ++j) delta += ds_x[j];
    __syncwarp();
    const float lse = p.lse[(long long)b * p.lse_batch + (long long)head * seq + tok];
    float acc[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) acc[i] = 0.f;
    // A row without keys (LSE -inf) takes part in no pair; a NaN LSE goes on, so that its gradients are NaN.
    if (!x_is_ninf(lse)) {
        const float lse2 = lse * LOG2E_X;
        const u16* kg = p.k + (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;
        const u16* vg = p.v + (long long)b * p.kv_batch + (long long)kvh * HEAD_DIM;
        const u32 tile = tok / p.tile_q, tr = tok % p.tile_q, slot = pattern * p.q_tiles + tile;
        for (u32 e = p.row_ptr[slot]; e < p.row_ptr[slot + 1]; ++e) {
            const u32 rm = p.row_entries[2 * e + 1];
            if (!x_row_attends(rm, tr, p.block_size)) continue;
            const u32 k_lo = p.row_entries[2 * e] * p.block_size;
            u32 k_hi = min(k_lo + p.block_size, seq);
            if (p.causal) k_hi = min(k_hi, tok + 1u);
            for (u32 k0 = k_lo; k0 < k_hi; k0 += 32) {
                const u32 n = min(k_hi - k0, 32u);
                if ((u32)lane < n) {
                    const u32 kj = k0 + lane;
                    const float s = dot_row(qs, kg + (long long)kj * p.kv_tok);
                    const float dp = dot_row(dos, vg + (long long)kj * p.kv_tok);
                    ds_x[lane] = exp2f(s - lse2) * (dp - delta);
                }
                __syncwarp();
                // Every active pair multiplies, a zero dS too (0 * inf is NaN, as in IEEE).
                for (u32 j = 0; j < n; ++j) {
                    const float w = ds_x[j];
                    const u16* krow = kg + (long long)(k0 + j) * p.kv_tok;
#pragma unroll
                    for (int i = 0; i < DL; ++i) acc[i] = fmaf(w, to_f32(krow[lane + 32 * i]), acc[i]);
                }
                __syncwarp();
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DL; ++i) p.dq[row + lane + 32 * i] = from_f32(acc[i] * p.scale);
}

// One key of one KV head: dK and dV, summed over the query heads of its GQA group. `ws`: the warp's shared
// memory (WS floats).
__device__ __forceinline__ void dkdv_key(const ExactParams& p, u32 item, float* ws, int lane) {
    float* ks = ws;
    float* vs = ws + HEAD_DIM;
    float* p_x = ws + 2 * HEAD_DIM;  // the lanes' P,
    float* ds_x = p_x + 32;          // dS,
    float* a_x = ds_x + 32;          // and whether the lane's row and the key are a pair (1) or not (0)
    const u32 seq = p.seq_len;
    const u32 kv_heads = p.num_heads / p.kv_group;
    const u32 kj = item % seq, rest = item / seq;
    const u32 kvh = rest % kv_heads, b = rest / kv_heads;
    const long long krow = (long long)b * p.kv_batch + (long long)kj * p.kv_tok + (long long)kvh * HEAD_DIM;
    __syncwarp();
    for (int d = lane; d < HEAD_DIM; d += 32) {
        ks[d] = to_f32(p.k[krow + d]);
        vs[d] = to_f32(p.v[krow + d]);
    }
    __syncwarp();
    const u32 kv_block = kj / p.block_size;
    float dk[DL], dv[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) dk[i] = dv[i] = 0.f;
    for (u32 hh = 0; hh < p.kv_group; ++hh) {
        const u32 head = kvh * p.kv_group + hh;
        const u32 slot = (head / p.heads_per_pattern) * p.kv_blocks + kv_block;
        const long long qh = (long long)b * p.q_batch + (long long)head * HEAD_DIM;
        const long long st = ((long long)b * p.num_heads + head) * p.seq_pad;
        for (u32 e = p.col_ptr[slot]; e < p.col_ptr[slot + 1]; ++e) {
            const u32 q0 = p.col_entries[2 * e] * p.col_tile, rm = p.col_entries[2 * e + 1];
            if (p.causal && q0 + p.col_tile <= kj) continue;  // every row of the tile lies before the key
            for (u32 r0 = 0; r0 < p.col_tile; r0 += 32) {
                const u32 r = r0 + lane, qi = q0 + r;
                bool act = r < p.col_tile && qi < seq && x_row_attends(rm, r, p.block_size) && !(p.causal && kj > qi);
                if (act) {
                    const float lse2 = p.lse2[st + qi];
                    act = !x_is_pinf(lse2);  // a row without keys takes part in no pair
                    if (act) {
                        const float s = dot_row(ks, p.q + qh + (long long)qi * p.q_tok) * p.scale_log2;
                        const float dp = dot_row(vs, p.d_o + qh + (long long)qi * p.q_tok);
                        const float pr = exp2f(s - lse2);
                        p_x[lane] = pr;
                        ds_x[lane] = pr * (dp - p.delta[st + qi]);
                    }
                }
                a_x[lane] = act ? 1.f : 0.f;
                __syncwarp();
                // Every pair multiplies, a zero P or dS too (0 * inf is NaN, as in IEEE); other rows add nothing.
                for (int j = 0; j < 32; ++j) {
                    if (a_x[j] == 0.f) continue;
                    const float pw = p_x[j], dw = ds_x[j];
                    const long long at = qh + (long long)(q0 + r0 + j) * p.q_tok;
#pragma unroll
                    for (int i = 0; i < DL; ++i) {
                        dv[i] = fmaf(pw, to_f32(p.d_o[at + lane + 32 * i]), dv[i]);
                        dk[i] = fmaf(dw, to_f32(p.q[at + lane + 32 * i]), dk[i]);
                    }
                }
                __syncwarp();
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DL; ++i) {
        p.dk[krow + lane + 32 * i] = from_f32(dk[i] * p.scale);
        p.dv[krow + lane + 32 * i] = from_f32(dv[i]);
    }
}

extern "C" __global__ void __launch_bounds__(EXACT_WARPS * 32) s2_exact_backward(const ExactParams p) {
    if (flag_clear(p)) return;
    __shared__ float sh[EXACT_WARPS][WS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 rows = p.seq_len * p.num_heads * p.batch;
    const u32 n = rows + p.seq_len * (p.num_heads / p.kv_group) * p.batch;
    for (u32 it = blockIdx.x * EXACT_WARPS + warp; it < n; it += gridDim.x * EXACT_WARPS) {
        if (it < rows) dq_row(p, it, sh[warp], lane);
        else dkdv_key(p, it - rows, sh[warp], lane);
    }
}
#endif
