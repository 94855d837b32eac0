// Checks shaders/cuda/s2_decode.cu on the CPU (no GPU, no CUDA toolkit): the kernels compiled by g++ over
// emu.h, one std::thread per CUDA thread, against an f64 softmax reference over a hand-built work list
// (two KV heads, shuffled pages, partial row masks, a skipped block, causal end, one family split in 3
// and combined by its last item, items stored 5 keys short of the call's key shift). With NONFINITE=1 the
// inputs also hold a NaN in one Q row, +inf K elements that make the first two blocks of each KV head score
// -inf (a whole split of the split family) and a NaN V element: outputs must be NaN exactly where the IEEE
// reference's are. Build and run all configurations with run.sh; exit status 1 on an error above 2e-3 or a
// NaN in the wrong place.
#include "emu.h"
#include <cstdio>
#include <cstdlib>
#include <random>
#include <algorithm>
#include <cmath>
#ifndef NONFINITE
#define NONFINITE 0
#endif
#ifndef SPLIT_PASS
#define SPLIT_PASS 1
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#define BK 64
#ifndef STAGES
#define STAGES 3
#endif
#define NT 128
#define PASS SPLIT_PASS
namespace A {
#include "k_emu.cu"
}
typedef unsigned u32;

int main() {
    const u32 D = HEAD_DIM, BS = 64, HK = 2, group = ROWS / NTOK, H = group * HK, n_tok = NTOK;
    const u32 kv_len = 64 * 5 + 17, blocks = 6, pages = HK * blocks;
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    std::vector<u16> kp(pages * BS * D), vp(pages * BS * D), q(n_tok * H * D);
    for (auto& x : kp) x = from_f32(U(rng));
    for (auto& x : vp) x = from_f32(U(rng));
    for (auto& x : q) x = from_f32(U(rng));
    std::vector<u32> perm(pages);
    for (u32 i = 0; i < pages; i++) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    const u32 pos0 = kv_len - n_tok;
    if (NONFINITE) {
        for (u32 t = 0; t < n_tok; t++)
            for (u32 h = 0; h < H; h++) q[(t * H + h) * D] = from_f32(-1.f);
        q[3] = from_f32(NAN); // token 0, head 0: a NaN row
        for (u32 f = 0; f < HK; f++)
            for (u32 kb = 0; kb < 2; kb++)
                for (u32 j = 0; j < BS; j++) kp[((size_t)perm[f * blocks + kb] * BS + j) * D] = from_f32(INFINITY);
        vp[((size_t)perm[3] * BS + 7) * D + 2] = from_f32(NAN); // KV head 0, block 3, key 7
    }
    // Entries: kv head f lists its blocks (head 1 skips block 2); row r attends block kb unless (r + kb) % 3 == 0.
    std::vector<uint4> entries;
    std::vector<std::pair<u32, u32>> fam_range;
    for (u32 f = 0; f < HK; f++) {
        u32 e0 = entries.size();
        for (u32 kb = 0; kb < blocks; kb++) {
            if (f == 1 && kb == 2) continue;
            unsigned long long mask = 0;
            for (u32 r = 0; r < ROWS; r++) if ((r + kb) % 3 != 0 || kb == blocks - 1) mask |= 1ull << r;
            entries.push_back({perm[f * blocks + kb] * BS * D / 4, kb * BS, (u32)mask, (u32)(mask >> 32)});
        }
        fam_range.push_back({e0, (u32)entries.size()});
    }
    struct It { u32 head0, tok0, pos0, n_valid, kv_len, e0, e1, slot, lse0, nsplit, family, p0; };
    std::vector<It> items, fams;
    // Family 0 split in 3, family 1 in 1.
    u32 slots = 0;
    for (u32 f = 0; f < HK; f++) {
        auto [e0, e1] = fam_range[f];
        // Stored 5 keys short, as a token loop's lists are after 5 steps: the call's key shift adds them.
        It base{f * group, 0, pos0 - 5, n_tok, kv_len - 5, e0, e1, 0, f * group * n_tok, 1, 0, 0};
        if (f == 0) {
            u32 n = e1 - e0, ns = 3, chunk = (n + ns - 1) / ns;
            for (u32 s = 0; s < ns; s++) {
                It it = base;
                it.e0 = std::min(e0 + s * chunk, e1);
                it.e1 = std::min(it.e0 + chunk, e1);
                it.slot = slots + s;
                it.nsplit = ns;
                it.family = fams.size();
                items.push_back(it);
            }
            It fr = base; fr.slot = slots; fr.nsplit = ns; fams.push_back(fr);
            slots += ns;
        } else items.push_back(base);
    }
    std::vector<u16> o(n_tok * H * D, 0xffff);
    std::vector<float> lse(H * n_tok, NAN), part_o(slots * ROWS * D, NAN), part_lse(slots * ROWS, NAN);
    const float scale = 1.f / sqrtf((float)D);
    A::Params p{};
    p.q = q.data(); p.k = (const uint4*)kp.data(); p.v = (const uint4*)vp.data(); p.o = o.data(); p.lse = lse.data();
    p.items = (const A::Item*)items.data(); p.entries = entries.data(); p.part_o = part_o.data(); p.part_lse = part_lse.data();
    std::vector<u32> done(fams.size(), 0);
    p.families = (const A::Item*)fams.data(); p.done = done.data();
    p.n_items = items.size(); p.num_heads = H; p.n_tok = n_tok; p.block_size = BS; p.causal = 1;
    p.scale_log2 = scale * 1.4426950408889634f; p.kv_tok_stride = D / 4; p.lse_head_stride = n_tok;
    p.key_shift = 5;
#if SPLIT_PASS == 1
    launch(items.size(), 128, [&] { A::s2_decode_narrow(p); });
#elif SPLIT_PASS == 2
    launch(items.size(), 128, [&] { A::s2_decode_mma(p); });
#else
    static uint4 dyn[65536];
    (void)dyn;
    launch(items.size(), 128, [&] { A::s2_decode_split(p); });
#endif
    int counts_left = 0; // the last item of a family resets its done count for the next call
    for (u32 d : done) counts_left += d != 0;
    // Reference: IEEE softmax attention in f64. A row with a NaN or +inf score, or whose keys all score
    // -inf, is NaN; a -inf score (p = 0) adds nothing.
    double worst = 0, num = 0, den = 0, lse_err = 0;
    int nan_misplaced = 0;
    auto check = [&](double got, double want) {
        if (std::isnan(want) || std::isnan(got)) {
            nan_misplaced += std::isnan(want) != std::isnan(got);
            return false;
        }
        return true;
    };
    for (u32 f = 0; f < HK; f++) {
        auto [e0, e1] = fam_range[f];
        for (u32 r = 0; r < ROWS; r++) {
            u32 t = r % n_tok, head = f * group + r / n_tok, pos = pos0 + t;
            std::vector<double> s; std::vector<const u16*> vrow;
            for (u32 e = e0; e < e1; e++) {
                if (!((((unsigned long long)entries[e].w << 32) | entries[e].z) >> r & 1)) continue;
                for (u32 j = 0; j < BS; j++) {
                    u32 key = entries[e].y + j;
                    if (key >= kv_len || key > pos) break;
                    const u16* kr = kp.data() + (size_t)entries[e].x * 4 + (size_t)j * D;
                    double d = 0;
                    for (u32 c = 0; c < D; c++) d += (double)to_f32(q[(t * H + head) * D + c]) * to_f32(kr[c]);
                    s.push_back(d * scale);
                    vrow.push_back(vp.data() + (size_t)entries[e].x * 4 + (size_t)j * D);
                }
            }
            bool nan_row = false, finite = false;
            double m = -INFINITY;
            for (double x : s) {
                nan_row |= std::isnan(x) || x == INFINITY;
                if (x > -INFINITY) finite = true;
                if (x > m) m = x;
            }
            nan_row |= !s.empty() && !finite;
            double l = 0;
            for (double x : s) l += x > -INFINITY ? exp(x - m) : 0.0;
            for (u32 c = 0; c < D; c++) {
                double acc = 0;
                for (size_t i = 0; i < s.size(); i++)
                    if (s[i] > -INFINITY) acc += exp(s[i] - m) / l * to_f32(vrow[i][c]);
                if (nan_row) acc = NAN;
                double got = to_f32(o[(t * H + head) * D + c]);
                if (!check(got, acc)) continue;
                num += (got - acc) * (got - acc); den += acc * acc;
                worst = std::max(worst, fabs(got - acc));
            }
            double want_lse = nan_row ? NAN : s.empty() ? -INFINITY : m + log(l);
            double got_lse = lse[f * group * n_tok + (r / n_tok) * n_tok + t];
            if (check(got_lse, want_lse) && want_lse > -INFINITY) lse_err = std::max(lse_err, fabs(got_lse - want_lse));
        }
    }
    printf("%s d %d ROWS %d NTOK %d pass %d%s: rel err %.3e, max abs %.3e, lse max err %.3e, misplaced NaN %d, "
           "done counts left %d\n",
           IS_BF16 ? "bf16" : "f16", HEAD_DIM, ROWS, NTOK, SPLIT_PASS, NONFINITE ? " non-finite inputs" : "", sqrt(num / den),
           worst, lse_err, nan_misplaced, counts_left);
    return sqrt(num / den) < (IS_BF16 ? 1e-2 : 2e-3) && lse_err < 1e-3 && nan_misplaced == 0 && counts_left == 0
               ? 0 : 1;
}
