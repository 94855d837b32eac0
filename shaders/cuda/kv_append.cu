// Appends K and V rows from device buffers into the pages of a KV cache in CUDA memory (`KvCache::append_cuda`):
// the CUDA twin of shaders/kv_append.wgsl. A batch of appends (one per sequence, their tokens one after the other
// in the source rows) into one pool segment is one launch, one thread per 32-bit word of a token's K (and V) row of
// one KV head, grid-strided; the batch's words are numbered append after append. Storage-type agnostic (a word is
// two f16 or bf16 elements), so one build serves every dtype. A small batch (a decode step's) carries its appends
// and page indices in the launch's parameters instead of device buffers, so a step uploads nothing.

typedef unsigned int u32;
typedef unsigned long long u64;

// One append of a batch.
struct Append {
    u32 tokens;      // tokens appended
    u32 len0;        // the sequence's length before the append
    u32 first_block; // logical block of its first token
    u32 blocks;      // blocks the append touches (columns of its page indices in `pages`)
    u32 pages0;      // index in `pages` of its [kv_heads, blocks] page indices
    u32 src_token0;  // its first token's row in the sources
    u64 words0;      // the batch's index of its first word
};

// Appends and page indices a batch may carry in its parameters.
#define INLINE_APPENDS 4
#define INLINE_PAGES 64

// Mirrors `BatchParams` in src/cuda/kv_append.rs.
struct Batch {
    const u32* src_k;     // token 0's K row (words)
    const u32* src_v;
    u32* pool_k;          // the segment's pools, [pages, block_size, row_words]
    u32* pool_v;
    const Append* appends; // null: `inline_appends`
    const u32* pages;     // page index of each touched block, 0xffffffff where no future query needs it (null:
                          // `inline_pages`)
    u64 words;            // words of every append
    u32 n_appends;
    u32 kv_heads;
    u32 row_words;        // words of one KV head's row (head_dim * element size / 4)
    u32 block_size;       // tokens per page
    u32 token_stride;     // words from one source token's rows to the next
    u32 pad;
    Append inline_appends[INLINE_APPENDS];
    u32 inline_pages[INLINE_PAGES];
};

extern "C" __global__ void kv_append(const __grid_constant__ Batch b) {
    const Append* appends = b.appends ? b.appends : b.inline_appends;
    const u32* pages = b.pages ? b.pages : b.inline_pages;
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < b.words; i += step) {
        // The append holding word i: the last whose first word is <= i (words0 ascends from 0).
        u32 lo = 0, hi = b.n_appends;
        while (hi - lo > 1) {
            const u32 mid = (lo + hi) / 2;
            if (appends[mid].words0 <= i) lo = mid; else hi = mid;
        }
        const Append a = appends[lo];
        const u64 j = i - a.words0;
        const u64 per_token = (u64)b.kv_heads * b.row_words;
        const u32 t = (u32)(j / per_token);
        const u32 col = (u32)(j % per_token);
        const u32 kvh = col / b.row_words;
        const u32 w = col % b.row_words;
        const u32 pos = a.len0 + t;
        const u32 page = pages[a.pages0 + kvh * a.blocks + pos / b.block_size - a.first_block];
        if (page == 0xffffffffu) continue;
        const u64 dst = ((u64)page * b.block_size + pos % b.block_size) * b.row_words + w;
        const u64 src = (u64)(a.src_token0 + t) * b.token_stride + col;
        b.pool_k[dst] = b.src_k[src];
        b.pool_v[dst] = b.src_v[src];
    }
}
