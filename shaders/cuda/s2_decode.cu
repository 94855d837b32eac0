// Split-KV decode over a host-built work list (the same list the WGSL kernels read, see
// shaders/shared/decode.wgsl and src/inference/worklist.rs), on KV cache pools in CUDA memory, in one launch.
// Compiled by NVRTC (src/cuda/decode.rs) with
//   HEAD_DIM, ROWS (query rows per item), BK (keys per step), NT (threads), IS_BF16, PASS (0 the general
//   split kernel, 1 the narrow one, 2 the tensor-core one), STAGES (the tensor-core kernel's ring depth).
//
// One CTA per work item: its R = group * n_tok query rows against its KV blocks, K/V read as 16-byte words,
// coalesced, one step of BK keys ahead (the next step's loads are in flight in registers while this one is
// computed). General kernel, per step: stage K/V in shared memory, S = Q K^T (one key per thread, a few rows
// each), then each thread of the O pass takes its row's step maximum from the scores (same value in every
// thread of the row), rescales its accumulators and adds P V over its keys; KS threads share an output when
// the rows hold fewer outputs than the CTA has threads. Items of split families write a partial (O / l,
// base-2 LSE) and count themselves done; the last item of a family to finish merges the family's partials by
// LSE (`combine_family`, the WGSL twin: shaders/decode_combine.wgsl) and resets the count for the next call.
//
// Non-finite inputs come out as IEEE softmax attention gives them (the WGSL twin: shaders/shared/
// nonfinite.wgsl): a row whose active scores hold a NaN or +inf, or whose active keys all score -inf, is
// NaN (O and LSE); a -inf score and a masked key contribute nothing, whatever V holds.

typedef unsigned int u32;
typedef unsigned short u16;

#define W (HEAD_DIM / 8)                 // 16-byte words per key row
#define KP (W + 1)                       // padded word stride of staged K rows
#define NL ((BK * W + NT - 1) / NT)      // words of K (and of V) each thread loads per step
#define NOUT (ROWS * W)                  // outputs: one 16-byte word (8 elements) of one row
#define NA ((NOUT + NT - 1) / NT)        // outputs per thread
#define KS ((NA == 1 && NT / NOUT > 1) ? NT / NOUT : 1) // threads sharing an output
#define D4 (HEAD_DIM / 4)
#define NEG_BIG (-3.0e38f)

#if (HEAD_DIM % 8) != 0 || (NT % BK) != 0 || ROWS > 64
#error "HEAD_DIM must be a multiple of 8, BK divide NT, ROWS be at most 64"
#endif

struct Item {
    u32 head0, tok0, pos0, n_valid, kv_len, e0, e1, slot, lse0, nsplit, family, pad0;
};

struct Params {
    const u16* q;         // [tokens, heads, HEAD_DIM]
    const uint4* k;       // pool words
    const uint4* v;
    u16* o;               // as q
    float* lse;           // natural log, indexed as the work list says
    const Item* items;    // split items (PASS 0) or combine records (PASS 1)
    const uint4* entries; // (base in 4-element units, first key, row mask lo, hi)
    float* part_o;        // [slot, ROWS, HEAD_DIM]
    float* part_lse;      // [slot, ROWS], base 2
    const Item* families; // one combine record per split family
    u32* done;            // per split family: its items done so far (0 between calls)
    u32 n_items;
    u32 num_heads;
    u32 n_tok;
    u32 block_size;
    u32 causal;
    float scale_log2;
    u32 kv_tok_stride;    // 4-element units from one key to the next
    u32 lse_head_stride;
    u32 key_shift;        // added to every item's kv_len and pos0 (the work list's key shift)
};


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

__device__ __forceinline__ void add4(float4& a, const float4 b) {
    a.x += b.x;
    a.y += b.y;
    a.z += b.z;
    a.w += b.w;
}

// The 8 elements of a 16-byte word.
__device__ __forceinline__ void unpack8(uint4 w, float* x) {
    const u32 a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        x[2 * i] = to_f32((u16)(a[i] & 0xffffu));
        x[2 * i + 1] = to_f32((u16)(a[i] >> 16));
    }
}

__device__ __forceinline__ bool row_valid(const Item& it, u32 r, u32 n_tok) { return r % n_tok < it.n_valid; }

__device__ __forceinline__ long long row_index(const Params& p, const Item& it, u32 r) {
    return ((long long)(it.tok0 + r % p.n_tok) * p.num_heads + it.head0 + r / p.n_tok) * HEAD_DIM;
}

__device__ __forceinline__ u32 lse_index(const Params& p, const Item& it, u32 r) {
    return it.lse0 + (r / p.n_tok) * p.lse_head_stride + r % p.n_tok;
}

// Row flags: the row has an active key; an active score was NaN or +inf.
#define ROW_HAS_KEY 1u
#define ROW_NAN 2u

// What one score says about its row (NEG_BIG: a masked pair). Bit tests, so no float assumption drops a NaN.
__device__ __forceinline__ u32 score_flags(float s) {
    if (s == NEG_BIG) return 0u;
    const u32 b = __float_as_uint(s);
    return ROW_HAS_KEY | (((b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u) ? ROW_NAN : 0u);
}

__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fc00000u); }

// A split's base-2 LSE of a row: NEG_BIG for no key, -inf for keys that all scored -inf, NaN for a NaN row.
__device__ __forceinline__ float partial_lse2(u32 flags, float m, float l) {
    if (flags & ROW_NAN) return quiet_nan();
    if (l > 0.f) return m + log2f(l);
    return (flags & ROW_HAS_KEY) ? __uint_as_float(0xff800000u) : NEG_BIG;
}

