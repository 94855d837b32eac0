/*
 * s2attn.h - C API of s2attn: S2-Attention (arXiv 2407.17678) on GPUs of every vendor.
 *
 * Hand-written to match the s2attn-capi crate (capi/src/); capi/tests/c/smoke.c and capi/tests/c/buffers.c
 * exercise every function.
 *
 * Link against libs2attn_capi.so / libs2attn_capi.dylib (cdylib) or libs2attn_capi.a (staticlib; then also link the
 * system libraries `cargo rustc -p s2attn-capi --lib -- --print native-static-libs` lists, on Linux
 * typically -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc).
 *
 * Conventions
 *   - Every function that can fail returns an s2attn_status: S2ATTN_OK (0) or an S2ATTN_ERR_* code.
 *     s2attn_last_error() then gives a message for the same thread.
 *   - Null pointers, wrong element counts, misaligned arrays and bad enum values are reported as codes;
 *     the library never aborts the process and no Rust panic crosses into C (a bug inside the library
 *     returns S2ATTN_ERR_PANIC).
 *   - Constructors write a new handle to their last argument (`out`), which reads NULL after a failure.
 *     Handles are released with the matching *_free function (NULL is a no-op); they may be freed in any
 *     order, since an op keeps its own references to the device and the layout.
 *   - Handles may be shared between threads.
 *   - Tensors are row-major: Q and O are [batch, seq, num_heads, head_dim], K and V are
 *     [batch, seq, num_kv_heads, head_dim], the log-sum-exp is [batch, num_heads, seq] (f32, natural log).
 *     f16 and bf16 elements are passed as their uint16_t bit patterns.
 */
#ifndef S2ATTN_H
#define S2ATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* Status codes                                                                                          */
/* ---------------------------------------------------------------------------------------------------- */

/** 0 on success, else one of the S2ATTN_ERR_* codes below. */
typedef int32_t s2attn_status;

enum {
    S2ATTN_OK = 0,
    /** A required pointer argument was NULL. */
    S2ATTN_ERR_NULL_POINTER = 1,
    /** An unknown dtype, a misaligned array, a string that is not UTF-8. */
    S2ATTN_ERR_INVALID_ARGUMENT = 2,
    /** The library panicked (a bug; please report the message). Handles stay valid to free. */
    S2ATTN_ERR_PANIC = 3,
    /* One code per error of the Rust library (s2attn::Error): */
    /** block_size is not 16, 32, 64 or 128. */
    S2ATTN_ERR_BLOCK_SIZE = 10,
    /** local_blocks (or the bidirectional window_left) is 0. */
    S2ATTN_ERR_LOCAL_BLOCKS = 11,
    /** vert_stride is 0. */
    S2ATTN_ERR_VERT_STRIDE = 12,
    /** num_heads is not a positive multiple of num_kv_heads. */
    S2ATTN_ERR_HEAD_GROUPS = 13,
    /** num_dense_heads exceeds num_kv_heads. */
    S2ATTN_ERR_DENSE_HEADS = 14,
    /** A custom mask whose dimensions do not fit. */
    S2ATTN_ERR_MASK = 15,
    /** head_dim has no kernel on this backend. */
    S2ATTN_ERR_HEAD_DIM = 16,
    /** Zero or unusable problem sizes (batch, seq_len, head_dim, scale). */
    S2ATTN_ERR_SHAPE = 17,
    /** An array has the wrong number of elements (see s2attn_op_sizes). */
    S2ATTN_ERR_LENGTH = 18,
    /** A device buffer is too small. */
    S2ATTN_ERR_BUFFER_TOO_SMALL = 19,
    /** The tensor's element type does not match the op's. */
    S2ATTN_ERR_DTYPE = 20,
    /** A device limit would be exceeded (the message names it). */
    S2ATTN_ERR_DEVICE_LIMIT = 21,
    /** No adapter matches the requested backend / name. */
    S2ATTN_ERR_NO_ADAPTER = 22,
    /** The device could not be opened or was lost. */
    S2ATTN_ERR_DEVICE = 23,
    /** One device of a call split across several devices failed. */
    S2ATTN_ERR_DEVICE_FAILED = 24,
    /** A shader failed to compile. */
    S2ATTN_ERR_SHADER = 25,
    /** A feature or backend is not available here (e.g. bf16 on wgpu, CUDA not built in). */
    S2ATTN_ERR_UNSUPPORTED = 26,
    /** The CUDA backend failed (driver, NVRTC, launch). */
    S2ATTN_ERR_CUDA = 27,
    /** A sequence id the KV cache does not hold (never added, or removed). */
    S2ATTN_ERR_UNKNOWN_SEQUENCE = 28,
    /** An append would take a sequence past the cache's max_seq_len. */
    S2ATTN_ERR_PAGE_TABLE_OVERFLOW = 29,
    /** The KV cache's page pool has too few free pages. */
    S2ATTN_ERR_CACHE_FULL = 30,
    /** The GPU did not finish within the context's wait timeout (S2ATTN_WAIT_TIMEOUT); it may be hung. */
    S2ATTN_ERR_TIMEOUT = 31,
    /** An error newer than this header; the message says what it is. */
    S2ATTN_ERR_OTHER = 99
};

