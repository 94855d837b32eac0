// S2 forward on cooperative matrices (tensor cores, simdgroup matrices): flash attention over the MergeQ
// tile lists with both matrix products on 16x16x16 f16 x f16 -> f32 matrix units. f16 storage only (the
// planner keeps f32 on the portable kernel). Same bindings and params as forward_portable.wgsl, plus the
// redo's dispatch sizes (shared/coop_redo.wgsl): where the epilogue writes a non-finite O or LSE, or a row
// with an active key has no positive sum, it arms the portable forward the host recorded after it, which
// redoes the op with IEEE non-finite semantics; the chunk loop itself does nothing for non-finite inputs.
//
// One workgroup per (query tile, head, batch) of BQ rows; subgroup g owns rows 16g..16g+15 and keeps
// their Q (D/16 A matrices) and O (D/16 f32 C matrices) in registers for the whole tile. For each chunk of
// BK keys of each KV block in the tile's list:
//   1. the workgroup stores the chunk's K and V rows, fetched into registers during the previous chunk,
//      to workgroup memory (padded rows against bank conflicts) and fetches the next chunk's (the only
//      two workgroup barriers of the chunk);
//   2. every subgroup computes S = Q K^T (BK/16 C matrices, each as two half-length accumulation chains)
//      and stores it to its rows of workgroup memory;
//   3. the subgroup's own lanes, two per row, run the online softmax in base 2 (masking only chunks that
//      touch the causal diagonal, the sequence end or a merged-query row mask) and write P as f16;
//   4. the subgroup loads P as A matrices and accumulates O += P V.
// Steps 2-4 touch only the subgroup's rows, so they synchronise with subgroup barriers and subgroups
// drift apart within a chunk (one's softmax overlaps another's matrix products). The chunk loop is straight
// line: every subgroup runs every chunk, the rows that see none of it masked (the element mask is on
// wherever a row's keys are cut), and O += P V is written out in both arms of the rescale branch, so that
// the driver keeps O in one register home on every path (shaders/NOTES-coop.md).
// Row maxima are updated lazily (FlashAttention-4): the running max moves only when a row's chunk max
// exceeds it by more than TAU (log2 units), so P <= 2^TAU fits f16 and the O rescale -- a trip of the C
// matrices through workgroup memory -- is skipped unless some row of the tile needed it.
//
// The matrices are named variables (q0..q7, o0..o7; the upper four only when D is 128), not arrays: the
// NVIDIA Vulkan driver keeps arrays of cooperative matrices in local memory (pipeline statistics: 512 B
// of local memory, 2x slower). Cooperative matrices have subgroup scope, so coop ops need only
// subgroup-uniform control flow; naga's uniformity check asks for workgroup-uniform flow, and its
// `derivative_uniformity` diagnostic (which governs all of its uniformity errors) is turned off below.
// Every branch around coop ops and subgroup barriers here depends only on overrides, params, the tile
// lists, the subgroup index or subgroup-wide votes; workgroup barriers sit in workgroup-uniform flow.
//
// The text keeps the shape of the one the kernel was tuned with, statement for statement (a one-trip
// slice loop, variables set right after their zero initialisation, `hh` and `moved` arguments that are
// constants at every call): the NVIDIA driver's code follows the text's shape (a rewrite with the same
// arithmetic ran 18-24% slower), and naga translates this text, with the planner's override constants,
// to the same IR as that one once its branches dead under them are removed.

diagnostic(off, derivative_uniformity);
enable f16;
enable wgpu_cooperative_matrix;

#include shared/params.wgsl

// f16 tensors as vec4<f16> (the `storage` pieces pack halves in u32 words for adapters without f16, and
// naga cannot bitcast u32 words to f16 vectors): one element per 4 halves, the params' vec4 units.
@group(0) @binding(1) var<storage, read> q_buf: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<vec4<f16>>;
// LSE out, [batch, heads, seq], f32.
@group(0) @binding(5) var<storage, read_write> lse_buf: array<f32>;

