// CPU emulation of the sm_90 pieces the wgmma kernels use (shaders/cuda/s2_forward.cu with USE_WGMMA=1, for
// forward_check.cc; s2_backward.cu's PASS 2 and 3, for backward_check.cc; see run.sh), on top of emu.h: the
// PTX functions of their `#ifndef S2_EMU` blocks with their PTX semantics, checked where a kernel could break them:
// - shared memory: `cvta.to.shared` gives the byte offset into emu.h's g_dyn; the launch's dynamic window starts
//   off a 1024-byte boundary (the kernel aligns its swizzle atoms itself) and every emulated access outside it
//   is an error; the window is poisoned (all bits set) before each block.
// - proxies: the async proxy (TMA and bulk copies, wgmma operand reads) sees shared memory through its own copy,
//   g_dyn_async: the TMA and bulk copies write both copies, wgmma reads the async one, and fence.proxy.async
//   copies the window's generic bytes into it. A wgmma operand written by generic stores or cp.async with no
//   proxy fence after them is read stale (poison), which shows. Coarser than the hardware: any thread's fence
//   publishes every generic write made so far, so a missing fence shows only where no later fence covers it.
// - cp.async (the Ampere form, 16 bytes, zero fill) copies its source when issued and lands later:
//   cp.async.mbarrier.arrive.noinc hands the thread's uncommitted copies to the mbarrier, and they land
//   together with that arrival either at once or only when some thread waits on the mbarrier (half each, by
//   a hash of thread and count), so a read before the wait or a buffer refilled while still in use shows.
// - mbarriers live in their shared-memory word: phase parity, pending and expected arrivals and the
//   transaction count; a phase completes when its arrivals reach zero and its transaction count is zero;
//   try_wait.parity passes for the phase before the current one. Over-arrivals and uninitialised mbarriers
//   are errors.
// - TMA (cp.async.bulk.tensor, tiled, from a tensor map the check program encodes with emu_tensor_map_4d into
//   the kernel's TensorMap): copies the box at once into shared memory in the map's swizzle (128B: the 16-byte
//   chunk at address bits 4-6 XOR address bits 7-9), zero-fills coordinates out of the tensor, then completes
//   the box's bytes on the mbarrier. The non-tensor bulk copy (cp.async.bulk.shared::cluster.global, 16-byte
//   aligned, a multiple of 16 bytes) likewise.
// - named barriers (bar.sync / bar.arrive id, n): per-id generations that complete at n arrivals (arrive does
//   not wait); a count that differs within a generation is an error.
// - wgmma.mma_async m64nNk16 (f32 += f16/bf16; B by a 128B-swizzled shared-memory descriptor, K-major or
//   transposed; A in registers, or (the SS form) by a K-major descriptor like B's, A element (m, k) where B's
//   (k, n = m) would be): warpgroup-collective, asynchronous: issue records the operands (the A fragments of
//   every thread or A's descriptor, a hash of the shared-memory elements this thread's accumulators read, the
//   accumulator address); the math happens only when wgmma.wait_group retires the op's group, each thread
//   computing its own accumulators from its quad's A fragments (or A's rows in shared memory) and the shared
//   memory of that moment. Errors: an issue with no wgmma.fence since the last wait, operands that differ
//   across the warpgroup, A or accumulator registers written, or the shared-memory operands changed, between
//   issue and retirement, ops left pending at exit.
// - setmaxnreg (deleted from the kernels by run.sh), wgmma.fence and the register fences are no-ops.
// Waits sleep on futexes (2 cores, 384 threads); one that makes no progress for EMU_DEADLOCK_S seconds ends
// the run as a deadlock (exit status 1). Other errors are counted in g_emu_errors (the first few printed).
#include <stdint.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <climits>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
typedef unsigned int u32;
typedef unsigned long long u64;
#define __align__(n) alignas(n)
#define __grid_constant__
#ifndef EMU_DEADLOCK_S
#define EMU_DEADLOCK_S 60
#endif
#define EMU_MAX_THREADS 1024

static std::atomic<unsigned> g_emu_errors{0};
static std::mutex g_emu_log;
template <class... A> void emu_error(const char* fmt, A... a) {
    if (g_emu_errors.fetch_add(1) >= 12) return;
    std::lock_guard<std::mutex> lock(g_emu_log);
    fprintf(stderr, "  emulation error (block %u, thread %u): ", blockIdx.x, threadIdx.x);
    fprintf(stderr, fmt, a...);
    fputc('\n', stderr);
}
static std::atomic<bool> g_emu_fatal{false};
template <class... A> [[noreturn]] void emu_fatal(const char* fmt, A... a) {
    if (g_emu_fatal.exchange(true))  // another thread is reporting and ending the run
        for (;;) pause();
    {
        std::lock_guard<std::mutex> lock(g_emu_log);
        fprintf(stderr, "  emulation error (block %u, thread %u): ", blockIdx.x, threadIdx.x);
        fprintf(stderr, fmt, a...);
        fputs("\n  FAILED\n", stderr);
        fflush(stderr);
    }
    _exit(1);
}

