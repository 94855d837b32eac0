// S2 backward on cooperative matrices, pass 2 of 2: dK and dV. f16 storage, f32 accumulation. Same
// bindings, params and column lists as the portable backward_dkdv.wgsl (CPU twin:
// src/cpu/backward/portable.rs).
//
// One workgroup per (KV tile of BK keys, KV head, batch); subgroup g owns keys 16g..16g+15 and keeps their
// dK and dV accumulators (2 x D/16 f32 C matrices) in registers; the tile's K and V rows stay in workgroup
// memory and are loaded as A matrices where needed (in registers they would not leave room for the
// accumulators). For each query head of the KV head's GQA group, for each BQ-row query tile of the KV
// block's column list (the transposed index, src/plan/column.rs):
//   1. the workgroup stages the tile's Q and dO rows, their LSE (base 2; +BIG where the row is masked,
//      past the end or without keys, so that P = 0 there) and D from pass 1;
//   2. each subgroup whose keys some row of the tile sees computes S^T = K Q^T and dP^T = V dO^T (BQ/16
//      C matrices each: four independent accumulation chains);
//   3. its lanes (two per key) recompute P^T = exp2(S^T * scale_log2 - LSE) from S^T in s_s (masked on
//      the causal diagonal and at the sequence end), read dP^T through s_s and write P^T and
//      dS^T = P^T * (dP^T - D) as f16;
//   4. dV += P^T dO and dK += dS^T Q.
// Steps 2-4 touch only the subgroup's rows and synchronise with subgroup barriers (see the uniformity
// note in forward_coop.wgsl). The group's query heads and tiles are summed in a fixed order inside one
// workgroup and dK, dV written once per element: deterministic, no atomics.

diagnostic(off, derivative_uniformity);
enable f16;
enable wgpu_cooperative_matrix;

#include shared/params.wgsl
#include shared/coop_backward.wgsl

override NSG: u32 = BK / 16u;        // subgroups the kernel needs
override PS4: u32 = (BQ + 8u) / 4u;  // vec4s per P^T / dS^T row
override SS4: u32 = (BQ + 8u) / 4u;  // vec4s per S^T / dP^T row (>= 16 columns: also dK/dV staging)

const MAX_BQ8: u32 = 4u;  // BQ at most 32

var<workgroup> k_s: array<vec4<f16>, BK * KS4>;
var<workgroup> v_s: array<vec4<f16>, BK * KS4>;
var<workgroup> q_s: array<vec4<f16>, BQ * KS4>;
var<workgroup> do_s: array<vec4<f16>, BQ * KS4>;
var<workgroup> p_s: array<vec4<f16>, BK * PS4>;
var<workgroup> ds_s: array<vec4<f16>, BK * PS4>;
var<workgroup> s_s: array<vec4<f32>, BK * SS4>;
var<workgroup> lse_s: array<vec4<f32>, BQ / 4u>;
var<workgroup> delta_s: array<vec4<f32>, BQ / 4u>;
var<workgroup> shape_ok_s: u32;

// S^T = K Q^T and dP^T = V dO^T of subgroup g's keys against the staged queries 16qt.. (qt = 0, 1).
fn scores(g: u32, s0: ptr<function, CM>, s1: ptr<function, CM>, e0: ptr<function, CM>, e1: ptr<function, CM>) {
    for (var j = 0u; j < D / 16u; j++) {
        let ka = coopLoadT<AM>(&k_s[16u * g * KS4 + 4u * j], KS4);
        let va = coopLoadT<AM>(&v_s[16u * g * KS4 + 4u * j], KS4);
        *s0 = coopMultiplyAdd(ka, coopLoad<BM>(&q_s[4u * j], KS4), *s0);
        *e0 = coopMultiplyAdd(va, coopLoad<BM>(&do_s[4u * j], KS4), *e0);
        if BQ > 16u {
            *s1 = coopMultiplyAdd(ka, coopLoad<BM>(&q_s[16u * KS4 + 4u * j], KS4), *s1);
            *e1 = coopMultiplyAdd(va, coopLoad<BM>(&do_s[16u * KS4 + 4u * j], KS4), *e1);
        }
    }
}

