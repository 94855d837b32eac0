/*
 * buffers.c - the device-buffer half of include/s2attn.h: s2attn_buffer create / write / read / size /
 * free, s2attn_forward_buffers on strided views into one interleaved QKV buffer (against attention
 * computed here in double precision for a dense causal GQA layout, and against the host path
 * s2attn_forward for an S2 layout; f32 and f16), KV-cache appends and decode steps on buffers (against
 * the host-memory cache and decode path), s2attn_context_synchronize, the CUDA entry points' statuses on
 * a wgpu op and cache, and the error codes for null pointers, views past their buffer, misaligned offsets and bad
 * sizes. Built and run by tests/c_api.rs; exits non-zero with a message per failed check.
 */
#define S2ATTN_CUDA
#include "s2attn.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* Values k/256 with |k| < 256: exact in f32 and f16. */
static uint64_t rng = 0x2545F4914F6CDD1Dull;
static double next_value(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)((int64_t)(rng % 511) - 255) / 256.0;
}

/* Exact for the values above (and for normal f16 results, rounded to nearest). */
static uint16_t to_f16(double x) {
    if (x == 0.0) return 0;
    uint16_t sign = x < 0 ? 0x8000 : 0;
    double a = fabs(x);
    int e = 0;
    double m = frexp(a, &e); /* a = m 2^e, m in [0.5, 1) */
    int exp = e - 1 + 15;
    if (exp <= 0) return sign; /* flush (not reached by these inputs) */
    uint32_t mant = (uint32_t)lround((m * 2.0 - 1.0) * 1024.0);
    if (mant == 1024) mant = 0, exp++;
    return (uint16_t)(sign | (exp << 10) | mant);
}
static double from_f16(uint16_t h) {
    int exp = (h >> 10) & 31, mant = h & 1023;
    double v = exp == 0 ? ldexp(mant, -24) : ldexp(1024 + mant, exp - 25);
    return (h & 0x8000) ? -v : v;
}

enum { H = 4, HK = 2, D = 32, SEQ = 80, BS = 16, ROW = (H + 2 * HK) * D };

/* Writes n doubles as dtype elements into a host array of elem size es. */
static void *typed(const double *x, size_t n, int dtype) {
    size_t es = dtype == S2ATTN_F32 ? 4 : 2;
    unsigned char *t = malloc(n * es);
    for (size_t i = 0; i < n; i++) {
        if (dtype == S2ATTN_F32) {
            float f = (float)x[i];
            memcpy(t + 4 * i, &f, 4);
        } else {
            uint16_t h = to_f16(x[i]);
            memcpy(t + 2 * i, &h, 2);
        }
    }
    return t;
}
static double get(const void *t, size_t i, int dtype) {
    if (dtype == S2ATTN_F32) return ((const float *)t)[i];
    return from_f16(((const uint16_t *)t)[i]);
}

/* Dense causal GQA attention of qkv [SEQ, ROW] (Q heads, then K heads, then V heads). */
static void dense_reference(const double *qkv, double *out, double *lse) {
    double scale = 1.0 / sqrt((double)D);
    for (int t = 0; t < SEQ; t++)
        for (int h = 0; h < H; h++) {
            const double *q = qkv + (size_t)t * ROW + h * D;
            int kh = h / (H / HK);
            double mx = -INFINITY, s[SEQ];
            for (int j = 0; j <= t; j++) {
                const double *k = qkv + (size_t)j * ROW + (H + kh) * D;
                double dot = 0;
                for (int d = 0; d < D; d++) dot += q[d] * k[d];
                s[j] = dot * scale;
                if (s[j] > mx) mx = s[j];
            }
            double sum = 0;
            for (int j = 0; j <= t; j++) sum += exp(s[j] - mx);
            double *o = out + ((size_t)t * H + h) * D;
            for (int d = 0; d < D; d++) o[d] = 0;
            for (int j = 0; j <= t; j++) {
                const double *v = qkv + (size_t)j * ROW + (H + HK + kh) * D;
                double p = exp(s[j] - mx) / sum;
                for (int d = 0; d < D; d++) o[d] += p * v[d];
            }
            lse[(size_t)h * SEQ + t] = mx + log(sum);
        }
}

