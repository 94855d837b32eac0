// Checks shaders/cuda/kv_append.cu on the CPU (no GPU, no CUDA toolkit): the kernel compiled by g++ over emu.h,
// one std::thread per CUDA thread, against the rows written on the host. A batch of three appends into one pool
// segment, two KV heads of 64 words (head dim 128 in f16), pages of 16 tokens, the source rows strided as the K
// and V columns of an interleaved QKV buffer: a prompt over several blocks in shuffled pages, one of whose blocks
// no future query needs (not written), an append within one page, and one that starts mid-page and crosses into
// the next; the grid smaller than the words, so threads stride. Run twice: the appends and page indices in device
// buffers, then carried in the launch's parameters. Every pool word must hold what the host puts there, the rest its
// poison. Exit status 1 on any difference.
#include "emu.h"
#include <cstdio>
#include <random>
#include <algorithm>
static dim3 blockDim;
#ifndef __grid_constant__
#define __grid_constant__
#endif
namespace A {
#include "kv_append.cu"
}
typedef unsigned u32;

int main() {
    const u32 HK = 2, RW = 64, BS = 16, Q_WORDS = 4 * RW, STRIDE = Q_WORDS + 2 * HK * RW, PAGES = 24;
    // (tokens, length before, first block, blocks) per append; pages[kvh][block] from a shuffled pool.
    struct Spec { u32 tokens, len0; };
    const Spec specs[3] = {{70, 0}, {5, 33}, {12, 10}};
    std::mt19937 rng(3);
    std::vector<u32> perm(PAGES);
    for (u32 i = 0; i < PAGES; i++) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    u32 next_page = 0, total = 0;
    std::vector<A::Append> appends;
    std::vector<u32> pages;
    unsigned long long words = 0;
    for (const Spec& s : specs) {
        const u32 first = s.len0 / BS, last = (s.len0 + s.tokens - 1) / BS, blocks = last - first + 1;
        A::Append a{s.tokens, s.len0, first, blocks, (u32)pages.size(), total, words};
        for (u32 h = 0; h < HK; h++)
            for (u32 b = 0; b < blocks; b++)
                // The prompt's block 2 of KV head 1 is one no future query needs.
                pages.push_back(&s == &specs[0] && h == 1 && b == 2 ? 0xffffffffu : perm[next_page++]);
        appends.push_back(a);
        words += (unsigned long long)s.tokens * HK * RW;
        total += s.tokens;
    }
    std::uniform_int_distribution<u32> U;
    std::vector<u32> qkv((size_t)total * STRIDE);
    for (auto& x : qkv) x = U(rng);
    const u32 POISON = 0xdeadbeefu;
    std::vector<u32> pool_k((size_t)PAGES * BS * RW, POISON), pool_v(pool_k), want_k(pool_k), want_v(pool_k);
    for (size_t i = 0; i < appends.size(); i++) {
        const A::Append& a = appends[i];
        for (u32 t = 0; t < a.tokens; t++)
            for (u32 h = 0; h < HK; h++) {
                const u32 pos = a.len0 + t;
                const u32 page = pages[a.pages0 + h * a.blocks + pos / BS - a.first_block];
                if (page == 0xffffffffu) continue;
                for (u32 w = 0; w < RW; w++) {
                    const size_t src = (size_t)(a.src_token0 + t) * STRIDE + h * RW + w;
                    const size_t dst = ((size_t)page * BS + pos % BS) * RW + w;
                    want_k[dst] = qkv[src + Q_WORDS];
                    want_v[dst] = qkv[src + Q_WORDS + HK * RW];
                }
            }
    }
    size_t bad = 0;
    for (int inl = 0; inl < 2; inl++) {
        std::fill(pool_k.begin(), pool_k.end(), POISON);
        std::fill(pool_v.begin(), pool_v.end(), POISON);
        A::Batch b{};
        b.src_k = qkv.data() + Q_WORDS;
        b.src_v = qkv.data() + Q_WORDS + HK * RW;
        b.pool_k = pool_k.data();
        b.pool_v = pool_v.data();
        b.appends = inl ? nullptr : appends.data();
        b.pages = inl ? nullptr : pages.data();
        if (inl) {
            if (appends.size() > INLINE_APPENDS || pages.size() > INLINE_PAGES) return 2;
            std::copy(appends.begin(), appends.end(), b.inline_appends);
            std::copy(pages.begin(), pages.end(), b.inline_pages);
        }
        b.words = words;
        b.n_appends = (u32)appends.size();
        b.kv_heads = HK;
        b.row_words = RW;
        b.block_size = BS;
        b.token_stride = STRIDE;
        blockDim = {64, 1, 1};
        launch(5, 64, [&] { A::kv_append(b); });
        size_t wrong = 0;
        for (size_t i = 0; i < pool_k.size(); i++) wrong += (pool_k[i] != want_k[i]) + (pool_v[i] != want_v[i]);
        const size_t skipped = std::count(pool_k.begin(), pool_k.end(), POISON);
        printf("kv_append (%s): %u tokens of 3 appends, %llu words, %zu pool words left unwritten, %zu wrong\n",
               inl ? "in the parameters" : "in device buffers", total, words, skipped, wrong);
        bad += wrong;
    }
    return bad ? 1 : 0;
}
