// S2 backward on cooperative matrices, pass 1 of 2: D = rowsum(dO * O) and dQ. f16 storage, f32
// accumulation. Same bindings, params and lists as the portable backward_dq.wgsl (CPU twin:
// src/cpu/backward/portable.rs), the chunk walk of forward_coop.wgsl (shared/coop_chunks.wgsl), plus the
// redo's dispatch sizes: a non-finite dQ in the epilogue arms the portable redo of both backward passes
// (shared/coop_redo.wgsl). A NaN LSE (a NaN row of the forward) makes its row's dQ NaN here, so this pass
// also catches the rows the dK/dV pass treats as masked.
//
// One workgroup per (query tile of BQ rows, head, batch) walking the forward's MergeQ tile list in chunks
// of BK keys. Subgroup g owns rows 16g..16g+15 and keeps their Q and dO (D/16 A matrices each) and the dQ
// accumulators (D/16 f32 C matrices) in registers; lanes 2r and 2r+1 keep row r's LSE (base 2) and D,
// which they compute first (each half of the head dims) and write for the dK/dV pass. Per chunk:
//   1. the workgroup stores the chunk's K and V rows (fetched during the previous chunk) to workgroup
//      memory and fetches the next chunk's (the chunk's only two workgroup barriers);
//   2. each subgroup whose rows see the chunk computes S = Q K^T and dP = dO V^T (BK/16 C matrices each);
//   3. its lanes recompute P = exp2(S * scale_log2 - LSE) from S in s_s (masked on the causal diagonal,
//      at the sequence end and under row masks), then read dP through s_s and write dS = P * (dP - D)
//      as f16 to p_s;
//   4. dQ += dS K.
// Steps 2-4 touch only the subgroup's rows and synchronise with subgroup barriers (see the uniformity
// note in forward_coop.wgsl). dQ = scale * dS K is written once per element: deterministic, no atomics.

diagnostic(off, derivative_uniformity);
enable f16;
enable wgpu_cooperative_matrix;

#include shared/params.wgsl

#include shared/coop_backward.wgsl
#include shared/coop_redo.wgsl
override NSG: u32 = BQ / 16u;          // subgroups the kernel needs
override NPF: u32 = BK * D / 4u / WG;  // K (and V) vec4s each invocation fetches per chunk
override PS4: u32 = (BK + 8u) / 4u;    // vec4s per dS row (also Q/dO staging, >= 16 columns)
override SS4: u32 = (BK + 8u) / 4u;    // vec4s per S/dP row (>= 16 columns: also dQ staging)

const MAX_BK8: u32 = 4u;  // BK at most 32
const MAX_PF: u32 = 8u;   // NPF at most 8

alias Fetch = array<vec4<f16>, MAX_PF>;

var<workgroup> k_s: array<vec4<f16>, BK * KS4>;
var<workgroup> v_s: array<vec4<f16>, BK * KS4>;
var<workgroup> p_s: array<vec4<f16>, BQ * PS4>;
var<workgroup> s_s: array<vec4<f32>, BQ * SS4>;
var<workgroup> shape_ok_s: u32;

#include shared/coop_grad_out.wgsl

#include shared/coop_chunks.wgsl

// The epilogue's store (shared/coop_grad_out.wgsl): dQ of query head `head`.
fn store_grad(which: u32, b: u32, tok: u32, head: u32, c4: u32, x: vec4<f16>) {
    dq_buf[q_index(b, tok, head, c4, D / 4u)] = x;
}

// Head dims 16j..16j+15 of the subgroup's rows of Q (`grad` false) or dO (true) as an A matrix, staged
// through p_s.
fn stage_rows(t: Tile, j: u32, grad: bool) -> AM {
    let d4 = D / 4u;
    for (var i = t.lid; i < BQ * 4u; i += WG) {
        let tok = t.row0 + i / 4u;
        let c4 = j * 4u + i % 4u;
        var x = vec4<f16>(0.0h);
        if tok < params.seq_len && grad {
            x = do_buf[o_index(t.b, tok, t.head, c4, d4)];
        } else if tok < params.seq_len {
            x = q_buf[q_index(t.b, tok, t.head, c4, d4)];
        }
        p_s[(i / 4u) * PS4 + i % 4u] = x;
    }
    workgroupBarrier();
    let m = coopLoadT<AM>(&p_s[16u * t.g * PS4], PS4);
    workgroupBarrier();
    return m;
}

// V rows 16kt.. as the columns of a B matrix, head dims 16j.. (dP = dO V^T).
fn vmat_cols(kt: u32, j: u32) -> BM {
    return coopLoad<BM>(&v_s[kt * 16u * KS4 + j * 4u], KS4);
}