override D: u32 = 128u;   // head dim: 64 or 128
override BQ: u32 = 64u;   // query rows per tile: 16 per subgroup
override BK: u32 = 32u;   // keys staged per chunk (two workgroup barriers): 16, 32 or 64, dividing the block size
override WG: u32 = 128u;  // invocations: 2 * BQ (two per query row in the softmax)
override TAU: f32 = 8.0;  // lazy rescale threshold, log2 units
override NSG: u32 = BQ / 16u;  // subgroups the kernel needs (subgroup size WG / NSG)
override NPF: u32 = BK * D / 4u / WG;  // K (and V) vec4s each invocation fetches per chunk

const MAX_BK8: u32 = 8u;  // BK at most 64
const MAX_QF: u32 = 16u;  // Q vec4s an invocation fetches in the prologue: 2 per 16 head dims (WG = 2 BQ)
const MAX_PF: u32 = 8u;   // NPF at most 8
const LN2: f32 = 0.6931471805599453;

alias AM = coop_mat16x16<f16, A>;
alias BM = coop_mat16x16<f16, B>;
alias CM = coop_mat16x16<f32, C>;
alias Fetch = array<vec4<f16>, MAX_PF>;

// Padded row strides: K/V rows D + 8 halves, P rows BK + 8 halves, S rows BK + 8 floats. With these, the
// 8 row starts an LDSM-style matrix load touches land in distinct 16-byte bank groups, and the softmax
// pairs' interleaved vec4 accesses are conflict-free (tighter pads cost 2-way conflicts).
override KS4: u32 = (D + 8u) / 4u;    // vec4s per K/V row
override PS4: u32 = (BK + 8u) / 4u;  // vec4s per P row (also Q staging, >= 16 columns)
override SS4: u32 = (BK + 8u) / 4u;  // vec4s per S row (>= 16 columns: also O staging)

var<workgroup> k_s: array<vec4<f16>, BK * KS4>;
var<workgroup> v_s: array<vec4<f16>, BK * KS4>;
var<workgroup> p_s: array<vec4<f16>, BQ * PS4>;  // P (and Q's staging)
var<workgroup> s_s: array<vec4<f32>, BQ * SS4>;  // element 0 first carries the subgroup-count check

#include shared/coop_chunks.wgsl
#include shared/coop_redo.wgsl

// The prologue: every invocation fetches its share of all of Q's column slices at once (one global
// round trip instead of one per slice). Each subgroup fetches and stages its own 16 rows (element n of
// slice j is lane + 32n: row 16g + (lane + 32n) / 4, vec4 column 4j + lane % 4), so that staging needs
// subgroup barriers only.
fn fetch_q(t: Tile, qf: ptr<function, array<vec4<f16>, MAX_QF>>) {
    let lane = t.lid % 32u;
    for (var j = 0u; j < D / 16u; j++) {
        for (var n = 0u; n < 2u; n++) {
            let i = lane + 32u * n;
            // Branch-free as `fetch` (rows past the end read the last row; their outputs are never written).
            let tok = min(t.row0 + 16u * t.g + i / 4u, params.seq_len - 1u);
            var x = vec4<f16>(0.0h);
            x = q_buf[q_index(t.b, tok, t.head, j * 4u + i % 4u, D / 4u)];
            (*qf)[2u * j + n] = x;
        }
    }
}

// Q columns 16j..16j+15 of the subgroup's rows from the prologue's registers, through its rows of p_s.
fn stash_q(t: Tile, qf: ptr<function, array<vec4<f16>, MAX_QF>>, j: u32) -> AM {
    let lane = t.lid % 32u;
    for (var n = 0u; n < 2u; n++) {
        let i = lane + 32u * n;
        p_s[(16u * t.g + i / 4u) * PS4 + i % 4u] = (*qf)[2u * j + n];
    }
    subgroupBarrier();
    let m = coopLoadT<AM>(&p_s[16u * t.g * PS4], PS4);
    subgroupBarrier();
    return m;
}

