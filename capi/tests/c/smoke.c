/*
 * smoke.c - calls every function of include/s2attn.h and checks the results against attention computed
 * here, in double precision, from the layout rule the header documents (no value is pasted in: every
 * expected number is computed by this program). Built and run by tests/c_api.rs; exits non-zero with a
 * message per failed check.
 *
 * Covers: S2 layouts (GQA, head_sliding_offset, homo_head + dense heads, bidirectional), a dense layout, a
 * custom mask with an empty row (zeros, lse = -inf), f32 and f16, a custom softmax scale, outputs poisoned
 * with NaN; chat-style decoding through the paged KV cache (prompts in chunks, then one token at a time)
 * with its memory report; the error codes for null pointers, wrong lengths, misaligned arrays, bad enums,
 * invalid parameters, unknown sequences, a full pool and a page-table overflow; handles freed in any order.
 */
#include "s2attn.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* ---- inputs: xorshift, values k/256 with |k| < 256 (exact in f32 and in f16) ---- */

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static double next_value(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)((int)(rng >> 40) % 512 - 256) / 256.0;
}

/* f16 bits of x = k/256 (|k| < 256): exact, so no rounding mode is involved. */
static uint16_t f16_bits_exact(double x) {
    if (x == 0.0) return 0;
    uint16_t sign = x < 0 ? 0x8000 : 0;
    double a = fabs(x);
    int e = 0;
    double m = frexp(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    int exp = e - 1 + 15;    /* normal numbers only: a >= 2^-8 */
    uint16_t mant = (uint16_t)((m * 2.0 - 1.0) * 1024.0);
    return (uint16_t)(sign | (exp << 10) | mant);
}

static double f16_to_double(uint16_t h) {
    int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
    double v;
    if (exp == 0) {
        v = ldexp(mant, -24);
    } else if (exp == 31) {
        v = mant ? NAN : INFINITY;
    } else {
        v = ldexp(1024 + mant, exp - 25);
    }
    return sign ? -v : v;
}

/* ---- the masks the header documents ---- */

typedef struct {
    int kind; /* 0: S2, 1: custom */
    s2attn_s2_params s2;
    const uint8_t *bits; /* custom: [mask_heads, q_blocks, kv_blocks] */
    uint32_t mask_heads, q_blocks, kv_blocks, block_size, causal, num_heads;
} mask_t;

static int s2_block_active(const s2attn_s2_params *p, uint32_t kv_head, uint32_t qb, uint32_t kb) {
    int dense = kv_head >= p->num_kv_heads - p->num_dense_heads;
    uint32_t phase = p->homo_head ? 0 : kv_head;
    uint32_t step = p->vert_stride / p->num_heads > 1 ? p->vert_stride / p->num_heads : 1;
#define STRIPE(d) ((((d) + phase * step + p->head_sliding_offset) % p->vert_stride) == 0)
    if (!p->bidirectional) return kb <= qb && (dense || qb - kb < p->local_blocks || STRIPE(kb));
    if (dense) return 1;
    if (kb <= qb) return qb - kb < p->window_left || STRIPE(qb - kb - p->window_left + 1);
    return kb - qb <= p->window_right || STRIPE(kb - qb - p->window_right);
#undef STRIPE
}

/* Whether query token qi of query head h sees key token kj. */
static int element_active(const mask_t *m, uint32_t h, uint32_t qi, uint32_t kj) {
    if (m->kind == 0) {
        const s2attn_s2_params *p = &m->s2;
        if (!p->bidirectional && kj > qi) return 0;
        uint32_t kv_head = h / (p->num_heads / p->num_kv_heads);
        return s2_block_active(p, kv_head, qi / p->block_size, kj / p->block_size);
    }
    if (m->causal && kj > qi) return 0;
    uint32_t mh = h / (m->num_heads / m->mask_heads), qb = qi / m->block_size, kb = kj / m->block_size;
    return m->bits[((size_t)mh * m->q_blocks + qb) * m->kv_blocks + kb] != 0;
}

/* ---- reference attention in double ---- */

typedef struct {
    uint32_t batch, seq, heads, kv_heads, dim;
    double scale;
} problem_t;

static size_t q_elems(const problem_t *p) { return (size_t)p->batch * p->seq * p->heads * p->dim; }
static size_t kv_elems(const problem_t *p) { return (size_t)p->batch * p->seq * p->kv_heads * p->dim; }
static size_t lse_elems(const problem_t *p) { return (size_t)p->batch * p->heads * p->seq; }

/* One output row: query token qi of head h against keys 0..n_keys-1 of one sequence, whose K and V are
 * [n_keys, p->kv_heads, p->dim]. Writes p->dim outputs and returns the row's lse (-inf with no key). */
static double attend_row(const problem_t *p, const mask_t *m, uint32_t h, uint32_t qi, uint32_t n_keys,
                         const double *q_row, const double *k, const double *v, double *o) {
    uint32_t kvh = h / (p->heads / p->kv_heads);
    double mx = -INFINITY, sum = 0;
    double *s = malloc(sizeof(double) * n_keys);
    for (uint32_t j = 0; j < n_keys; j++) {
        s[j] = -INFINITY;
        if (!element_active(m, h, qi, j)) continue;
        const double *kr = k + ((size_t)j * p->kv_heads + kvh) * p->dim;
        double dot = 0;
        for (uint32_t d = 0; d < p->dim; d++) dot += q_row[d] * kr[d];
        s[j] = dot * p->scale;
        if (s[j] > mx) mx = s[j];
    }
    for (uint32_t d = 0; d < p->dim; d++) o[d] = 0;
    for (uint32_t j = 0; mx > -INFINITY && j < n_keys; j++) {
        if (s[j] == -INFINITY) continue;
        double w = exp(s[j] - mx);
        const double *vr = v + ((size_t)j * p->kv_heads + kvh) * p->dim;
        sum += w;
        for (uint32_t d = 0; d < p->dim; d++) o[d] += w * vr[d];
    }
    free(s);
    if (mx == -INFINITY) return -INFINITY;
    for (uint32_t d = 0; d < p->dim; d++) o[d] /= sum;
    return mx + log(sum);
}

static void reference(const problem_t *p, const mask_t *m, const double *q, const double *k, const double *v,
                      double *out, double *lse) {
    size_t kv_seq = (size_t)p->seq * p->kv_heads * p->dim;
    for (uint32_t b = 0; b < p->batch; b++)
        for (uint32_t h = 0; h < p->heads; h++)
            for (uint32_t i = 0; i < p->seq; i++) {
                size_t row = (((size_t)b * p->seq + i) * p->heads + h) * p->dim;
                lse[((size_t)b * p->heads + h) * p->seq + i] =
                    attend_row(p, m, h, i, p->seq, q + row, k + b * kv_seq, v + b * kv_seq, out + row);
            }
}

/* ||got - want|| / ||want|| over finite entries of want; non-finite entries must match exactly; a NaN in
 * got gives infinity. */
static double rel_l2(const double *got, const double *want, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(got[i])) return INFINITY;
        if (!isfinite(want[i]) || !isfinite(got[i])) {
            if (got[i] != want[i]) return INFINITY;
            continue;
        }
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return den == 0 ? sqrt(num) : sqrt(num / den);
}