// What a row's O accumulators are multiplied by: 1 / l, NaN for a NaN row (or, unsplit, keys all at
// -inf), 0 for no key; a split whose keys all scored -inf writes 0 (the combine weighs it by 0).
__device__ __forceinline__ float o_scale(u32 flags, float l, u32 nsplit) {
    if ((flags & ROW_NAN) || (nsplit == 1 && (flags & ROW_HAS_KEY) && !(l > 0.f))) return quiet_nan();
    return l > 0.f ? 1.f / l : 0.f;
}

// The natural-log LSE written out: -inf for no key (NEG_BIG), NaN for a NaN row or keys all at -inf.
__device__ __forceinline__ float lse_out(float lse2) {
    const u32 b = __float_as_uint(lse2);
    if ((b & 0x7fffffffu) > 0x7f800000u || b == 0xff800000u) return quiet_nan();
    return lse2 > NEG_BIG ? lse2 * 0.6931471805599453f : __int_as_float(0xff800000);
}


// Two values as one 32-bit word of the storage type, x in the low half.
__device__ __forceinline__ u32 pack2(float x, float y) { return (u32)from_f32(x) | ((u32)from_f32(y) << 16); }

// A split item's end for row r's 16-byte word w: its 8 unnormalised O sums `o` with the row's flags, base-2
// max m and sum l go out as the row's output (unsplit: O and the natural-log LSE) or as its partial (O / l
// and the base-2 LSE, for the combine).
__device__ __forceinline__ void store_word(const Params& p, const Item& it, u32 r, u32 w, const float (&o)[8],
                                           u32 flags, float m, float l) {
    const float inv = o_scale(flags, l, it.nsplit);
    if (it.nsplit == 1) {
        u32 words[4];
#pragma unroll
        for (int e = 0; e < 4; e++) words[e] = pack2(o[2 * e] * inv, o[2 * e + 1] * inv);
        *(uint4*)(p.o + row_index(p, it, r) + 8 * w) = make_uint4(words[0], words[1], words[2], words[3]);
    } else {
        float4* dst = (float4*)(p.part_o + ((size_t)it.slot * ROWS + r) * HEAD_DIM + 8 * w);
        dst[0] = make_float4(o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv);
        dst[1] = make_float4(o[4] * inv, o[5] * inv, o[6] * inv, o[7] * inv);
    }
    if (w == 0) {
        const float lse2 = partial_lse2(flags, m, l);
        if (it.nsplit == 1) p.lse[lse_index(p, it, r)] = lse_out(lse2);
        else p.part_lse[it.slot * ROWS + r] = lse2;
    }
}


// Combine: the CTA of a split family's last item merges the family's nsplit partials by their base-2 LSE;
// the splits are spread over the threads (LL lanes per row for the LSE, SL lanes per output float4 for O)
// and the lanes meet in shared memory (the WGSL twin: shaders/decode_combine.wgsl). The partials were
// written by other CTAs: read through L2 (ld.global.cg), never a stale L1 line.
#define N4 (ROWS * D4)
#define SL ((NT / N4) > 1 ? (NT / N4) : 1)
#define LL ((NT / ROWS) < 16 ? (NT / ROWS) : 16)

// Folds partial LSE x into (m, s); flags f: 1 a NaN partial, 2 a -inf one (keys that all scored -inf).
__device__ __forceinline__ void fold(float& m, float& s, u32& f, float x) {
    const u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) f |= 1u;
    else if (b == 0xff800000u) f |= 2u;
    if (x > m) {
        s = s * exp2f(m - x) + 1.f;
        m = x;
    } else if (x > NEG_BIG) {
        s += exp2f(x - m);
    }
}

// Out of line for the FMA kernels (their registers), inline for the tensor-core one (no stack copy of the
// parameters for the call).
#if PASS == 2
#define COMBINE_LINKAGE __forceinline__
#else
#define COMBINE_LINKAGE __noinline__
#endif
// Partials each combine thread has in flight.
#define CB 8

