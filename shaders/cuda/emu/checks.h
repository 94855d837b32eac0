// The host-side pieces the wgmma checks (forward_check.cc, backward_check.cc) share: their layouts' block
// rule, the kernels' lists built from it as the host builds them (MergeQ row lists, src/plan/mergeq.rs; column
// lists, src/plan/column.rs), random 16-bit inputs that are never zero, and their command lines. Included after
// emu.h.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

// Whether query block qb of `pattern` attends key block kb, as the block index holds it (causal: kb <= qb): a
// local window of two blocks, a vertical stride (3 + pattern, phase stride - 1), and in pattern 1 the odd query
// blocks also attend the blocks 3 to 6 back, which their 128-row tile's even block does not (but for a stride
// block): bit-mask entries, and with blocks of 64 runs of three chunks that a tile's first warpgroup skips after
// one it computed (a warpgroup that held that chunk's K/V stage across them would deadlock the forward's ring);
// without causality also the next block, and pattern 1's query block 4 attends nothing.
inline bool block_rule(bool causal, unsigned pattern, unsigned qb, unsigned kb) {
    if (causal && kb > qb) return false;
    if (!causal && pattern == 1 && qb == 4) return false;
    if (kb == qb || kb + 1 == qb) return true;
    if (kb % (3 + pattern) == 2 + pattern) return true;
    if (pattern == 1 && qb % 2 == 1 && kb + 3 <= qb && kb + 6 >= qb) return true;
    return !causal && kb == qb + 1;
}

// Lists as the kernels read them: `ptr` offsets (one list per slot) into [block or tile, row mask] pairs.
struct EmuLists {
    std::vector<unsigned> ptr{0}, entries;
    unsigned prefix = 0, bits = 0;  // entries with a row-count mask, with a per-block bit mask
};
static const unsigned EMU_ROWMASK_BITS = 1u << 31;

// Appends the entry [id, row mask] of a tile whose query blocks `bits` take part: a prefix row count where the
// smallest prefix covering them adds only `dont_care` blocks (masked whole by causality or past the end), else
// the bits (`row_mask` in src/plan/column.rs, `MergeQPlan::build`).
inline void push_masked(EmuLists& l, unsigned id, unsigned bits, unsigned dont_care, unsigned bs) {
    const unsigned covered = 32 - __builtin_clz(bits), prefix = (1u << covered) - 1;
    if ((prefix & ~(bits | dont_care)) == 0) {
        l.entries.insert(l.entries.end(), {id, covered * bs});
        l.prefix++;
    } else {
        l.entries.insert(l.entries.end(), {id, EMU_ROWMASK_BITS | bits});
        l.bits++;
    }
}

// MergeQ row lists, per pattern and tile of `tile` rows: [kv_block, rowmask] pairs, the row mask a prefix row count
// where the rows up to the last attending block may all attend (the rest being fully causal-masked or past the
// end), else bit b per query block b of the tile.
inline EmuLists mergeq_lists(bool causal, unsigned patterns, unsigned seq, unsigned bs, unsigned tile) {
    EmuLists l;
    const unsigned nb = (seq + bs - 1) / bs, tiles = (seq + tile - 1) / tile;
    for (unsigned pat = 0; pat < patterns; pat++)
        for (unsigned t = 0; t < tiles; t++) {
            if (tile <= bs) {
                const unsigned qb = t * tile / bs;
                for (unsigned kb = 0; kb < nb; kb++)
                    if (block_rule(causal, pat, qb, kb)) l.entries.insert(l.entries.end(), {kb, tile}), l.prefix++;
            } else {
                const unsigned per = tile / bs, first = t * per;
                for (unsigned kb = 0; kb < nb; kb++) {
                    unsigned bits = 0, dont_care = 0;
                    for (unsigned b = 0; b < per; b++) {
                        const unsigned qb = first + b;
                        if (qb < nb && block_rule(causal, pat, qb, kb)) bits |= 1u << b;
                        else if (qb >= nb || (causal && qb < kb)) dont_care |= 1u << b;
                    }
                    if (bits) push_masked(l, kb, bits, dont_care, bs);
                }
            }
            l.ptr.push_back(l.entries.size() / 2);
        }
    if (l.entries.empty()) l.entries = {0, 0};  // the host uploads two words for an empty list
    return l;
}