/* ---- host arrays in the API's element types ---- */

static size_t elem_size(int dtype) { return dtype == S2ATTN_F32 ? 4 : 2; }

static double *random_values(size_t n) {
    double *x = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) x[i] = next_value();
    return x;
}

/* x as f32 or f16 (exact for next_value()'s values); NULL x gives NaN everywhere (poisoned outputs). */
static void *typed(const double *x, size_t n, int dtype) {
    void *t = malloc(elem_size(dtype) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) {
        if (dtype == S2ATTN_F32)
            ((float *)t)[i] = x ? (float)x[i] : NAN;
        else
            ((uint16_t *)t)[i] = x ? f16_bits_exact(x[i]) : 0x7E00;
    }
    return t;
}

static double *widened(const void *t, size_t n, int dtype) {
    double *x = malloc(sizeof(double) * n);
    for (size_t i = 0; i < n; i++) x[i] = dtype == S2ATTN_F32 ? ((const float *)t)[i] : f16_to_double(((const uint16_t *)t)[i]);
    return x;
}

static float *nan_floats(size_t n) {
    float *x = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) x[i] = NAN;
    return x;
}

/* Checks O (in the op's dtype) and the lse against the reference; frees got and got_lse. */
static void compare(const char *name, int dtype, void *got, const double *want, size_t n, float *got_lse,
                    const double *want_lse, size_t nl) {
    double *o = widened(got, n, dtype), *l = malloc(sizeof(double) * nl);
    for (size_t i = 0; i < nl; i++) l[i] = got_lse[i];
    double tol = dtype == S2ATTN_F32 ? 1e-5 : 2e-3;
    double err = rel_l2(o, want, n), lse_err = rel_l2(l, want_lse, nl);
    CHECK(err < tol, "%s: |out - ref| / |ref| = %.3e >= %.0e", name, err, tol);
    CHECK(lse_err < 1e-4, "%s: lse error %.3e", name, lse_err);
    printf("%-40s out error %.2e, lse error %.2e\n", name, err, lse_err);
    free(o), free(l), free(got), free(got_lse);
}

/* ---- one problem through the API ---- */

