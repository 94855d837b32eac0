// Appends K and V rows from caller buffers into the pages of a KV cache (`KvCache::append_encoded`,
// `KvCache::append_encoded_batch`): a batch of appends (one per sequence) in one dispatch, one invocation
// per 32-bit word of a token's K (and V) row of one KV head, the batch's words numbered one after the
// other. Storage-type agnostic (f32 rows are one word per element, f16 rows one word per two), so one
// source serves both dtypes.

struct AppendParams {
    tokens: u32,       // tokens appended
    kv_heads: u32,
    row_words: u32,    // words of one KV head's row (head_dim * element size / 4)
    block_size: u32,   // tokens per page
    len0: u32,         // the sequence's length before the append
    first_block: u32,  // logical block of token 0
    blocks: u32,       // blocks the append touches (columns of its page table in `pages`)
    k_off: u32,        // word offset of token 0's K row in src_k
    k_stride: u32,     // words from one token's K row to the next
    v_off: u32,
    v_stride: u32,
    pages0: u32,       // index in `pages` of this append's [kv_heads, blocks] page offsets
    words0: u32,       // the batch's word index of this append's first word
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

struct Batch {
    appends: u32,      // appends in the batch (>= 1)
    words: u32,        // words of all of them
    pad0: u32,
    pad1: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> batch: Batch;
@group(0) @binding(1) var<storage, read> src_k: array<u32>;
@group(0) @binding(2) var<storage, read> src_v: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst_k: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst_v: array<u32>;
// Per append, [kv_heads, blocks] (from its `pages0`): the word offset of each touched block's page, or
// 0xffffffff where no future query needs the block (it is not written).
@group(0) @binding(5) var<storage, read> pages: array<u32>;
@group(0) @binding(6) var<storage, read> appends: array<AppendParams>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= batch.words {
        return;
    }
    // The append holding word i: the last whose first word is <= i (words0 ascends from 0).
    var lo = 0u;
    var hi = batch.appends;
    while hi - lo > 1u {
        let mid = (lo + hi) / 2u;
        if appends[mid].words0 <= i {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let p = appends[lo];
    let j = i - p.words0;
    let per_token = p.kv_heads * p.row_words;
    let t = j / per_token;
    let kvh = (j % per_token) / p.row_words;
    let w = j % p.row_words;
    let pos = p.len0 + t;
    let base = pages[p.pages0 + kvh * p.blocks + pos / p.block_size - p.first_block];
    if base == 0xffffffffu {
        return;
    }
    let dst = base + (pos % p.block_size) * p.row_words + w;
    let col = kvh * p.row_words + w;
    dst_k[dst] = src_k[p.k_off + t * p.k_stride + col];
    dst_v[dst] = src_v[p.v_off + t * p.v_stride + col];
}