__device__ COMBINE_LINKAGE void combine_family(const Params& p, const Item& fam) {
    __shared__ float m_s[NT], s_s[NT], lse_s[ROWS];
    __shared__ u32 f_s[NT];
    __shared__ float4 o_s[NT];
    const u32 tid = threadIdx.x, n = fam.nsplit;
    if (tid < ROWS * LL) {
        const u32 r = tid / LL, ln = tid % LL;
        float m = NEG_BIG, s = 0.f;
        u32 f = 0u;
#pragma unroll 4
        for (u32 k = ln; k < n; k += LL) fold(m, s, f, __ldcg(p.part_lse + (fam.slot + k) * ROWS + r));
        m_s[tid] = m;
        s_s[tid] = s;
        f_s[tid] = f;
    }
    __syncthreads();
    if (tid < ROWS) {
        float m = NEG_BIG;
        u32 f = 0u;
        for (int x = 0; x < LL; x++) {
            m = fmaxf(m, m_s[tid * LL + x]);
            f |= f_s[tid * LL + x];
        }
        float lse2 = NEG_BIG;
        if (m > NEG_BIG) {
            float sum = 0.f;
            for (int x = 0; x < LL; x++) {
                const float mx = m_s[tid * LL + x];
                if (mx > NEG_BIG) sum += s_s[tid * LL + x] * exp2f(mx - m);
            }
            lse2 = m + log2f(sum);
        }
        // A NaN partial, or keys that all scored -inf in every split that has keys: a NaN row.
        if ((f & 1u) || ((f & 2u) && !(m > NEG_BIG))) lse2 = quiet_nan();
        lse_s[tid] = lse2;
        if (row_valid(fam, tid, p.n_tok)) p.lse[lse_index(p, fam, tid)] = lse_out(lse2);
    }
    __syncthreads();
    const u32 ln = tid / N4;
    for (u32 o = tid % N4; o < N4; o += NT) {
        if (ln >= SL) break;
        const u32 r = o / D4, c = o % D4;
        const float lse2 = lse_s[r];
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if ((__float_as_uint(lse2) & 0x7fffffffu) > 0x7f800000u) {
            x = make_float4(quiet_nan(), quiet_nan(), quiet_nan(), quiet_nan());
        } else if (lse2 > NEG_BIG) {
            // CB partials' loads issued together, then their sums (a chain of L2 round trips CB times
            // shorter).
            for (u32 k0 = ln; k0 < n; k0 += SL * CB) {
                float wl[CB];
                float4 y[CB];
#pragma unroll
                for (int b = 0; b < CB; b++) {
                    const u32 k = k0 + b * SL;
                    const size_t slot = (size_t)(fam.slot + min(k, n - 1)) * ROWS + r;
                    wl[b] = k < n ? __ldcg(p.part_lse + slot) : NEG_BIG;
                    y[b] = __ldcg((const float4*)p.part_o + slot * D4 + c);
                }
#pragma unroll
                for (int b = 0; b < CB; b++) {
                    if (!(wl[b] > NEG_BIG)) continue; // past the family, or a split without keys
                    const float wgt = exp2f(wl[b] - lse2);
                    x.x += wgt * y[b].x;
                    x.y += wgt * y[b].y;
                    x.z += wgt * y[b].z;
                    x.w += wgt * y[b].w;
                }
            }
        }
        if (SL == 1) {
            if (row_valid(fam, r, p.n_tok)) {
                *(uint2*)(p.o + row_index(p, fam, r) + 4 * c) = make_uint2(pack2(x.x, x.y), pack2(x.z, x.w));
            }
        } else {
            o_s[tid] = x;
        }
    }
#if SL > 1
    __syncthreads();
    if (tid < N4) {
        const u32 r = tid / D4, c = tid % D4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < SL; s++) {
            add4(x, o_s[s * N4 + tid]);
        }
        if (row_valid(fam, r, p.n_tok)) {
            *(uint2*)(p.o + row_index(p, fam, r) + 4 * c) = make_uint2(pack2(x.x, x.y), pack2(x.z, x.w));
        }
    }
#endif
}


// A split item's end: count this item done; the family's last item combines and resets the count. Every
// thread of the CTA calls it, after the item's partial writes.
__device__ __forceinline__ void finish_split(const Params& p, const Item& it) {
    __shared__ u32 last_s;
    __threadfence(); // this CTA's partials are visible device-wide before it counts itself
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 before = atomicAdd(p.done + it.family, 1u);
        last_s = before + 1 == it.nsplit;
        if (last_s) p.done[it.family] = 0u;
    }
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    combine_family(p, p.families[it.family]);
}

#if PASS == 0

