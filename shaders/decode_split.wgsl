// Decode and variable-length attention over a host-built work list (see shared/decode.wgsl): one
// workgroup per work item, R query rows (the query heads of one KV group times the item's query tokens)
// against the item's KV blocks, read through the entries' offsets (pages of the KV cache, or blocks of
// packed K/V). Portable: plain f32 arithmetic and workgroup memory, f16 storage unpacked. CPU twin:
// src/cpu/varlen.rs (`attend_worklist`).
//
// Per KV chunk of BK keys: K and V staged together (coalesced: a block's keys are contiguous), S = Q K^T
// (each invocation a few scores), per-row online softmax in base 2 (one invocation per row), O += P V
// (each invocation a fixed slice of O in registers).

#include storage
#include shared/decode.wgsl

override D: u32 = 64u;           // head dim (multiple of 4)
override R: u32 = 4u;            // query rows per item (<= 64)
override BK: u32 = 16u;          // keys per chunk (a multiple of 4 dividing the block size)
override WG: u32 = 64u;          // invocations
override KP: u32 = D / 4u + 1u;  // vec4 stride of staged K/V rows, padded against bank conflicts
const MAX_ACC: u32 = 16u;        // vec4 accumulators per invocation (R * D / 4 <= WG * MAX_ACC)

var<workgroup> q_s: array<vec4<f32>, R * D / 4u>;  // query rows, pre-scaled by scale * log2(e)
var<workgroup> k_s: array<vec4<f32>, BK * KP>;
var<workgroup> v_s: array<vec4<f32>, BK * KP>;
var<workgroup> p_s: array<vec4<f32>, R * BK / 4u>; // scores, then probabilities (row r at r * BK / 4)
var<workgroup> m_s: array<f32, R>;                 // running row max (base 2)
var<workgroup> l_s: array<f32, R>;                 // running row sum
var<workgroup> alpha_s: array<f32, R>;             // this chunk's rescale factor

#include shared/online_softmax.wgsl

fn row_attends(mask: vec2<u32>, r: u32) -> bool {
    let word = select(mask.x, mask.y, r >= 32u);
    return ((word >> (r % 32u)) & 1u) == 1u;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = item_id(wg, nwg);
    if id >= params.n_items {
        return;
    }
    let it = items[id];
    let d4 = D / 4u;
    let causal = params.causal != 0u;
    // The last position a valid row queries: no key after it is needed in a causal layout.
    let last_pos = it.pos0 + it.n_valid - 1u;

    for (var i = lid; i < R * d4; i += WG) {
        var x = vec4<f32>(0.0);
        if row_valid(it, i / d4) {
            x = load_q(q_index(it, i / d4, i % d4, d4)) * params.scale_log2;
        }
        q_s[i] = x;
    }
    if lid < R {
        m_s[lid] = NEG_BIG;
        l_s[lid] = 0.0;
    }
    var acc: array<vec4<f32>, MAX_ACC>;
    for (var j = 0u; j < MAX_ACC; j++) {
        acc[j] = vec4<f32>(0.0);
    }
    let n_acc = (R * d4 + WG - 1u) / WG;

    for (var e = it.e0; e < it.e1; e++) {
        let entry = entries[e];
        for (var sub = 0u; sub < params.block_size; sub += BK) {
            let k0 = entry.y + sub;
            if k0 >= it.kv_len || (causal && k0 > last_pos) {
                break;
            }
            workgroupBarrier(); // the previous chunk's P V is done with k_s, v_s and p_s
            for (var i = lid; i < BK * d4; i += WG) {
                let kk = i / d4;
                var kx = vec4<f32>(0.0);
                var vx = vec4<f32>(0.0);
                if k0 + kk < it.kv_len {
                    let at = entry.x + (sub + kk) * params.kv_tok_stride + i % d4;
                    kx = load_k(params.k_off + at);
                    vx = load_v(params.v_off + at);
                }
                k_s[kk * KP + i % d4] = kx;
                v_s[kk * KP + i % d4] = vx;
            }
            workgroupBarrier();
            for (var i = lid; i < R * BK; i += WG) {
                let r = i / BK;
                let kk = i % BK;
                let kpos = k0 + kk;
                var s = NEG_BIG;
                if row_valid(it, r) && kpos < it.kv_len && (!causal || kpos <= it.pos0 + r % params.n_tok)
                    && row_attends(entry.zw, r) {
                    var dot = vec4<f32>(0.0);
                    for (var c = 0u; c < d4; c++) {
                        dot += q_s[r * d4 + c] * k_s[kk * KP + c];
                    }
                    s = dot.x + dot.y + dot.z + dot.w;
                }
                p_s[i / 4u][i % 4u] = s;
            }
            workgroupBarrier();
            if lid < R {
                online_softmax_row(lid);
            }
            workgroupBarrier();
            for (var j = 0u; j < n_acc; j++) {
                let i = lid + j * WG;
                if i < R * d4 {
                    let r = i / d4;
                    let c = i % d4;
                    var a = acc[j] * alpha_s[r];
                    for (var k4 = 0u; k4 < BK / 4u; k4++) {
                        let p = p_s[r * BK / 4u + k4];
                        let v0 = 4u * k4 * KP + c;
                        a += p.x * v_s[v0] + p.y * v_s[v0 + KP] + p.z * v_s[v0 + 2u * KP] + p.w * v_s[v0 + 3u * KP];
                    }
                    acc[j] = a;
                }
            }
        }
    }

    workgroupBarrier();
    for (var j = 0u; j < n_acc; j++) {
        let i = lid + j * WG;
        let r = i / d4;
        if i < R * d4 && row_valid(it, r) {
            let l = l_s[r];
            var x = vec4<f32>(0.0);
            if l > 0.0 {
                x = acc[j] / l;
            }
            if it.nsplit == 1u {
                store_o(o_index(it, r, i % d4, d4), x);
            } else {
                part_o[(it.slot * R + r) * d4 + i % d4] = x;
            }
        }
    }
    if lid < R && row_valid(it, lid) {
        let l = l_s[lid];
        var lse2 = NEG_BIG;
        if l > 0.0 {
            lse2 = m_s[lid] + log2(l);
        }
        if it.nsplit == 1u {
            lse_buf[lse_index(it, lid)] = lse_out(lse2);
        } else {
            part_lse[it.slot * R + lid] = lse2;
        }
    }
}
