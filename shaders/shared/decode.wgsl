// Shared by decode_split.wgsl and decode_combine.wgsl (after `#include storage`): the per-call
// parameters, the host-built work list, the split partials and the row addressing.
//
// A work item is one workgroup's job: R = group * n_tok query rows (row r = g * n_tok + t: query head
// head0 + g, query token tok0 + t at position pos0 + t of its sequence) against a run of KV blocks
// entries[e0 .. e1]. The rows of one item share one KV head, so GQA groups read each KV block once. An
// entry is (first K/V vec4 of the block, position of its first key, 64-bit row mask): the host resolves
// the page table (decode) or the packed offsets (variable-length prefill) into it, so both read KV
// through the same kernel. An item whose family was split over several items (flash-decoding) writes a
// partial (O normalised by its own sum, LSE in base 2) to slot `slot`; decode_combine merges them.

struct AttendParams {
    num_heads: u32,
    n_tok: u32,           // query tokens per item
    block_size: u32,      // keys per KV block (one page)
    causal: u32,
    scale_log2: f32,      // softmax scale * log2(e): scores live in the base-2 domain
    q_off: u32,           // vec4 units, as all offsets and strides below
    q_stride: u32,
    o_off: u32,
    o_stride: u32,
    k_off: u32,
    v_off: u32,
    kv_tok_stride: u32,   // from one key of a block to the next
    lse_off: u32,         // f32 units
    lse_head_stride: u32, // f32 units from one head's LSE row to the next
    n_items: u32,         // split items (the split pass's workgroups)
    neg_inf: f32,         // -inf, written for rows with no active key
    key_shift: u32,       // added to every item's kv_len and pos0 (the work list's key shift)
    n_families: u32,      // combine records (the combine pass's workgroups)
}

struct WorkItem {
    head0: u32,
    tok0: u32,
    pos0: u32,
    n_valid: u32,         // valid query tokens (t < n_valid)
    kv_len: u32,          // keys in the sequence
    e0: u32,
    e1: u32,
    slot: u32,            // first partial slot of the family (combine) or this item's slot (split)
    lse0: u32,            // LSE index of row 0
    nsplit: u32,          // items the family was split into (1: write the output directly)
    family: u32,          // the family's combine record (split items; the CUDA kernels' fused combine)
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: AttendParams;
// The split pass binds its work items here, the combine pass one record per split family.
@group(0) @binding(5) var<storage, read> items: array<WorkItem>;
@group(0) @binding(6) var<storage, read> entries: array<vec4<u32>>;
// Partials of split families: O [slot, R, D / 4] and base-2 LSE [slot, R].
@group(0) @binding(7) var<storage, read_write> part_o: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> part_lse: array<f32>;
// Output LSE, natural log.
@group(0) @binding(9) var<storage, read_write> lse_buf: array<f32>;

// Stands for -inf inside the kernels (WGSL has no infinity literal).
const NEG_BIG: f32 = -3.0e38;
const LN2: f32 = 0.6931471805599453;

// The work item of this workgroup (2-D dispatch when the list exceeds one dimension).
fn item_id(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// Item (or combine record) `id` as the kernels use it: the call's key shift added to its key count and
// first position (a token loop's step moves every sequence on without rewriting the items).
fn load_item(id: u32) -> WorkItem {
    var it = items[id];
    it.kv_len += params.key_shift;
    it.pos0 += params.key_shift;
    return it;
}

fn q_index(it: WorkItem, r: u32, c4: u32, d4: u32) -> u32 {
    return params.q_off + (it.tok0 + r % params.n_tok) * params.q_stride + (it.head0 + r / params.n_tok) * d4 + c4;
}
fn o_index(it: WorkItem, r: u32, c4: u32, d4: u32) -> u32 {
    return params.o_off + (it.tok0 + r % params.n_tok) * params.o_stride + (it.head0 + r / params.n_tok) * d4 + c4;
}
fn lse_index(it: WorkItem, r: u32) -> u32 {
    return params.lse_off + it.lse0 + (r / params.n_tok) * params.lse_head_stride + r % params.n_tok;
}
fn row_valid(it: WorkItem, r: u32) -> bool {
    return r % params.n_tok < it.n_valid;
}
// A split's base-2 LSE of a row from its flags (shared/nonfinite.wgsl), max `m` and sum `l`: NEG_BIG for
// no key, -inf for keys whose scores were all -inf (NaN only if no other split has a finite one), NaN for
// a NaN row, else m + log2(l).
fn partial_lse2(flags: u32, m: f32, l: f32) -> f32 {
    if (flags & ROW_NAN) != 0u {
        return quiet_nan();
    }
    if l > 0.0 {
        return m + log2(l);
    }
    return select(NEG_BIG, params.neg_inf, (flags & ROW_HAS_KEY) != 0u);
}

// What a row's O accumulators are multiplied by: 1 / l, NaN for a NaN row, and 0 for no key. A split of
// a family whose keys all scored -inf writes 0 (its partial LSE, -inf, says the rest): the combine weighs
// it by 0, and the row is NaN only if no other split has a finite key.
fn o_scale(flags: u32, l: f32, nsplit: u32) -> f32 {
    if (flags & ROW_NAN) != 0u || (nsplit == 1u && row_is_nan(flags, l)) {
        return quiet_nan();
    }
    return select(0.0, 1.0 / l, l > 0.0);
}

// A row's base-2 LSE as the natural-log value written out: -inf for no key (NEG_BIG), NaN for a NaN row
// or keys that all scored -inf.
fn lse_out(lse2: f32) -> f32 {
    let bits = bitcast<u32>(lse2);
    if (bits & 0x7fffffffu) > 0x7f800000u || bits == 0xff800000u {
        return quiet_nan();
    }
    return select(params.neg_inf, lse2 * LN2, lse2 > NEG_BIG);
}
// One past the last key an item needs: the sequence's end, or (causal) past its last valid row.
fn item_key_end(it: WorkItem) -> u32 {
    if params.causal != 0u {
        return min(it.kv_len, it.pos0 + it.n_valid);
    }
    return it.kv_len;
}
