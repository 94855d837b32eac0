// S2 backward on cooperative matrices, pass 2 of 2: dK and dV. f16 storage, f32 accumulation. Same
// bindings, params and column lists as the portable backward_dkdv.wgsl (CPU twin:
// src/cpu/backward/coop.rs), plus the redo's dispatch sizes: a non-finite dK or dV in the epilogue arms the
// portable redo of both backward passes (shared/coop_redo.wgsl).
//
// One workgroup per (KV tile of BK keys, KV head, batch). The tile's K and V rows stay in workgroup memory
// and are loaded as A matrices where needed. Blocks of 16 keys x 16 query rows (NPAIR = NKT x QG of them
// per staged query tile of BQ rows) each go to a pair of subgroups: subgroup g = side NPAIR + p works on
// block p (keys 16(p % NKT).., rows 16(p / NKT).. of every staged query tile) and keeps one set of
// accumulators of its keys (D/16 f32 C matrices): side 0 (the "V-side") dV, side 1 (the "K-side") dK.
// For each query head of the KV head's GQA group, for each BQ-row query tile of the KV block's column list
// (the transposed index, src/plan/column.rs):
//   1. the workgroup stores the tile's Q and dO rows, their LSE (base 2; +BIG where the row is masked,
//      past the end or without keys, so that P = 0 there) and D from pass 1, fetched into registers
//      during the previous tile's math, and fetches the next tile's;
//   2. the V-side of each block whose keys some of its rows see computes S^T = K Q^T to the block's rows
//      of s_s, and its lanes (two per key) P^T = exp2(S^T * scale_log2 - LSE) (masked on the causal
//      diagonal and at the sequence end) as f16 to p_s; the K-side computes dP^T = V dO^T and holds it
//      in registers;
//   3. a workgroup barrier publishes P^T (and frees s_s); the K-side stores dP^T to the block's s_s rows
//      and writes dS^T = P^T (dP^T - D) as f16 (P^T as the f16 the V-side wrote);
//   4. the V-side accumulates dV += P^T dO, the K-side dK += dS^T Q over the block's 16 rows.
// Steps 2-4 within a side synchronise with subgroup barriers (see the uniformity note in
// forward_coop.wgsl). At the end the subgroups of each (side, key range) add their partial sums in a fixed
// order (row group 1, 2, .. into 0) through workgroup memory; the group's query heads and tiles are
// summed in a fixed order as well, and dK, dV written once per element: deterministic, no atomics.
//
// The walk goes down each column list from its last query tile, so that the stripe columns of a head,
// which all end at the sequence's last query tile, read the same query tiles at about the same time (L2
// hits instead of each streaming its own from HBM), and each workgroup takes its (KV tile, KV head) from
// a launch order the host appends to tile_ptr after the column pointers (longest GQA-summed column first,
// so that the stripe columns do not start last and leave a tail). Measured slower or no faster on the
// H200: one subgroup per block holding both dK and dV, two 16-row slices per subgroup, 32-row blocks
// (with or without the P^T hand-over).

diagnostic(off, derivative_uniformity);
enable f16;
enable wgpu_cooperative_matrix;

#include shared/params.wgsl

#include shared/coop_backward.wgsl
#include shared/coop_redo.wgsl
override NKT: u32 = BK / 16u;        // key ranges of 16
override QG: u32 = BQ / 16u;         // row groups of 16
override NPAIR: u32 = NKT * QG;      // (key range, row group) blocks; 16 scratch rows each
override NSG: u32 = 2u * NPAIR;      // subgroups the kernel needs: a V-side and a K-side per block
override NQF: u32 = BQ * D / 4u / WG; // Q (and dO) vec4s each invocation fetches per query tile
const PS4: u32 = 6u;                 // vec4s per P^T / dS^T row (16 queries, padded)
const SS4: u32 = 6u;                 // vec4s per S^T / dP^T row (16 queries, padded; also dK/dV staging)