// O += P V for the chunk's keys 16kt..16kt+15, P's columns 16pt..16pt+15.
fn pv(
    t: Tile,
    kt: u32,
    pt: u32,
    o0: ptr<function, CM>,
    o1: ptr<function, CM>,
    o2: ptr<function, CM>,
    o3: ptr<function, CM>,
    o4: ptr<function, CM>,
    o5: ptr<function, CM>,
    o6: ptr<function, CM>,
    o7: ptr<function, CM>,
) {
    let pa = coopLoadT<AM>(&p_s[16u * t.g * PS4 + pt * 4u], PS4);
    *o0 = coopMultiplyAdd(pa, vmat(kt, 0u), *o0);
    *o1 = coopMultiplyAdd(pa, vmat(kt, 1u), *o1);
    *o2 = coopMultiplyAdd(pa, vmat(kt, 2u), *o2);
    *o3 = coopMultiplyAdd(pa, vmat(kt, 3u), *o3);
    if D > 64u {
        *o4 = coopMultiplyAdd(pa, vmat(kt, 4u), *o4);
        *o5 = coopMultiplyAdd(pa, vmat(kt, 5u), *o5);
        *o6 = coopMultiplyAdd(pa, vmat(kt, 6u), *o6);
        *o7 = coopMultiplyAdd(pa, vmat(kt, 7u), *o7);
    }
}

// Multiplies row r of an O matrix by `alpha`, through the subgroup's rows of workgroup memory (C
// matrices are opaque), at S columns 16hh..16hh+15 (`hh` is 0 at every call).
fn rescale(t: Tile, hh: u32, m: CM, alpha: f32) -> CM {
    let r = 16u * t.g + (t.lid % 32u) / 2u;  // t.lid / 2
    let h = t.lid % 2u + 4u * hh;
    coopStoreT(m, &s_s[16u * t.g * SS4 + 4u * hh], SS4);
    subgroupBarrier();
    s_s[r * SS4 + h] *= alpha;
    s_s[r * SS4 + h + 2u] *= alpha;
    subgroupBarrier();
    let out = coopLoadT<CM>(&s_s[16u * t.g * SS4 + 4u * hh], SS4);
    subgroupBarrier();
    return out;
}

// The end of a chunk: the subgroup's O rows rescaled by their `alpha` if `moved`, then O += P V over the
// chunk's BK/16 key tiles from tile kt0. The P V steps are written out: the NVIDIA driver keeps a loop over the
// tiles and shuffles the 64 accumulator registers around it (~130 moves per chunk, measured on an earlier
// form). The chunk loop calls it with `moved` a constant in each arm of its own branch.
fn rescale_pv(
    t: Tile,
    kt0: u32,
    moved: bool,
    alpha: f32,
    o0: ptr<function, CM>,
    o1: ptr<function, CM>,
    o2: ptr<function, CM>,
    o3: ptr<function, CM>,
    o4: ptr<function, CM>,
    o5: ptr<function, CM>,
    o6: ptr<function, CM>,
    o7: ptr<function, CM>,
) {
    if moved {
        *o0 = rescale(t, 0u, *o0, alpha);
        *o1 = rescale(t, 0u, *o1, alpha);
        *o2 = rescale(t, 0u, *o2, alpha);
        *o3 = rescale(t, 0u, *o3, alpha);
        if D > 64u {
            *o4 = rescale(t, 0u, *o4, alpha);
            *o5 = rescale(t, 0u, *o5, alpha);
            *o6 = rescale(t, 0u, *o6, alpha);
            *o7 = rescale(t, 0u, *o7, alpha);
        }
    }
    pv(t, kt0, 0u, o0, o1, o2, o3, o4, o5, o6, o7);
    if BK > 16u {
        pv(t, kt0 + 1u, 1u, o0, o1, o2, o3, o4, o5, o6, o7);
    }
    if BK > 32u {
        pv(t, kt0 + 2u, 2u, o0, o1, o2, o3, o4, o5, o6, o7);
        pv(t, kt0 + 3u, 3u, o0, o1, o2, o3, o4, o5, o6, o7);
    }
}