// dP of the subgroup's rows against keys 16kt..16kt+15, as two half-length chains like `qk`.
fn dov(kt: u32, g0: AM, g1: AM, g2: AM, g3: AM, g4: AM, g5: AM, g6: AM, g7: AM) -> CM {
    var s = coopMultiplyAdd(g0, vmat_cols(kt, 0u), CM());
    var u = coopMultiplyAdd(g1, vmat_cols(kt, 1u), CM());
    s = coopMultiplyAdd(g2, vmat_cols(kt, 2u), s);
    u = coopMultiplyAdd(g3, vmat_cols(kt, 3u), u);
    if D > 64u {
        s = coopMultiplyAdd(g4, vmat_cols(kt, 4u), s);
        u = coopMultiplyAdd(g5, vmat_cols(kt, 5u), u);
        s = coopMultiplyAdd(g6, vmat_cols(kt, 6u), s);
        u = coopMultiplyAdd(g7, vmat_cols(kt, 7u), u);
    }
    return s + u;
}

// dQ += dS K for keys 16kt..16kt+15 (K rows as the rows of B matrices).
fn dsk(
    t: Tile,
    kt: u32,
    a0: ptr<function, CM>,
    a1: ptr<function, CM>,
    a2: ptr<function, CM>,
    a3: ptr<function, CM>,
    a4: ptr<function, CM>,
    a5: ptr<function, CM>,
    a6: ptr<function, CM>,
    a7: ptr<function, CM>,
) {
    let ds = coopLoadT<AM>(&p_s[16u * t.g * PS4 + kt * 4u], PS4);
    let at = kt * 16u * KS4;
    *a0 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at], KS4), *a0);
    *a1 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at + 4u], KS4), *a1);
    *a2 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at + 8u], KS4), *a2);
    *a3 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at + 12u], KS4), *a3);
    if D > 64u {
        *a4 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at + 16u], KS4), *a4);
        *a5 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at + 20u], KS4), *a5);
        *a6 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at + 24u], KS4), *a6);
        *a7 = coopMultiplyAdd(ds, coopLoadT<BM>(&k_s[at + 28u], KS4), *a7);
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    // Longest tiles (latest in a causal sequence) first, for load balance.
    let tile = params.tiles - 1u - wg.x;
    let head = wg.y;
    let row0 = tile * BQ;
    let seq = params.seq_len;
    let causal = params.causal != 0u;
    let d4 = D / 4u;
    let t = Tile(
        wg.z,
        head,
        head / (params.num_heads / params.num_kv_heads),
        row0,
        min(row0 + BQ, seq) - 1u,
        lid,
        min(sg_id, NSG - 1u),
    );
    let pattern = head / params.heads_per_pattern;
    // Elementwise role: lanes 2r and 2r+1 own tile row r, each half of its vec4 columns (interleaved).
    let r = lid / 2u;
    let h = lid % 2u;
    let qi = row0 + r;

    // The row split needs exactly NSG subgroups; any other subgroup size poisons dQ (NaN).
    if lid == 0u {
        shape_ok_s = u32(n_sg == NSG);
    }
    if workgroupUniformLoad(&shape_ok_s) == 0u {
        let nan = params.neg_inf - params.neg_inf;
        for (var i = lid; i < BQ * d4; i += WG) {
            let tok = row0 + i / d4;
            if tok < seq {
                dq_buf[q_index(t.b, tok, head, i % d4, d4)] = vec4<f16>(f16(nan));
            }
        }
        return;
    }

    // Preprocess: D = rowsum(dO * O) of row r (for this pass and the dK/dV pass) and its LSE.
    var delta = 0.0;
    var lse = POS_BIG;
    if qi < seq {
        var acc = vec4<f32>(0.0);
        for (var c = h; c < d4; c += 2u) {
            let at = o_index(t.b, qi, head, c, d4);
            acc += vec4<f32>(do_buf[at]) * vec4<f32>(o_buf[at]);
        }
        delta = acc.x + acc.y + acc.z + acc.w;
    }
    delta += subgroupShuffleXor(delta, 1u);
    if qi < seq {
        lse = lse_log2(stat_index(t.b, head, qi));
        if h == 0u {
            delta_buf[stat_index(t.b, head, qi)] = delta;
        }
    }

    // Q and dO (raw f16; the scale is applied to S in f32) and the dQ accumulators.
    let q0 = stage_rows(t, 0u, false);
    let q1 = stage_rows(t, 1u, false);
    let q2 = stage_rows(t, 2u, false);
    let q3 = stage_rows(t, 3u, false);
    let g0 = stage_rows(t, 0u, true);
    let g1 = stage_rows(t, 1u, true);
    let g2 = stage_rows(t, 2u, true);
    let g3 = stage_rows(t, 3u, true);
    var q4 = AM();
    var q5 = AM();
    var q6 = AM();
    var q7 = AM();
    var g4 = AM();
    var g5 = AM();
    var g6 = AM();
    var g7 = AM();
    if D > 64u {
        q4 = stage_rows(t, 4u, false);
        q5 = stage_rows(t, 5u, false);
        q6 = stage_rows(t, 6u, false);
        q7 = stage_rows(t, 7u, false);
        g4 = stage_rows(t, 4u, true);
        g5 = stage_rows(t, 5u, true);
        g6 = stage_rows(t, 6u, true);
        g7 = stage_rows(t, 7u, true);
    }
    var a0 = CM();
    var a1 = CM();
    var a2 = CM();
    var a3 = CM();
    var a4 = CM();
    var a5 = CM();
    var a6 = CM();
    var a7 = CM();

    let slot = pattern * params.tiles + tile;
    let subs = params.block_size / BK;
    let c_end = tile_ptr[slot + 1u] * subs;
    var c = next_chunk(tile_ptr[slot] * subs, c_end, subs, t.row_last);
    var fk: Fetch;
    var fv: Fetch;
    if c < c_end {
        fetch(t, chunk_k0(c, subs), &fk, &fv);
    }
    while c < c_end {
        let rows = chunk_entry(c, subs).y;
        let k0 = chunk_k0(c, subs);
        workgroupBarrier(); // every subgroup is done with the previous chunk's k_s and v_s
        stash(t, &fk, &fv);
        c = next_chunk(c + 1u, c_end, subs, t.row_last);
        fetch_chunk(t, c, c_end, subs, &fk, &fv); // in flight during this chunk's math
        workgroupBarrier();

        // Subgroups whose 16 rows all precede the chunk (causal) or sit outside its row mask skip it.
        let sg_row0 = row0 + 16u * t.g;
        if (sg_row0 < seq && (!causal || k0 <= sg_row0 + 15u) && row_attends(rows, 16u * t.g)) {
            let s0 = qk(0u, q0, q1, q2, q3, q4, q5, q6, q7);
            let e0 = dov(0u, g0, g1, g2, g3, g4, g5, g6, g7);
            var s1 = CM();
            var e1 = CM();
            if BK > 16u {
                s1 = qk(1u, q0, q1, q2, q3, q4, q5, q6, q7);
                e1 = dov(1u, g0, g1, g2, g3, g4, g5, g6, g7);
            }
            coopStoreT(s0, &s_s[16u * t.g * SS4], SS4);
            if BK > 16u {
                coopStoreT(s1, &s_s[16u * t.g * SS4 + 4u], SS4);
            }
            subgroupBarrier();

            // P from the forward's LSE, masked only in chunks on the causal diagonal, at the sequence
            // end or under a partial row mask (rows past the end have LSE = +BIG, so P = 0 there).
            let need_mask = k0 + BK > seq || (causal && k0 + BK - 1u > row0) || rows < BQ || rows >= ROWMASK_BITS_FLAG;
            let row_ok = row_attends(rows, r);
            var pr: array<vec4<f32>, MAX_BK8>;
            for (var i = 0u; i < BK / 8u; i++) {
                var p = exp2(s_s[r * SS4 + 2u * i + h] * params.scale_log2 - vec4<f32>(lse));
                if need_mask {
                    let kj = vec4<u32>(k0 + 8u * i + 4u * h) + vec4<u32>(0u, 1u, 2u, 3u);
                    let ok = vec4<bool>(row_ok) & (kj < vec4<u32>(seq)) & (vec4<bool>(!causal) | (kj <= vec4<u32>(qi)));
                    p = select(vec4<f32>(0.0), p, ok);
                }
                pr[i] = p;
            }
            subgroupBarrier(); // S is read: dP takes its place
            coopStoreT(e0, &s_s[16u * t.g * SS4], SS4);
            if BK > 16u {
                coopStoreT(e1, &s_s[16u * t.g * SS4 + 4u], SS4);
            }
            subgroupBarrier();
            for (var i = 0u; i < BK / 8u; i++) {
                let dp = s_s[r * SS4 + 2u * i + h];
                p_s[r * PS4 + 2u * i + h] = vec4<f16>(pr[i] * (dp - vec4<f32>(delta)));
            }
            subgroupBarrier(); // dS is complete

            for (var kt = 0u; kt < BK / 16u; kt++) {
                dsk(t, kt, &a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7);
            }
        }
    }

    // dQ = scale * sum dS K, 16 head dims at a time (scale = scale_log2 * ln 2). A non-finite dQ arms the
    // portable redo of both passes (shared/coop_redo.wgsl).
    let scale = params.scale_log2 * LN2;
    var bad = write_grad(a0, t.g, lid, row0, t.b, head, 0u, scale, 0u);
    bad = bad | write_grad(a1, t.g, lid, row0, t.b, head, 1u, scale, 0u);
    bad = bad | write_grad(a2, t.g, lid, row0, t.b, head, 2u, scale, 0u);
    bad = bad | write_grad(a3, t.g, lid, row0, t.b, head, 3u, scale, 0u);
    if D > 64u {
        bad = bad | write_grad(a4, t.g, lid, row0, t.b, head, 4u, scale, 0u);
        bad = bad | write_grad(a5, t.g, lid, row0, t.b, head, 5u, scale, 0u);
        bad = bad | write_grad(a6, t.g, lid, row0, t.b, head, 6u, scale, 0u);
        bad = bad | write_grad(a7, t.g, lid, row0, t.b, head, 7u, scale, 0u);
    }
    if bad {
        arm_redo();
    }
}
