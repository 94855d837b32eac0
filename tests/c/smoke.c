/*
 * smoke.c - calls every function of include/s2attn.h and checks the results against attention computed
 * here, in double precision, from the layout rule the header documents (no value is pasted in: every
 * expected number is computed by this program). Built and run by tests/c_api.rs; exits non-zero with a
 * message per failed check.
 *
 * Covers: S2 layouts (GQA, head_sliding_offset, homo_head + dense heads, bidirectional), a dense layout, a
 * custom mask with an empty row (zeros, lse = -inf), f32 and f16, a custom softmax scale, outputs poisoned
 * with NaN, and the error codes for null pointers, wrong lengths, misaligned arrays, bad enums and invalid
 * parameters; handles freed in any order.
 */
#include "s2attn.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, " [last error: %s]\n", s2attn_last_error());   \
            failures++;                                                    \
        }                                                                  \
    } while (0)

/* A call that must succeed: stops the program otherwise, since later checks depend on it. */
#define MUST(call)                                                                              \
    do {                                                                                        \
        s2attn_status st_ = (call);                                                             \
        if (st_ != S2ATTN_OK) {                                                                 \
            fprintf(stderr, "FATAL %s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call,     \
                    s2attn_status_name(st_), s2attn_last_error());                              \
            exit(2);                                                                            \
        }                                                                                       \
    } while (0)

/* A call that must fail with `code` and leave a message. */
#define EXPECT_STATUS(code, call)                                                                      \
    do {                                                                                               \
        s2attn_status st_ = (call);                                                                    \
        CHECK(st_ == (code), "%s returned %s, expected %s", #call, s2attn_status_name(st_),            \
              s2attn_status_name(code));                                                               \
        CHECK(st_ == S2ATTN_OK || strlen(s2attn_last_error()) > 0, "%s left no error message", #call); \
    } while (0)

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

static void reference(const problem_t *p, const mask_t *m, const double *q, const double *k, const double *v,
                      double *out, double *lse) {
    uint32_t group = p->heads / p->kv_heads;
    double *s = malloc(sizeof(double) * p->seq);
    for (uint32_t b = 0; b < p->batch; b++)
        for (uint32_t h = 0; h < p->heads; h++)
            for (uint32_t i = 0; i < p->seq; i++) {
                const double *qr = q + (((size_t)b * p->seq + i) * p->heads + h) * p->dim;
                double *o = out + (((size_t)b * p->seq + i) * p->heads + h) * p->dim;
                double mx = -INFINITY, sum = 0;
                for (uint32_t j = 0; j < p->seq; j++) {
                    s[j] = -INFINITY;
                    if (!element_active(m, h, i, j)) continue;
                    const double *kr = k + (((size_t)b * p->seq + j) * p->kv_heads + h / group) * p->dim;
                    double dot = 0;
                    for (uint32_t d = 0; d < p->dim; d++) dot += qr[d] * kr[d];
                    s[j] = dot * p->scale;
                    if (s[j] > mx) mx = s[j];
                }
                for (uint32_t d = 0; d < p->dim; d++) o[d] = 0;
                lse[((size_t)b * p->heads + h) * p->seq + i] = -INFINITY;
                if (mx == -INFINITY) continue;
                for (uint32_t j = 0; j < p->seq; j++) {
                    if (s[j] == -INFINITY) continue;
                    double w = exp(s[j] - mx);
                    const double *vr = v + (((size_t)b * p->seq + j) * p->kv_heads + h / group) * p->dim;
                    sum += w;
                    for (uint32_t d = 0; d < p->dim; d++) o[d] += w * vr[d];
                }
                for (uint32_t d = 0; d < p->dim; d++) o[d] /= sum;
                lse[((size_t)b * p->heads + h) * p->seq + i] = mx + log(sum);
            }
    free(s);
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

/* ---- one problem through the API ---- */

/* Runs `op` on fresh inputs of `dtype`, outputs poisoned with NaN, and checks O and the lse. */
static void run_and_check(const char *name, const s2attn_op *op, const problem_t *p, const mask_t *m, int dtype) {
    size_t nq = q_elems(p), nkv = kv_elems(p), nl = lse_elems(p), sq = 0, skv = 0, sl = 0;
    MUST(s2attn_op_sizes(op, &sq, &skv, &sl));
    CHECK(sq == nq && skv == nkv && sl == nl, "%s: op sizes %zu/%zu/%zu, expected %zu/%zu/%zu", name, sq, skv, sl,
          nq, nkv, nl);
    double *q = malloc(sizeof(double) * nq), *k = malloc(sizeof(double) * nkv), *v = malloc(sizeof(double) * nkv);
    for (size_t i = 0; i < nq; i++) q[i] = next_value();
    for (size_t i = 0; i < nkv; i++) k[i] = next_value();
    for (size_t i = 0; i < nkv; i++) v[i] = next_value();
    double *want = malloc(sizeof(double) * nq), *want_lse = malloc(sizeof(double) * nl);
    reference(p, m, q, k, v, want, want_lse);

    double *got = malloc(sizeof(double) * nq), *got_lse = malloc(sizeof(double) * nl);
    float *lse = malloc(sizeof(float) * nl);
    for (size_t i = 0; i < nl; i++) lse[i] = NAN;
    s2attn_status st;
    if (dtype == S2ATTN_F32) {
        float *qf = malloc(sizeof(float) * nq), *kf = malloc(sizeof(float) * nkv), *vf = malloc(sizeof(float) * nkv);
        float *of = malloc(sizeof(float) * nq);
        for (size_t i = 0; i < nq; i++) qf[i] = (float)q[i], of[i] = NAN;
        for (size_t i = 0; i < nkv; i++) kf[i] = (float)k[i], vf[i] = (float)v[i];
        st = s2attn_forward(op, qf, nq, kf, nkv, vf, nkv, of, nq, lse, nl);
        for (size_t i = 0; i < nq; i++) got[i] = of[i];
        free(qf), free(kf), free(vf), free(of);
    } else {
        uint16_t *qh = malloc(2 * nq), *kh = malloc(2 * nkv), *vh = malloc(2 * nkv), *oh = malloc(2 * nq);
        for (size_t i = 0; i < nq; i++) qh[i] = f16_bits_exact(q[i]), oh[i] = 0x7E00; /* NaN */
        for (size_t i = 0; i < nkv; i++) kh[i] = f16_bits_exact(k[i]), vh[i] = f16_bits_exact(v[i]);
        st = s2attn_forward(op, qh, nq, kh, nkv, vh, nkv, oh, nq, lse, nl);
        for (size_t i = 0; i < nq; i++) got[i] = f16_to_double(oh[i]);
        free(qh), free(kh), free(vh), free(oh);
    }
    CHECK(st == S2ATTN_OK, "%s: s2attn_forward returned %s", name, s2attn_status_name(st));
    for (size_t i = 0; i < nl; i++) got_lse[i] = lse[i];
    double tol = dtype == S2ATTN_F32 ? 1e-5 : 2e-3;
    double err = rel_l2(got, want, nq), lse_err = rel_l2(got_lse, want_lse, nl);
    CHECK(err < tol, "%s: |out - ref| / |ref| = %.3e >= %.0e", name, err, tol);
    CHECK(lse_err < 1e-4, "%s: lse error %.3e", name, lse_err);
    printf("%-40s out error %.2e, lse error %.2e\n", name, err, lse_err);
    free(q), free(k), free(v), free(want), free(want_lse), free(got), free(got_lse), free(lse);
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

static void check_errors(const s2attn_context *ctx) {
    CHECK(strcmp(s2attn_status_name(S2ATTN_ERR_LENGTH), "S2ATTN_ERR_LENGTH") == 0, "status name");
    CHECK(strcmp(s2attn_status_name(12345), "S2ATTN_ERR_UNKNOWN") == 0, "unknown status name");

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

    check_s2_layouts(ctx);
    check_custom_mask(ctx);
    check_errors(ctx);

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
