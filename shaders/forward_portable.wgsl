// Portable S2 forward: flash-style attention over the MergeQ tile lists on plain f32 arithmetic and
// workgroup memory. Runs on every adapter (lavapipe included): no subgroups, no f16 arithmetic, no
// cooperative matrices. CPU twin: src/cpu/forward.rs (`forward_portable`).
//
// One workgroup per (query tile, head, batch). For each KV block of the tile's list, keys are staged in
// chunks of BK: S = Q K^T (each invocation a few scores), per-row online softmax in base 2 (one
// invocation per row), then O += P V (each invocation a fixed slice of O, kept in registers).
//
// Where the device caps loop iterations (plan/loop_budget.rs), each row list is cut into `params.splits`
// pieces walked by separate workgroups (workgroup_id.y = split * heads + head); each writes its rows'
// unnormalised O, (m, l) and its row flags to `part_buf`, and split_merge.wgsl combines them.

#include shared/params.wgsl
#include shared/nonfinite.wgsl
#include storage

// LSE out, [batch, heads, seq], f32.
@group(0) @binding(5) var<storage, read_write> lse_buf: array<f32>;
// Split partials, [batch, split, heads, seq] rows of D / 4 vec4s of O and one vec4 (m, l, row flags, 0).
@group(0) @binding(13) var<storage, read_write> part_buf: array<vec4<f32>>;

override D: u32 = 64u;    // head dim (multiple of 4)
override BQ: u32 = 16u;   // query rows per tile
override BK: u32 = 16u;   // keys per chunk (divides the block size)
override WG: u32 = 64u;   // invocations
const MAX_ACC: u32 = 16u; // vec4 accumulators per invocation (BQ * D / 4 <= WG * MAX_ACC)