// Waits: a thread that finds its condition false sleeps on a 32-bit word (futex) that every change of the state it
// waits for bumps (a few yields first); one that makes no progress for EMU_DEADLOCK_S seconds is a deadlock.
inline void emu_wake(std::atomic<u32>& w) {
    syscall(SYS_futex, (u32*)&w, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}
inline void emu_bump(std::atomic<u32>& w) {
    w.fetch_add(1);
    emu_wake(w);
}
template <class P> void emu_wait(std::atomic<u32>& w, P ready, const char* what) {
    const auto t0 = std::chrono::steady_clock::now();
    for (unsigned n = 0;; n++) {
        const u32 seen = w.load();
        if (ready()) return;
        if (n < 4) {
            std::this_thread::yield();
            continue;
        }
        timespec ts{0, 50000000};
        syscall(SYS_futex, (u32*)&w, FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
        if ((n & 15) == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::seconds(EMU_DEADLOCK_S))
            emu_fatal("no progress for %d s waiting on %s: a deadlock", EMU_DEADLOCK_S, what);
    }
}

// ---- Shared memory ----
// Where the dynamic window starts: 16 bytes past a 1024-byte boundary, so that aligning the swizzle atoms takes
// all but 16 bytes of the host's 1 KB of slack.
#define EMU_DYN_OFFSET 0x10u
static u32 g_win_lo, g_win_hi, g_threads;
inline unsigned char* emu_dyn_smem() { return (unsigned char*)g_dyn + EMU_DYN_OFFSET; }
// The async proxy's view of shared memory (same offsets as g_dyn); g_proxy_mu orders its writers (the TMA and bulk
// copies, fence.proxy.async).
alignas(1024) static unsigned char g_dyn_async[sizeof(g_dyn)];
static std::mutex g_proxy_mu;
inline u32 smem_addr(const void* p) {
    const ptrdiff_t off = (const unsigned char*)p - (const unsigned char*)g_dyn;
    if (off < 0 || off >= (ptrdiff_t)sizeof(g_dyn)) emu_fatal("cvta.to.shared of a pointer outside shared memory");
    return (u32)off;
}
// The bytes [addr, addr + n) of the shared window.
inline unsigned char* emu_smem(u32 addr, u32 n, const char* what) {
    if (addr < g_win_lo || (u64)addr + n > g_win_hi) {
        if ((u64)addr + n > sizeof(g_dyn)) emu_fatal("%s: shared address %#x past shared memory", what, addr);
        emu_error("%s: shared bytes [%#x, %#x) outside the dynamic window [%#x, %#x)", what, addr, addr + n, g_win_lo,
                  g_win_hi);
    }
    return (unsigned char*)g_dyn + addr;
}
// The same bytes as the async proxy sees them.
inline unsigned char* emu_smem_async(u32 addr, u32 n, const char* what) {
    return g_dyn_async + (emu_smem(addr, n, what) - (unsigned char*)g_dyn);
}
// fence.proxy.async.shared::cta: the generic proxy's writes so far become visible to the async proxy.
inline void fence_proxy_async() {
    std::lock_guard<std::mutex> lock(g_proxy_mu);
    memcpy(g_dyn_async + g_win_lo, (unsigned char*)g_dyn + g_win_lo, g_win_hi - g_win_lo);
}

// ---- Conversions and approximate math (the kernel's PTX functions) ----
// cvt.rn.{f16,bf16}x2.f32, `lo` in the low half.
inline u32 pack2(float lo, float hi) { return (u32)from_f32(lo) | ((u32)from_f32(hi) << 16); }
inline float fast_exp2(float x) {  // ex2.approx.ftz.f32: subnormal inputs and results flush to zero
    if (fabsf(x) < 1.17549435e-38f) x = 0.f;
    const float y = exp2f(x);
    return fabsf(y) < 1.17549435e-38f ? 0.f : y;
}
inline float fast_log2(float x) { return log2f(x); }  // lg2.approx.f32

// ---- ldmatrix (x4, plain or transposed) from a shared-window address, and mma.sync with the A fragments as
// an array (s2_forward.cu's signatures) ----
inline void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    if (addr % 16) emu_error("ldmatrix row address %#x not 16-byte aligned", addr);
    ldsm4(r, (const uint4*)emu_smem(addr, 16, "ldmatrix"));
}
inline void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    if (addr % 16) emu_error("ldmatrix row address %#x not 16-byte aligned", addr);
    ldsm4_trans(r, (const uint4*)emu_smem(addr, 16, "ldmatrix"));
}
inline void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma16816(c, a[0], a[1], a[2], a[3], b0, b1); }