// dV += P^T dO and dK += dS^T Q for staged queries 16qt..16qt+15 (dO, Q rows as the rows of B).
fn accumulate(
    g: u32,
    qt: u32,
    v0: ptr<function, CM>,
    v1: ptr<function, CM>,
    v2: ptr<function, CM>,
    v3: ptr<function, CM>,
    v4: ptr<function, CM>,
    v5: ptr<function, CM>,
    v6: ptr<function, CM>,
    v7: ptr<function, CM>,
    k0: ptr<function, CM>,
    k1: ptr<function, CM>,
    k2: ptr<function, CM>,
    k3: ptr<function, CM>,
    k4: ptr<function, CM>,
    k5: ptr<function, CM>,
    k6: ptr<function, CM>,
    k7: ptr<function, CM>,
) {
    let pa = coopLoadT<AM>(&p_s[16u * g * PS4 + 4u * qt], PS4);
    let da = coopLoadT<AM>(&ds_s[16u * g * PS4 + 4u * qt], PS4);
    let at = 16u * qt * KS4;
    *v0 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at], KS4), *v0);
    *k0 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at], KS4), *k0);
    *v1 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 4u], KS4), *v1);
    *k1 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 4u], KS4), *k1);
    *v2 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 8u], KS4), *v2);
    *k2 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 8u], KS4), *k2);
    *v3 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 12u], KS4), *v3);
    *k3 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 12u], KS4), *k3);
    if D > 64u {
        *v4 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 16u], KS4), *v4);
        *k4 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 16u], KS4), *k4);
        *v5 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 20u], KS4), *v5);
        *k5 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 20u], KS4), *k5);
        *v6 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 24u], KS4), *v6);
        *k6 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 24u], KS4), *k6);
        *v7 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 28u], KS4), *v7);
        *k7 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 28u], KS4), *k7);
    }
}