extern "C" __global__ void __launch_bounds__(NT) s2_decode_split(const Params p) {
    const u32 id = blockIdx.x + blockIdx.y * gridDim.x;
    if (id >= p.n_items) return;
    const Item it = p.items[id];
    const u32 pos0 = it.pos0 + p.key_shift; // the call's key shift moves the item's keys (as kv_len below)
    const u32 tid = threadIdx.x;
    extern __shared__ uint4 smem[];
    uint4* k_s = smem;                                  // [BK][KP]
    uint4* v_s = k_s + BK * KP;                         // [BK][W]
    float* q_s = (float*)(v_s + BK * W);                // [ROWS][HEAD_DIM], pre-scaled
    float* p_s = q_s + ROWS * HEAD_DIM;                 // [ROWS][BK]
    float* red = p_s + ROWS * BK;                       // key-split partials: [(KS - 1) * NOUT][9]

    const bool causal = p.causal != 0;
    u32 key_end = it.kv_len + p.key_shift;
    if (causal) key_end = min(key_end, pos0 + it.n_valid);
    const u32 tok_stride = p.kv_tok_stride / 2;         // 16-byte words (2-byte elements)

    for (u32 i = tid; i < ROWS * HEAD_DIM; i += NT) {
        const u32 r = i / HEAD_DIM;
        float x = 0.f;
        if (row_valid(it, r, p.n_tok)) x = to_f32(p.q[row_index(p, it, r) + i % HEAD_DIM]) * p.scale_log2;
        q_s[i] = x;
    }

    const u32 ks = tid / NOUT;
    const bool active_o = tid < KS * NOUT;
    float acc[NA][8];
    float m_r[NA], l_r[NA];
    u32 f_r[NA]; // row flags, gathered by every thread of the row from the same scores
#pragma unroll
    for (int j = 0; j < NA; j++) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[j][e] = 0.f;
        m_r[j] = NEG_BIG;
        l_r[j] = 0.f;
        f_r[j] = 0u;
    }

    const u32 per_block = p.block_size / BK;
    const u32 n_chunks = (it.e1 - it.e0) * per_block;
    uint4 pk[NL], pv[NL];
    u32 next_k0 = 0;
    auto load = [&](u32 c) {
        const uint4 e = p.entries[it.e0 + c / per_block];
        const u32 sub = (c % per_block) * BK;
        next_k0 = e.y + sub;
#pragma unroll
        for (int j = 0; j < NL; j++) {
            const u32 i = tid + j * NT;
            const u32 kk = i / W;
            uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
            if (i < BK * W && next_k0 + kk < key_end) {
                const size_t at = e.x / 2 + (size_t)(sub + kk) * tok_stride + i % W;
                kx = __ldg(p.k + at);
                vx = __ldg(p.v + at);
            }
            pk[j] = kx;
            pv[j] = vx;
        }
    };
    if (n_chunks > 0) load(0);
    for (u32 c = 0; c < n_chunks;) {
        const u32 k0 = next_k0;
        if (k0 >= key_end) break;
        const uint4 entry = p.entries[it.e0 + c / per_block];
        __syncthreads(); // the previous step's O pass is done with k_s, v_s, p_s
#pragma unroll
        for (int j = 0; j < NL; j++) {
            const u32 i = tid + j * NT;
            if (i < BK * W) {
                k_s[(i / W) * KP + i % W] = pk[j];
                v_s[i] = pv[j];
            }
        }
        __syncthreads();
        c++;
        if (c < n_chunks) load(c);

        // S = Q K^T.
        const u32 kk = tid % BK;
        const u32 kpos = k0 + kk;
        for (u32 r = tid / BK; r < ROWS; r += NT / BK) {
            float s = NEG_BIG;
            const u32 word = r < 32 ? entry.z : entry.w;
            if (row_valid(it, r, p.n_tok) && kpos < key_end && (!causal || kpos <= pos0 + r % p.n_tok)
                && ((word >> (r % 32)) & 1u)) {
                float dot = 0.f;
#pragma unroll
                for (int w = 0; w < W; w++) {
                    float x[8];
                    unpack8(k_s[kk * KP + w], x);
                    const float4 qa = *(const float4*)(q_s + r * HEAD_DIM + 8 * w);
                    const float4 qb = *(const float4*)(q_s + r * HEAD_DIM + 8 * w + 4);
                    dot += qa.x * x[0] + qa.y * x[1] + qa.z * x[2] + qa.w * x[3] + qb.x * x[4] + qb.y * x[5]
                        + qb.z * x[6] + qb.w * x[7];
                }
                s = dot;
            }
            p_s[r * BK + kk] = s;
        }
        __syncthreads();

        // O += P V with each row's running maximum.
        if (active_o) {
#pragma unroll
            for (int j = 0; j < NA; j++) {
                const u32 o = tid % NOUT + j * NT;
                if (o < NOUT) {
                    const u32 r = o / W, w = o % W;
                    float mc = NEG_BIG;
                    u32 f = 0u;
#pragma unroll 8
                    for (int k = 0; k < BK; k++) {
                        const float s = p_s[r * BK + k];
                        mc = fmaxf(mc, s);
                        f |= score_flags(s);
                    }
                    f_r[j] |= f;
                    const float m_new = fmaxf(m_r[j], mc);
                    if (m_new > NEG_BIG) {
                        const float alpha = exp2f(m_r[j] - m_new);
                        float l = l_r[j] * alpha;
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[j][e] *= alpha;
                        for (u32 k = ks; k < BK; k += KS) {
                            const float s = p_s[r * BK + k];
                            const float pr = s > NEG_BIG ? exp2f(s - m_new) : 0.f;
                            if (pr == 0.f) continue; // adds nothing, not 0 * a non-finite V
                            float x[8];
                            unpack8(v_s[k * W + w], x);
                            l += pr;
#pragma unroll
                            for (int e = 0; e < 8; e++) acc[j][e] += pr * x[e];
                        }
                        l_r[j] = l;
                        m_r[j] = m_new;
                    }
                }
            }
        }
    }

#if KS > 1
    __syncthreads();
    if (active_o && ks > 0) {
        float* t = red + (tid - NOUT) * 9;
#pragma unroll
        for (int e = 0; e < 8; e++) t[e] = acc[0][e];
        t[8] = l_r[0];
    }
    __syncthreads();
    if (ks == 0) {
        for (u32 s = 1; s < KS; s++) {
            const float* t = red + ((s - 1) * NOUT + tid) * 9;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[0][e] += t[e];
            l_r[0] += t[8];
        }
    }
#endif
#pragma unroll
    for (int j = 0; j < NA; j++) {
        if (!active_o || ks != 0) break;
        const u32 o = tid + j * NT;
        const u32 r = o / W, w = o % W;
        if (o < NOUT && row_valid(it, r, p.n_tok)) store_word(p, it, r, w, acc[j], f_r[j], m_r[j], l_r[j]);
    }
    if (it.nsplit > 1) finish_split(p, it);
}

#elif PASS == 1

// Narrow items (ROWS <= 4): thread (g, w) owns 16-byte word w of every key row and keys g, g + NG, ... of
// each step; Q, K, V and O stay in registers, each thread runs its own online softmax over its keys, and
// the NG key groups of a word merge at the end (the WGSL twin: shaders/decode_split_narrow.wgsl).
#define NG (NT / W)                       // key groups
#define NK (BK / NG)                      // keys per thread per step
#define RED ((BK * W) > 2 * NT ? (BK * W) : 2 * NT)