/* Splits qkv rows into contiguous Q [SEQ, H, D], K and V [SEQ, HK, D]. */
static void split(const double *qkv, double *q, double *k, double *v) {
    for (int t = 0; t < SEQ; t++) {
        memcpy(q + (size_t)t * H * D, qkv + (size_t)t * ROW, sizeof(double) * H * D);
        memcpy(k + (size_t)t * HK * D, qkv + (size_t)t * ROW + H * D, sizeof(double) * HK * D);
        memcpy(v + (size_t)t * HK * D, qkv + (size_t)t * ROW + (H + HK) * D, sizeof(double) * HK * D);
    }
}

static double max_abs_diff(const void *a, const void *b, size_t n, int dtype) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(get(a, i, dtype) - get(b, i, dtype));
        if (!(d <= m)) m = d; /* NaN propagates */
    }
    return m;
}

/* Forward on buffers (strided views into one QKV buffer, the LSE at an offset) vs the dense reference and
 * vs the host path, for `layout`. */
static void check_forward(const s2attn_context *ctx, const s2attn_layout *layout, int dense, int dtype) {
    const char *dn = dtype == S2ATTN_F32 ? "f32" : "f16";
    size_t es = dtype == S2ATTN_F32 ? 4 : 2, nq = (size_t)SEQ * H * D, nkv = (size_t)SEQ * HK * D;
    size_t nl = (size_t)H * SEQ;
    s2attn_op *op = NULL;
    MUST(s2attn_op_create(ctx, layout, 1, SEQ, D, dtype, 0.0f, &op));
    double *qkv = malloc(sizeof(double) * SEQ * ROW);
    for (size_t i = 0; i < (size_t)SEQ * ROW; i++) qkv[i] = next_value();

    /* Host path. */
    double *q = malloc(sizeof(double) * nq), *k = malloc(sizeof(double) * nkv), *v = malloc(sizeof(double) * nkv);
    split(qkv, q, k, v);
    void *qt = typed(q, nq, dtype), *kt = typed(k, nkv, dtype), *vt = typed(v, nkv, dtype);
    void *host_out = calloc(nq, es);
    float *host_lse = calloc(nl, 4);
    MUST(s2attn_forward(op, qt, nq, kt, nkv, vt, nkv, host_out, nq, host_lse, nl));

    /* Buffer path: one interleaved QKV buffer, an output buffer poisoned with NaN, the LSE 4 floats in. */
    void *qkv_t = typed(qkv, (size_t)SEQ * ROW, dtype);
    s2attn_buffer *bqkv = NULL, *bout = NULL, *blse = NULL;
    MUST(s2attn_buffer_create(ctx, (uint64_t)SEQ * ROW * es, &bqkv));
    MUST(s2attn_buffer_create(ctx, nq * es, &bout));
    MUST(s2attn_buffer_create(ctx, (nl + 4) * 4, &blse));
    CHECK(s2attn_buffer_size(bqkv) == (uint64_t)SEQ * ROW * es, "s2attn_buffer_size");
    MUST(s2attn_buffer_write(bqkv, 0, qkv_t, (size_t)SEQ * ROW * es));
    unsigned char *poison = malloc(nq * es);
    memset(poison, 0xFF, nq * es); /* NaN in f32 and f16 */
    MUST(s2attn_buffer_write(bout, 0, poison, nq * es));
    s2attn_tensor_view vq = {bqkv, 0, ROW}, vk = {bqkv, H * D, ROW}, vv = {bqkv, (H + HK) * D, ROW};
    s2attn_tensor_view vo = {bout, 0, 0};
    MUST(s2attn_forward_buffers(op, &vq, &vk, &vv, &vo, blse, 4));
    void *buf_out = malloc(nq * es);
    float *buf_lse = malloc(nl * 4);
    MUST(s2attn_buffer_read(bout, 0, buf_out, nq * es));
    MUST(s2attn_buffer_read(blse, 16, buf_lse, nl * 4));

    double err = max_abs_diff(buf_out, host_out, nq, dtype), lerr = 0;
    for (size_t i = 0; i < nl; i++) {
        double d = fabs((double)buf_lse[i] - host_lse[i]);
        if (!(d <= lerr)) lerr = d;
    }
    printf("forward %s %s: buffers vs host path: max |out diff| %.3g, max |lse diff| %.3g\n", dense ? "dense" : "s2",
           dn, err, lerr);
    CHECK(err <= 1e-6 && lerr <= 1e-5, "forward %s on buffers differs from the host path", dn);
    if (dense) {
        double *want = malloc(sizeof(double) * nq), *want_lse = malloc(sizeof(double) * nl);
        /* The reference reads the values as stored (exact in f16 too). */
        double *stored = malloc(sizeof(double) * SEQ * ROW);
        for (size_t i = 0; i < (size_t)SEQ * ROW; i++) stored[i] = get(qkv_t, i, dtype);
        dense_reference(stored, want, want_lse);
        double num = 0, den = 0, lmax = 0;
        for (size_t i = 0; i < nq; i++) {
            double d = get(buf_out, i, dtype) - want[i];
            num += d * d, den += want[i] * want[i];
        }
        for (size_t i = 0; i < nl; i++) {
            double d = fabs(buf_lse[i] - want_lse[i]);
            if (!(d <= lmax)) lmax = d;
        }
        double rel = sqrt(num / den), tol = dtype == S2ATTN_F32 ? 1e-5 : 2e-3;
        printf("forward dense %s on buffers vs double reference: rel l2 %.3g, max |lse err| %.3g\n", dn, rel, lmax);
        CHECK(rel <= tol && lmax <= 10 * tol, "forward dense %s: rel %.3g lse %.3g", dn, rel, lmax);
        free(want), free(want_lse), free(stored);
    }

    /* Errors: null views and buffers, a view past its buffer, a misaligned offset, another LSE too small. */
    s2attn_tensor_view vnull = {NULL, 0, 0}, vshort = {blse, 0, 0}, vmis = {bqkv, 2, ROW};
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward_buffers(NULL, &vq, &vk, &vv, &vo, blse, 0));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward_buffers(op, NULL, &vk, &vv, &vo, blse, 0));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward_buffers(op, &vq, &vnull, &vv, &vo, blse, 0));
    if (es * nq > (nl + 4) * 4)
        EXPECT_STATUS(S2ATTN_ERR_BUFFER_TOO_SMALL, s2attn_forward_buffers(op, &vq, &vk, &vv, &vshort, blse, 0));
    EXPECT_STATUS(S2ATTN_ERR_BUFFER_TOO_SMALL, s2attn_forward_buffers(op, &vq, &vk, &vv, &vo, blse, 5));
    s2attn_status mis = s2attn_forward_buffers(op, &vmis, &vk, &vv, &vo, blse, 0);
    CHECK(mis != S2ATTN_OK && strlen(s2attn_last_error()) > 0, "a misaligned Q offset was accepted");
    /* No LSE wanted. */
    MUST(s2attn_buffer_write(bout, 0, poison, nq * es));
    MUST(s2attn_forward_buffers(op, &vq, &vk, &vv, &vo, NULL, 0));
    MUST(s2attn_buffer_read(bout, 0, buf_out, nq * es));
    CHECK(max_abs_diff(buf_out, host_out, nq, dtype) <= 1e-6, "forward without an LSE buffer");

    /* CUDA memory: this op runs on wgpu (and the library may lack CUDA): unsupported, not a crash. */
    s2attn_cuda_tensor ct = {0x1000, 0};
    EXPECT_STATUS(S2ATTN_ERR_UNSUPPORTED, s2attn_forward_cuda(op, &ct, &ct, &ct, &ct, 0x2000));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward_cuda(NULL, &ct, &ct, &ct, &ct, 0x2000));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_forward_cuda(op, NULL, &ct, &ct, &ct, 0x2000));

    s2attn_buffer_free(bqkv), s2attn_buffer_free(bout), s2attn_buffer_free(blse);
    s2attn_op_free(op);
    free(qkv), free(q), free(k), free(v), free(qt), free(kt), free(vt), free(qkv_t);
    free(host_out), free(host_lse), free(buf_out), free(buf_lse), free(poison);
}

