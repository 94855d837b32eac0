// Portable S2 backward, pass 1 of 2: D = rowsum(dO * O) and dQ. CPU twin: src/cpu/backward/portable.rs.
//
// One workgroup per (query tile, head, batch), walking the forward's MergeQ row list (the same tiles
// and row masks the forward used). It first computes D for its rows (the flash-attention preprocess,
// fused here because this pass stages dO anyway) and writes it for pass 2, then for each chunk of BK keys
// recomputes P from Q, K and the forward's LSE, forms dS = P * (dP - D) and accumulates dQ += dS K in
// registers. dQ is a separate pass over the row index rather than atomics in the dK/dV pass: every dQ
// element is written once by one invocation, so the result is deterministic (bitwise reproducible) and
// needs no float atomics, which WGSL lacks; the price is recomputing P once more.
//
// Where the device caps loop iterations (plan/loop_budget.rs), each row list is cut into `params.splits`
// pieces walked by separate workgroups (workgroup_id.y = split * heads + head); each writes its scaled
// partial dQ to `part_buf` ([split] copies of dQ's layout) and split_sum.wgsl adds them in split order.

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

    stage_queries(b, head, row0, lid);
    workgroupBarrier();
    // Preprocess: D = rowsum(dO * O) of this tile's rows, for this pass and for the dK/dV pass.
    for (var r = lid; r < BQ; r += WG) {
        let tok = row0 + r;
        var delta = 0.0;
        var lse = NEG_BIG;
        if tok < seq {
            var acc = vec4<f32>(0.0);
            for (var c = 0u; c < d4; c++) {
                acc += do_s[r * d4 + c] * load_o(o_index(b, tok, head, c, d4));
            }
            delta = acc.x + acc.y + acc.z + acc.w;
            if split == 0u {
                delta_buf[stat_index(b, head, tok)] = delta;
            }
            lse = lse_log2(stat_index(b, head, tok));
        }
        delta_s[r] = delta;
        lse_s[r] = lse;
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
        for (var sub = 0u; sub < params.block_size; sub += BK) {
            let k0 = kv0 + sub;
            if k0 >= seq || (causal && k0 > row0 + BQ - 1u) {
                break;
            }
            workgroupBarrier(); // the previous chunk is done with k_s and pds_s
            stage_keys(b, kv_head, k0, lid);
            workgroupBarrier();
            pair_grads(row0, k0, entry.y, lid);
            workgroupBarrier();
            for (var j = 0u; j < n_acc; j++) {
                let i = lid + j * WG;
                let r = i / d4;
                let c = i % d4;
                var a = acc[j];
                for (var kk = 0u; kk < BK; kk++) {
                    a += grad_term(pds_s[r * BK + kk].y, k_s[kk * d4 + c]);
                }
                acc[j] = a;
            }
        }
    }

    // dQ = scale * sum dS K, with scale = scale_log2 * ln 2.
    for (var j = 0u; j < n_acc; j++) {
        let i = lid + j * WG;
        let tok = row0 + i / d4;
        if tok < seq {
            let at = q_index(b, tok, head, i % d4, d4);
            let g = acc[j] * (params.scale_log2 * LN2);
            if params.splits > 1u {
                part_buf[split * nwg.z * seq * params.q_stride + at] = g;
            } else {
                store_dq(at, g);
            }
        }
    }
}
