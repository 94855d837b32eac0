// Checks shaders/cuda/s2_exact.cu on the CPU (no GPU, no CUDA toolkit): the exact forward and backward
// compiled by g++ over emu.h (one std::thread per CUDA thread, 2 warps per CTA, a grid of 3 CTAs so that
// the grid-stride loops wrap), against an f64 reference over hand-built MergeQ row lists (tiles of 32 rows,
// both row-mask forms) and column lists (query tiles of 64): 4 heads in 2 patterns over 2 KV heads (GQA),
// blocks of 16, 93 tokens (a partial last block). Arguments: `noncausal`: the layout also attends the next block
// and one query block of pattern 1 has no key (O 0, LSE -inf); `nonfinite`: the inputs hold a NaN Q row,
// +inf K elements that make two blocks of KV head 0 score -inf (rows whose active keys all score -inf) and
// a key whose V holds a NaN score -inf (it adds nothing), NaN and +inf V elements and a NaN K element, each
// reached by some rows and masked (causality, block sparsity) for others, and a NaN dO row: every output (O, LSE, dQ, dK, dV) must be non-finite
// exactly where the IEEE reference's is, with the same infinities. The forward's O and LSE feed the
// backward, whose D / LSE scratch is filled as the tensor-core dQ pass fills it. Also checks that a clear
// flag leaves the outputs untouched. Build and run all configurations with run.sh; exit status 1 on an
// error above the tolerance or a misplaced non-finite value.
#include "emu.h"
#include <cstdio>
#include <cstdlib>
#include <random>
#include <cmath>
#include <cstring>
#define EXACT_EMU 1
#define EXACT_WARPS 2
typedef unsigned u32;
#include "k_exact.cu"

static const u32 BS = 16, SEQ = 93, H = 4, HK = 2, GROUP = H / HK, HPP = 2, PATTERNS = H / HPP, B = 1;
static const u32 TILE_Q = 32, COL_TILE = 64, D = HEAD_DIM;
static bool CAUSAL = true, NONFINITE = false;  // from the command line