/* Runs `op` on fresh inputs of `dtype`, outputs poisoned with NaN, and checks O and the lse. */
static void run_and_check(const char *name, const s2attn_op *op, const problem_t *p, const mask_t *m, int dtype) {
    size_t nq = q_elems(p), nkv = kv_elems(p), nl = lse_elems(p), sq = 0, skv = 0, sl = 0;
    MUST(s2attn_op_sizes(op, &sq, &skv, &sl));
    CHECK(sq == nq && skv == nkv && sl == nl, "%s: op sizes %zu/%zu/%zu, expected %zu/%zu/%zu", name, sq, skv, sl,
          nq, nkv, nl);
    double *q = random_values(nq), *k = random_values(nkv), *v = random_values(nkv);
    double *want = malloc(sizeof(double) * nq), *want_lse = malloc(sizeof(double) * nl);
    reference(p, m, q, k, v, want, want_lse);

    void *qt = typed(q, nq, dtype), *kt = typed(k, nkv, dtype), *vt = typed(v, nkv, dtype), *ot = typed(NULL, nq, dtype);
    float *lse = nan_floats(nl);
    s2attn_status st = s2attn_forward(op, qt, nq, kt, nkv, vt, nkv, ot, nq, lse, nl);
    CHECK(st == S2ATTN_OK, "%s: s2attn_forward returned %s", name, s2attn_status_name(st));
    compare(name, dtype, ot, want, nq, lse, want_lse, nl);
    free(qt), free(kt), free(vt);
    free(q), free(k), free(v), free(want), free(want_lse);
}

static s2attn_op *make_op(const s2attn_context *ctx, const s2attn_layout *layout, const problem_t *p, int dtype,
                          float scale) {
    s2attn_op *op = NULL;
    MUST(s2attn_op_create(ctx, layout, p->batch, p->seq, p->dim, dtype, scale, &op));
    return op;
}

/* ---- the checks ---- */

/* Builds `layout`'s op for `p` (scale 0: the default), runs it on fresh inputs and frees it. */
static void check_layout(const s2attn_context *ctx, const char *name, s2attn_layout *layout, const mask_t *m,
                         problem_t p, int dtype, float scale) {
    p.scale = scale != 0.0f ? scale : 1.0 / sqrt((double)p.dim);
    s2attn_op *op = make_op(ctx, layout, &p, dtype, scale);
    printf("%s: %s\n", name, s2attn_op_explain(op));
    run_and_check(name, op, &p, m, dtype);
    s2attn_op_free(op);
    s2attn_layout_free(layout);
}

static void check_s2(const s2attn_context *ctx, const char *name, s2attn_s2_params params, problem_t p, int dtype,
                     float scale) {
    s2attn_layout *l = NULL;
    MUST(s2attn_layout_s2(&params, &l));
    p.heads = params.num_heads;
    p.kv_heads = params.num_kv_heads;
    mask_t m = {.kind = 0, .s2 = params};
    check_layout(ctx, name, l, &m, p, dtype, scale);
}

static void check_s2_layouts(const s2attn_context *ctx) {
    /* GQA, offset, partial last block, batch 2. */
    s2attn_s2_params a = s2attn_s2_params_init(4, 16, 2, 3);
    a.num_kv_heads = 2;
    a.head_sliding_offset = 1;
    check_s2(ctx, "s2 gqa offset f32", a, (problem_t){.batch = 2, .seq = 75, .dim = 32}, S2ATTN_F32, 0.0f);
    check_s2(ctx, "s2 gqa offset f16", a, (problem_t){.batch = 1, .seq = 50, .dim = 64}, S2ATTN_F16, 0.0f);

    /* homo_head with one dense KV head, custom scale. */
    s2attn_s2_params b = s2attn_s2_params_init(4, 16, 1, 4);
    b.homo_head = 1;
    b.num_dense_heads = 1;
    check_s2(ctx, "s2 homo + dense head f16 scale 0.3", b, (problem_t){.batch = 1, .seq = 70, .dim = 64}, S2ATTN_F16,
             0.3f);

    /* Bidirectional window with stripes. */
    s2attn_s2_params c = s2attn_s2_params_init(2, 16, 1, 2);
    c.bidirectional = 1;
    c.window_left = 1;
    c.window_right = 1;
    check_s2(ctx, "s2 bidirectional f32", c, (problem_t){.batch = 1, .seq = 90, .dim = 32}, S2ATTN_F32, 0.0f);

    /* Dense causal, GQA 2:1: the same mask as S2 with vert_stride 1. */
    s2attn_layout *ld = NULL;
    MUST(s2attn_layout_dense(2, 1, 32, 1, &ld));
    s2attn_s2_params dense = s2attn_s2_params_init(2, 32, 1, 1);
    dense.num_kv_heads = 1;
    mask_t md = {.kind = 0, .s2 = dense};
    problem_t pd = {.batch = 1, .seq = 66, .heads = 2, .kv_heads = 1, .dim = 32};
    check_layout(ctx, "dense causal gqa f16", ld, &md, pd, S2ATTN_F16, 0.0f);
}

