// The model's own kernels on CUDA (`CudaModel`; the matmuls run on cuBLAS, the attention on s2attn): the twins of
// embed.wgsl, rmsnorm.wgsl, rope.wgsl, swiglu.wgsl and argmax.wgsl. The residual stream is f32; the matmuls'
// inputs (normed rows, the SiLU-gated MLP rows) and Q/K/V are f16, with f32 arithmetic everywhere.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float h2f(u16 x) {
    float f;
    asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(x));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 x;
    asm("{ .reg .b16 h; cvt.rn.f16.f32 h, %1; mov.b16 %0, h; }" : "=h"(x) : "f"(f));
    return x;
}

#define WG 256

// x[r, :] = table[ids[id0 + r], :] (f16 table, f32 rows), one block per row.
extern "C" __global__ void embed(const u32* ids, u32 id0, const u16* table, float* x, u32 cols) {
    const u32 r = blockIdx.x;
    const u16* src = table + (size_t)ids[id0 + r] * cols;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) x[(size_t)r * cols + c] = h2f(src[c]);
}

// y[r, :] = x[row0 + r, :] / sqrt(mean(x[row0 + r, :]^2) + eps) * w (f32 in, f16 out), one block of WG per row.
extern "C" __global__ void __launch_bounds__(WG) rmsnorm(const float* x, u32 row0, const u16* w, u16* y,
                                                          u32 cols, float eps) {
    __shared__ float partial[WG];
    const u32 r = blockIdx.x;
    const float* src = x + (size_t)(row0 + r) * cols;
    float s = 0.f;
    for (u32 c = threadIdx.x; c < cols; c += WG) s += src[c] * src[c];
    partial[threadIdx.x] = s;
    __syncthreads();
    for (u32 span = WG / 2; span > 0; span /= 2) {
        if (threadIdx.x < span) partial[threadIdx.x] += partial[threadIdx.x + span];
        __syncthreads();
    }
    const float inv = rsqrtf(partial[0] / (float)cols + eps);
    for (u32 c = threadIdx.x; c < cols; c += WG)
        y[(size_t)r * cols + c] = f2h(src[c] * inv * h2f(w[c]));
}

// RoPE in place on the first `heads` heads of each row of qkv (the Q and K heads): the pair (p, p + d/2) of a head
// at position pos0 + r turns by (pos0 + r) * theta^(-2p/d). One thread per pair.
extern "C" __global__ void rope(u16* qkv, u32 rows, u32 heads, u32 d, u32 stride, u32 pos0, float theta) {
    const u32 half_d = d / 2;
    const size_t pairs = (size_t)rows * heads * half_d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += (size_t)gridDim.x * blockDim.x) {
        const u32 p = i % half_d;
        const u32 h = (i / half_d) % heads;
        const u32 r = i / ((size_t)half_d * heads);
        const float angle = (float)(pos0 + r) * powf(theta, -2.f * (float)p / (float)d);
        const float c = cosf(angle), s = sinf(angle);
        u16* v = qkv + (size_t)r * stride + (size_t)h * d;
        const float a = h2f(v[p]), b = h2f(v[p + half_d]);
        v[p] = f2h(a * c - b * s);
        v[p + half_d] = f2h(a * s + b * c);
    }
}

// out[r, j] = silu(gu[r, j]) * gu[r, f + j] (gate columns first), f16 in and out.
extern "C" __global__ void swiglu(const u16* gu, u16* out, u32 rows, u32 f) {
    const size_t n = (size_t)rows * f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / f, j = i % f;
        const float g = h2f(gu[r * 2 * f + j]), u = h2f(gu[r * 2 * f + f + j]);
        out[i] = f2h(g / (1.f + __expf(-g)) * u);
    }
}

// ids[dst] = argmax(logits[0..n]) (the lowest index among equal maxima), one block of WG.
extern "C" __global__ void __launch_bounds__(WG) argmax(const float* logits, u32 n, u32* ids, u32 dst) {
    __shared__ float best_v[WG];
    __shared__ u32 best_i[WG];
    float v = -3.4e38f;
    u32 idx = 0xffffffffu;
    for (u32 i = threadIdx.x; i < n; i += WG) {
        if (logits[i] > v || idx == 0xffffffffu) {
            v = logits[i];
            idx = i;
        }
    }
    best_v[threadIdx.x] = v;
    best_i[threadIdx.x] = idx;
    __syncthreads();
    for (u32 span = WG / 2; span > 0; span /= 2) {
        if (threadIdx.x < span) {
            const float ov = best_v[threadIdx.x + span];
            const u32 oi = best_i[threadIdx.x + span];
            if (oi != 0xffffffffu && (best_i[threadIdx.x] == 0xffffffffu || ov > best_v[threadIdx.x] ||
                                      (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x]))) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) ids[dst] = best_i[0];
}