#if ROWS > 4 || (NT % W) != 0 || (BK % NG) != 0 || NK < 1
#error "the narrow decode kernel takes at most 4 rows, W dividing NT and BK a multiple of NT / W"
#endif

__device__ __forceinline__ float& lane(float4& v, int i) { return reinterpret_cast<float*>(&v)[i]; }

// At least 3 CTAs per SM (registers capped near 170): a batch-1 call of the default split fits one wave.
extern "C" __global__ void __launch_bounds__(NT, 3) s2_decode_narrow(const Params p) {
    const u32 id = blockIdx.x + blockIdx.y * gridDim.x;
    if (id >= p.n_items) return;
    const Item it = p.items[id];
    const u32 pos0 = it.pos0 + p.key_shift; // the call's key shift moves the item's keys (as kv_len below)
    __shared__ float4 red_s[RED];
    __shared__ float4 s_s[BK];
    __shared__ u32 flag_s[4]; // row flags
    u32 flags = 0u;           // of the keys this thread scores (tid < BK), two bits per row
    const u32 tid = threadIdx.x, w = tid % W, g = tid / W;
    const bool causal = p.causal != 0;
    u32 key_end = it.kv_len + p.key_shift;
    if (causal) key_end = min(key_end, pos0 + it.n_valid);
    const u32 tok_stride = p.kv_tok_stride / 2;
    if (tid < 4) flag_s[tid] = 0u;

    float q[4][8], acc[4][8], m[4], l[4];
#pragma unroll
    for (int r = 0; r < 4; r++) {
        m[r] = NEG_BIG;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            q[r][e] = 0.f;
            acc[r][e] = 0.f;
        }
        if (r < ROWS && row_valid(it, r, p.n_tok)) {
            float x[8];
            unpack8(*(const uint4*)(p.q + row_index(p, it, r) + 8 * w), x);
#pragma unroll
            for (int e = 0; e < 8; e++) q[r][e] = x[e] * p.scale_log2;
        }
    }

    const u32 per_block = p.block_size / BK;
    const u32 n_chunks = (it.e1 - it.e0) * per_block;
    uint4 pk[NK], pv[NK];
    u32 k0 = key_end;
    if (n_chunks > 0) {
        const uint4 e = p.entries[it.e0];
        k0 = e.y;
        const size_t base = e.x / 2;
#pragma unroll
        for (int j = 0; j < NK; j++) {
            const u32 kk = g + NG * j;
            uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
            if (k0 + kk < key_end) {
                kx = __ldg(p.k + base + (size_t)kk * tok_stride + w);
                vx = __ldg(p.v + base + (size_t)kk * tok_stride + w);
            }
            pk[j] = kx;
            pv[j] = vx;
        }
    }
    for (u32 c = 0; c < n_chunks && k0 < key_end;) {
        const uint4 entry = p.entries[it.e0 + c / per_block];
        const u32 c1 = c + 1;
        u32 k1 = key_end;
        size_t base1 = 0;
        if (c1 < n_chunks) {
            const uint4 e = p.entries[it.e0 + c1 / per_block];
            const u32 sub = (c1 % per_block) * BK;
            k1 = e.y + sub;
            base1 = e.x / 2 + (size_t)sub * tok_stride;
        }
        // Partial dots over this thread's word, rows in lanes.
#pragma unroll
        for (int j = 0; j < NK; j++) {
            float x[8];
            unpack8(pk[j], x);
            float4 part = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < 8; e++) d += q[r][e] * x[e];
                lane(part, r) = d;
            }
            red_s[(g + NG * j) * W + w] = part;
        }
        if (k1 < key_end) {
#pragma unroll
            for (int j = 0; j < NK; j++) {
                const u32 kk = g + NG * j;
                pk[j] = k1 + kk < key_end ? __ldg(p.k + base1 + (size_t)kk * tok_stride + w) : make_uint4(0, 0, 0, 0);
            }
        }
        __syncthreads();
        if (tid < BK) {
            float4 sc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int x = 0; x < W; x++) {
                add4(sc, red_s[tid * W + x]);
            }
            const u32 kpos = k0 + tid;
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const bool live = r < ROWS && row_valid(it, r, p.n_tok) && kpos < key_end
                    && (!causal || kpos <= pos0 + r % p.n_tok) && ((entry.z >> r) & 1u);
                if (!live) lane(sc, r) = NEG_BIG;
                if (r < ROWS) flags |= score_flags(lane(sc, r)) << (2 * r);
            }
            s_s[tid] = sc;
        }
        __syncthreads();
        float mc[4];
#pragma unroll
        for (int r = 0; r < 4; r++) mc[r] = m[r];
#pragma unroll
        for (int j = 0; j < NK; j++) {
            float4 sc = s_s[g + NG * j];
#pragma unroll
            for (int r = 0; r < 4; r++) mc[r] = fmaxf(mc[r], lane(sc, r));
        }
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            const float alpha = exp2f(m[r] - mc[r]);
            l[r] *= alpha;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[r][e] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < NK; j++) {
            float4 sc = s_s[g + NG * j];
            float x[8];
            unpack8(pv[j], x);
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                const float s = lane(sc, r);
                const float pr = s > NEG_BIG ? exp2f(s - mc[r]) : 0.f;
                if (pr == 0.f) continue; // adds nothing, not 0 * a non-finite V
                l[r] += pr;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[r][e] += pr * x[e];
            }
        }