static void check_custom_mask(const s2attn_context *ctx) {
    /* Two pattern heads over 4 x 4 blocks of 16; query block 2 of pattern head 1 attends nothing. */
    enum { H = 2, QB = 4, KB = 4 };
    uint8_t bits[H * QB * KB];
    for (int h = 0; h < H; h++)
        for (int qb = 0; qb < QB; qb++)
            for (int kb = 0; kb < KB; kb++) bits[(h * QB + qb) * KB + kb] = (uint8_t)((qb + kb + h) % 2 == 0 || kb == qb);
    for (int kb = 0; kb < KB; kb++) bits[(1 * QB + 2) * KB + kb] = 0;
    s2attn_layout *l = NULL;
    MUST(s2attn_layout_custom(bits, sizeof bits, H, QB, KB, 16, 1, 4, 2, &l));
    problem_t p = {.batch = 1, .seq = 60, .heads = 4, .kv_heads = 2, .dim = 32};
    mask_t m = {.kind = 1, .bits = bits, .mask_heads = H, .q_blocks = QB, .kv_blocks = KB, .block_size = 16,
                .causal = 1, .num_heads = 4};
    check_layout(ctx, "custom mask with an empty row f32", l, &m, p, S2ATTN_F32, 0.0f);
}

/* ---- the KV cache and decode ---- */

/* Appends tokens from..to-1 of a sequence's history (rows of `row` elements) and checks its length. */
static void append_tokens(s2attn_kv_cache *cache, uint64_t id, const double *k, const double *v, uint32_t from,
                          uint32_t to, size_t row, int dtype) {
    size_t n = (size_t)(to - from) * row;
    void *kt = typed(k + from * row, n, dtype), *vt = typed(v + from * row, n, dtype);
    MUST(s2attn_kv_cache_append(cache, id, kt, vt, n));
    uint32_t len = 0;
    MUST(s2attn_kv_cache_seq_len(cache, id, &len));
    CHECK(len == to, "sequence %llu holds %u tokens, expected %u", (unsigned long long)id, len, to);
    free(kt), free(vt);
}

/* Chat-style decoding: two sequences' prompts appended in chunks, then steps that append one token to each
 * and attend its query to the cached history. Each output is held against attend_row over the whole
 * history under the S2 mask, so pages the cache evicted must be ones no later query attends; the memory
 * report is held against the eviction rule counted here. */