/**
 * The message of the most recent call on this thread that returned an s2attn_status: "" after a success.
 * Never NULL; valid until the next s2attn call on this thread.
 */
const char *s2attn_last_error(void);

/** The name of a status constant ("S2ATTN_ERR_LENGTH"); "S2ATTN_ERR_UNKNOWN" for other values. Static. */
const char *s2attn_status_name(s2attn_status status);

/** The library version, e.g. "0.1.0". Static. */
const char *s2attn_version(void);

/* ---------------------------------------------------------------------------------------------------- */
/* Context: the device                                                                                   */
/* ---------------------------------------------------------------------------------------------------- */

typedef struct S2attnContext s2attn_context;

/**
 * Opens the device the environment chooses: S2ATTN_BACKEND (auto, cuda, wgpu, vulkan, gl, metal, dx12)
 * and S2ATTN_ADAPTER (adapter name substring); without them the best adapter (discrete GPUs first, a
 * software rasteriser such as lavapipe last).
 */
s2attn_status s2attn_context_create(s2attn_context **out);

/**
 * Opens a device by name, ignoring the environment.
 * backend: NULL or "auto", "wgpu", "cuda", or a wgpu API: "vulkan", "gl", "metal", "dx12".
 * adapter: NULL, or a case-insensitive substring of the adapter name (e.g. "nvidia", "llvmpipe").
 */
s2attn_status s2attn_context_create_with(const char *backend, const char *adapter, s2attn_context **out);

/** The adapter's name; valid while ctx lives; NULL if ctx is NULL. */
const char *s2attn_context_adapter_name(const s2attn_context *ctx);

/** The backend's name ("vulkan", "metal", "dx12", "gl", "cuda"); valid while ctx lives; NULL if ctx is NULL. */
const char *s2attn_context_backend_name(const s2attn_context *ctx);

/**
 * Sets the longest a call on ctx (and on the ops and caches made from it) waits for the GPU before failing with
 * S2ATTN_ERR_TIMEOUT instead of blocking on a hung device; seconds <= 0 waits as long as it takes (the default,
 * unless S2ATTN_WAIT_TIMEOUT set one for s2attn_context_create). NaN or infinity: S2ATTN_ERR_INVALID_ARGUMENT.
 */
s2attn_status s2attn_context_set_wait_timeout(const s2attn_context *ctx, double seconds);

/** The wait timeout of ctx in seconds; 0 for none or a NULL ctx. */
double s2attn_context_wait_timeout(const s2attn_context *ctx);

/** Releases a context (NULL is a no-op). */
void s2attn_context_free(s2attn_context *ctx);

/* ---------------------------------------------------------------------------------------------------- */
/* Layouts: which KV blocks each head attends                                                            */
/* ---------------------------------------------------------------------------------------------------- */

typedef struct S2attnLayout s2attn_layout;

/**
 * Every parameter of an S2 layout. Causal: query block qb of KV head h attends KV block kb <= qb when
 *   h is one of the last num_dense_heads KV heads, or qb - kb < local_blocks, or
 *   (kb + p * step + head_sliding_offset) % vert_stride == 0,
 * with p = (homo_head ? 0 : h) and step = max(1, vert_stride / num_heads); within the diagonal block
 * keys after the query are masked. Query head i uses KV head i / (num_heads / num_kv_heads).
 * Start from s2attn_s2_params_init() and change fields.
 */