const MAX_QF: u32 = 16u; // NQF at most 16 (BQ * D / 4 / WG = D / (8 NKT); the planner keeps it so)

alias QFetch = array<vec4<f16>, MAX_QF>;

var<workgroup> k_s: array<vec4<f16>, BK * KS4>;
var<workgroup> v_s: array<vec4<f16>, BK * KS4>;
var<workgroup> q_s: array<vec4<f16>, BQ * KS4>;
var<workgroup> do_s: array<vec4<f16>, BQ * KS4>;
var<workgroup> p_s: array<vec4<f16>, 16u * NPAIR * PS4>;
var<workgroup> ds_s: array<vec4<f16>, 16u * NPAIR * PS4>;
var<workgroup> s_s: array<vec4<f32>, 16u * NPAIR * SS4>;
var<workgroup> lse_s: array<vec4<f32>, BQ / 4u>;
var<workgroup> delta_s: array<vec4<f32>, BQ / 4u>;
var<workgroup> shape_ok_s: u32;

#include shared/coop_grad_out.wgsl

// The epilogue's store (shared/coop_grad_out.wgsl): `which` 1 dK, else dV, of KV head `head`.
fn store_grad(which: u32, b: u32, tok: u32, head: u32, c4: u32, x: vec4<f16>) {
    if which == 1u {
        dk_buf[kv_index(0u, b, tok, head, c4, D / 4u)] = x;
    } else {
        dv_buf[kv_index(0u, b, tok, head, c4, D / 4u)] = x;
    }
}

// What one subgroup works on.
struct Sub {
    g: u32,    // its block: its rows of p_s, ds_s and s_s are 16g..16g+15
    kt: u32,   // its keys: 16kt.. of the tile (the rows of its A matrices)
    qs: u32,   // its row group: rows 16qs.. of each staged query tile
    side: u32, // 0 S^T, P^T, dV; 1 dP^T, dS^T, dK
}

// S^T = K Q^T (`grad` false) or dP^T = V dO^T (true) of the subgroup's keys against the queries of
// row group `sl` (rows 16sl..), as two half-length accumulation chains (even and odd head-dim blocks).
fn scores(u: Sub, sl: u32, grad: bool) -> CM {
    var s = CM();
    var t = CM();
    let ka = 16u * u.kt * KS4;
    let qb = 16u * sl * KS4;
    for (var j = 0u; j < D / 16u; j += 2u) {
        if grad {
            s = coopMultiplyAdd(coopLoadT<AM>(&v_s[ka + 4u * j], KS4), coopLoad<BM>(&do_s[qb + 4u * j], KS4), s);
            t = coopMultiplyAdd(coopLoadT<AM>(&v_s[ka + 4u * j + 4u], KS4), coopLoad<BM>(&do_s[qb + 4u * j + 4u], KS4), t);
        } else {
            s = coopMultiplyAdd(coopLoadT<AM>(&k_s[ka + 4u * j], KS4), coopLoad<BM>(&q_s[qb + 4u * j], KS4), s);
            t = coopMultiplyAdd(coopLoadT<AM>(&k_s[ka + 4u * j + 4u], KS4), coopLoad<BM>(&q_s[qb + 4u * j + 4u], KS4), t);
        }
    }
    return s + t;
}

