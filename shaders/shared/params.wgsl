// Shared by the forward kernels: the per-call parameters and the MergeQ tile lists.
// Offsets and strides are in vec4 units (4 elements), so Q/K/V may be views into one interleaved buffer.

struct Params {
    seq_len: u32,
    num_heads: u32,
    num_kv_heads: u32,
    tiles: u32,
    heads_per_pattern: u32,
    block_size: u32,
    causal: u32,
    scale_log2: f32,     // softmax scale * log2(e): scores live in the base-2 domain
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    q_stride: u32,       // vec4s from one token to the next
    kv_stride: u32,
    o_stride: u32,
    lse_off: u32,        // in f32 elements
    neg_inf: f32,        // -inf, written for rows with no active key
    // The portable kernels' list splits (plan/loop_budget.rs): 0 when every list is walked whole, else the
    // workgroups per list, each walking at most `split_len` items and writing partials to `part_buf`.
    splits: u32,
    split_len: u32,
    first_row: u32,      // the forward's first computed row (rows before it are left unwritten)
}

@group(0) @binding(0) var<uniform> params: Params;
// tile_ptr[pattern * tiles + tile] .. tile_ptr[... + 1] indexes `entries`.
@group(0) @binding(6) var<storage, read> tile_ptr: array<u32>;
// entries[e] = (kv_block, rows): rows < 2^31 is a prefix row count; otherwise bit b of the low 31 bits
// says whether the tile's b-th merged query block attends.
@group(0) @binding(7) var<storage, read> entries: array<vec2<u32>>;

const ROWMASK_BITS_FLAG: u32 = 0x80000000u;
// Stands for -inf inside the kernels (WGSL has no infinity literal).
const NEG_BIG: f32 = -3.0e38;

// The items `begin .. end` of a list that split `split` walks (the whole list when lists are not split).
fn split_range(begin: u32, end: u32, split: u32) -> vec2<u32> {
    if params.splits <= 1u {
        return vec2<u32>(begin, end);
    }
    let b = min(begin + split * params.split_len, end);
    return vec2<u32>(b, min(b + params.split_len, end));
}

fn row_attends(rows: u32, r: u32) -> bool {
    if rows < ROWMASK_BITS_FLAG {
        return r < rows;
    }
    // Block sizes are powers of two (the layout checks): a shift, not an integer division.
    return ((rows >> (r >> countTrailingZeros(params.block_size))) & 1u) == 1u;
}

// Head-major offsets in vec4 units.
fn q_index(b: u32, tok: u32, head: u32, c4: u32, d4: u32) -> u32 {
    return params.q_off + (b * params.seq_len + tok) * params.q_stride + head * d4 + c4;
}
fn kv_index(off: u32, b: u32, tok: u32, kv_head: u32, c4: u32, d4: u32) -> u32 {
    return off + (b * params.seq_len + tok) * params.kv_stride + kv_head * d4 + c4;
}
fn o_index(b: u32, tok: u32, head: u32, c4: u32, d4: u32) -> u32 {
    return params.o_off + (b * params.seq_len + tok) * params.o_stride + head * d4 + c4;
}