typedef struct s2attn_s2_params {
    uint32_t num_heads;           /**< query heads */
    uint32_t num_kv_heads;        /**< key/value heads (GQA when fewer than num_heads) */
    uint32_t block_size;          /**< tokens per block: 16, 32, 64 or 128 */
    uint32_t local_blocks;        /**< causal window in blocks, counting the query's own block (>= 1) */
    uint32_t vert_stride;         /**< every vert_stride-th block outside the window (1 = dense) */
    uint32_t homo_head;           /**< non-zero: all sparse heads share head 0's stripes */
    uint32_t head_sliding_offset; /**< added to every head's stripe phase (Phi-3-small uses 1) */
    uint32_t num_dense_heads;     /**< the last num_dense_heads KV heads attend densely */
    uint32_t bidirectional;       /**< non-zero: bidirectional (encoder) attention; local_blocks unused */
    uint32_t window_left;         /**< bidirectional: window blocks to the left, own block included (>= 1) */
    uint32_t window_right;        /**< bidirectional: window blocks to the right */
} s2attn_s2_params;

/** Causal, heterogeneous heads, num_kv_heads = num_heads, no dense heads, offset 0. */
s2attn_s2_params s2attn_s2_params_init(uint32_t num_heads, uint32_t block_size, uint32_t local_blocks,
                                       uint32_t vert_stride);

/** Validates params and builds the layout. */
s2attn_status s2attn_layout_s2(const s2attn_s2_params *params, s2attn_layout **out);

/** Dense attention as a layout (causal when causal is non-zero). */
s2attn_status s2attn_layout_dense(uint32_t num_heads, uint32_t num_kv_heads, uint32_t block_size, int32_t causal,
                                  s2attn_layout **out);

/**
 * A custom block mask: mask_len = mask_heads * q_blocks * kv_blocks bytes, head-major then row-major,
 * non-zero = attended. mask_heads must divide num_heads (1 shares one mask; num_kv_heads gives each GQA
 * group its KV head's mask). With causal non-zero, keys after the query are masked too. A query row with
 * no attended key yields zeros and a log-sum-exp of -infinity. Sequences may be up to q_blocks *
 * block_size tokens long.
 */
s2attn_status s2attn_layout_custom(const uint8_t *mask, size_t mask_len, uint32_t mask_heads, uint32_t q_blocks,
                                   uint32_t kv_blocks, uint32_t block_size, int32_t causal, uint32_t num_heads,
                                   uint32_t num_kv_heads, s2attn_layout **out);

/** Releases a layout (NULL is a no-op). */
void s2attn_layout_free(s2attn_layout *layout);

/* ---------------------------------------------------------------------------------------------------- */
/* Ops: one layout at one shape on one device, planned once                                               */
/* ---------------------------------------------------------------------------------------------------- */

/** Storage type of Q, K, V and O (accumulation is always f32). */
enum {
    S2ATTN_F32 = 0,
    S2ATTN_F16 = 1,  /**< IEEE half, as uint16_t bits */
    S2ATTN_BF16 = 2  /**< bfloat16, as uint16_t bits; CUDA backend only */
};

typedef struct S2attnOp s2attn_op;

/**
 * Plans an op: batch sequences of seq_len tokens, head_dim features per head, dtype S2ATTN_F32/F16/BF16.
 * scale is the softmax scale; 0 means 1/sqrt(head_dim). Compiles (or fetches) the kernel.
 */
s2attn_status s2attn_op_create(const s2attn_context *ctx, const s2attn_layout *layout, uint32_t batch,
                               uint32_t seq_len, uint32_t head_dim, int32_t dtype, float scale, s2attn_op **out);

/** Element counts: Q and O (q_elems), K and V (kv_elems), the log-sum-exp (lse_elems). Any may be NULL. */
s2attn_status s2attn_op_sizes(const s2attn_op *op, size_t *q_elems, size_t *kv_elems, size_t *lse_elems);

/** What will run and why (kernel variant, tiles); valid while op lives; NULL if op is NULL. */
const char *s2attn_op_explain(const s2attn_op *op);

/**
 * Runs attention on host memory and blocks until the result is back. q, k, v, out hold elements of the
 * op's dtype (float, or uint16_t bits for f16/bf16); the *_len arguments are element counts and must equal
 * s2attn_op_sizes(). lse may be NULL (then lse_len is ignored); otherwise it receives lse_elems floats.
 * Outputs are written only on success and only after the inputs have been read.
 */