#pragma unroll
        for (int r = 0; r < 4; r++) m[r] = mc[r];
        if (k1 < key_end) {
#pragma unroll
            for (int j = 0; j < NK; j++) {
                const u32 kk = g + NG * j;
                pv[j] = k1 + kk < key_end ? __ldg(p.v + base1 + (size_t)kk * tok_stride + w) : make_uint4(0, 0, 0, 0);
            }
        }
        c = c1;
        k0 = k1;
    }

    // The NG key groups of word w merge: common max, scaled sums, then O row by row; the rows' flags meet.
    __syncthreads();
    red_s[tid] = make_float4(m[0], m[1], m[2], m[3]);
#pragma unroll
    for (int r = 0; r < ROWS; r++)
        if ((flags >> (2 * r)) & 3u) atomicOr(&flag_s[r], (flags >> (2 * r)) & 3u);
    __syncthreads();
    float mx[4] = {NEG_BIG, NEG_BIG, NEG_BIG, NEG_BIG}, scale[4], lt[4] = {0.f, 0.f, 0.f, 0.f};
    for (int x = 0; x < NG; x++) {
        float4 y = red_s[x * W + w];
#pragma unroll
        for (int r = 0; r < 4; r++) mx[r] = fmaxf(mx[r], lane(y, r));
    }
#pragma unroll
    for (int r = 0; r < 4; r++) scale[r] = mx[r] > NEG_BIG ? exp2f(m[r] - mx[r]) : 0.f;
    __syncthreads();
    red_s[tid] = make_float4(l[0] * scale[0], l[1] * scale[1], l[2] * scale[2], l[3] * scale[3]);
    __syncthreads();
    for (int x = 0; x < NG; x++) {
        float4 y = red_s[x * W + w];
#pragma unroll
        for (int r = 0; r < 4; r++) lt[r] += lane(y, r);
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        __syncthreads();
        red_s[2 * tid] = make_float4(acc[r][0] * scale[r], acc[r][1] * scale[r], acc[r][2] * scale[r], acc[r][3] * scale[r]);
        red_s[2 * tid + 1] =
            make_float4(acc[r][4] * scale[r], acc[r][5] * scale[r], acc[r][6] * scale[r], acc[r][7] * scale[r]);
        __syncthreads();
        if (g == 0 && row_valid(it, r, p.n_tok)) {
            float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int x = 0; x < NG; x++) {
                const float4 a = red_s[2 * (x * W + w)], b = red_s[2 * (x * W + w) + 1];
                o[0] += a.x; o[1] += a.y; o[2] += a.z; o[3] += a.w;
                o[4] += b.x; o[5] += b.y; o[6] += b.z; o[7] += b.w;
            }
            store_word(p, it, r, w, o, flag_s[r], mx[r], lt[r]);
        }
    }
    if (it.nsplit > 1) finish_split(p, it);
}

#elif PASS == 2

// Tensor-core items (ROWS <= 16, HEAD_DIM 64 or 128, 16-key chunks): each warp streams its own chunks of
// the item (chunk w, w + NW, ...) through a STAGES-deep cp.async ring in shared memory, scores them with
// mma.sync m16n8k16 (the rows padded to 16, Q's fragments in registers, K through ldmatrix), keeps its own
// online softmax per row and adds P V with mma (V through ldmatrix.trans, P rounded to the storage type).
// The warps meet once, at the end, in shared memory. A chunk whose V holds a non-finite element takes a
// scalar P V in f32 that skips p = 0 (an mma would turn 0 * inf into NaN).
#define NW (NT / 32)                      // warps, each with its own ring
#define CK 16                             // keys per chunk
#define SLOT (2 * CK * W)                 // 16-byte words of one ring slot: K rows, then V rows
#define HI_ROWS (ROWS > 8)                // rows 8..15 exist
#define MO_STRIDE (HEAD_DIM + 8)          // floats per row of the warps' merged O (rows 8 banks apart)

#if ROWS > 16 || (HEAD_DIM != 64 && HEAD_DIM != 128) || (NT % 32) != 0 || STAGES < 2
#error "the tensor-core decode kernel takes at most 16 rows, head dim 64 or 128, whole warps, 2+ stages"
#endif

// Word w of key row `key` in a slot: XOR-swizzled by the key so that ldmatrix's 8 rows hit 8 bank groups.
__device__ __forceinline__ u32 swz(u32 key, u32 w) { return key * W + (w ^ (key & 7u)); }