// Column lists, per pattern and KV block: the query tiles of `tile` rows of the query blocks that attend it, in
// ascending order. With tile <= bs each block is a run of whole tiles with the row mask Prefix(tile); with larger
// tiles, one entry per tile holding an attending block, its row mask encoded as in mergeq_lists (blocks masked
// whole by causality or past the end may join a prefix).
inline EmuLists column_lists(bool causal, unsigned patterns, unsigned seq, unsigned bs, unsigned tile) {
    EmuLists l;
    const unsigned nb = (seq + bs - 1) / bs, tiles = (seq + tile - 1) / tile;
    for (unsigned pat = 0; pat < patterns; pat++)
        for (unsigned kb = 0; kb < nb; kb++) {
            if (tile <= bs) {
                const unsigned per = bs / tile;
                for (unsigned qb = 0; qb < nb; qb++)
                    if (block_rule(causal, pat, qb, kb))
                        for (unsigned t = qb * per; t < (qb + 1) * per && t < tiles; t++) {
                            l.entries.insert(l.entries.end(), {t, tile});
                            l.prefix++;
                        }
            } else {
                const unsigned per = tile / bs;
                for (unsigned t = 0; t < tiles; t++) {
                    unsigned bits = 0, dont_care = 0;
                    for (unsigned b = 0; b < per; b++) {
                        const unsigned qb = t * per + b;
                        if (qb < nb && block_rule(causal, pat, qb, kb)) bits |= 1u << b;
                        else if (qb >= nb || (causal && qb < kb)) dont_care |= 1u << b;
                    }
                    if (bits) push_masked(l, t, bits, dont_care, bs);
                }
            }
            l.ptr.push_back(l.entries.size() / 2);
        }
    if (l.entries.empty()) l.entries = {0, 0};
    return l;
}

// A persistent kernel's work items dealt to `ctas` CTAs as the host deals them (`deal_items`, src/cuda/plan.rs): in
// their own order, each to the CTA with the least work so far (the lowest index among equals); `sched` gets the
// items CTA by CTA and `cta_ptr` the ctas + 1 offsets.
inline void deal_items(const std::vector<unsigned long long>& costs, unsigned ctas, std::vector<unsigned>& sched,
                       std::vector<unsigned>& cta_ptr) {
    std::vector<std::vector<unsigned>> per(ctas);
    std::vector<unsigned long long> load(ctas, 0);
    for (unsigned w = 0; w < costs.size(); w++) {
        unsigned c = 0;
        for (unsigned i = 1; i < ctas; i++)
            if (load[i] < load[c]) c = i;
        per[c].push_back(w);
        load[c] += costs[w];
    }
    sched.clear();
    cta_ptr.assign(1, 0);
    for (auto& items : per) {
        sched.insert(sched.end(), items.begin(), items.end());
        cta_ptr.push_back(sched.size());
    }
}

// Uniform values in [-1.5, 1.5), none of magnitude below 1e-3 (those become 0.5), in the storage type.
struct NonZero {
    std::mt19937 rng;
    std::uniform_real_distribution<float> u{-1.5f, 1.5f};
    explicit NonZero(unsigned seed) : rng(seed) {}
    u16 operator()() {
        const float x = u(rng);
        return from_f32(fabsf(x) < 1e-3f ? 0.5f : x);
    }
};

// The f64 reference's row: the keys query row i of `pattern` attends (block rule, causality, the sequence's end)
// and their scores dot(j) * scale; returns the largest score (-inf without a key).
template <class Dot>
double row_scores(bool causal, unsigned pattern, unsigned bs, unsigned seq, unsigned i, double scale, Dot dot,
                  std::vector<unsigned>& keys, std::vector<double>& s) {
    double m = -INFINITY;
    for (unsigned j = 0; j < seq; j++) {
        if (!block_rule(causal, pattern, i / bs, j / bs) || (causal && j > i)) continue;
        const double x = dot(j) * scale;
        keys.push_back(j);
        s.push_back(x);
        m = x > m ? x : m;
    }
    return m;
}

// The command line: `key=value` into the unsigned named `key`, a bare word sets the bool it names to its value.
struct EmuArg {
    const char* key;
    unsigned* value;
};
struct EmuFlag {
    const char* word;
    bool* at;
    bool value;
};
inline bool parse_args(int argc, char** argv, std::initializer_list<EmuArg> args, std::initializer_list<EmuFlag> flags) {
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        bool known = false;
        for (const EmuFlag& f : flags)
            if (a == f.word) *f.at = f.value, known = true;
        for (const EmuArg& k : args)
            if (a.rfind(std::string(k.key) + "=", 0) == 0) *k.value = (unsigned)atoi(a.c_str() + strlen(k.key) + 1), known = true;
        if (!known) {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return false;
        }
    }
    return true;
}