s2attn_status s2attn_forward(const s2attn_op *op, const void *q, size_t q_len, const void *k, size_t k_len,
                             const void *v, size_t v_len, void *out, size_t out_len, float *lse, size_t lse_len);

/** Releases an op (NULL is a no-op). */
void s2attn_op_free(s2attn_op *op);

/* ---------------------------------------------------------------------------------------------------- */
/* Paged KV cache and decode                                                                              */
/* ---------------------------------------------------------------------------------------------------- */

/*
 * A KV cache holds the K and V rows of many sequences in fixed-size pages on the device (one page = one
 * layout block of one KV head). For S2 layouts it frees every page no future query can attend (a KV head
 * keeps its local window and its stripes), so resident memory stays a fraction of a dense cache. A decode
 * step attends the last q_len tokens of each listed sequence (1 for plain decoding) to its cached history;
 * append the new tokens' K and V first, then decode with their Q.
 */

typedef struct S2attnKvCache s2attn_kv_cache;
typedef struct S2attnDecode s2attn_decode;

typedef struct s2attn_kv_cache_params {
    uint32_t head_dim;     /**< features per head */
    int32_t dtype;         /**< S2ATTN_F32 or S2ATTN_F16 */
    uint32_t max_seq_len;  /**< the most tokens one sequence may hold */
    uint32_t sequences;    /**< sequences of max_seq_len tokens the pool is sized for (when max_pages is 0) */
    uint32_t max_pages;    /**< pages in the pool; 0 sizes it from sequences */
    uint32_t query_window; /**< trailing tokens a decode step may query: 1, or more for speculative decoding */
} s2attn_kv_cache_params;

/** One sequence of up to max_seq_len tokens, decoded one token at a time. */
s2attn_kv_cache_params s2attn_kv_cache_params_init(uint32_t head_dim, int32_t dtype, uint32_t max_seq_len);

/** What a cache holds against what a dense cache would. */
typedef struct s2attn_memory_report {
    uint64_t sequences;      /**< sequences in the cache */
    uint64_t tokens;         /**< tokens over all sequences */
    uint64_t page_bytes;     /**< bytes of one page, K and V together */
    uint64_t resident_pages; /**< pages in use */
    uint64_t dense_pages;    /**< pages a dense paged cache would use */
    uint64_t pool_pages;     /**< pages allocated in the pool */
    uint64_t resident_bytes; /**< bytes of the pages in use */
    uint64_t dense_bytes;    /**< bytes a dense cache would hold */
    uint64_t pool_bytes;     /**< bytes allocated for the pool */
} s2attn_memory_report;

/** A cache for a causal layout on ctx's device (wgpu), its pool allocated up front. */
s2attn_status s2attn_kv_cache_create(const s2attn_context *ctx, const s2attn_layout *layout,
                                     const s2attn_kv_cache_params *params, s2attn_kv_cache **out);

/** Starts an empty sequence; writes its id (never reused) to *seq. */
s2attn_status s2attn_kv_cache_add_sequence(s2attn_kv_cache *cache, uint64_t *seq);

/** Removes a finished sequence and frees its pages. */
s2attn_status s2attn_kv_cache_remove_sequence(s2attn_kv_cache *cache, uint64_t seq);

/**
 * Appends tokens to a sequence: k and v hold len elements each, [tokens, num_kv_heads, head_dim] in the
 * cache's dtype. Changes nothing when it fails (unknown sequence, wrong length, overflow, full pool).
 */
s2attn_status s2attn_kv_cache_append(s2attn_kv_cache *cache, uint64_t seq, const void *k, const void *v, size_t len);

/** Writes the number of tokens appended to seq so far to *len. */
s2attn_status s2attn_kv_cache_seq_len(const s2attn_kv_cache *cache, uint64_t seq, uint32_t *len);

/** Fills *report. */
s2attn_status s2attn_kv_cache_memory(const s2attn_kv_cache *cache, s2attn_memory_report *report);

/** Releases a cache (NULL is a no-op). */
void s2attn_kv_cache_free(s2attn_kv_cache *cache);

/** The decode op for cache (compiles its kernel); scale 0 means 1/sqrt(head_dim). */
s2attn_status s2attn_decode_create(const s2attn_kv_cache *cache, float scale, s2attn_decode **out);