#ifndef S2_EMU
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared, asynchronously; `bytes` 0 fills zeros.
__device__ __forceinline__ void cp_async16(uint4* dst, const uint4* src, u32 bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 matrices of 16-bit elements, lane l giving row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm4(u32 (&r)[4], const uint4* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm4_trans(u32 (&r)[4], const uint4* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// d += A (16x16, row-major fragments a) * B (16x8, column fragments b0, b1), f32 accumulators.
__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
#endif
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// A 32-bit word of two storage-type elements (an mma A fragment) back in f32.
__device__ __forceinline__ float lo_f32(u32 w) { return to_f32((u16)(w & 0xffffu)); }
__device__ __forceinline__ float hi_f32(u32 w) { return to_f32((u16)(w >> 16)); }

// Adds 1 to bit 15 (31) of the result's half where a 16-bit element of x is non-finite (exponent all ones).
#if IS_BF16
#define EXP_BITS 0x7f807f80u
#define EXP_CARRY 0x00800080u
#else
#define EXP_BITS 0x7c007c00u
#define EXP_CARRY 0x04000400u
#endif

extern "C" __global__ void __launch_bounds__(NT, 2) s2_decode_mma(const Params p) {
    const u32 id = blockIdx.x + blockIdx.y * gridDim.x;
    if (id >= p.n_items) return;
    const Item it = p.items[id];
    const u32 pos0 = it.pos0 + p.key_shift; // the call's key shift moves the item's keys (as kv_len below)
    extern __shared__ uint4 smem[];
    __shared__ float pscr_s[NW][16][CK];          // a scalar chunk's probabilities
    __shared__ float mm_s[NW][16], ml_s[NW][16];  // each warp's row maxima and sums
    __shared__ u32 mf_s[NW][16];                  // and row flags
    const u32 tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const u32 g = lane / 4, q4 = lane % 4;        // fragment row (and row + 8), column pair
    uint4* ring = smem + warp * STAGES * SLOT;
    const bool causal = p.causal != 0;
    u32 key_end = it.kv_len + p.key_shift;
    if (causal) key_end = min(key_end, pos0 + it.n_valid);
    const u32 tok_stride = p.kv_tok_stride / 2;

    // Q's A fragments, unscaled: rows g (and g + 8), columns 16 ks + 2 q4 (+ 8).
    u32 qa[HEAD_DIM / 16][4];
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ks++) {
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const u32 r = g + 8 * (x & 1), col = 16 * ks + 2 * q4 + 8 * (x >> 1);
            u32 v = 0u;
            if ((x & 1) == 0 || HI_ROWS)
                if (r < ROWS && row_valid(it, r, p.n_tok)) v = *(const u32*)(p.q + row_index(p, it, r) + col);
            qa[ks][x] = v;
        }
    }

    const u32 per_block = p.block_size / CK;
    const u32 n_chunks = (it.e1 - it.e0) * per_block;
    const u32 mine = n_chunks > warp ? (n_chunks - warp + NW - 1) / NW : 0;
    // Chunk i of this warp into ring slot i % STAGES (keys at or past key_end read as zeros).
    auto issue = [&](u32 i) {
        const u32 c = warp + i * NW;
        const uint4 e = p.entries[it.e0 + c / per_block];
        const u32 sub = (c % per_block) * CK;
        uint4* slot = ring + (i % STAGES) * SLOT;
#pragma unroll
        for (int j = 0; j < CK * W / 32; j++) {
            const u32 x = lane + 32 * j, key = x / W, w = x % W;
            const bool live = e.y + sub + key < key_end;
            const size_t at = live ? e.x / 2 + (size_t)(sub + key) * tok_stride + w : 0;
            cp_async16(slot + swz(key, w), p.k + at, live ? 16u : 0u);
            cp_async16(slot + CK * W + swz(key, w), p.v + at, live ? 16u : 0u);
        }
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) {
        if ((u32)i < mine) issue(i);
        cp_async_commit();
    }

    float o[W][4];
#pragma unroll
    for (int n = 0; n < W; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {NEG_BIG, NEG_BIG}, l[2] = {0.f, 0.f};
    u32 f[2] = {0u, 0u};

    for (u32 i = 0; i < mine; i++) {
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        if (i + STAGES - 1 < mine) issue(i + STAGES - 1);
        cp_async_commit();
        const uint4* slot = ring + (i % STAGES) * SLOT;
        const u32 c = warp + i * NW;
        const uint4 entry = p.entries[it.e0 + c / per_block];
        const u32 k0 = entry.y + (c % per_block) * CK;

        // S = Q K^T over the chunk's 16 keys: n-tiles of keys 0-7 and 8-15.
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ks++) {
            u32 b[4];
            const u32 mtx = lane / 8;
            ldsm4(b, slot + swz((mtx / 2) * 8 + lane % 8, 2 * ks + mtx % 2));
            mma16816(s[0], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], b[0], b[1]);
            mma16816(s[1], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], b[2], b[3]);
        }
        // Scale and mask; s[j][h * 2 + e] is row g + 8 h, key 8 j + 2 q4 + e.
        float mc[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const u32 r = g + 8 * h;
            const bool row_ok = r < ROWS && row_valid(it, r, p.n_tok) && (((r < 32 ? entry.z : entry.w) >> (r % 32)) & 1u);
            mc[h] = m[h];
#pragma unroll
            for (int j = 0; j < 2; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const u32 kpos = k0 + 8 * j + 2 * q4 + e;
                    const bool live = row_ok && kpos < key_end && (!causal || kpos <= pos0 + r % p.n_tok);
                    float x = live ? s[j][2 * h + e] * p.scale_log2 : NEG_BIG;
                    f[h] |= score_flags(x);
                    s[j][2 * h + e] = x;
                    mc[h] = fmaxf(mc[h], x);
                }
            }
            mc[h] = fmaxf(mc[h], __shfl_xor_sync(0xffffffffu, mc[h], 1));
            mc[h] = fmaxf(mc[h], __shfl_xor_sync(0xffffffffu, mc[h], 2));
        }
        // Rescale the running sums and O, then P.
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float alpha = exp2f(m[h] - mc[h]);
            l[h] *= alpha;
#pragma unroll
            for (int n = 0; n < W; n++) {
                o[n][2 * h] *= alpha;
                o[n][2 * h + 1] *= alpha;
            }