static void check_decode(const s2attn_context *ctx, int dtype) {
    enum { H = 4, HK = 2, D = 32, MAXLEN = 128, NSEQ = 2, STEPS = 3, BS = 16 };
    s2attn_s2_params sp = s2attn_s2_params_init(H, BS, 2, 3);
    sp.num_kv_heads = HK;
    sp.head_sliding_offset = 1;
    s2attn_layout *l = NULL;
    MUST(s2attn_layout_s2(&sp, &l));
    s2attn_kv_cache_params cp = s2attn_kv_cache_params_init(D, dtype, MAXLEN);
    cp.sequences = NSEQ;
    s2attn_kv_cache *cache = NULL;
    MUST(s2attn_kv_cache_create(ctx, l, &cp, &cache));
    s2attn_layout_free(l);
    s2attn_decode *dec = NULL;
    MUST(s2attn_decode_create(cache, 0.0f, &dec));

    const size_t row = (size_t)HK * D;
    const uint32_t prompt[NSEQ] = {70, 45};
    uint64_t ids[NSEQ];
    uint32_t len[NSEQ];
    double *hist_k[NSEQ], *hist_v[NSEQ]; /* [MAXLEN, HK, D] per sequence */
    for (int s = 0; s < NSEQ; s++) {
        MUST(s2attn_kv_cache_add_sequence(cache, &ids[s]));
        hist_k[s] = random_values(MAXLEN * row);
        hist_v[s] = random_values(MAXLEN * row);
        append_tokens(cache, ids[s], hist_k[s], hist_v[s], 0, 33, row, dtype); /* ends mid-block */
        append_tokens(cache, ids[s], hist_k[s], hist_v[s], 33, prompt[s], row, dtype);
        len[s] = prompt[s];
    }
    problem_t p = {.batch = 1, .heads = H, .kv_heads = HK, .dim = D, .scale = 1.0 / sqrt((double)D)};
    mask_t m = {.kind = 0, .s2 = sp};
    const size_t nq = (size_t)NSEQ * H * D, nl = (size_t)NSEQ * H;
    for (int step = 0; step < STEPS; step++) {
        for (int s = 0; s < NSEQ; s++) {
            append_tokens(cache, ids[s], hist_k[s], hist_v[s], len[s], len[s] + 1, row, dtype);
            len[s]++;
        }
        double *q = random_values(nq), *want = malloc(sizeof(double) * nq), *want_lse = malloc(sizeof(double) * nl);
        for (int s = 0; s < NSEQ; s++)
            for (int h = 0; h < H; h++) {
                size_t r = (size_t)s * H + h; /* q [seq, q_len 1, head, D]; lse [seq, head, q_len 1] */
                want_lse[r] = attend_row(&p, &m, h, len[s] - 1, len[s], q + r * D, hist_k[s], hist_v[s], want + r * D);
            }
        void *qt = typed(q, nq, dtype), *ot = typed(NULL, nq, dtype);
        float *lse = nan_floats(nl);
        MUST(s2attn_decode_run(dec, cache, ids, NSEQ, qt, nq, ot, nq, lse, nl));
        char name[64];
        snprintf(name, sizeof name, "decode step %d %s", step, dtype == S2ATTN_F32 ? "f32" : "f16");
        compare(name, dtype, ot, want, nq, lse, want_lse, nl);
        free(qt), free(q), free(want), free(want_lse);
    }

    /* KV head kvh keeps block kb while some future query block qb >= qb_min = (len - 1) / BS attends it;
     * the earliest such block, max(qb_min, kb), is the one to ask. */
    uint64_t tokens = 0, resident = 0, dense = 0;
    for (int s = 0; s < NSEQ; s++) {
        uint32_t blocks = (len[s] + BS - 1) / BS, qb_min = (len[s] - 1) / BS;
        tokens += len[s];
        for (uint32_t kvh = 0; kvh < HK; kvh++)
            for (uint32_t kb = 0; kb < blocks; kb++) {
                dense++;
                resident += s2_block_active(&sp, kvh, qb_min > kb ? qb_min : kb, kb);
            }
    }
    s2attn_memory_report r;
    MUST(s2attn_kv_cache_memory(cache, &r));
    uint64_t es = elem_size(dtype), page = 2 * BS * D * es;
    printf("kv cache %s: %llu of %llu pages resident, %llu of %llu bytes\n", dtype == S2ATTN_F32 ? "f32" : "f16",
           (unsigned long long)r.resident_pages, (unsigned long long)r.dense_pages,
           (unsigned long long)r.resident_bytes, (unsigned long long)r.dense_bytes);
    CHECK(r.sequences == NSEQ && r.tokens == tokens, "memory report: %llu sequences, %llu tokens",
          (unsigned long long)r.sequences, (unsigned long long)r.tokens);
    CHECK(r.page_bytes == page && r.dense_pages == dense && r.resident_pages == resident,
          "memory report: page %llu B, %llu dense / %llu resident pages; expected %llu, %llu, %llu",
          (unsigned long long)r.page_bytes, (unsigned long long)r.dense_pages, (unsigned long long)r.resident_pages,
          (unsigned long long)page, (unsigned long long)dense, (unsigned long long)resident);
    CHECK(resident < dense, "the S2 layout must evict something here");
    CHECK(r.resident_bytes == resident * page && r.dense_bytes == tokens * row * es * 2 &&
              r.pool_bytes == r.pool_pages * page && r.pool_pages >= resident,
          "memory report byte counts");

    MUST(s2attn_kv_cache_remove_sequence(cache, ids[0]));
    uint32_t n = 0;
    EXPECT_STATUS(S2ATTN_ERR_UNKNOWN_SEQUENCE, s2attn_kv_cache_seq_len(cache, ids[0], &n));
    MUST(s2attn_kv_cache_memory(cache, &r));
    CHECK(r.sequences == 1 && r.tokens == len[1], "after removal: %llu sequences", (unsigned long long)r.sequences);
    for (int s = 0; s < NSEQ; s++) free(hist_k[s]), free(hist_v[s]);
    s2attn_decode_free(dec);
    s2attn_kv_cache_free(cache);
}