// ---- mbarriers: one 64-bit shared word; bits 0-19 pending arrivals, 20-39 expected arrivals, 40-60 the
// transaction count (signed), 61-62 a tag (01: initialised), 63 the current phase's parity ----
struct Mbar {
    u32 pending, expected;
    int tx;
    u32 phase;
};
static const u64 MB_TAG_MASK = 3ull << 61, MB_TAG = 1ull << 62;
inline bool mb_decode(u64 w, Mbar& m) {
    if ((w & MB_TAG_MASK) != MB_TAG) return false;
    m.pending = w & 0xfffffu;
    m.expected = (w >> 20) & 0xfffffu;
    int tx = (int)((w >> 40) & 0x1fffffu);
    m.tx = tx >= 0x100000 ? tx - 0x200000 : tx;
    m.phase = (u32)(w >> 63);
    return true;
}
inline u64 mb_encode(const Mbar& m) {
    return (u64)m.pending | ((u64)m.expected << 20) | ((u64)((u32)m.tx & 0x1fffffu) << 40) | MB_TAG |
           ((u64)m.phase << 63);
}
static std::atomic<u32> g_mb_seq[256];  // bumped at every change of the mbarriers hashed to each
inline std::atomic<u32>& mb_seq(u32 bar) { return g_mb_seq[(bar >> 3) % 256]; }
inline u64* mb_word(u32 bar, const char* what) {
    if (bar % 8) emu_error("%s: mbarrier address %#x not 8-byte aligned", what, bar);
    return (u64*)emu_smem(bar & ~7u, 8, what);
}
inline void mbar_init(u32 bar, u32 count) {
    if (count == 0 || count >= (1u << 20)) emu_error("mbarrier.init count %u out of range", count);
    __atomic_store_n(mb_word(bar, "mbarrier.init"), mb_encode({count, count, 0, 0}), __ATOMIC_SEQ_CST);
    emu_bump(mb_seq(bar));
}
// `arrivals` arrive-on operations and a transaction-count change of `tx` (expect-tx +, complete-tx -), atomically.
inline void mb_update(u32 bar, u32 arrivals, int tx, const char* what) {
    u64* w = mb_word(bar, what);
    u64 old = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    for (;;) {
        Mbar m;
        if (!mb_decode(old, m)) {
            emu_error("%s on shared address %#x, which holds no initialised mbarrier", what, bar);
            return;
        }
        if (arrivals > m.pending) {
            emu_error("%s on mbarrier %#x: an arrival beyond the phase's expected count", what, bar);
            return;
        }
        m.pending -= arrivals;
        m.tx += tx;
        if (m.tx >= (1 << 20) || m.tx <= -(1 << 20)) emu_error("%s on mbarrier %#x: tx-count out of range", what, bar);
        if (m.pending == 0 && m.tx == 0) {
            m.phase ^= 1u;
            m.pending = m.expected;
        }
        if (__atomic_compare_exchange_n(w, &old, mb_encode(m), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            emu_bump(mb_seq(bar));
            return;
        }
    }
}
inline void mbar_arrive(u32 bar) { mb_update(bar, 1, 0, "mbarrier.arrive"); }
inline void mbar_arrive_expect_tx(u32 bar, u32 bytes) { mb_update(bar, 1, (int)bytes, "mbarrier.arrive.expect_tx"); }

// ---- cp.async (16 bytes; `valid` false fills zeros) and its mbarrier arrival ----
inline void cp_async16(u32 dst, const void* src, bool valid) {
    if (dst % 16) emu_error("cp.async destination %#x not 16-byte aligned", dst);
    if (valid && (uintptr_t)src % 16) emu_error("cp.async source %p not 16-byte aligned", src);
    uint4 v{0, 0, 0, 0};
    if (valid) memcpy(&v, src, 16);
    t_pending.push_back({(uint4*)emu_smem(dst, 16, "cp.async"), v});
}
struct CpAsyncArrival {
    u32 bar;
    unsigned owner;
    std::vector<AsyncCopy> copies;
};
static std::mutex g_cpa_mu;
static std::deque<CpAsyncArrival> g_cpa;  // arrivals whose copies have not landed
static std::atomic<unsigned> g_cpa_count{0};
thread_local unsigned t_cpa_n;
inline void cpa_land(CpAsyncArrival& e) {
    for (auto& c : e.copies) *c.dst = c.val;
    mb_update(e.bar, 1, 0, "cp.async.mbarrier.arrive.noinc");
}
// Lands the deferred arrivals on `bar` (all: ~0u) issued by `owner` (all: ~0u).
inline void cpa_land_deferred(u32 bar, unsigned owner) {
    if (g_cpa_count.load() == 0) return;
    std::vector<CpAsyncArrival> take;
    {
        std::lock_guard<std::mutex> lock(g_cpa_mu);
        for (auto it = g_cpa.begin(); it != g_cpa.end();) {
            if ((bar == ~0u || it->bar == bar) && (owner == ~0u || it->owner == owner)) {
                take.push_back(std::move(*it));
                it = g_cpa.erase(it);
                g_cpa_count.fetch_sub(1);
            } else {
                ++it;
            }
        }
    }
    for (auto& e : take) cpa_land(e);
}
// cp.async.mbarrier.arrive.noinc: arrives on `bar` (its pending count not raised first) once every cp.async this
// thread issued so far has landed. Committed groups land now; the uncommitted copies land with the arrival.
inline void mbar_arrive_cp_async(u32 bar) {
    for (auto& g : t_groups)
        for (auto& c : g) *c.dst = c.val;
    t_groups.clear();
    CpAsyncArrival e{bar, threadIdx.x, std::move(t_pending)};
    t_pending.clear();
    const unsigned h = (t_cpa_n++ + 1u) * 2654435761u ^ (threadIdx.x * 40503u);
    if ((h >> 15) & 1u) {
        cpa_land(e);
    } else {
        {
            std::lock_guard<std::mutex> lock(g_cpa_mu);
            g_cpa.push_back(std::move(e));
            g_cpa_count.fetch_add(1);
        }
        emu_bump(mb_seq(bar));  // a thread asleep on the mbarrier lands it
    }
}

inline bool mbar_test(u32 bar, u32 parity) {
    for (int pass = 0; pass < 2; pass++) {
        Mbar m;
        if (!mb_decode(__atomic_load_n(mb_word(bar, "mbarrier.try_wait"), __ATOMIC_SEQ_CST), m)) {
            emu_error("mbarrier.try_wait on shared address %#x, which holds no initialised mbarrier", bar);
            return true;
        }
        if (m.phase != (parity & 1u)) return true;  // the phase before the current one: complete
        if (pass == 0) cpa_land_deferred(bar, ~0u);  // copies still in flight land now that someone waits
    }
    return false;
}
inline void mbar_wait(u32 bar, u32 parity) {
    emu_wait(mb_seq(bar), [&] { return mbar_test(bar, parity); }, "an mbarrier");
}

// ---- TMA: a tiled tensor map (what cuTensorMapEncodeTiled encodes, in the kernel's opaque TensorMap) ----
struct EmuTensorMap {
    u64 magic;
    const void* addr;
    u64 dims[4];      // elements, innermost first
    u64 strides[3];   // bytes, of dims 1..3
    u32 box[4];
    u32 elem_bytes, swizzle_bytes;  // swizzle: 0 (none), 32, 64 or 128
};
static const u64 EMU_TMAP_MAGIC = 0x70616d736e6574ull;
template <class M> void emu_tensor_map_4d(M& map, const void* addr, const u64 (&dims)[4], const u64 (&strides)[3],
                                          const u32 (&box)[4], u32 elem_bytes, u32 swizzle_bytes) {
    static_assert(sizeof(M) >= sizeof(EmuTensorMap), "the kernel's tensor map holds the emulated one");
    EmuTensorMap m{EMU_TMAP_MAGIC, addr, {}, {}, {}, elem_bytes, swizzle_bytes};
    memcpy(m.dims, dims, sizeof dims);
    memcpy(m.strides, strides, sizeof strides);
    memcpy(m.box, box, sizeof box);
    memset(&map, 0, sizeof map);
    memcpy(&map, &m, sizeof m);
}
// The shared address where the TMA (and the wgmma descriptors) put the byte at linear address `a`.
inline u32 emu_swizzle(u32 a, u32 swizzle_bytes) {
    return swizzle_bytes ? a ^ (((a >> 7) & (swizzle_bytes / 16 - 1)) << 4) : a;
}
// cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [map, {c0..c3}], [bar]
template <class M> void tma_load_4d(u32 dst, const M* map, int c0, int c1, int c2, int c3, u32 bar) {
    EmuTensorMap m;
    memcpy(&m, map, sizeof m);
    if (m.magic != EMU_TMAP_MAGIC) emu_fatal("cp.async.bulk.tensor with a tensor map the check did not encode");
    const u32 row = m.box[0] * m.elem_bytes, rows = m.box[1] * m.box[2] * m.box[3], bytes = row * rows;
    if (dst % 128) emu_error("cp.async.bulk.tensor destination %#x not 128-byte aligned", dst);
    if (m.swizzle_bytes && row != m.swizzle_bytes)
        emu_error("cp.async.bulk.tensor: box rows of %u bytes with a %u-byte swizzle", row, m.swizzle_bytes);
    if ((uintptr_t)m.addr % 16 || m.strides[0] % 16 || m.strides[1] % 16 || m.strides[2] % 16)
        emu_error("cp.async.bulk.tensor: global address or strides not 16-byte aligned");
    unsigned char* smem = emu_smem(dst, bytes, "cp.async.bulk.tensor");
    unsigned char* smem_async = emu_smem_async(dst, bytes, "cp.async.bulk.tensor");
    const int c[4] = {c0, c1, c2, c3};
    std::unique_lock<std::mutex> lock(g_proxy_mu);
    for (u32 i3 = 0; i3 < m.box[3]; i3++)
        for (u32 i2 = 0; i2 < m.box[2]; i2++)
            for (u32 i1 = 0; i1 < m.box[1]; i1++)
                for (u32 i0 = 0; i0 < m.box[0]; i0++) {
                    const long long x[4] = {(long long)c[0] + i0, (long long)c[1] + i1, (long long)c[2] + i2,
                                            (long long)c[3] + i3};
                    bool in = true;
                    for (int d = 0; d < 4; d++) in &= x[d] >= 0 && x[d] < (long long)m.dims[d];
                    const u32 lin = dst + ((i3 * m.box[2] + i2) * m.box[1] + i1) * row + i0 * m.elem_bytes;
                    const u32 at = emu_swizzle(lin, m.swizzle_bytes) - dst;
                    if (in)
                        memcpy(smem + at,
                               (const unsigned char*)m.addr + x[0] * m.elem_bytes + x[1] * m.strides[0] +
                                   x[2] * m.strides[1] + x[3] * m.strides[2],
                               m.elem_bytes);
                    else
                        memset(smem + at, 0, m.elem_bytes);
                    memcpy(smem_async + at, smem + at, m.elem_bytes);
                }
    lock.unlock();
    mb_update(bar, 0, -(int)bytes, "cp.async.bulk.tensor complete_tx");
}
// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [src], bytes, [bar]
inline void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    if (dst % 16 || (uintptr_t)src % 16 || bytes % 16 || bytes == 0)
        emu_error("cp.async.bulk: destination %#x, source %p or size %u not a multiple of 16", dst, src, bytes);
    unsigned char* smem = emu_smem(dst, bytes, "cp.async.bulk");
    {
        std::lock_guard<std::mutex> lock(g_proxy_mu);
        memcpy(smem, src, bytes);
        memcpy(emu_smem_async(dst, bytes, "cp.async.bulk"), src, bytes);
    }
    mb_update(bar, 0, -(int)bytes, "cp.async.bulk complete_tx");
}

