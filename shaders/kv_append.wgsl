// Appends K and V rows from caller buffers into the pages of a KV cache (`KvCache::append_encoded`):
// one invocation per 32-bit word of a token's K (and V) row of one KV head. Storage-type agnostic (f32
// rows are one word per element, f16 rows one word per two), so one source serves both dtypes.

struct AppendParams {
    tokens: u32,       // tokens appended
    kv_heads: u32,
    row_words: u32,    // words of one KV head's row (head_dim * element size / 4)
    block_size: u32,   // tokens per page
    len0: u32,         // the sequence's length before the append
    first_block: u32,  // logical block of token 0
    blocks: u32,       // blocks the append touches (columns of `pages`)
    k_off: u32,        // word offset of token 0's K row in src_k
    k_stride: u32,     // words from one token's K row to the next
    v_off: u32,
    v_stride: u32,
    pad: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> params: AppendParams;
@group(0) @binding(1) var<storage, read> src_k: array<u32>;
@group(0) @binding(2) var<storage, read> src_v: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst_k: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst_v: array<u32>;
// [kv_heads, blocks]: the word offset of each touched block's page, or 0xffffffff where no future query
// needs the block (it is not written).
@group(0) @binding(5) var<storage, read> pages: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let per_token = params.kv_heads * params.row_words;
    if i >= params.tokens * per_token {
        return;
    }
    let t = i / per_token;
    let kvh = (i % per_token) / params.row_words;
    let w = i % params.row_words;
    let pos = params.len0 + t;
    let base = pages[kvh * params.blocks + pos / params.block_size - params.first_block];
    if base == 0xffffffffu {
        return;
    }
    let dst = base + (pos % params.block_size) * params.row_words + w;
    let col = kvh * params.row_words + w;
    dst_k[dst] = src_k[params.k_off + t * params.k_stride + col];
    dst_v[dst] = src_v[params.v_off + t * params.v_stride + col];
}
