// The CUDA subset shaders/cuda/s2_decode.cu uses, emulated on the CPU for decode_check.cc (see run.sh).
// CPU emulation of the CUDA subset s2_decode.cu uses: one std::thread per CUDA thread, std::barrier for
// __syncthreads, static "shared" memory (one block at a time).
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct dim3 { unsigned x, y, z; };
thread_local dim3 threadIdx, blockIdx;
static uint4 g_dyn[8192];
static dim3 gridDim;
static std::barrier<>* g_bar;
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 __ldg(const uint4* p) { return *p; }
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
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
// With __syncthreads inside, an early `return` of some threads would deadlock the emulated barrier;
// a thread that finishes drops out of the barrier.
template <class F> void launch(unsigned blocks, unsigned threads, F kernel) {
    gridDim = {blocks, 1, 1};
    for (unsigned b = 0; b < blocks; b++) {
        std::barrier<> bar(threads);
        g_bar = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; t++)
            ts.emplace_back([&, t, b] { threadIdx = {t, 0, 0}; blockIdx = {b, 0, 0}; kernel(); bar.arrive_and_drop(); });
        for (auto& th : ts) th.join();
    }
}