// The V-side's dV += P^T dO or the K-side's dK += dS^T Q over the queries of row group `sl`, into the
// subgroup's one set of accumulators.
fn accumulate(
    u: Sub,
    sl: u32,
    a0: ptr<function, CM>,
    a1: ptr<function, CM>,
    a2: ptr<function, CM>,
    a3: ptr<function, CM>,
    a4: ptr<function, CM>,
    a5: ptr<function, CM>,
    a6: ptr<function, CM>,
    a7: ptr<function, CM>,
) {
    let at = 16u * sl * KS4;
    let ap = 16u * u.g * PS4;
    if u.side == 0u {
        let pa = coopLoadT<AM>(&p_s[ap], PS4);
        *a0 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at], KS4), *a0);
        *a1 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 4u], KS4), *a1);
        *a2 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 8u], KS4), *a2);
        *a3 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 12u], KS4), *a3);
        if D > 64u {
            *a4 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 16u], KS4), *a4);
            *a5 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 20u], KS4), *a5);
            *a6 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 24u], KS4), *a6);
            *a7 = coopMultiplyAdd(pa, coopLoadT<BM>(&do_s[at + 28u], KS4), *a7);
        }
    } else {
        let da = coopLoadT<AM>(&ds_s[ap], PS4);
        *a0 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at], KS4), *a0);
        *a1 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 4u], KS4), *a1);
        *a2 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 8u], KS4), *a2);
        *a3 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 12u], KS4), *a3);
        if D > 64u {
            *a4 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 16u], KS4), *a4);
            *a5 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 20u], KS4), *a5);
            *a6 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 24u], KS4), *a6);
            *a7 = coopMultiplyAdd(da, coopLoadT<BM>(&q_s[at + 28u], KS4), *a7);
        }
    }
}

// P^T of the subgroup's block from S^T in s_s (lanes 2r, 2r+1: key row `row`, interleaved vec4 columns `h`;
// 16 queries, vec4s 2i + h for i < 2) and the LSE of each column's query (row group `sl`, first query q0); the element mask only where `need_mask` (the block touches the causal diagonal or the sequence end;
// row masks and rows past the end have LSE = +BIG).
fn probs(sl: u32, row: u32, h: u32, kj: u32, q0: u32, need_mask: bool) -> array<vec4<f32>, 2> {
    let seq = params.seq_len;
    let causal = params.causal != 0u;
    var pr: array<vec4<f32>, 2>;
    for (var i = 0u; i < 2u; i++) {
        var p = exp2(s_s[row * SS4 + 2u * i + h] * params.scale_log2 - lse_s[4u * sl + 2u * i + h]);
        if need_mask {
            let qi = vec4<u32>(q0 + 8u * i + 4u * h) + vec4<u32>(0u, 1u, 2u, 3u);
            let ok = vec4<bool>(kj < seq) & (vec4<bool>(!causal) | (vec4<u32>(kj) <= qi));
            p = select(vec4<f32>(0.0), p, ok);
        }
        pr[i] = p;
    }
    return pr;
}

// Stages the tile's BK rows of K and V (KV head `head`, from token `tok0`); zeros past the end.
fn stage_kv(b: u32, head: u32, tok0: u32, lid: u32) {
    let d4 = D / 4u;
    for (var i = lid; i < BK * d4; i += WG) {
        let tok = tok0 + i / d4;
        let at = (i / d4) * KS4 + i % d4;
        var x = vec4<f16>(0.0h);
        var y = vec4<f16>(0.0h);
        if tok < params.seq_len {
            x = k_buf[kv_index(params.k_off, b, tok, head, i % d4, d4)];
            y = v_buf[kv_index(params.v_off, b, tok, head, i % d4, d4)];
        }
        k_s[at] = x;
        v_s[at] = y;
    }
}

// One query tile as held in registers between its fetch and its store to workgroup memory: the
// invocation's NQF vec4s of Q and dO rows, and the forward's raw LSE and D of rows 4 lid..4 lid+3 with
// whether each row takes part (inside the sequence, in the entry's row mask); only invocations
// lid < BQ/4 store the latter.
struct QTile {
    q: QFetch,
    g: QFetch,
    lse: vec4<f32>,
    delta: vec4<f32>,
    ok: vec4<bool>,
}