/**
 * One decode step, blocking until the result is back. seqs lists n_seqs sequence ids; q and out hold
 * q_elems / out_elems elements, [n_seqs, q_len, num_heads, head_dim] in the cache's dtype, where q_len
 * (<= query_window) follows from q_elems; lse may be NULL, else it receives [n_seqs, num_heads, q_len]
 * floats (lse_len = q_elems / head_dim). Must run with the cache the op was created for.
 */
s2attn_status s2attn_decode_run(const s2attn_decode *decode, const s2attn_kv_cache *cache, const uint64_t *seqs,
                                size_t n_seqs, const void *q, size_t q_elems, void *out, size_t out_elems, float *lse,
                                size_t lse_len);

/** Releases a decode op (NULL is a no-op). */
void s2attn_decode_free(s2attn_decode *decode);

/* ---------------------------------------------------------------------------------------------------- */
/* Device buffers: run on memory that stays on the GPU                                                   */
/* ---------------------------------------------------------------------------------------------------- */

/*
 * An s2attn_buffer is a storage buffer on a context's device (wgpu). Write it from host memory once, then
 * run the forward pass, KV-cache appends and decode steps on views of it with no host round trip: each of
 * those calls records its GPU work, submits it and returns at once; work runs in call order, and
 * s2attn_buffer_read (or s2attn_context_synchronize) waits for it. A view names a tensor inside a
 * buffer at an element offset with a token stride, so Q, K and V interleaved in one QKV buffer
 * ([tokens, (num_heads + 2 num_kv_heads) head_dim], as a fused projection writes them) are used in place:
 *
 *     uint64_t row = (H + 2 * HK) * D;
 *     s2attn_tensor_view q = {qkv, 0, row}, k = {qkv, H * D, row}, v = {qkv, (H + HK) * D, row};
 *     s2attn_tensor_view o = {out, 0, 0};
 *     s2attn_forward_buffers(op, &q, &k, &v, &o, lse, 0);
 *
 * Offsets and strides are in elements of the op's (or cache's) dtype and must be multiples of 4. Views
 * that run past their buffer are S2ATTN_ERR_BUFFER_TOO_SMALL, misaligned ones S2ATTN_ERR_SHAPE or
 * S2ATTN_ERR_INVALID_ARGUMENT, a buffer of another device S2ATTN_ERR_INVALID_ARGUMENT. Buffers need a wgpu
 * context; on a CUDA context use s2attn_forward_cuda.
 */

typedef struct S2attnBuffer s2attn_buffer;

/** A tensor inside a buffer: first element `offset`, tokens `token_stride` elements apart (0: contiguous). */
typedef struct s2attn_tensor_view {
    const s2attn_buffer *buffer;
    uint64_t offset;
    uint64_t token_stride;
} s2attn_tensor_view;

/** A zero-filled buffer of `bytes` bytes (a positive multiple of 4) on ctx's device. */
s2attn_status s2attn_buffer_create(const s2attn_context *ctx, uint64_t bytes, s2attn_buffer **out);

/** The buffer's size in bytes; 0 for NULL. */
uint64_t s2attn_buffer_size(const s2attn_buffer *buffer);

/**
 * Copies `bytes` bytes of host `data` into the buffer at byte `offset` (both multiples of 4). The data is
 * taken at once (reuse `data` freely) and lands before any later call's GPU work.
 */
s2attn_status s2attn_buffer_write(const s2attn_buffer *buffer, uint64_t offset, const void *data, size_t bytes);

/** Waits for all submitted work, then copies `bytes` bytes from byte `offset` (multiples of 4) into `data`. */
s2attn_status s2attn_buffer_read(const s2attn_buffer *buffer, uint64_t offset, void *data, size_t bytes);

/** Releases a buffer (NULL is a no-op); work already submitted on it still completes. */
void s2attn_buffer_free(s2attn_buffer *buffer);

/** Blocks until all work submitted on ctx's device (wgpu or CUDA) has finished. */
s2attn_status s2attn_context_synchronize(const s2attn_context *ctx);

/**
 * The forward pass on buffers: q, k, v, out views in the op's dtype (K and V share a token stride); the
 * f32 log-sum-exp [batch, num_heads, seq] goes into `lse` from element `lse_offset` (lse NULL: not
 * wanted). Submits and returns without waiting.
 */