static void check_decode_errors(const s2attn_context *ctx) {
    enum { D = 32, ROW = 2 * D, MAXLEN = 64 };
    s2attn_s2_params sp = s2attn_s2_params_init(2, 16, 1, 2);
    s2attn_layout *l = NULL, *bidir = NULL;
    MUST(s2attn_layout_s2(&sp, &l));
    s2attn_kv_cache_params cp = s2attn_kv_cache_params_init(D, S2ATTN_F32, MAXLEN);
    s2attn_kv_cache *cache = NULL;
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_create(NULL, l, &cp, &cache));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_create(ctx, l, NULL, &cache));
    cp.dtype = 9;
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_kv_cache_create(ctx, l, &cp, &cache));
    cp.dtype = S2ATTN_BF16;
    EXPECT_STATUS(S2ATTN_ERR_UNSUPPORTED, s2attn_kv_cache_create(ctx, l, &cp, &cache));
    cp = s2attn_kv_cache_params_init(33, S2ATTN_F32, MAXLEN);
    EXPECT_STATUS(S2ATTN_ERR_HEAD_DIM, s2attn_kv_cache_create(ctx, l, &cp, &cache));
    cp = s2attn_kv_cache_params_init(D, S2ATTN_F32, MAXLEN);
    cp.query_window = 0;
    EXPECT_STATUS(S2ATTN_ERR_SHAPE, s2attn_kv_cache_create(ctx, l, &cp, &cache));
    cp = s2attn_kv_cache_params_init(D, S2ATTN_F32, MAXLEN);
    s2attn_s2_params bp = sp;
    bp.bidirectional = 1, bp.window_left = 1;
    MUST(s2attn_layout_s2(&bp, &bidir));
    EXPECT_STATUS(S2ATTN_ERR_UNSUPPORTED, s2attn_kv_cache_create(ctx, bidir, &cp, &cache));
    s2attn_layout_free(bidir);
    CHECK(cache == NULL, "failed caches leave NULL");

    float *kv = calloc((size_t)(MAXLEN + 1) * ROW, sizeof(float));
    uint64_t id = 0;
    /* One page per KV head for the first token: a one-page pool is full at once. */
    cp.max_pages = 1;
    MUST(s2attn_kv_cache_create(ctx, l, &cp, &cache));
    MUST(s2attn_kv_cache_add_sequence(cache, &id));
    EXPECT_STATUS(S2ATTN_ERR_CACHE_FULL, s2attn_kv_cache_append(cache, id, kv, kv, ROW));
    s2attn_kv_cache_free(cache);

    cp.max_pages = 0;
    MUST(s2attn_kv_cache_create(ctx, l, &cp, &cache));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_add_sequence(cache, NULL));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_add_sequence(NULL, &id));
    MUST(s2attn_kv_cache_add_sequence(cache, &id));
    EXPECT_STATUS(S2ATTN_ERR_PAGE_TABLE_OVERFLOW, s2attn_kv_cache_append(cache, id, kv, kv, (size_t)(MAXLEN + 1) * ROW));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_kv_cache_append(cache, id, kv, kv, ROW - 1));
    EXPECT_STATUS(S2ATTN_ERR_UNKNOWN_SEQUENCE, s2attn_kv_cache_append(cache, id + 100, kv, kv, ROW));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_append(cache, id, NULL, kv, ROW));
    uint32_t n = 99;
    MUST(s2attn_kv_cache_seq_len(cache, id, &n));
    CHECK(n == 0, "failed appends changed the sequence (%u tokens)", n);
    MUST(s2attn_kv_cache_append(cache, id, kv, kv, ROW));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_seq_len(cache, id, NULL));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_memory(cache, NULL));
    EXPECT_STATUS(S2ATTN_ERR_UNKNOWN_SEQUENCE, s2attn_kv_cache_remove_sequence(cache, id + 100));

    s2attn_decode *dec = NULL;
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_create(NULL, 0.0f, &dec));
    EXPECT_STATUS(S2ATTN_ERR_SHAPE, s2attn_decode_create(cache, -2.0f, &dec));
    MUST(s2attn_decode_create(cache, 0.0f, &dec));
    size_t nq = ROW; /* 1 sequence x 1 token x 2 heads x D */
    float *q = calloc(2 * nq, sizeof(float)), *o = nan_floats(2 * nq), lse[4];
    uint64_t unknown = id + 100;
    EXPECT_STATUS(S2ATTN_ERR_UNKNOWN_SEQUENCE, s2attn_decode_run(dec, cache, &unknown, 1, q, nq, o, nq, lse, 2));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_run(dec, cache, NULL, 1, q, nq, o, nq, lse, 2));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_run(dec, cache, &id, 1, NULL, nq, o, nq, lse, 2));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_run(NULL, cache, &id, 1, q, nq, o, nq, lse, 2));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_decode_run(dec, cache, &id, 1, q, nq, o, nq - 1, lse, 2));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_decode_run(dec, cache, &id, 1, q, nq, o, nq, lse, 3));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_decode_run(dec, cache, &id, 1, q, nq - 4, o, nq - 4, NULL, 0));
    EXPECT_STATUS(S2ATTN_ERR_SHAPE, s2attn_decode_run(dec, cache, &id, 1, q, 2 * nq, o, 2 * nq, NULL, 0));
    CHECK(isnan(o[0]), "a failed decode wrote its output");
    MUST(s2attn_decode_run(dec, cache, &id, 1, q, nq, o, nq, NULL, 0));
    CHECK(o[0] == 0.0f && isnan(o[nq]), "zero inputs give zero output, and nothing past out_elems is written");

    free(kv), free(q), free(o);
    s2attn_decode_free(dec);
    s2attn_kv_cache_free(cache);
    s2attn_layout_free(l);
    s2attn_decode_free(NULL);
    s2attn_kv_cache_free(NULL);
}