var<workgroup> q_s: array<vec4<f32>, BQ * D / 4u>;   // Q tile, pre-scaled by scale * log2(e)
var<workgroup> kv_s: array<vec4<f32>, BK * D / 4u>;  // K chunk, then V chunk
var<workgroup> p_s: array<f32, BQ * BK>;             // scores, then probabilities
var<workgroup> m_s: array<f32, BQ>;                  // running row max (base 2)
var<workgroup> l_s: array<f32, BQ>;                  // running row sum
var<workgroup> f_s: array<u32, BQ>;                  // row flags (score_flags, OR-ed)
var<workgroup> alpha_s: array<f32, BQ>;              // this chunk's rescale factor

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d4 = D / 4u;
    // Longest tiles (latest in a causal sequence) first, for load balance.
    let tile = params.tiles - 1u - wg.x;
    let head = wg.y % params.num_heads;
    let split = wg.y / params.num_heads;
    let b = wg.z;
    let kv_head = head / (params.num_heads / params.num_kv_heads);
    let pattern = head / params.heads_per_pattern;
    let row0 = tile * BQ;
    let seq = params.seq_len;
    let causal = params.causal != 0u;

    for (var i = lid; i < BQ * d4; i += WG) {
        let tok = row0 + i / d4;
        var x = vec4<f32>(0.0);
        if tok < seq {
            x = load_q(q_index(b, tok, head, i % d4, d4)) * params.scale_log2;
        }
        q_s[i] = x;
    }
    if lid < BQ {
        m_s[lid] = NEG_BIG;
        l_s[lid] = 0.0;
        f_s[lid] = 0u;
    }
    var acc: array<vec4<f32>, MAX_ACC>;
    let n_acc = BQ * d4 / WG;
    for (var j = 0u; j < MAX_ACC; j++) {
        acc[j] = vec4<f32>(0.0);
    }

    let slot = pattern * params.tiles + tile;
    let walk = split_range(tile_ptr[slot], tile_ptr[slot + 1u], split);
    for (var e = walk.x; e < walk.y; e++) {
        let entry = entries[e];
        let kv0 = entry.x * params.block_size;
        let rows = entry.y;
        for (var sub = 0u; sub < params.block_size; sub += BK) {
            let k0 = kv0 + sub;
            if k0 >= seq || (causal && k0 > row0 + BQ - 1u) {
                break;
            }
            workgroupBarrier(); // previous chunk's P V is done with kv_s and p_s
            for (var i = lid; i < BK * d4; i += WG) {
                let tok = k0 + i / d4;
                var x = vec4<f32>(0.0);
                if tok < seq {
                    x = load_k(kv_index(params.k_off, b, tok, kv_head, i % d4, d4));
                }
                kv_s[i] = x;
            }
            workgroupBarrier();
            for (var i = lid; i < BQ * BK; i += WG) {
                let r = i / BK;
                let kk = i % BK;
                let qi = row0 + r;
                let kj = k0 + kk;
                var s = NEG_BIG;
                if kj < seq && qi < seq && (!causal || kj <= qi) && row_attends(rows, r) {
                    var dot = vec4<f32>(0.0);
                    for (var c = 0u; c < d4; c++) {
                        dot += q_s[r * d4 + c] * kv_s[kk * d4 + c];
                    }
                    s = dot.x + dot.y + dot.z + dot.w;
                }
                p_s[i] = s;
            }
            workgroupBarrier(); // scores done: K is no longer needed
            for (var i = lid; i < BK * d4; i += WG) {
                let tok = k0 + i / d4;
                var x = vec4<f32>(0.0);
                if tok < seq {
                    x = load_v(kv_index(params.v_off, b, tok, kv_head, i % d4, d4));
                }
                kv_s[i] = x;
            }
            if lid < BQ {
                let m_old = m_s[lid];
                var m_new = m_old;
                var flags = f_s[lid];
                for (var kk = 0u; kk < BK; kk++) {
                    let s = p_s[lid * BK + kk];
                    m_new = max(m_new, s);
                    flags |= score_flags(s);
                }
                f_s[lid] = flags;
                var alpha = 1.0;
                var sum = 0.0;
                if m_new > NEG_BIG {
                    alpha = exp2(m_old - m_new);
                    for (var kk = 0u; kk < BK; kk++) {
                        let s = p_s[lid * BK + kk];
                        var p = 0.0;
                        if s > NEG_BIG {
                            p = exp2(s - m_new);
                        }
                        p_s[lid * BK + kk] = p;
                        sum += p;
                    }
                } else {
                    for (var kk = 0u; kk < BK; kk++) {
                        p_s[lid * BK + kk] = 0.0;
                    }
                }
                l_s[lid] = l_s[lid] * alpha + sum;
                m_s[lid] = m_new;
                alpha_s[lid] = alpha;
            }
            workgroupBarrier();
            for (var j = 0u; j < n_acc; j++) {
                let i = lid + j * WG;
                let r = i / d4;
                let c = i % d4;
                var a = acc[j] * alpha_s[r];
                for (var kk = 0u; kk < BK; kk++) {
                    // A zero P (masked, or a -inf score) adds nothing, not 0 * a non-finite V.
                    let p = p_s[r * BK + kk];
                    a += select(p * kv_s[kk * d4 + c], vec4<f32>(0.0), p == 0.0);
                }
                acc[j] = a;
            }
        }
    }

    workgroupBarrier();
    if params.splits > 1u {
        // Row `tok`'s partial: D / 4 vec4s of unnormalised O, then (m, l).
        let part_row = ((b * params.splits + split) * params.num_heads + head) * seq;
        for (var j = 0u; j < n_acc; j++) {
            let i = lid + j * WG;
            let tok = row0 + i / d4;
            if tok < seq {
                part_buf[(part_row + tok) * (d4 + 1u) + i % d4] = acc[j];
            }
        }
        if lid < BQ && row0 + lid < seq {
            part_buf[(part_row + row0 + lid) * (d4 + 1u) + d4] = vec4<f32>(m_s[lid], l_s[lid], f32(f_s[lid]), 0.0);
        }
        return;
    }
    for (var j = 0u; j < n_acc; j++) {
        let i = lid + j * WG;
        let r = i / d4;
        let tok = row0 + r;
        if tok < seq {
            let l = l_s[r];
            var x = vec4<f32>(0.0);
            if row_is_nan(f_s[r], l) {
                x = vec4<f32>(quiet_nan());
            } else if l > 0.0 {
                x = acc[j] / l;
            }
            store_o(o_index(b, tok, head, i % d4, d4), x);
        }
    }
    if lid < BQ && row0 + lid < seq {
        let l = l_s[lid];
        var lse = params.neg_inf;
        if row_is_nan(f_s[lid], l) {
            lse = quiet_nan();
        } else if l > 0.0 {
            lse = (m_s[lid] + log2(l)) * 0.6931471805599453;
        }
        lse_buf[params.lse_off + (b * params.num_heads + head) * seq + row0 + lid] = lse;
    }
}