// Stages `n` rows of D/4 vec4s from token `tok0` of `head` into `dst`-selected workgroup arrays: 0 K and V
// (KV head), 1 Q and dO (query head); zeros past the end.
fn stage(which: u32, b: u32, head: u32, tok0: u32, n: u32, lid: u32) {
    let d4 = D / 4u;
    for (var i = lid; i < n * d4; i += WG) {
        let tok = tok0 + i / d4;
        let at = (i / d4) * KS4 + i % d4;
        var x = vec4<f16>(0.0h);
        var y = vec4<f16>(0.0h);
        if which == 0u {
            if tok < params.seq_len {
                x = k_buf[kv_index(params.k_off, b, tok, head, i % d4, d4)];
                y = v_buf[kv_index(params.v_off, b, tok, head, i % d4, d4)];
            }
            k_s[at] = x;
            v_s[at] = y;
        } else {
            if tok < params.seq_len {
                x = q_buf[q_index(b, tok, head, i % d4, d4)];
                y = do_buf[o_index(b, tok, head, i % d4, d4)];
            }
            q_s[at] = x;
            do_s[at] = y;
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let d4 = D / 4u;
    let k0 = wg.x * BK;
    let kv_head = wg.y;
    let b = wg.z;
    let group = params.num_heads / params.num_kv_heads;
    // `tiles` is the number of KV blocks per pattern in this pass's params.
    let kb = k0 / params.block_size;
    let seq = params.seq_len;
    let causal = params.causal != 0u;
    let g = min(sg_id, NSG - 1u);
    // Elementwise role: lanes 2r and 2r+1 own key row r of the tile, each half of its vec4 columns.
    let r = lid / 2u;
    let h = lid % 2u;
    let kj = k0 + r;
    let key0 = k0 + 16u * g;

    // The key split needs exactly NSG subgroups; any other subgroup size poisons dK and dV (NaN).
    if lid == 0u {
        shape_ok_s = u32(n_sg == NSG);
    }
    if workgroupUniformLoad(&shape_ok_s) == 0u {
        let nan = vec4<f16>(f16(params.neg_inf - params.neg_inf));
        for (var i = lid; i < BK * d4; i += WG) {
            let tok = k0 + i / d4;
            if tok < seq {
                dk_buf[kv_index(0u, b, tok, kv_head, i % d4, d4)] = nan;
                dv_buf[kv_index(0u, b, tok, kv_head, i % d4, d4)] = nan;
            }
        }
        return;
    }

    stage(0u, b, kv_head, k0, BK, lid);
    var v0 = CM();
    var v1 = CM();
    var v2 = CM();
    var v3 = CM();
    var v4 = CM();
    var v5 = CM();
    var v6 = CM();
    var v7 = CM();
    var dk0 = CM();
    var dk1 = CM();
    var dk2 = CM();
    var dk3 = CM();
    var dk4 = CM();
    var dk5 = CM();
    var dk6 = CM();
    var dk7 = CM();

    for (var head = kv_head * group; head < (kv_head + 1u) * group; head++) {
        let slot = (head / params.heads_per_pattern) * params.tiles + kb;
        let e_end = tile_ptr[slot + 1u];
        for (var e = tile_ptr[slot]; e < e_end; e++) {
            let entry = entries[e];
            let row0 = entry.x * BQ;
            let row_last = min(row0 + BQ, seq) - 1u;
            if causal && row_last < k0 {
                continue; // every row of the tile precedes every key
            }
            workgroupBarrier(); // every subgroup is done with the previous tile's q_s, do_s, lse_s, delta_s
            stage(1u, b, head, row0, BQ, lid);
            for (var i = lid; i < BQ; i += WG) {
                let tok = row0 + i;
                var lse = POS_BIG;
                var delta = 0.0;
                if tok < seq && row_attends(entry.y, i) {
                    lse = lse_log2(stat_index(b, head, tok));
                    delta = delta_buf[stat_index(b, head, tok)];
                }
                lse_s[i / 4u][i % 4u] = lse;
                delta_s[i / 4u][i % 4u] = delta;
            }
            workgroupBarrier();

            // Subgroups whose 16 keys all follow every row of the tile (causal) or lie past the end skip it.
            if key0 < seq && (!causal || key0 <= row_last) {
                var s0 = CM();
                var s1 = CM();
                var e0 = CM();
                var e1 = CM();
                scores(g, &s0, &s1, &e0, &e1);
                coopStoreT(s0, &s_s[16u * g * SS4], SS4);
                if BQ > 16u {
                    coopStoreT(s1, &s_s[16u * g * SS4 + 4u], SS4);
                }
                subgroupBarrier();

                // P^T from the LSE of each column's query; the element mask only where the tile touches
                // the causal diagonal or the sequence end (row masks and rows past the end: LSE = +BIG).
                let need_mask = k0 + BK > seq || (causal && k0 + BK - 1u > row0);
                var pr: array<vec4<f32>, MAX_BQ8>;
                for (var i = 0u; i < BQ / 8u; i++) {
                    var p = exp2(s_s[r * SS4 + 2u * i + h] * params.scale_log2 - lse_s[2u * i + h]);
                    if need_mask {
                        let qi = vec4<u32>(row0 + 8u * i + 4u * h) + vec4<u32>(0u, 1u, 2u, 3u);
                        let ok = vec4<bool>(kj < seq) & (vec4<bool>(!causal) | (vec4<u32>(kj) <= qi));
                        p = select(vec4<f32>(0.0), p, ok);
                    }
                    pr[i] = p;
                }
                subgroupBarrier(); // S^T is read: dP^T takes its place
                coopStoreT(e0, &s_s[16u * g * SS4], SS4);
                if BQ > 16u {
                    coopStoreT(e1, &s_s[16u * g * SS4 + 4u], SS4);
                }
                subgroupBarrier();
                for (var i = 0u; i < BQ / 8u; i++) {
                    let dp = s_s[r * SS4 + 2u * i + h];
                    p_s[r * PS4 + 2u * i + h] = vec4<f16>(pr[i]);
                    ds_s[r * PS4 + 2u * i + h] = vec4<f16>(pr[i] * (dp - delta_s[2u * i + h]));
                }
                subgroupBarrier(); // P^T and dS^T are complete

                for (var qt = 0u; qt < BQ / 16u; qt++) {
                    accumulate(g, qt, &v0, &v1, &v2, &v3, &v4, &v5, &v6, &v7, &dk0, &dk1, &dk2, &dk3, &dk4, &dk5, &dk6, &dk7);
                }
            }
        }
    }

    // dK = scale * sum dS^T Q (scale = scale_log2 * ln 2); dV = sum P^T dO. 16 head dims at a time.
    let scale = params.scale_log2 * LN2;
    write_grad(dk0, g, lid, k0, b, kv_head, 0u, scale, 1u);
    write_grad(dk1, g, lid, k0, b, kv_head, 1u, scale, 1u);
    write_grad(dk2, g, lid, k0, b, kv_head, 2u, scale, 1u);
    write_grad(dk3, g, lid, k0, b, kv_head, 3u, scale, 1u);
    write_grad(v0, g, lid, k0, b, kv_head, 0u, 1.0, 2u);
    write_grad(v1, g, lid, k0, b, kv_head, 1u, 1.0, 2u);
    write_grad(v2, g, lid, k0, b, kv_head, 2u, 1.0, 2u);
    write_grad(v3, g, lid, k0, b, kv_head, 3u, 1.0, 2u);
    if D > 64u {
        write_grad(dk4, g, lid, k0, b, kv_head, 4u, scale, 1u);
        write_grad(dk5, g, lid, k0, b, kv_head, 5u, scale, 1u);
        write_grad(dk6, g, lid, k0, b, kv_head, 6u, scale, 1u);
        write_grad(dk7, g, lid, k0, b, kv_head, 7u, scale, 1u);
        write_grad(v4, g, lid, k0, b, kv_head, 4u, 1.0, 2u);
        write_grad(v5, g, lid, k0, b, kv_head, 5u, 1.0, 2u);
        write_grad(v6, g, lid, k0, b, kv_head, 6u, 1.0, 2u);
        write_grad(v7, g, lid, k0, b, kv_head, 7u, 1.0, 2u);
    }
}