static void check_errors(const s2attn_context *ctx) {
    CHECK(strcmp(s2attn_status_name(S2ATTN_ERR_LENGTH), "S2ATTN_ERR_LENGTH") == 0, "status name");
    CHECK(strcmp(s2attn_status_name(12345), "S2ATTN_ERR_UNKNOWN") == 0, "unknown status name");

    /* The wait timeout: set, read back, cleared; a NaN or infinite one and a NULL context refused. */
    CHECK(s2attn_context_wait_timeout(ctx) == 0.0, "no wait timeout by default");
    MUST(s2attn_context_set_wait_timeout(ctx, 30.5));
    CHECK(s2attn_context_wait_timeout(ctx) == 30.5, "the wait timeout reads back");
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_context_set_wait_timeout(ctx, NAN));
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_context_set_wait_timeout(ctx, INFINITY));
    CHECK(s2attn_context_wait_timeout(ctx) == 30.5, "a refused timeout changes nothing");
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_context_set_wait_timeout(NULL, 1.0));
    CHECK(s2attn_context_wait_timeout(NULL) == 0.0, "a NULL context has none");
    MUST(s2attn_context_set_wait_timeout(ctx, 0.0));
    CHECK(s2attn_context_wait_timeout(ctx) == 0.0, "0 clears the wait timeout");

    /* Null out-pointers and handles. */
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_context_create(NULL));
    CHECK(strstr(s2attn_last_error(), "out") != NULL, "the message names the argument");
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_layout_s2(NULL, NULL));
    s2attn_layout *l = (s2attn_layout *)&l; /* garbage that must be overwritten with NULL */
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_layout_s2(NULL, &l));
    CHECK(l == NULL, "a failed constructor leaves NULL in out");
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_layout_custom(NULL, 4, 1, 2, 2, 16, 1, 1, 1, &l));
    CHECK(s2attn_context_adapter_name(NULL) == NULL && s2attn_op_explain(NULL) == NULL, "getters on NULL");

    /* Invalid layout parameters: one code per Rust error. */
    s2attn_s2_params p = s2attn_s2_params_init(4, 24, 2, 3);
    EXPECT_STATUS(S2ATTN_ERR_BLOCK_SIZE, s2attn_layout_s2(&p, &l));
    p = s2attn_s2_params_init(4, 16, 0, 3);
    EXPECT_STATUS(S2ATTN_ERR_LOCAL_BLOCKS, s2attn_layout_s2(&p, &l));
    p = s2attn_s2_params_init(4, 16, 2, 0);
    EXPECT_STATUS(S2ATTN_ERR_VERT_STRIDE, s2attn_layout_s2(&p, &l));
    p = s2attn_s2_params_init(3, 16, 2, 3);
    p.num_kv_heads = 2;
    EXPECT_STATUS(S2ATTN_ERR_HEAD_GROUPS, s2attn_layout_s2(&p, &l));
    p = s2attn_s2_params_init(4, 16, 2, 3);
    p.num_dense_heads = 5;
    EXPECT_STATUS(S2ATTN_ERR_DENSE_HEADS, s2attn_layout_s2(&p, &l));
    uint8_t bits[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    EXPECT_STATUS(S2ATTN_ERR_MASK, s2attn_layout_custom(bits, 7, 2, 2, 2, 16, 1, 2, 2, &l));
    EXPECT_STATUS(S2ATTN_ERR_MASK, s2attn_layout_custom(bits, 8, 2, 2, 2, 16, 1, 3, 1, &l));
    CHECK(l == NULL, "failed layouts leave NULL");

    /* Context by name. */
    s2attn_context *c = NULL;
    EXPECT_STATUS(S2ATTN_ERR_NO_ADAPTER, s2attn_context_create_with("no-such-api", NULL, &c));
    EXPECT_STATUS(S2ATTN_ERR_NO_ADAPTER, s2attn_context_create_with("wgpu", "no such adapter 1234", &c));
    CHECK(c == NULL, "failed contexts leave NULL");

    /* Op creation. */
    p = s2attn_s2_params_init(2, 16, 2, 2);
    MUST(s2attn_layout_s2(&p, &l));
    s2attn_op *op = NULL;
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_op_create(NULL, l, 1, 40, 32, S2ATTN_F32, 0.0f, &op));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_op_create(ctx, NULL, 1, 40, 32, S2ATTN_F32, 0.0f, &op));
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_op_create(ctx, l, 1, 40, 32, 7, 0.0f, &op));
    EXPECT_STATUS(S2ATTN_ERR_SHAPE, s2attn_op_create(ctx, l, 0, 40, 32, S2ATTN_F32, 0.0f, &op));
    EXPECT_STATUS(S2ATTN_ERR_SHAPE, s2attn_op_create(ctx, l, 1, 40, 32, S2ATTN_F32, -1.0f, &op));
    if (strcmp(s2attn_context_backend_name(ctx), "cuda") != 0)
        EXPECT_STATUS(S2ATTN_ERR_UNSUPPORTED, s2attn_op_create(ctx, l, 1, 40, 32, S2ATTN_BF16, 0.0f, &op));
    CHECK(op == NULL, "failed ops leave NULL");

    /* Forward with bad arrays: codes, and the outputs stay untouched. */
    MUST(s2attn_op_create(ctx, l, 1, 40, 32, S2ATTN_F32, 0.0f, &op));
    size_t n = 0, nl = 0;
    MUST(s2attn_op_sizes(op, &n, NULL, &nl));
    MUST(s2attn_op_sizes(op, NULL, NULL, NULL));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_op_sizes(NULL, &n, NULL, NULL));
    float *x = calloc(n + 1, sizeof(float)), *o = malloc(sizeof(float) * (n + 1)), *lse = malloc(sizeof(float) * nl);
    for (size_t i = 0; i <= n; i++) o[i] = NAN;
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward(NULL, x, n, x, n, x, n, o, n, lse, nl));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward(op, NULL, n, x, n, x, n, o, n, lse, nl));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward(op, x, n, x, n, x, n, NULL, n, lse, nl));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_forward(op, x, n - 1, x, n, x, n, o, n, lse, nl));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_forward(op, x, n, x, n + 1, x, n, o, n, lse, nl));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_forward(op, x, n, x, n, x, n, o, n + 1, lse, nl));
    EXPECT_STATUS(S2ATTN_ERR_LENGTH, s2attn_forward(op, x, n, x, n, x, n, o, n, lse, nl - 1));
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT,
                  s2attn_forward(op, (const char *)x + 1, n, x, n, x, n, o, n, lse, nl));
    int untouched = 1;
    for (size_t i = 0; i < n; i++) untouched &= isnan(o[i]);
    CHECK(untouched, "a failed forward wrote its output");
    /* A success clears the message; lse may be NULL. */
    MUST(s2attn_forward(op, x, n, x, n, x, n, o, n, NULL, 0));
    CHECK(s2attn_last_error()[0] == '\0', "success leaves an empty message");
    CHECK(o[0] == 0.0f && isnan(o[n]), "zero inputs give zero output, and nothing past out_len is written");
    free(x), free(o), free(lse);

    s2attn_op_free(op);
    s2attn_layout_free(l);
    s2attn_op_free(NULL);
    s2attn_layout_free(NULL);
    s2attn_context_free(NULL);
}