// Orders the accesses to a tile row's workgroup memory among the invocations that share the row: each
// subgroup owns its rows of s_s, so a subgroup barrier.
fn rows_barrier() {
    subgroupBarrier();
}

// Writes head dims 16j..16j+15 of O / l through workgroup memory; each invocation 8 of its row. `hh`
// (0 at every call) would move them by hh*D head dims and to S columns 16hh... Returns whether a value it
// wrote is non-finite.
fn write_o(t: Tile, hh: u32, m: CM, j: u32, inv_l: f32) -> bool {
    let r = 16u * t.g + (t.lid % 32u) / 2u;
    let h = t.lid % 2u;
    let qi = t.row0 + r;
    let jg = hh * (D / 16u) + j;
    rows_barrier();
    coopStoreT(m, &s_s[16u * t.g * SS4 + 4u * hh], SS4);
    rows_barrier();
    var bad = false;
    if qi < params.seq_len {
        let x0 = s_s[r * SS4 + 4u * hh + h] * inv_l;
        let x1 = s_s[r * SS4 + 4u * hh + h + 2u] * inv_l;
        o_buf[o_index(t.b, qi, t.head, jg * 4u + h, D / 4u)] = vec4<f16>(x0);
        o_buf[o_index(t.b, qi, t.head, jg * 4u + h + 2u, D / 4u)] = vec4<f16>(x1);
        bad = nonfinite4(x0) || nonfinite4(x1);
    }
    return bad;
}