/* A prompt appended from a QKV buffer and decode steps whose Q are views into it, against the host-memory
 * cache and decode path fed the same values. */
static void check_decode(const s2attn_context *ctx, int dtype) {
    const char *dn = dtype == S2ATTN_F32 ? "f32" : "f16";
    enum { PROMPT = 50, STEPS = 3 };
    size_t es = dtype == S2ATTN_F32 ? 4 : 2;
    s2attn_s2_params sp = s2attn_s2_params_init(H, BS, 1, 2);
    sp.num_kv_heads = HK;
    s2attn_layout *l = NULL;
    MUST(s2attn_layout_s2(&sp, &l));
    s2attn_kv_cache_params cp = s2attn_kv_cache_params_init(D, dtype, SEQ);
    s2attn_kv_cache *host = NULL, *dev = NULL;
    MUST(s2attn_kv_cache_create(ctx, l, &cp, &host));
    MUST(s2attn_kv_cache_create(ctx, l, &cp, &dev));
    s2attn_layout_free(l);
    s2attn_decode *dh = NULL, *dd = NULL;
    MUST(s2attn_decode_create(host, 0.0f, &dh));
    MUST(s2attn_decode_create(dev, 0.0f, &dd));
    uint64_t sh, sd;
    MUST(s2attn_kv_cache_add_sequence(host, &sh));
    MUST(s2attn_kv_cache_add_sequence(dev, &sd));

    const int total = PROMPT + STEPS;
    double *qkv = malloc(sizeof(double) * total * ROW);
    for (size_t i = 0; i < (size_t)total * ROW; i++) qkv[i] = next_value();
    void *qkv_t = typed(qkv, (size_t)total * ROW, dtype);
    s2attn_buffer *bqkv = NULL, *bout = NULL, *blse = NULL;
    MUST(s2attn_buffer_create(ctx, (uint64_t)total * ROW * es, &bqkv));
    MUST(s2attn_buffer_create(ctx, (uint64_t)H * D * es, &bout));
    MUST(s2attn_buffer_create(ctx, H * 4, &blse));
    MUST(s2attn_buffer_write(bqkv, 0, qkv_t, (size_t)total * ROW * es));

    /* Host side: contiguous K and V rows of the same values. */
    unsigned char *k = malloc((size_t)total * HK * D * es), *v = malloc((size_t)total * HK * D * es);
    for (int t = 0; t < total; t++) {
        memcpy(k + (size_t)t * HK * D * es, (unsigned char *)qkv_t + ((size_t)t * ROW + H * D) * es, HK * D * es);
        memcpy(v + (size_t)t * HK * D * es, (unsigned char *)qkv_t + ((size_t)t * ROW + (H + HK) * D) * es,
               HK * D * es);
    }
    MUST(s2attn_kv_cache_append(host, sh, k, v, (size_t)PROMPT * HK * D));
    s2attn_tensor_view vk = {bqkv, H * D, ROW}, vv = {bqkv, (H + HK) * D, ROW};
    MUST(s2attn_kv_cache_append_buffers(dev, sd, &vk, &vv, PROMPT));

    unsigned char *qh = malloc((size_t)H * D * es), *oh = malloc((size_t)H * D * es), *od = malloc((size_t)H * D * es);
    float lh[H], ld[H];
    for (int step = 0; step < STEPS; step++) {
        int t = PROMPT + step;
        MUST(s2attn_kv_cache_append(host, sh, k + (size_t)t * HK * D * es, v + (size_t)t * HK * D * es, HK * D));
        s2attn_tensor_view tk = {bqkv, (uint64_t)t * ROW + H * D, ROW}, tv = {bqkv, (uint64_t)t * ROW + (H + HK) * D, ROW};
        MUST(s2attn_kv_cache_append_buffers(dev, sd, &tk, &tv, 1));
        memcpy(qh, (unsigned char *)qkv_t + (size_t)t * ROW * es, (size_t)H * D * es);
        MUST(s2attn_decode_run(dh, host, &sh, 1, qh, H * D, oh, H * D, lh, H));
        s2attn_tensor_view tq = {bqkv, (uint64_t)t * ROW, ROW}, to = {bout, 0, 0};
        MUST(s2attn_decode_run_buffers(dd, dev, &sd, 1, 1, &tq, &to, blse, 0));
        MUST(s2attn_buffer_read(bout, 0, od, (size_t)H * D * es));
        MUST(s2attn_buffer_read(blse, 0, ld, sizeof ld));
        double err = max_abs_diff(od, oh, (size_t)H * D, dtype), lerr = 0;
        for (int h = 0; h < H; h++)
            if (!(fabs((double)ld[h] - lh[h]) <= lerr)) lerr = fabs((double)ld[h] - lh[h]);
        printf("decode %s step %d: buffers vs host path: max |out diff| %.3g, max |lse diff| %.3g\n", dn, step, err,
               lerr);
        CHECK(err <= 1e-6 && lerr <= 1e-5, "decode %s step %d on buffers differs from the host path", dn, step);
    }
    uint32_t n = 0;
    MUST(s2attn_kv_cache_seq_len(dev, sd, &n));
    CHECK(n == (uint32_t)total, "append_buffers: the sequence holds %u tokens, expected %d", n, total);

    /* Errors: unknown sequence, null views, zero tokens, a view past its buffer (nothing changes). */
    s2attn_tensor_view far = {bqkv, (uint64_t)(total - 1) * ROW + H * D, ROW};
    EXPECT_STATUS(S2ATTN_ERR_UNKNOWN_SEQUENCE, s2attn_kv_cache_append_buffers(dev, sd + 100, &vk, &vv, 1));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_append_buffers(dev, sd, NULL, &vv, 1));
    EXPECT_STATUS(S2ATTN_ERR_SHAPE, s2attn_kv_cache_append_buffers(dev, sd, &vk, &vv, 0));
    s2attn_status st = s2attn_kv_cache_append_buffers(dev, sd, &far, &far, 2);
    CHECK(st == S2ATTN_ERR_BUFFER_TOO_SMALL || st == S2ATTN_ERR_SHAPE, "a K view past its buffer: %s",
          s2attn_status_name(st));
    MUST(s2attn_kv_cache_seq_len(dev, sd, &n));
    CHECK(n == (uint32_t)total, "a failed append changed the sequence (%u tokens)", n);
    s2attn_tensor_view tq = {bqkv, 0, ROW}, to = {bout, 0, 0};
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_run_buffers(dd, dev, NULL, 1, 1, &tq, &to, NULL, 0));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_run_buffers(dd, dev, &sd, 1, 1, &tq, NULL, NULL, 0));
    EXPECT_STATUS(S2ATTN_ERR_BUFFER_TOO_SMALL, s2attn_decode_run_buffers(dd, dev, &sd, 1, 1, &tq, &to, blse, 1));
    MUST(s2attn_decode_run_buffers(dd, dev, &sd, 1, 1, &tq, &to, NULL, 0));
    MUST(s2attn_context_synchronize(ctx));
    /* CUDA memory: this cache lives on wgpu (and the library may lack CUDA): unsupported, not a crash; null
     * handles and pointers by name. Nothing changes. */
    s2attn_cuda_tensor ck = {0x1000, ROW}, cv = {0x1100, ROW};
    EXPECT_STATUS(S2ATTN_ERR_UNSUPPORTED, s2attn_kv_cache_append_cuda(dev, sd, &ck, &cv, 1));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_append_cuda(NULL, sd, &ck, &cv, 1));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_kv_cache_append_cuda(dev, sd, &ck, NULL, 1));
    EXPECT_STATUS(S2ATTN_ERR_UNSUPPORTED, s2attn_decode_run_cuda(dd, dev, &sd, 1, 1, 0x1000, 0x2000, 0x3000));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_run_cuda(dd, dev, &sd, 1, 1, 0x1000, 0, 0x3000));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_decode_run_cuda(NULL, dev, &sd, 1, 1, 0x1000, 0x2000, 0x3000));
    MUST(s2attn_kv_cache_seq_len(dev, sd, &n));
    CHECK(n == (uint32_t)total, "a refused CUDA append changed the sequence (%u tokens)", n);

    s2attn_buffer_free(bqkv), s2attn_buffer_free(bout), s2attn_buffer_free(blse);
    s2attn_decode_free(dh), s2attn_decode_free(dd);
    s2attn_kv_cache_free(host), s2attn_kv_cache_free(dev);
    free(qkv), free(qkv_t), free(k), free(v), free(qh), free(oh), free(od);
}