// Loads the query tile `entry` (a column-list entry) of query head `head` into registers. Branch-free, as
// the forward's K/V fetch (shared/coop_chunks.wgsl): rows past the end are read as the last row (finite;
// their LSE becomes +BIG at the store, so their P is 0), every invocation reads the LSE and D of its four
// rows, and nothing reads the loaded registers before `stash_tile` -- a conditional load or a select on
// the loaded value makes the NVIDIA driver wait for the data right after the load.
fn fetch_tile(b: u32, head: u32, entry: vec2<u32>, lid: u32) -> QTile {
    let d4 = D / 4u;
    let row0 = entry.x * BQ;
    let last = params.seq_len - 1u;
    var t: QTile;
    for (var n = 0u; n < NQF; n++) {
        let i = lid + n * WG;
        let tok = min(row0 + i / d4, last);
        t.q[n] = q_buf[q_index(b, tok, head, i % d4, d4)];
        t.g[n] = do_buf[o_index(b, tok, head, i % d4, d4)];
    }
    for (var c = 0u; c < 4u; c++) {
        let r = (4u * lid + c) % BQ;
        let tok = row0 + r;
        let at = stat_index(b, head, min(tok, last));
        t.lse[c] = lse_buf[params.lse_off + at];
        t.delta[c] = delta_buf[at];
        t.ok[c] = tok <= last && row_attends(entry.y, r);
    }
    return t;
}

// Stores a fetched query tile to q_s, do_s, lse_s (base 2; +BIG where the row is masked, past the end
// or without keys) and delta_s.
fn stash_tile(t: ptr<function, QTile>, lid: u32) {
    let d4 = D / 4u;
    for (var n = 0u; n < NQF; n++) {
        let i = lid + n * WG;
        q_s[(i / d4) * KS4 + i % d4] = (*t).q[n];
        do_s[(i / d4) * KS4 + i % d4] = (*t).g[n];
    }
    if lid < BQ / 4u {
        let lse = (*t).lse;
        lse_s[lid] = select(vec4<f32>(POS_BIG), lse * LOG2E, (*t).ok & (lse > vec4<f32>(NEG_BIG)));
        delta_s[lid] = (*t).delta;
    }
}

// Where the walk over the GQA group's column lists stands: query head `head` (the group's end when the
// walk is done), step `i` of its list of KV block `kb` (walked descending), the list being entries
// first .. first + len. The list bounds ride along in registers, so that stepping within
// a list loads nothing (in-order issue would wait on every dependent index load).
struct Cursor {
    head: u32,
    i: u32,
    first: u32,
    len: u32,
}

// The index into `entries` of the cursor's step.
fn entry_index(c: Cursor) -> u32 {
    return c.first + c.len - 1u - c.i;
}

// `c` itself if it is a step of its list, else the first step of the next head with a nonempty list, or
// the group's end `head_end`.
fn settle(c: Cursor, head_end: u32, kb: u32) -> Cursor {
    var n = c;
    loop {
        if n.i < n.len || n.head >= head_end {
            break;
        }
        n.head++;
        n.i = 0u;
        if n.head < head_end {
            let slot = (n.head / params.heads_per_pattern) * params.tiles + kb;
            n.first = tile_ptr[slot];
            n.len = tile_ptr[slot + 1u] - n.first;
        }
    }
    return n;
}

// The step after `c`.
fn advance(c: Cursor, head_end: u32, kb: u32) -> Cursor {
    return settle(Cursor(c.head, c.i + 1u, c.first, c.len), head_end, kb);
}

// The walk's first step: the last query tile of head `head0`'s list (or a later head's). Causal query
// tiles that all precede the KV tile come last and are skipped block by block.
fn first_step(head0: u32, head_end: u32, kb: u32) -> Cursor {
    let slot = (head0 / params.heads_per_pattern) * params.tiles + kb;
    let first = tile_ptr[slot];
    return settle(Cursor(head0, 0u, first, tile_ptr[slot + 1u] - first), head_end, kb);
}

// The s_s slot (16 rows) through which a row group's partial sum reaches row group 0: one per (side, key
// range) (2 NKT <= NPAIR where QG >= 2, the only case with a reduction step).
fn reduce_slot(u: Sub) -> u32 {
    return u.side * NKT + u.kt;
}