int main(void) {
    printf("s2attn %s\n", s2attn_version());
    s2attn_context *ctx = NULL;
    MUST(s2attn_context_create(&ctx));
    printf("device: %s (%s)\n", s2attn_context_adapter_name(ctx), s2attn_context_backend_name(ctx));
    if (strcmp(s2attn_context_backend_name(ctx), "cuda") == 0) {
        /* The default context of a `cuda` build on a CUDA machine is the CUDA device, whose kernels are f16/bf16
         * only: it refuses an f32 op by name. The checks below are f32 and f16 at head dim 32, which the wgpu
         * kernels run, so they take the wgpu device (tests/c/buffers.c covers the CUDA device). */
        s2attn_s2_params p = s2attn_s2_params_init(2, 16, 1, 2);
        s2attn_layout *l = NULL;
        s2attn_op *op = NULL;
        MUST(s2attn_layout_s2(&p, &l));
        EXPECT_STATUS(S2ATTN_ERR_UNSUPPORTED, s2attn_op_create(ctx, l, 1, 48, 64, S2ATTN_F32, 0.0f, &op));
        s2attn_layout_free(l);
        s2attn_context_free(ctx);
        ctx = NULL;
        MUST(s2attn_context_create_with("wgpu", NULL, &ctx));
        printf("device for the checks: %s (%s)\n", s2attn_context_adapter_name(ctx), s2attn_context_backend_name(ctx));
    }

    check_s2_layouts(ctx);
    check_custom_mask(ctx);
    check_decode(ctx, S2ATTN_F32);
    check_decode(ctx, S2ATTN_F16);
    check_errors(ctx);
    check_decode_errors(ctx);

    /* An op keeps the device alive after its context handle is freed. */
    s2attn_s2_params p = s2attn_s2_params_init(2, 16, 1, 2);
    s2attn_layout *l = NULL;
    MUST(s2attn_layout_s2(&p, &l));
    problem_t pr = {1, 48, 2, 2, 32, 1.0 / sqrt(32.0)};
    mask_t m = {.kind = 0, .s2 = p};
    s2attn_op *op = make_op(ctx, l, &pr, S2ATTN_F32, 0.0f);
    s2attn_context_free(ctx);
    s2attn_layout_free(l);
    run_and_check("context and layout freed first", op, &pr, &m, S2ATTN_F32);
    s2attn_op_free(op);

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C API checks passed\n");
    return 0;
}