// Whether tile row `r` (query `qi`) has an active key in tile list `slot`: a key inside the sequence (and,
// causal, not after the row) of a block whose row mask admits the row. The epilogue asks only about rows
// whose sum is not positive, which finite inputs give only to rows without keys (custom masks).
fn row_sees_a_key(slot: u32, r: u32, qi: u32) -> bool {
    let lim = select(params.seq_len, min(params.seq_len, qi + 1u), params.causal != 0u);
    for (var e = tile_ptr[slot]; e < tile_ptr[slot + 1u]; e++) {
        let entry = entries[e];
        if entry.x * params.block_size < lim && row_attends(entry.y, r) {
            return true;
        }
    }
    return false;
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
    // Softmax role: invocations 2r and 2r+1 own tile row r, each half of its vec4 columns (interleaved).
    let r = lid / 2u;
    let h = lid % 2u;
    let qi = row0 + r;

    // The row split needs exactly NSG subgroups; any other subgroup size poisons the tile (NaN) rather
    // than returning silently wrong rows. The planner only picks this kernel where that holds.
    if lid == 0u {
        s_s[0] = vec4<f32>(f32(n_sg == NSG));
    }
    if workgroupUniformLoad(&s_s[0]).x == 0.0 {
        let nan = params.neg_inf - params.neg_inf;
        for (var i = lid; i < BQ * D / 4u; i += WG) {
            let tok = row0 + i / (D / 4u);
            if tok < seq {
                o_buf[o_index(t.b, tok, head, i % (D / 4u), D / 4u)] = vec4<f16>(f16(nan));
            }
        }
        return;
    }

    // Q (raw f16, unscaled: the scale is applied to S in f32) and the O accumulators. Q's loads, the tile
    // list's and the first chunk's are all issued before Q is staged, so that their latencies overlap (the
    // tile's only global round trips not hidden behind another chunk's math).
    var qf: array<vec4<f16>, MAX_QF>;
    fetch_q(t, &qf);
    let slot = pattern * params.tiles + tile;
    let subs = params.block_size / BK;
    let c_end = tile_ptr[slot + 1u] * subs;
    var c = next_chunk(tile_ptr[slot] * subs, c_end, subs, t.row_last);
    // The walk visits every chunk from the first visible one to the list's end (a chunk no subgroup sees,
    // which only the sequence's last tile can have, is staged and run wholly masked), and its entries are
    // loaded a chunk ahead of their use, so that no index load sits right before its use (in-order issue
    // waits there). Past the list's end the entry of its last chunk stands in: fetched, never stashed.
    let sh = countTrailingZeros(subs);
    let c_last = max(c_end, 1u) - 1u;
    var e_cur = entries[min(c, c_last) >> sh];
    var e_next = entries[min(c + 1u, c_last) >> sh];
    var fk: Fetch;
    var fv: Fetch;
    if c < c_end {
        fetch(t, entry_k0(e_cur, c, subs), &fk, &fv);
    }
    let q0 = stash_q(t, &qf, 0u);
    let q1 = stash_q(t, &qf, 1u);
    let q2 = stash_q(t, &qf, 2u);
    let q3 = stash_q(t, &qf, 3u);
    var q4 = AM();
    var q5 = AM();
    var q6 = AM();
    var q7 = AM();
    if D > 64u {
        q4 = stash_q(t, &qf, 4u);
        q5 = stash_q(t, &qf, 5u);
        q6 = stash_q(t, &qf, 6u);
        q7 = stash_q(t, &qf, 7u);
    }
    var o0 = CM();
    var o1 = CM();
    var o2 = CM();
    var o3 = CM();
    var o4 = CM();
    var o5 = CM();
    var o6 = CM();
    var o7 = CM();

    var m = NEG_BIG;  // running (lazy) row max, base 2
    var l = 0.0;      // running row sum relative to m
    while c < c_end {
        let rows = e_cur.y;
        let k0 = entry_k0(e_cur, c, subs);
        workgroupBarrier(); // every subgroup is done with the previous chunk's k_s and v_s
        stash(t, &fk, &fv);
        // The next chunk, in flight during this chunk's math.
        fetch(t, entry_k0(e_next, c + 1u, subs), &fk, &fv);
        let e_after = entries[min(c + 2u, c_last) >> sh];
        workgroupBarrier();

        // The staged chunk, run by every subgroup (one pass of the slice loop: a chunk is one slice).
        for (var sl = 0u; sl < 1u; sl++) {
            let ks = k0 + sl * BK;  // the chunk's first key
            let kt0 = sl * (BK / 16u);  // its first 16-key tile in k_s / v_s
            // S = Q K^T, BK/16 independent accumulators, then to the subgroup's rows of s_s.
            var s0 = CM();
            s0 = qk(kt0, q0, q1, q2, q3, q4, q5, q6, q7);
            var s1 = CM();
            var s2 = CM();
            var s3 = CM();
            if BK > 16u {
                s1 = qk(kt0 + 1u, q0, q1, q2, q3, q4, q5, q6, q7);
            }
            if BK > 32u {
                s2 = qk(kt0 + 2u, q0, q1, q2, q3, q4, q5, q6, q7);
                s3 = qk(kt0 + 3u, q0, q1, q2, q3, q4, q5, q6, q7);
            }
            coopStoreT(s0, &s_s[16u * t.g * SS4], SS4);
            if BK > 16u {
                coopStoreT(s1, &s_s[16u * t.g * SS4 + 4u], SS4);
            }
            if BK > 32u {
                coopStoreT(s2, &s_s[16u * t.g * SS4 + 8u], SS4);
                coopStoreT(s3, &s_s[16u * t.g * SS4 + 12u], SS4);
            }
            subgroupBarrier();

            // Online softmax, base 2, on the subgroup's own rows. Only chunks on the causal diagonal, at
            // the sequence end or under a partial row mask pay for the element mask. The scale is applied
            // in the exponent's multiply-add (the max of the raw scores, scaled, is the max of the scaled
            // ones: the scale is positive), one instruction per score less than scaling each first. Masked
            // scores are -inf (params.neg_inf): their max scaled stays -inf, below any threshold (m, finite
            // from its NEG_BIG start, moves only to a real score), and exp2(-inf - m) is 0, so P needs no
            // second select (two instructions per score the compiler issued on every chunk).
            // The element mask as one bound per row: the row sees the keys below `lim` (none where its
            // row mask excludes it or it lies past the end; else up to the sequence end or, causal, up to
            // itself), so each vec4 of scores costs one subtraction and four compares (keys < 2^31).
            let need_mask = ks + BK > seq || (causal && ks + BK - 1u > row0) || rows < BQ || rows >= ROWMASK_BITS_FLAG;
            let row_ok = qi < seq && row_attends(rows, r);
            let lim = select(0u, select(seq, min(seq, qi + 1u), causal), row_ok);
            let scale = params.scale_log2;
            var sv: array<vec4<f32>, MAX_BK8>;
            var mx = params.neg_inf;
            for (var i = 0u; i < BK / 8u; i++) {
                var x = s_s[r * SS4 + 2u * i + h];
                if need_mask {
                    let room = i32(lim) - i32(ks + 8u * i + 4u * h);
                    x = select(vec4<f32>(params.neg_inf), x, vec4<i32>(0, 1, 2, 3) < vec4<i32>(room));
                }
                sv[i] = x;
                mx = max(mx, max(max(x.x, x.y), max(x.z, x.w)));
            }
            mx = max(mx, subgroupShuffleXor(mx, 1u)) * scale;
            var m_new = m;
            if mx > m + TAU {
                m_new = mx;
            }
            let alpha = exp2(m - m_new);
            var sum = 0.0;
            for (var i = 0u; i < BK / 8u; i++) {
                let p = exp2(fma(sv[i], vec4<f32>(scale), vec4<f32>(-m_new)));
                sum += p.x + p.y + p.z + p.w;
                p_s[r * PS4 + 2u * i + h] = vec4<f16>(p);
            }
            sum += subgroupShuffleXor(sum, 1u);
            let moved = subgroupAny(m_new != m && l > 0.0);
            l = l * alpha + sum;
            m = m_new;
            subgroupBarrier(); // P is complete
            if moved {
                rescale_pv(t, kt0, true, alpha, &o0, &o1, &o2, &o3, &o4, &o5, &o6, &o7);
            } else {
                rescale_pv(t, kt0, false, alpha, &o0, &o1, &o2, &o3, &o4, &o5, &o6, &o7);
            }
        }
        c += 1u;
        e_cur = e_next;
        e_next = e_after;
    }

    // Epilogue: O / l, 16 head dims at a time; then the LSE. A non-finite O or LSE, or a row with an
    // active key whose sum is not positive (a NaN or +inf score, or only -inf ones), arms the portable
    // redo (shared/coop_redo.wgsl): IEEE's answer there is not what the matrix units computed.
    let inv_l = select(0.0, 1.0 / l, l > 0.0);
    var bad = write_o(t, 0u, o0, 0u, inv_l);
    bad = bad | write_o(t, 0u, o1, 1u, inv_l);
    bad = bad | write_o(t, 0u, o2, 2u, inv_l);
    bad = bad | write_o(t, 0u, o3, 3u, inv_l);
    if D > 64u {
        bad = bad | write_o(t, 0u, o4, 4u, inv_l);
        bad = bad | write_o(t, 0u, o5, 5u, inv_l);
        bad = bad | write_o(t, 0u, o6, 6u, inv_l);
        bad = bad | write_o(t, 0u, o7, 7u, inv_l);
    }
    if h == 0u && qi < seq {
        var lse = params.neg_inf;
        if l > 0.0 {
            lse = (m + log2(l)) * LN2;
            bad = bad || nonfinite4(vec4<f32>(lse));
        } else if nonfinite4(vec4<f32>(l)) || row_sees_a_key(slot, r, qi) {
            bad = true;
        }
        lse_buf[params.lse_off + (t.b * params.num_heads + head) * seq + qi] = lse;
    }
    if bad {
        arm_redo();
    }
}