// Adds the partial sums of the key range's other row groups (qs = 1, 2, ..) into subgroup qs = 0's `m`
// (of the same side), through s_s, in a fixed order. Called by every subgroup (workgroup barriers); only
// qs = 0 uses the result.
fn reduce(u: Sub, m: CM) -> CM {
    var acc = m;
    for (var src = 1u; src < QG; src++) {
        workgroupBarrier();
        if u.qs == src {
            coopStoreT(m, &s_s[16u * reduce_slot(u) * SS4], SS4);
        }
        workgroupBarrier();
        if u.qs == 0u {
            acc = acc + coopLoadT<CM>(&s_s[16u * reduce_slot(u) * SS4], SS4);
        }
    }
    workgroupBarrier(); // s_s is free again for the epilogue's staging
    return acc;
}

// The reduced dK or dV matrix `m` (head dims 16j..) of subgroup qs = 0, written times `scale`, staged
// through slot kt of s_s (write_grad takes the slot's rows as those of invocations 32 kt..). The V-sides
// write first, then the K-sides, a workgroup barrier apart (reduce() ends with one, so the slots are free
// when the first side starts). Returns whether a value the subgroup wrote is non-finite.
fn finish(u: Sub, m: CM, lid: u32, k0: u32, b: u32, kv_head: u32, j: u32, scale: f32, which: u32) -> bool {
    let total = reduce(u, m);
    var bad = false;
    for (var side = 0u; side <= 1u; side++) {
        if side > 0u {
            workgroupBarrier();
        }
        if u.qs == 0u && u.side == side {
            bad = write_grad(total, u.kt, 32u * u.kt + lid % 32u, k0, b, kv_head, j, scale, which);
        }
    }
    return bad;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
    @builtin(num_workgroups) n_wg: vec3<u32>,
) {
    let d4 = D / 4u;
    // Launch slot wg.y * n_wg.x + wg.x runs the (KV tile, KV head) the host put there, as
    // kv_head * n_wg.x + tile, after the column pointers.
    let order = (params.num_heads / params.heads_per_pattern) * params.tiles + 1u;
    let w = tile_ptr[order + wg.y * n_wg.x + wg.x];
    let tile = w % n_wg.x;
    let kv_head = w / n_wg.x;
    let k0 = tile * BK;
    let b = wg.z;
    let group = params.num_heads / params.num_kv_heads;
    // `tiles` is the number of KV blocks per pattern in this pass's params.
    let kb = k0 / params.block_size;
    let seq = params.seq_len;
    let causal = params.causal != 0u;
    let g = min(sg_id, NSG - 1u);
    let blk = g % NPAIR;
    let u = Sub(blk, blk % NKT, blk / NKT, g / NPAIR);
    // Elementwise role: lanes 2r and 2r+1 of the subgroup own its key 16kt + r, each half of the row's
    // vec4 columns (interleaved); `row` is that key's row in p_s, ds_s and s_s.
    let row = 16u * u.g + (lid % 32u) / 2u;
    let h = lid % 2u;
    let kj = k0 + 16u * u.kt + row % 16u;
    let key0 = k0 + 16u * u.kt;

    // The split needs exactly NSG subgroups; any other subgroup size poisons dK and dV (NaN).
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

    stage_kv(b, kv_head, k0, lid);
    // dV (the V-side) or dK (the K-side) of the subgroup's keys.
    var v0 = CM();
    var v1 = CM();
    var v2 = CM();
    var v3 = CM();
    var v4 = CM();
    var v5 = CM();
    var v6 = CM();
    var v7 = CM();

    let head_end = (kv_head + 1u) * group;
    var cur = first_step(kv_head * group, head_end, kb);
    var nxt = advance(cur, head_end, kb);
    // The entries of the current and the next step, each loaded a step before its use; an index past the
    // walk's end reads the current step's entry again (fetched, never stored).
    var e_cur = vec2<u32>(0u);
    var e_nxt = vec2<u32>(0u);
    var held: QTile;
    if cur.head < head_end {
        e_cur = entries[entry_index(cur)];
        e_nxt = entries[select(entry_index(cur), entry_index(nxt), nxt.head < head_end)];
        held = fetch_tile(b, cur.head, e_cur, lid);
    }
    loop {
        if cur.head >= head_end {
            break;
        }
        let head = cur.head;
        let entry = e_cur;
        let row0 = entry.x * BQ;
        workgroupBarrier(); // every subgroup is done with the previous tile's q_s, do_s, lse_s, delta_s
        stash_tile(&held, lid);
        workgroupBarrier();
        let more = nxt.head < head_end;
        // In flight during this tile's math; stored at the next step. Unconditional (past the walk's end it
        // fetches this tile again, never stored), see `fetch_tile`.
        held = fetch_tile(b, select(head, nxt.head, more), select(entry, e_nxt, more), lid);
        let after = advance(nxt, head_end, kb);
        let e_after = entries[select(entry_index(cur), entry_index(after), after.head < head_end)];
        cur = nxt;
        nxt = after;
        e_cur = e_nxt;
        e_nxt = e_after;

        // The block's V-side and K-side (see the header); a block whose rows lie past the end, or all
        // precede its keys (causal), is skipped by both.
        let sl = u.qs;
        let q0 = row0 + 16u * sl;
        let live = key0 < seq && q0 < seq && (!causal || key0 <= min(q0 + 15u, seq - 1u));
        let need_mask = key0 + 16u > seq || (causal && key0 + 15u > q0);
        var dpt = CM();
        if live {
            if u.side == 0u {
                // S^T -> s_s -> P^T to p_s.
                coopStoreT(scores(u, sl, false), &s_s[16u * u.g * SS4], SS4);
                subgroupBarrier();
                let pr = probs(sl, row, h, kj, q0, need_mask);
                for (var i = 0u; i < 2u; i++) {
                    p_s[row * PS4 + 2u * i + h] = vec4<f16>(pr[i]);
                }
            } else {
                dpt = scores(u, sl, true);
            }
        }
        workgroupBarrier(); // every block's P^T is in p_s, and its S^T has been read
        if live {
            if u.side == 1u {
                coopStoreT(dpt, &s_s[16u * u.g * SS4], SS4);
                subgroupBarrier();
                for (var i = 0u; i < 2u; i++) {
                    let dp = s_s[row * SS4 + 2u * i + h];
                    // P^T as the f16 the V-side wrote.
                    let p = vec4<f32>(p_s[row * PS4 + 2u * i + h]);
                    ds_s[row * PS4 + 2u * i + h] = vec4<f16>(p * (dp - delta_s[4u * sl + 2u * i + h]));
                }
                subgroupBarrier(); // dS^T is complete
            }
            accumulate(u, sl, &v0, &v1, &v2, &v3, &v4, &v5, &v6, &v7);
        }
    }

    // dK = scale * sum dS^T Q (scale = scale_log2 * ln 2); dV = sum P^T dO. 16 head dims at a time, the
    // query-row subgroups' partial sums added first. A non-finite dK or dV arms the portable redo of both
    // passes (shared/coop_redo.wgsl).
    let scale = params.scale_log2 * LN2;
    // The V-side's accumulators are dV, the K-side's dK.
    let sc = select(1.0, scale, u.side == 1u);
    let which = select(2u, 1u, u.side == 1u);
    var bad = finish(u, v0, lid, k0, b, kv_head, 0u, sc, which);
    bad = bad | finish(u, v1, lid, k0, b, kv_head, 1u, sc, which);
    bad = bad | finish(u, v2, lid, k0, b, kv_head, 2u, sc, which);
    bad = bad | finish(u, v3, lid, k0, b, kv_head, 3u, sc, which);
    if D > 64u {
        bad = bad | finish(u, v4, lid, k0, b, kv_head, 4u, sc, which);
        bad = bad | finish(u, v5, lid, k0, b, kv_head, 5u, sc, which);
        bad = bad | finish(u, v6, lid, k0, b, kv_head, 6u, sc, which);
        bad = bad | finish(u, v7, lid, k0, b, kv_head, 7u, sc, which);
    }
    if bad {
        arm_redo();
    }
}