s2attn_status s2attn_forward_buffers(const s2attn_op *op, const s2attn_tensor_view *q, const s2attn_tensor_view *k,
                                     const s2attn_tensor_view *v, const s2attn_tensor_view *out,
                                     const s2attn_buffer *lse, uint64_t lse_offset);

/**
 * Appends `tokens` tokens to seq from buffers: k and v views of [tokens, num_kv_heads, head_dim] rows in
 * the cache's dtype (e.g. the K and V columns of a QKV buffer). Submits and returns; changes nothing
 * when it fails.
 */
s2attn_status s2attn_kv_cache_append_buffers(s2attn_kv_cache *cache, uint64_t seq, const s2attn_tensor_view *k,
                                             const s2attn_tensor_view *v, uint32_t tokens);

/**
 * One decode step on buffers: the last q_len tokens of each of the n_seqs sequences attend their cached
 * history; q and out are views of [n_seqs, q_len, num_heads, head_dim] rows in the cache's dtype (q may
 * be the Q columns of a QKV buffer); the f32 log-sum-exp [n_seqs, num_heads, q_len] goes into `lse` from
 * element `lse_offset` (NULL: not wanted). Submits and returns without waiting.
 */
s2attn_status s2attn_decode_run_buffers(const s2attn_decode *decode, const s2attn_kv_cache *cache,
                                        const uint64_t *seqs, size_t n_seqs, uint32_t q_len,
                                        const s2attn_tensor_view *q, const s2attn_tensor_view *out,
                                        const s2attn_buffer *lse, uint64_t lse_offset);

/*
 * Caller CUDA memory (define S2ATTN_CUDA before including this header to declare it). The op must have
 * been created on a CUDA context (s2attn_context_create_with("cuda", ...)); the pointers are CUdeviceptr
 * values of that context's device. The calls are always exported: a library built without the `cuda`
 * feature, or an op or cache on wgpu, returns S2ATTN_ERR_UNSUPPORTED.
 */
#ifdef S2ATTN_CUDA
/** A tensor in CUDA memory: `ptr` (16-byte aligned), tokens `token_stride` elements apart (a multiple of 8; 0: contiguous). */
typedef struct s2attn_cuda_tensor {
    unsigned long long ptr; /**< a CUdeviceptr */
    uint64_t token_stride;
} s2attn_cuda_tensor;

/**
 * The forward pass on CUDA memory, on the op's stream: q, k, v, out in the op's dtype, the f32
 * log-sum-exp [batch, num_heads, seq] at device address `lse`. Returns without waiting; synchronize with
 * s2attn_context_synchronize before reading the results from another stream.
 */
s2attn_status s2attn_forward_cuda(const s2attn_op *op, const s2attn_cuda_tensor *q, const s2attn_cuda_tensor *k,
                                  const s2attn_cuda_tensor *v, const s2attn_cuda_tensor *out, unsigned long long lse);

/**
 * Appends `tokens` tokens to `seq` of a cache made on a CUDA context from CUDA memory: k->ptr and v->ptr
 * address token 0's [kv_heads, head_dim] rows in the cache's dtype (on 32-bit words), consecutive tokens
 * token_stride elements apart (the same for k and v; 0: packed rows), e.g. the K and V columns of an
 * interleaved QKV buffer. Enqueued on the context's stream without waiting; changes nothing when it fails.
 */
s2attn_status s2attn_kv_cache_append_cuda(const s2attn_kv_cache *cache, uint64_t seq, const s2attn_cuda_tensor *k,
                                          const s2attn_cuda_tensor *v, uint32_t tokens);

/**
 * One decode step on CUDA memory: the last q_len tokens of each of the n_seqs sequences attend their cached
 * history; q and out address [n_seqs, q_len, heads, head_dim] rows in the cache's dtype (contiguous,
 * 16-byte aligned), the f32 log-sum-exp [n_seqs, heads, q_len] goes to `lse`. Enqueued on the context's
 * stream without waiting.
 */
s2attn_status s2attn_decode_run_cuda(const s2attn_decode *decode, const s2attn_kv_cache *cache,
                                     const uint64_t *seqs, size_t n_seqs, uint32_t q_len, unsigned long long q,
                                     unsigned long long out, unsigned long long lse);
#endif

#ifdef __cplusplus
}
#endif

#endif /* S2ATTN_H */