// ---- Named barriers: per id, one 64-bit word: arrivals (bits 0-15), the generation's count (16-31) and the
// generation (32-63) ----
static std::atomic<u64> g_named[16];
static std::atomic<u32> g_named_seq[16];
inline void emu_named(u32 id, u32 n, bool wait) {
    if (id >= 16 || n == 0 || n % 32 || n > g_threads)
        emu_error("bar.%s %u, %u: bad barrier or thread count", wait ? "sync" : "arrive", id, n);
    u64 old = g_named[id % 16].load();
    for (;;) {
        const u32 c = old & 0xffffu, cn = (old >> 16) & 0xffffu, gen = (u32)(old >> 32);
        if (c > 0 && cn != n) emu_error("bar %u: %u threads here, %u in the same generation before", id, n, cn);
        const u64 next = c + 1 >= n ? (u64)(gen + 1) << 32 : ((u64)gen << 32) | ((u64)n << 16) | (c + 1);
        if (g_named[id % 16].compare_exchange_weak(old, next)) {
            if (c + 1 >= n) emu_bump(g_named_seq[id % 16]);
            else if (wait)
                emu_wait(g_named_seq[id % 16], [&] { return (u32)(g_named[id % 16].load() >> 32) != gen; },
                         "a named barrier");
            return;
        }
    }
}
inline void named_sync(u32 id, u32 n) { emu_named(id, n, true); }
inline void named_arrive(u32 id, u32 n) { emu_named(id, n, false); }

