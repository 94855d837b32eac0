// Portable S2 backward, pass 2 of 2: dK and dV. CPU twin: src/cpu/backward/portable.rs.
//
// One workgroup per (KV tile of BK keys, KV head, batch). It stages its K and V rows once, then for each
// query head of the KV head's GQA group walks the column list of its KV block (the query tiles that attend
// it: the transposed index, src/plan/column.rs), recomputes P and dS = P * (dP - D) for each BQ-row
// query tile from the forward's LSE and pass 1's D, and accumulates dV += P^T dO and dK += dS^T Q in
// registers. The group's query heads are summed in a fixed order inside one workgroup, so dK and dV are
// written once per element, without atomics: deterministic.
//
// Where the device caps loop iterations (plan/loop_budget.rs), a KV tile's work (its column lists of every
// query head of the group, one after the other) is cut into `params.splits` pieces of `params.split_len`
// query tiles, walked by separate workgroups (workgroup_id.y = split * kv_heads + kv_head); each writes its
// partial dK and dV to `part_buf` and split_sum.wgsl adds them in split order.

#include shared/params.wgsl
#include shared/nonfinite.wgsl
#include storage
#include grad_storage
#include shared/backward.wgsl

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let d4 = D / 4u;
    let kv_tile = wg.x;
    let kv_head = wg.y % params.num_kv_heads;
    let split = wg.y / params.num_kv_heads;
    let b = wg.z;
    let group = params.num_heads / params.num_kv_heads;
    let k0 = kv_tile * BK;
    // `tiles` is the number of KV blocks per pattern in this pass's params.
    let kb = k0 / params.block_size;
    let seq = params.seq_len;
    let causal = params.causal != 0u;

    stage_keys(b, kv_head, k0, lid);
    var dk: array<vec4<f32>, MAX_ACC / 2u>;
    var dv: array<vec4<f32>, MAX_ACC / 2u>;
    let n_acc = BK * d4 / WG;
    for (var j = 0u; j < MAX_ACC / 2u; j++) {
        dk[j] = vec4<f32>(0.0);
        dv[j] = vec4<f32>(0.0);
    }

    // This split's share of the group's column lists, walked as one list: `skip` items, then `take`.
    var skip = 0u;
    var take = 0xffffffffu;
    if params.splits > 1u {
        skip = split * params.split_len;
        take = params.split_len;
    }
    for (var head = kv_head * group; head < (kv_head + 1u) * group; head++) {
        let slot = (head / params.heads_per_pattern) * params.tiles + kb;
        let begin = tile_ptr[slot];
        let len = tile_ptr[slot + 1u] - begin;
        let skipped = min(skip, len);
        skip -= skipped;
        let first = begin + skipped;
        let e_end = first + min(len - skipped, take);
        take -= e_end - first;
        for (var e = first; e < e_end; e++) {
            let entry = entries[e];
            let row0 = entry.x * BQ;
            if causal && row0 + BQ <= k0 {
                continue; // every row of the tile precedes every key
            }
            workgroupBarrier(); // the previous tile is done with q_s, do_s and pds_s
            stage_queries(b, head, row0, lid);
            for (var r = lid; r < BQ; r += WG) {
                let tok = row0 + r;
                var delta = 0.0;
                var lse = NEG_BIG;
                if tok < seq {
                    delta = delta_buf[stat_index(b, head, tok)];
                    lse = lse_log2(stat_index(b, head, tok));
                }
                delta_s[r] = delta;
                lse_s[r] = lse;
            }
            workgroupBarrier();
            pair_grads(row0, k0, entry.y, lid);
            workgroupBarrier();
            for (var j = 0u; j < n_acc; j++) {
                let i = lid + j * WG;
                let c = i / d4;
                let x = i % d4;
                var a = dk[j];
                var g = dv[j];
                for (var r = 0u; r < BQ; r++) {
                    let pd = pds_s[r * BK + c];
                    a += grad_term(pd.y, q_s[r * d4 + x]);
                    g += grad_term(pd.x, do_s[r * d4 + x]);
                }
                dk[j] = a;
                dv[j] = g;
            }
        }
    }

    // dK = scale * sum dS Q = ln 2 * sum dS (Q * scale_log2); dV = sum P dO.
    for (var j = 0u; j < n_acc; j++) {
        let i = lid + j * WG;
        let tok = k0 + i / d4;
        if tok < seq {
            let at = kv_index(0u, b, tok, kv_head, i % d4, d4);
            if params.splits > 1u {
                let n4 = nwg.z * seq * params.kv_stride;
                part_buf[split * n4 + at] = dk[j] * LN2;
                part_buf[(params.splits + split) * n4 + at] = dv[j];
            } else {
                store_dk(at, dk[j] * LN2);
                store_dv(at, dv[j]);
            }
        }
    }
}