static void check_buffer_errors(const s2attn_context *ctx) {
    s2attn_buffer *b = (s2attn_buffer *)&b, *ok = NULL;
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_buffer_create(ctx, 0, &b));
    CHECK(b == NULL, "a failed create left a handle");
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_buffer_create(ctx, 6, &b));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_buffer_create(NULL, 16, &b));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_buffer_create(ctx, 16, NULL));
    EXPECT_STATUS(S2ATTN_ERR_DEVICE_LIMIT, s2attn_buffer_create(ctx, UINT64_MAX - 3, &b));
    MUST(s2attn_buffer_create(ctx, 64, &ok));
    uint32_t words[20] = {0}, back[16];
    for (int i = 0; i < 16; i++) words[i] = 0x01010101u * (uint32_t)i;
    EXPECT_STATUS(S2ATTN_ERR_BUFFER_TOO_SMALL, s2attn_buffer_write(ok, 0, words, 80));
    EXPECT_STATUS(S2ATTN_ERR_BUFFER_TOO_SMALL, s2attn_buffer_write(ok, UINT64_MAX - 3, words, 4));
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_buffer_write(ok, 2, words, 4));
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_buffer_write(ok, 0, words, 6));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_buffer_write(ok, 0, NULL, 4));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_buffer_write(NULL, 0, words, 4));
    MUST(s2attn_buffer_write(ok, 0, words, 64));
    MUST(s2attn_buffer_write(ok, 8, words + 10, 8)); /* words 2, 3 = 10, 11 */
    MUST(s2attn_buffer_read(ok, 0, back, 64));
    int same = 1;
    for (int i = 0; i < 16; i++) same &= back[i] == words[i == 2 ? 10 : i == 3 ? 11 : i];
    CHECK(same, "buffer write / read round trip");
    EXPECT_STATUS(S2ATTN_ERR_BUFFER_TOO_SMALL, s2attn_buffer_read(ok, 4, back, 64));
    EXPECT_STATUS(S2ATTN_ERR_INVALID_ARGUMENT, s2attn_buffer_read(ok, 1, back, 4));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_buffer_read(ok, 0, NULL, 4));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_buffer_read(NULL, 0, back, 4));
    EXPECT_STATUS(S2ATTN_ERR_NULL_POINTER, s2attn_context_synchronize(NULL));
    CHECK(s2attn_buffer_size(NULL) == 0, "size of NULL");
    s2attn_buffer_free(ok);
    s2attn_buffer_free(NULL);
}

int main(void) {
    s2attn_context *ctx = NULL;
    MUST(s2attn_context_create_with("wgpu", NULL, &ctx));
    printf("adapter: %s (%s)\n", s2attn_context_adapter_name(ctx), s2attn_context_backend_name(ctx));
    check_buffer_errors(ctx);
    s2attn_layout *dense = NULL, *s2 = NULL;
    MUST(s2attn_layout_dense(H, HK, BS, 1, &dense));
    s2attn_s2_params sp = s2attn_s2_params_init(H, BS, 2, 2);
    sp.num_kv_heads = HK;
    MUST(s2attn_layout_s2(&sp, &s2));
    for (int f16 = 0; f16 < 2; f16++) {
        int dtype = f16 ? S2ATTN_F16 : S2ATTN_F32;
        check_forward(ctx, dense, 1, dtype);
        check_forward(ctx, s2, 0, dtype);
        check_decode(ctx, dtype);
    }
    s2attn_layout_free(dense), s2attn_layout_free(s2);
    s2attn_context_free(ctx);
    if (failures) {
        fprintf(stderr, "%d C buffer API check(s) failed\n", failures);
        return 1;
    }
    printf("all C API checks passed\n");
    return 0;
}