// ---- wgmma ----
template <int N> void fence_regs(float*) {}
template <int N> void fence_u32(u32*) {}
#define EMU_WG_RING 32
// What each thread contributes to its k-th wgmma (slot k % EMU_WG_RING), read by the others of its warpgroup.
struct WgRec {
    u64 desc, desc_a;  // desc_a: the SS form's A descriptor (0: A in registers)
    u32 n, trans, scale, a[4];
};
static WgRec g_wg_ring[EMU_MAX_THREADS][EMU_WG_RING];
static std::atomic<u32> g_wg_issued[EMU_MAX_THREADS], g_wg_retired[EMU_MAX_THREADS];  // ops per thread
struct WgOp {
    u64 k, desc, desc_a, bhash;
    u32 n, trans, scale, a[4];
    const u32* a_reg;  // null in the SS form
    float* d;
    bool snap;  // dsnap holds the accumulators as they must be when the op runs
    float dsnap[128];
};
thread_local std::vector<WgOp> t_wg_open;
thread_local std::deque<std::vector<WgOp>> t_wg_groups;
thread_local u64 t_wg_issued;
thread_local bool t_wg_fenced;

// Shared address of B element (k, n) of a 128B-swizzled descriptor: K-major, rows of 128 bytes along N, 8-row
// groups SBO apart; transposed (MN-major), 64-element rows along N, 8-row groups along K SBO apart, 64-column
// atoms along N LBO apart.
inline u32 wg_b_addr(u64 desc, u32 trans, u32 k, u32 n) {
    const u32 start = (u32)(desc & 0x3fffu) << 4, lbo = (u32)((desc >> 16) & 0x3fffu) << 4,
              sbo = (u32)((desc >> 32) & 0x3fffu) << 4;
    const u32 lin = trans ? start + (n / 64) * lbo + (n % 64) * 2 + (k / 8) * sbo + (k % 8) * 128
                          : start + (n / 8) * sbo + (n % 8) * 128 + k * 2;
    return emu_swizzle(lin, 128);
}
// Operand elements as the async proxy reads them: B (k, n), and the SS form's A (m, k) (K-major: where a K-major
// B's (k, n = m) is).
inline u16 wg_b(u64 desc, u32 trans, u32 k, u32 n) {
    u16 x;
    memcpy(&x, emu_smem_async(wg_b_addr(desc, trans, k, n), 2, "wgmma B operand"), 2);
    return x;
}
inline u16 wg_a(u64 desc_a, u32 m, u32 k) {
    u16 x;
    memcpy(&x, emu_smem_async(wg_b_addr(desc_a, 0, k, m), 2, "wgmma A operand"), 2);
    return x;
}
// This thread's accumulator rows within its warpgroup's 64: g and g + 8 of its warp's 16.
inline u32 wg_row(u32 h) { return (threadIdx.x % 128) / 32 * 16 + (threadIdx.x % 32) / 4 + 8 * h; }
// A hash of the shared-memory elements this thread's accumulators read: B's columns 2t, 2t + 1 of every 8, and
// in the SS form A's rows wg_row(0), wg_row(1).
inline u64 wg_b_hash(const WgOp& op) {
    const u32 t = threadIdx.x % 4;
    u64 h = 1469598103934665603ull;
    for (u32 k = 0; k < 16; k++) {
        for (u32 j = 0; j < op.n; j += 8)
            for (u32 e = 0; e < 2; e++) h = (h ^ wg_b(op.desc, op.trans, k, j + 2 * t + e)) * 1099511628211ull;
        if (op.desc_a)
            for (u32 r = 0; r < 2; r++) h = (h ^ wg_a(op.desc_a, wg_row(r), k)) * 1099511628211ull;
    }
    return h;
}
// The descriptor checks: 128B swizzle, no base offset, reserved bits clear, rows inside a swizzle row.
inline void wg_check_desc(u64 desc, u32 trans, const char* what) {
    if ((desc >> 62) != 1)
        emu_error("wgmma %s descriptor %#llx: layout type %llu, only 128B swizzle emulated", what, desc, desc >> 62);
    if (((desc >> 49) & 7u) != 0) emu_error("wgmma %s descriptor %#llx: non-zero base offset not emulated", what, desc);
    if (desc & 0x3ffe0000c000c000ull) emu_error("wgmma %s descriptor %#llx: reserved bits set", what, desc);
    const u32 start = (u32)(desc & 0x3fffu) << 4;
    if (trans ? start % 128 != 0 : start % 128 > 96)
        emu_error("wgmma %s descriptor start %#x: the operand's rows cross a 128-byte swizzle row", what, start);
}
// One thread's part of a wgmma: A from registers `a`, or (a null, the SS form) from descriptor `desc_a`.
inline void emu_wgmma(u32 n, u32 trans, float* d, const u32* a, u64 desc_a, u64 desc, int accumulate) {
    const unsigned tid = threadIdx.x, wg0 = tid / 128 * 128;
    if (!t_wg_fenced) emu_error("wgmma.mma_async with no wgmma.fence since the last wgmma.wait_group");
    wg_check_desc(desc, trans, "B");
    if (!a) {
        if (!desc_a) emu_error("wgmma A descriptor 0");
        wg_check_desc(desc_a, 0, "A");
    }
    const u64 k = t_wg_issued;
    if (k >= EMU_WG_RING)  // the slot's previous op must be retired by every reader
        for (unsigned q = wg0; q < wg0 + 128; q++)
            emu_wait(g_wg_retired[q], [&] { return g_wg_retired[q].load() >= k - EMU_WG_RING + 1; },
                     "wgmma operand slots");
    WgOp op;
    op.k = k;
    op.desc = desc;
    op.desc_a = a ? 0 : desc_a;
    op.n = n;
    op.trans = trans;
    op.scale = accumulate != 0;
    if (a) memcpy(op.a, a, sizeof op.a);
    else memset(op.a, 0, sizeof op.a);
    op.a_reg = a;
    op.d = d;
    op.snap = true;
    for (auto& o : t_wg_open) op.snap &= o.d != d;
    for (auto& g : t_wg_groups)
        for (auto& o : g) op.snap &= o.d != d;
    if (op.snap) memcpy(op.dsnap, d, n / 2 * sizeof(float));
    op.bhash = wg_b_hash(op);
    g_wg_ring[tid][k % EMU_WG_RING] = {desc, op.desc_a, n, trans, op.scale, {op.a[0], op.a[1], op.a[2], op.a[3]}};
    g_wg_issued[tid].store(k + 1);
    emu_wake(g_wg_issued[tid]);
    t_wg_issued = k + 1;
    t_wg_open.push_back(op);
}
template <int TRANS_B> void wgmma_n64(float* d, const u32 (&a)[4], u64 desc, int accumulate) {
    emu_wgmma(64, TRANS_B, d, a, 0, desc, accumulate);
}
template <int TRANS_B> void wgmma_n128(float* d, const u32 (&a)[4], u64 desc, int accumulate) {
    emu_wgmma(128, TRANS_B, d, a, 0, desc, accumulate);
}
// The SS form (both operands K-major from shared memory).
inline void wgmma_ss_n64(float* d, u64 desc_a, u64 desc_b, int accumulate) {
    emu_wgmma(64, 0, d, nullptr, desc_a, desc_b, accumulate);
}
inline void wgmma_ss_n128(float* d, u64 desc_a, u64 desc_b, int accumulate) {
    emu_wgmma(128, 0, d, nullptr, desc_a, desc_b, accumulate);
}
inline void wgmma_fence() { t_wg_fenced = true; }
inline void wgmma_commit() {
    t_wg_groups.push_back(std::move(t_wg_open));
    t_wg_open.clear();
}
// Runs `op` for this thread's accumulators: D[row][col] (+)= sum_k A[row][k] B[k][col], rows g and g + 8 of the
// warp's 16, columns 8j + 2t, 8j + 2t + 1 (accumulator i: row g + 8 * (i / 2 % 2), column 8 * (i / 4) + 2t + i % 2).
inline void wg_retire(WgOp& op) {
    const unsigned tid = threadIdx.x, wg0 = tid / 128 * 128, lane = tid % 32, g = lane / 4, t = lane % 4;
    const unsigned warp0 = tid - lane;
    for (unsigned q : {warp0 + 4 * g, warp0 + 4 * g + 1, warp0 + 4 * g + 2, warp0 + 4 * g + 3, wg0})
        emu_wait(g_wg_issued[q], [&] { return g_wg_issued[q].load() > op.k; },
                 "the warpgroup's threads to issue a wgmma");
    const WgRec& first = g_wg_ring[wg0][op.k % EMU_WG_RING];
    if (first.desc != op.desc || first.desc_a != op.desc_a || first.n != op.n || first.trans != op.trans ||
        first.scale != op.scale)
        emu_error("wgmma %llu: descriptors, shape, transpose or scale-d differ from the warpgroup's thread 0", op.k);
    if (op.a_reg && memcmp(op.a_reg, op.a, sizeof op.a))
        emu_error("wgmma %llu: A fragment registers written between the issue and wait_group", op.k);
    if (op.snap && memcmp(op.d, op.dsnap, op.n / 2 * sizeof(float)))
        emu_error("wgmma %llu: accumulator registers written between the issue and wait_group", op.k);
    if (wg_b_hash(op) != op.bhash)
        emu_error("wgmma %llu: its shared-memory operands changed between the issue and wait_group", op.k);
    float A[2][16];
    for (u32 h = 0; h < 2; h++)
        for (u32 kk = 0; kk < 16; kk++) {
            if (op.desc_a) {
                A[h][kk] = to_f32(wg_a(op.desc_a, wg_row(h), kk));
                continue;
            }
            const u32 w = g_wg_ring[warp0 + 4 * g + (kk % 8) / 2][op.k % EMU_WG_RING].a[h + 2 * (kk >= 8)];
            A[h][kk] = to_f32((u16)(kk % 2 ? w >> 16 : w & 0xffffu));
        }
    for (u32 i = 0; i < op.n / 2; i++) {
        const u32 h = (i / 2) % 2, col = 8 * (i / 4) + 2 * t + i % 2;
        float acc = op.scale ? op.d[i] : 0.f;
        for (u32 kk = 0; kk < 16; kk++) acc += A[h][kk] * to_f32(wg_b(op.desc, op.trans, kk, col));
        op.d[i] = acc;
    }
    g_wg_retired[tid].store(op.k + 1);
    emu_wake(g_wg_retired[tid]);
}
// wgmma.wait_group N: retires this thread's groups but the N most recent.
template <int N> void wgmma_wait() {
    while (t_wg_groups.size() > (size_t)N) {
        auto& grp = t_wg_groups.front();
        for (size_t i = 0; i < grp.size(); i++) {
            wg_retire(grp[i]);
            // The next pending op on these accumulators must find them as this one left them.
            WgOp* next = nullptr;
            for (size_t j = i + 1; j < grp.size() && !next; j++)
                if (grp[j].d == grp[i].d) next = &grp[j];
            for (size_t gi = 1; gi < t_wg_groups.size() && !next; gi++)
                for (auto& o : t_wg_groups[gi])
                    if (!next && o.d == grp[i].d) next = &o;
            for (auto& o : t_wg_open)
                if (!next && o.d == grp[i].d) next = &o;
            if (next) {
                next->snap = true;
                memcpy(next->dsnap, next->d, next->n / 2 * sizeof(float));
            }
        }
        t_wg_groups.pop_front();
    }
    t_wg_fenced = false;
}