// Whether query block qb of `pattern` attends key block kb (before causality): a local window of two
// blocks, a vertical stride (3 + pattern, phase stride - 1); without causality also the next block, and
// pattern 1's query block 4 attends nothing.
static bool attend(u32 pattern, u32 qb, u32 kb) {
    if (!CAUSAL && pattern == 1 && qb == 4) return false;
    if (kb == qb || kb + 1 == qb) return true;
    if (kb % (3 + pattern) == 2 + pattern) return true;
    return !CAUSAL && kb == qb + 1;
}
static bool pair_active(u32 head, u32 i, u32 j) {
    return attend(head / HPP, i / BS, j / BS) && j < SEQ && i < SEQ && (!CAUSAL || j <= i);
}
// A row mask for tile rows [0, rows) in blocks of BS: the count form when the attending blocks are a prefix.
static u32 encode(u32 bits, u32 nblocks) {
    for (u32 n = 1; n <= nblocks; n++)
        if (bits == (1u << n) - 1u) return n * BS;
    return EXACT_ROWMASK_BITS | bits;
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "nonfinite")) NONFINITE = true;
        if (!strcmp(argv[i], "noncausal")) CAUSAL = false;
    }
    const u32 nkb = (SEQ + BS - 1) / BS, q_tiles = (SEQ + TILE_Q - 1) / TILE_Q, c_tiles = (SEQ + COL_TILE - 1) / COL_TILE;
    // MergeQ row lists (per pattern and query tile of TILE_Q rows, the key blocks some row attends) and
    // column lists (per pattern and key block, the query tiles of COL_TILE rows some row of which attends it).
    auto rows_of = [&](u32 pat, u32 tile, u32 rows, u32 kb) {
        u32 bits = 0;
        for (u32 r = 0; r < rows / BS; r++)
            if (tile * rows + r * BS < SEQ && attend(pat, tile * rows / BS + r, kb)) bits |= 1u << r;
        return bits;
    };
    std::vector<u32> row_ptr{0}, row_entries, col_ptr{0}, col_entries;
    for (u32 pat = 0; pat < PATTERNS; pat++) {
        for (u32 t = 0; t < q_tiles; t++) {
            for (u32 kb = 0; kb < nkb; kb++)
                if (u32 bits = rows_of(pat, t, TILE_Q, kb)) row_entries.insert(row_entries.end(), {kb, encode(bits, TILE_Q / BS)});
            row_ptr.push_back(row_entries.size() / 2);
        }
        for (u32 kb = 0; kb < nkb; kb++) {
            for (u32 t = 0; t < c_tiles; t++)
                if (u32 bits = rows_of(pat, t, COL_TILE, kb)) col_entries.insert(col_entries.end(), {t, encode(bits, COL_TILE / BS)});
            col_ptr.push_back(col_entries.size() / 2);
        }
    }

    std::mt19937 rng(11 + D);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const size_t nq = (size_t)B * SEQ * H * D, nk = (size_t)B * SEQ * HK * D;
    std::vector<u16> q(nq), k(nk), v(nk), d_o(nq);
    for (auto& x : q) x = from_f32(U(rng));
    for (auto& x : k) x = from_f32(U(rng));
    for (auto& x : v) x = from_f32(U(rng));
    for (auto& x : d_o) x = from_f32(U(rng));
    auto qi = [](u32 t, u32 h, u32 c) { return ((size_t)t * H + h) * D + c; };
    auto ki = [](u32 t, u32 h, u32 c) { return ((size_t)t * HK + h) * D + c; };
    if (NONFINITE) {
        for (u32 t = 0; t < SEQ; t++)
            for (u32 h = 0; h < H; h++) q[qi(t, h, 0)] = from_f32(-1.f);
        q[qi(5, 0, 3)] = from_f32(NAN);                                   // a NaN Q row
        for (u32 t = 16; t < 48; t++) k[ki(t, 0, 0)] = from_f32(INFINITY); // blocks 1, 2 of KV head 0 score -inf
        v[ki(70, 0, 2)] = from_f32(NAN);      // key 70 scores -inf: its V adds nothing (nor to rows before it)
        k[ki(70, 0, 0)] = from_f32(INFINITY);
        v[ki(85, 1, 4)] = from_f32(NAN);      // rows 85.. of heads 2, 3 are NaN, rows 80..84 mask it (causality)
        v[ki(40, 1, 1)] = from_f32(INFINITY); // O of the rows that see it is +inf
        k[ki(5, 1, 3)] = from_f32(NAN);       // rows 0..4 mask it (causality), blocks >= 2 never see block 0
        d_o[qi(60, 3, 7)] = from_f32(NAN);    // a NaN dO row
    }
    const float scale = 1.f / sqrtf((float)D);
    std::vector<u16> o(nq, 0x1234), dq(nq, 0x1234), dk(nk, 0x1234), dv(nk, 0x1234);
    std::vector<float> lse((size_t)B * H * SEQ, 7.f);
    u32 flag = 0;
    ExactParams p{};
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = o.data(); p.d_o = d_o.data(); p.out = o.data();
    p.out_lse = lse.data(); p.dq = dq.data(); p.dk = dk.data(); p.dv = dv.data(); p.lse = lse.data();
    p.row_ptr = row_ptr.data(); p.row_entries = row_entries.data(); p.col_ptr = col_ptr.data();
    p.col_entries = col_entries.data(); p.flag = &flag;
    p.q_tok = H * D; p.q_batch = (long long)SEQ * H * D; p.kv_tok = HK * D; p.kv_batch = (long long)SEQ * HK * D;
    p.o_tok = p.q_tok; p.o_batch = p.q_batch; p.lse_batch = H * SEQ;
    p.batch = B; p.seq_len = SEQ; p.seq_pad = (SEQ + 63) / 64 * 64; p.num_heads = H; p.kv_group = GROUP;
    p.heads_per_pattern = HPP; p.q_tiles = q_tiles; p.tile_q = TILE_Q; p.kv_blocks = nkb; p.col_tile = COL_TILE;
    p.block_size = BS; p.causal = CAUSAL; p.scale_log2 = scale * 1.4426950408889634f; p.scale = scale;

    // A clear flag: nothing written.
    launch(3, 32 * EXACT_WARPS, [&] { s2_exact_forward(p); });
    int untouched = o[0] == 0x1234 && lse[0] == 7.f;
    flag = 1;
    launch(3, 32 * EXACT_WARPS, [&] { s2_exact_forward(p); });
    // The scratch the tensor-core dQ pass writes: LSE * log2(e) (+inf for -inf) and D = rowsum(dO * O).
    std::vector<float> lse2((size_t)B * H * p.seq_pad, INFINITY), delta((size_t)B * H * p.seq_pad, 0.f);
    for (u32 h = 0; h < H; h++)
        for (u32 t = 0; t < SEQ; t++) {
            float acc = 0.f;
            for (u32 c = 0; c < D; c++) acc += to_f32(d_o[qi(t, h, c)]) * to_f32(o[qi(t, h, c)]);
            float l = lse[h * SEQ + t];
            lse2[h * p.seq_pad + t] = std::isinf(l) && l < 0 ? INFINITY : l * 1.4426950408889634f;
            delta[h * p.seq_pad + t] = acc;
        }
    p.lse2 = lse2.data(); p.delta = delta.data();
    launch(3, 32 * EXACT_WARPS, [&] { s2_exact_backward(p); });

    // Reference, f64 IEEE: O, LSE; then P = exp(S - LSE), dS = P (dP - D), over the active pairs only.
    std::vector<double> ro(nq), rlse(H * SEQ), rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
    auto f = [](u16 x) { return (double)to_f32(x); };
    auto score = [&](u32 i, u32 h, u32 j) {
        double s = 0;
        for (u32 c = 0; c < D; c++) s += f(q[qi(i, h, c)]) * f(k[ki(j, h / GROUP, c)]);
        return s * scale;
    };
    for (u32 h = 0; h < H; h++)
        for (u32 i = 0; i < SEQ; i++) {
            std::vector<u32> keys;
            for (u32 j = 0; j < SEQ; j++)
                if (pair_active(h, i, j)) keys.push_back(j);
            bool nan_row = false, finite = false;
            double m = -INFINITY;
            std::vector<double> s;
            for (u32 j : keys) {
                double x = score(i, h, j);
                s.push_back(x);
                nan_row |= std::isnan(x) || x == INFINITY;
                if (x > -INFINITY) finite = true;
                if (x > m) m = x;
            }
            nan_row |= !keys.empty() && !finite;
            double l = 0;
            for (double x : s) l += x > -INFINITY ? exp(x - m) : 0.0;
            for (u32 c = 0; c < D; c++) {
                double acc = 0;
                for (size_t n = 0; n < keys.size(); n++)
                    if (s[n] > -INFINITY) acc += exp(s[n] - m) / l * f(v[ki(keys[n], h / GROUP, c)]);
                ro[qi(i, h, c)] = nan_row ? NAN : keys.empty() ? 0.0 : acc;
            }
            double L = nan_row ? NAN : keys.empty() ? -INFINITY : m + log(l);
            rlse[h * SEQ + i] = L;
            if (keys.empty()) continue;
            double dl = 0;
            for (u32 c = 0; c < D; c++) dl += f(d_o[qi(i, h, c)]) * ro[qi(i, h, c)];
            for (size_t n = 0; n < keys.size(); n++) {
                u32 j = keys[n];
                double dp = 0;
                for (u32 c = 0; c < D; c++) dp += f(d_o[qi(i, h, c)]) * f(v[ki(j, h / GROUP, c)]);
                double pr = exp(s[n] - L), ds = pr * (dp - dl);
                for (u32 c = 0; c < D; c++) {
                    rdq[qi(i, h, c)] += ds * f(k[ki(j, h / GROUP, c)]) * scale;
                    rdk[ki(j, h / GROUP, c)] += ds * f(q[qi(i, h, c)]) * scale;
                    rdv[ki(j, h / GROUP, c)] += pr * f(d_o[qi(i, h, c)]);
                }
            }
        }
    int misplaced = 0;
    auto compare = [&](const char* name, const std::vector<u16>& got, const std::vector<double>& want) {
        double num = 0, den = 0;
        int bad = 0, nonfin = 0;
        for (size_t i = 0; i < got.size(); i++) {
            double g = f(got[i]), w = want[i];
            if (!std::isfinite(w) || !std::isfinite(g)) {
                nonfin += !std::isfinite(w);
                bad += !(std::isnan(w) ? std::isnan(g) : g == w);
                continue;
            }
            num += (g - w) * (g - w);
            den += w * w;
        }
        misplaced += bad;
        double rel = sqrt(num / (den > 0 ? den : 1));
        printf("  %s: rel err %.2e, non-finite %d, misplaced %d\n", name, rel, nonfin, bad);
        return rel;
    };
    printf("%s D %u %s%s:\n", IS_BF16 ? "bf16" : "f16", D, CAUSAL ? "causal" : "non-causal",
           NONFINITE ? ", non-finite inputs" : "");
    double e_o = compare("O", o, ro);
    double lse_err = 0;
    int lse_bad = 0;
    for (u32 i = 0; i < H * SEQ; i++) {
        double g = lse[i], w = rlse[i];
        if (!std::isfinite(w) || !std::isfinite(g)) lse_bad += !(std::isnan(w) ? std::isnan(g) : g == w);
        else lse_err = std::max(lse_err, fabs(g - w));
    }
    misplaced += lse_bad;
    printf("  LSE: max err %.2e, misplaced %d\n", lse_err, lse_bad);
    double e_dq = compare("dQ", dq, rdq), e_dk = compare("dK", dk, rdk), e_dv = compare("dV", dv, rdv);
    const double tol = IS_BF16 ? 2e-2 : 4e-3;
    const bool ok = untouched && misplaced == 0 && lse_err < 1e-3 && e_o < tol && e_dq < 2 * tol && e_dk < 2 * tol &&
                    e_dv < 2 * tol;
    if (!untouched) printf("  a clear flag wrote outputs\n");
    printf("  %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