#pragma unroll
            for (int j = 0; j < 2; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float x = s[j][2 * h + e];
                    const float pr = x > NEG_BIG ? exp2f(x - mc[h]) : 0.f;
                    s[j][2 * h + e] = pr;
                    l[h] += pr;
                }
            }
            m[h] = mc[h];
        }
        // Does the chunk's V hold a non-finite element? (Each lane checks words it copied.)
        u32 carry = 0u;
#pragma unroll
        for (int j = 0; j < CK * W / 32; j++) {
            const u32 x = lane + 32 * j;
            const uint4 v = slot[CK * W + swz(x / W, x % W)];
            carry |= ((v.x & EXP_BITS) + EXP_CARRY) | ((v.y & EXP_BITS) + EXP_CARRY) | ((v.z & EXP_BITS) + EXP_CARRY)
                | ((v.w & EXP_BITS) + EXP_CARRY);
        }
        if (!__any_sync(0xffffffffu, (carry & 0x80008000u) != 0u)) {
            // O += P V: P's A fragments are the score fragments; V's B fragments by ldmatrix.trans. In bf16
            // (8 significant bits) P is the sum of two bf16 parts, each multiplied by V.
            const u32 pa0 = pack2(s[0][0], s[0][1]), pa1 = pack2(s[0][2], s[0][3]);
            const u32 pa2 = pack2(s[1][0], s[1][1]), pa3 = pack2(s[1][2], s[1][3]);
#if IS_BF16
            const u32 pb0 = pack2(s[0][0] - lo_f32(pa0), s[0][1] - hi_f32(pa0));
            const u32 pb1 = pack2(s[0][2] - lo_f32(pa1), s[0][3] - hi_f32(pa1));
            const u32 pb2 = pack2(s[1][0] - lo_f32(pa2), s[1][1] - hi_f32(pa2));
            const u32 pb3 = pack2(s[1][2] - lo_f32(pa3), s[1][3] - hi_f32(pa3));
#endif
#pragma unroll
            for (int n = 0; n < W; n += 2) {
                u32 b[4];
                const u32 mtx = lane / 8;
                ldsm4_trans(b, slot + CK * W + swz((mtx % 2) * 8 + lane % 8, n + mtx / 2));
                mma16816(o[n], pa0, pa1, pa2, pa3, b[0], b[1]);
                mma16816(o[n + 1], pa0, pa1, pa2, pa3, b[2], b[3]);
#if IS_BF16
                mma16816(o[n], pb0, pb1, pb2, pb3, b[0], b[1]);
                mma16816(o[n + 1], pb0, pb1, pb2, pb3, b[2], b[3]);
#endif
            }
        } else {
            // Scalar P V in f32, skipping p = 0 (adds nothing, not 0 * a non-finite V).
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) pscr_s[warp][g + 8 * h][8 * j + 2 * q4 + e] = s[j][2 * h + e];
            __syncwarp();
            const u16* vs = (const u16*)(slot + CK * W);
            for (u32 k = 0; k < CK; k++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const float pr = pscr_s[warp][g + 8 * h][k];
                    if (pr == 0.f) continue;
#pragma unroll
                    for (int n = 0; n < W; n++) {
                        const u32 col = 8 * n + 2 * q4;
                        const u16* row = vs + 8 * swz(k, col / 8);
                        o[n][2 * h] += pr * to_f32(row[col % 8]);
                        o[n][2 * h + 1] += pr * to_f32(row[col % 8 + 1]);
                    }
                }
            }
            __syncwarp();
        }
    }
    cp_async_wait<0>();

    // Each warp's rows: quad-wide sums and flags; then the warps meet in shared memory (over the rings).
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        f[h] |= __float_as_uint(__shfl_xor_sync(0xffffffffu, __uint_as_float(f[h]), 1));
        f[h] |= __float_as_uint(__shfl_xor_sync(0xffffffffu, __uint_as_float(f[h]), 2));
    }
    __syncthreads(); // every warp is done with its ring
    float* mo_s = (float*)smem; // [NW][ROWS][MO_STRIDE]
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const u32 r = g + 8 * h;
        if (r >= ROWS) continue;
        if (q4 == 0) {
            mm_s[warp][r] = m[h];
            ml_s[warp][r] = l[h];
            mf_s[warp][r] = f[h];
        }
#pragma unroll
        for (int n = 0; n < W; n++) {
            float* dst = mo_s + (warp * ROWS + r) * MO_STRIDE + 8 * n + 2 * q4;
            dst[0] = o[n][2 * h];
            dst[1] = o[n][2 * h + 1];
        }
    }
    __syncthreads();
    for (u32 x = tid; x < ROWS * W; x += NT) {
        const u32 r = x / W, w = x % W;
        if (!row_valid(it, r, p.n_tok)) continue;
        float mx = NEG_BIG, lt = 0.f, acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        u32 flags = 0u;
        for (int v = 0; v < NW; v++) {
            mx = fmaxf(mx, mm_s[v][r]);
            flags |= mf_s[v][r];
        }
        for (int v = 0; v < NW; v++) {
            const float sc = mm_s[v][r] > NEG_BIG ? exp2f(mm_s[v][r] - mx) : 0.f;
            lt += ml_s[v][r] * sc;
            const float* src = mo_s + (v * ROWS + r) * MO_STRIDE + 8 * w;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] += sc * src[e];
        }
        store_word(p, it, r, w, acc, flags, mx, lt);
    }
    if (it.nsplit > 1) finish_split(p, it);
}

#endif