// ---- Launch hooks: per block, the state above reset and the window poisoned; per thread, its leftovers ----
static u32 g_smem_bytes;  // the launch's dynamic shared memory (set by the check program)
inline void sm90_block_start(unsigned, unsigned threads) {
    if (threads > EMU_MAX_THREADS) emu_fatal("more than %d threads", EMU_MAX_THREADS);
    g_threads = threads;
    g_win_lo = EMU_DYN_OFFSET;
    g_win_hi = EMU_DYN_OFFSET + g_smem_bytes;
    if (g_win_hi > sizeof(g_dyn)) emu_fatal("%u bytes of dynamic shared memory do not fit", g_smem_bytes);
    memset(g_dyn, 0xff, sizeof(g_dyn));
    memset(g_dyn_async, 0xff, sizeof(g_dyn_async));
    for (auto& b : g_named) b.store(0);
    for (auto& b : g_named_seq) b.store(0);
    for (auto& b : g_mb_seq) b.store(0);
    for (unsigned t = 0; t < EMU_MAX_THREADS; t++) g_wg_issued[t].store(0), g_wg_retired[t].store(0);
    g_cpa.clear();
    g_cpa_count.store(0);
}
inline void sm90_thread_exit() {
    if (!t_wg_open.empty() || !t_wg_groups.empty()) emu_error("exited with wgmma ops no wait_group retired");
    if (!t_pending.empty()) emu_error("exited with %zu cp.async copies no mbarrier or group tracks", t_pending.size());
    cpa_land_deferred(~0u, threadIdx.x);
}
inline void sm90_install() {
    g_block_start = sm90_block_start;
    g_thread_exit = sm90_thread_exit;
}
