// CPU emulation of the CUDA subset shaders/cuda/s2_decode.cu and s2_exact.cu use, for decode_check.cc and
// exact_check.cc (see run.sh), and the base that sm90.h (the sm_90 wgmma kernels of s2_forward.cu and
// s2_backward.cu, forward_check.cc and backward_check.cc) builds on: one std::thread per CUDA thread,
// std::barrier for __syncthreads and, per warp, for the warp collectives (shuffles, votes: every lane writes its
// value, all wait, each reads), static "shared" memory (one block at a time), cp.async, ldmatrix and mma.sync.
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#include <memory>
#include <atomic>
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct dim3 { unsigned x, y, z; };
thread_local dim3 threadIdx, blockIdx;
// Dynamic shared memory, as large as sm_90's opt-in maximum per block (227 KB); byte offsets into it are the
// emulated shared-window addresses (sm90.h), so the swizzle atoms' 1024-byte alignment is that of the offsets.
alignas(1024) static uint4 g_dyn[232448 / 16];
static dim3 gridDim;
static std::barrier<>* g_bar;
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 __ldg(const uint4* p) { return *p; }
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline float __ldcg(const float* p) { return *p; }
inline float4 __ldcg(const float4* p) { return *p; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
// A barrier that spins with yields (the warp collectives are frequent and short: a futex wake-up chain of 32
// threads on a few cores costs far more); a lane that finishes drops out.
struct SpinBarrier {
    std::atomic<unsigned> arrived{0}, gen{0}, count;
    explicit SpinBarrier(unsigned n) : count(n) {}
    void arrive_and_wait() {
        const unsigned g = gen.load();
        if (arrived.fetch_add(1) + 1 == count.load()) {
            arrived.store(0);
            gen.fetch_add(1);
        } else {
            while (gen.load() == g) std::this_thread::yield();
        }
    }
    void arrive_and_drop() {
        const unsigned n = count.fetch_sub(1) - 1;
        if (n != 0 && arrived.load() == n) {
            arrived.store(0);
            gen.fetch_add(1);
        }
    }
};
// Warp collectives: all 32 lanes of a warp call them together (warp-uniform control flow, as the kernels have).
static SpinBarrier* g_wbar[32];
static unsigned g_xchg[32][32];
template <class F> unsigned warp_collective(unsigned v, F f) {
    const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_xchg[w][l] = v;
    g_wbar[w]->arrive_and_wait();
    const unsigned r = f(g_xchg[w], l);
    g_wbar[w]->arrive_and_wait();
    return r;
}
inline void __syncwarp() { g_wbar[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_sync(unsigned, float v, int src) {
    return __uint_as_float(warp_collective(__float_as_uint(v), [&](const unsigned* x, unsigned) { return x[src & 31]; }));
}
inline float __shfl_xor_sync(unsigned, float v, int m) {
    return __uint_as_float(warp_collective(__float_as_uint(v), [&](const unsigned* x, unsigned l) { return x[(l ^ m) & 31]; }));
}
inline unsigned __ballot_sync(unsigned, int pred) {
    return warp_collective(pred ? 1u : 0u, [](const unsigned* x, unsigned) {
        unsigned r = 0;
        for (unsigned i = 0; i < 32; i++) r |= x[i] << i;
        return r;
    });
}
inline int __any_sync(unsigned, int pred) { return __ballot_sync(0xffffffffu, pred) != 0; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
// Every lane's `v`, in lane order (a warp collective).
template <class T> void warp_all(const T& v, T (&out)[32]) {
    static_assert(sizeof(T) <= 64, "exchange at most 64 bytes per lane");
    static unsigned char buf[32][32][64];
    const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    memcpy(buf[w][l], &v, sizeof(T));
    g_wbar[w]->arrive_and_wait();
    for (int i = 0; i < 32; i++) memcpy(&out[i], buf[w][i], sizeof(T));
    g_wbar[w]->arrive_and_wait();
}
typedef unsigned short u16;
inline float to_f32(u16 x) {
#if IS_BF16
    return __uint_as_float(((unsigned)x) << 16);
#else
    _Float16 h; memcpy(&h, &x, 2); return (float)h;
#endif
}
inline u16 from_f32(float f) {
#if IS_BF16
    unsigned u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (u16)(u >> 16);
#else
    _Float16 h = (_Float16)f; u16 x; memcpy(&x, &h, 2); return x;
#endif
}
// The tensor-core kernel's PTX pieces (s2_decode.cu's `#ifndef S2_EMU` block), with their semantics:
// cp.async copies land only when a wait_group retires their group (a read before the wait sees stale
// shared memory), ldmatrix and mma.sync exchange fragments across the warp in the PTX layouts.
#define S2_EMU 1
struct AsyncCopy { uint4* dst; uint4 val; };
thread_local std::vector<AsyncCopy> t_pending;
thread_local std::vector<std::vector<AsyncCopy>> t_groups;
inline void cp_async16(uint4* dst, const uint4* src, unsigned bytes) {
    t_pending.push_back({dst, bytes ? *src : uint4{0, 0, 0, 0}});
}
inline void cp_async_commit() { t_groups.push_back(std::move(t_pending)); t_pending.clear(); }
template <int N> void cp_async_wait() {
    while (t_groups.size() > (size_t)N) {
        for (auto& c : t_groups.front()) *c.dst = c.val;
        t_groups.erase(t_groups.begin());
    }
}
inline u16 emu_half(const void* row, unsigned i) { u16 x; memcpy(&x, (const unsigned char*)row + 2 * i, 2); return x; }
inline void ldsm4(unsigned (&r)[4], const uint4* row) {
    const uint4* rows[32];
    warp_all(row, rows);
    const unsigned t = threadIdx.x % 32;
    for (int i = 0; i < 4; i++) {
        const uint4* rp = rows[8 * i + t / 4];
        r[i] = emu_half(rp, 2 * (t % 4)) | ((unsigned)emu_half(rp, 2 * (t % 4) + 1) << 16);
    }
}
inline void ldsm4_trans(unsigned (&r)[4], const uint4* row) {
    const uint4* rows[32];
    warp_all(row, rows);
    const unsigned t = threadIdx.x % 32;
    for (int i = 0; i < 4; i++)
        r[i] = emu_half(rows[8 * i + 2 * (t % 4)], t / 4) | ((unsigned)emu_half(rows[8 * i + 2 * (t % 4) + 1], t / 4) << 16);
}
struct MmaIn { unsigned a[4], b[2]; };
inline void mma16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    MmaIn all[32];
    warp_all(MmaIn{{a0, a1, a2, a3}, {b0, b1}}, all);
    auto elem = [](unsigned w, unsigned k) { return to_f32((u16)(k % 2 ? w >> 16 : w & 0xffffu)); };
    auto A = [&](unsigned i, unsigned k) { return elem(all[(i % 8) * 4 + (k % 8) / 2].a[(i >= 8) + 2 * (k >= 8)], k); };
    auto B = [&](unsigned k, unsigned j) { return elem(all[j * 4 + (k % 8) / 2].b[k >= 8], k); };
    const unsigned t = threadIdx.x % 32;
    for (int x = 0; x < 4; x++) {
        const unsigned i = t / 4 + 8 * (x / 2), j = 2 * (t % 4) + x % 2;
        float acc = d[x];
        for (unsigned k = 0; k < 16; k++) acc += A(i, k) * B(k, j);
        d[x] = acc;
    }
}
// Optional hooks (sm90.h): before each block's threads start, and in each thread after the kernel returned.
static void (*g_block_start)(unsigned block, unsigned threads) = nullptr;
static void (*g_thread_exit)() = nullptr;
// With __syncthreads inside, an early `return` of some threads would deadlock the emulated barrier;
// a thread that finishes drops out of the barrier.
// Blocks run one after the other, x fastest; the hooks see a block's linear index.
template <class F> void launch(dim3 grid, unsigned threads, F kernel) {
    gridDim = grid;
    const unsigned blocks = grid.x * grid.y * grid.z;
    for (unsigned b = 0; b < blocks; b++) {
        if (g_block_start) g_block_start(b, threads);
        std::barrier<> bar(threads);
        g_bar = &bar;
        std::vector<std::unique_ptr<SpinBarrier>> wbars;
        for (unsigned w = 0; w * 32 < threads; w++) {
            wbars.push_back(std::make_unique<SpinBarrier>(threads - w * 32 < 32 ? threads - w * 32 : 32));
            g_wbar[w] = wbars.back().get();
        }
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; t++)
            ts.emplace_back([&, t, b] {
                threadIdx = {t, 0, 0};
                blockIdx = {b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
                kernel();
                if (g_thread_exit) g_thread_exit();
                bar.arrive_and_drop();
                g_wbar[t / 32]->arrive_and_drop();
            });
        for (auto& th : ts) th.join();
    }
}
template <class F> void launch(unsigned blocks, unsigned threads, F kernel) { launch(dim3{blocks, 1, 1}, threads, kernel); }
