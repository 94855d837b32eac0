// S2 forward on cooperative matrices (tensor cores, simdgroup matrices): flash attention over the MergeQ
// tile lists with both matrix products on 16x16x16 f16 x f16 -> f32 matrix units. f16 storage only (the
// planner keeps f32 on the portable kernel). Same bindings and params as forward_portable.wgsl.
//
// One workgroup per (query tile, head, batch) of BQ rows; subgroup g owns rows 16g..16g+15 and keeps
// their Q (D/16 A matrices) and O (D/16 f32 C matrices) in registers for the whole tile. For each chunk of
// BK keys of each KV block in the tile's list:
//   1. the workgroup stages K and V rows (f16, 8-byte vector loads, padded rows against bank conflicts);
//   2. each subgroup computes S = Q K^T (BK/16 C matrices) and stores it to workgroup memory;
//   3. two invocations per row run the online softmax in base 2 (masking only chunks that touch the
//      causal diagonal, the sequence end or a merged-query row mask) and write P as f16;
//   4. each subgroup loads P as A matrices and accumulates O += P V.
// Row maxima are updated lazily (FlashAttention-4): the running max moves only when a row's chunk max
// exceeds it by more than TAU (log2 units), so P <= 2^TAU fits f16 and the O rescale -- a trip of the C
// matrices through workgroup memory -- is skipped unless some row of the tile needed it.
//
// Coop ops and barriers must sit in workgroup-uniform control flow (naga checks it), so every branch
// around them depends only on params, the tile lists or workgroupUniformLoad results.

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

override D: u32 = 128u;   // head dim: 64 or 128 (a multiple of 16, at most 16 * MAX_D16)
override BQ: u32 = 64u;   // query rows per tile: 16 per subgroup
override BK: u32 = 32u;   // keys per chunk: 16, 32 or 64, dividing the block size
override WG: u32 = 128u;  // invocations: 2 * BQ (two per query row in the softmax)
override TAU: f32 = 8.0;  // lazy rescale threshold, log2 units
override NSG: u32 = BQ / 16u;  // subgroups the kernel needs (subgroup size WG / NSG)

const MAX_D16: u32 = 8u;  // head dim at most 128
const MAX_BK8: u32 = 8u;  // BK at most 64
const LN2: f32 = 0.6931471805599453;

// Padded row strides: K/V rows D + 8 halves, P rows BK + 8 halves, S rows BK + 8 floats. With these, the
// 8 row starts an LDSM-style matrix load touches land in distinct 16-byte bank groups, and the softmax
// pairs' interleaved vec4 accesses are conflict-free.
override KS4: u32 = (D + 8u) / 4u;   // vec4s per K/V row
override PS4: u32 = (BK + 8u) / 4u;  // vec4s per P row (also Q staging, >= 16 columns)
override SS4: u32 = (BK + 8u) / 4u;  // vec4s per S row (>= 16 columns: also O staging)

var<workgroup> k_s: array<vec4<f16>, BK * KS4>;
var<workgroup> v_s: array<vec4<f16>, BK * KS4>;
var<workgroup> p_s: array<vec4<f16>, BQ * PS4>;
var<workgroup> s_s: array<vec4<f32>, BQ * SS4>;
var<workgroup> rescale_s: u32;  // set when some row's softmax moved its max: rescale O this chunk
var<workgroup> shape_ok_s: u32;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let d4 = D / 4u;
    // Longest tiles (latest in a causal sequence) first, for load balance.
    let tile = params.tiles - 1u - wg.x;
    let head = wg.y;
    let b = wg.z;
    let kv_head = head / (params.num_heads / params.num_kv_heads);
    let pattern = head / params.heads_per_pattern;
    let row0 = tile * BQ;
    let seq = params.seq_len;
    let causal = params.causal != 0u;
    let row_last = min(row0 + BQ, seq) - 1u;
    // Softmax role: invocations 2r and 2r+1 own tile row r, each half of its vec4 columns (interleaved).
    let r = lid / 2u;
    let h = lid % 2u;
    let qi = row0 + r;
    // Matrix role: subgroup g owns tile rows 16g..16g+15.
    let g = min(sg_id, NSG - 1u);

    // The row split needs exactly NSG subgroups; any other subgroup size poisons the tile (NaN) rather
    // than returning silently wrong rows. The planner only picks this kernel where that holds.
    if lid == 0u {
        shape_ok_s = u32(n_sg == NSG);
        rescale_s = 0u;
    }
    if workgroupUniformLoad(&shape_ok_s) == 0u {
        let nan = params.neg_inf - params.neg_inf;
        for (var i = lid; i < BQ * d4; i += WG) {
            let tok = row0 + i / d4;
            if tok < seq {
                o_buf[o_index(b, tok, head, i % d4, d4)] = vec4<f16>(f16(nan));
            }
        }
        return;
    }

    // Q: staged 16 columns at a time through p_s into the subgroup's A matrices (raw f16, unscaled).
    var qa: array<coop_mat16x16<f16, A>, MAX_D16>;
    var o: array<coop_mat16x16<f32, C>, MAX_D16>;
    for (var j = 0u; j < D / 16u; j++) {
        for (var i = lid; i < BQ * 4u; i += WG) {
            let tok = row0 + i / 4u;
            var x = vec4<f16>(0.0h);
            if tok < seq {
                x = (q_buf[q_index(b, tok, head, j * 4u + i % 4u, d4)]);
            }
            p_s[(i / 4u) * PS4 + i % 4u] = x;
        }
        workgroupBarrier();
        qa[j] = coopLoadT<coop_mat16x16<f16, A>>(&p_s[16u * g * PS4], PS4);
        o[j] = coop_mat16x16<f32, C>();
        workgroupBarrier();
    }

    var m = NEG_BIG;  // running (lazy) row max, base 2
    var l = 0.0;      // running row sum relative to m
    var alpha = 1.0;  // this chunk's rescale factor for the row
    let slot = pattern * params.tiles + tile;
    let subs = params.block_size / BK;
    let c_end = tile_ptr[slot + 1u] * subs;
    for (var c = tile_ptr[slot] * subs; c < c_end; c++) {
        let entry = entries[c / subs];
        let k0 = entry.x * params.block_size + (c % subs) * BK;
        if k0 >= seq || (causal && k0 > row_last) {
            continue;
        }
        workgroupBarrier(); // the previous chunk is done with k_s, v_s, p_s, s_s and rescale_s
        if lid == 0u {
            rescale_s = 0u;
        }

        for (var i = lid; i < BK * d4; i += WG) {
            let tok = k0 + i / d4;
            var kx = vec4<f16>(0.0h);
            var vx = vec4<f16>(0.0h);
            if tok < seq {
                kx = (k_buf[kv_index(params.k_off, b, tok, kv_head, i % d4, d4)]);
                vx = (v_buf[kv_index(params.v_off, b, tok, kv_head, i % d4, d4)]);
            }
            k_s[(i / d4) * KS4 + i % d4] = kx;
            v_s[(i / d4) * KS4 + i % d4] = vx;
        }
        workgroupBarrier();

        // S = Q K^T: K rows are the columns of the B matrix, i.e. a column-major load.
        for (var t = 0u; t < BK / 16u; t++) {
            var sc = coop_mat16x16<f32, C>();
            for (var j = 0u; j < D / 16u; j++) {
                let kb = coopLoad<coop_mat16x16<f16, B>>(&k_s[t * 16u * KS4 + j * 4u], KS4);
                sc = coopMultiplyAdd(qa[j], kb, sc);
            }
            coopStoreT(sc, &s_s[16u * g * SS4 + t * 4u], SS4);
        }
        workgroupBarrier();

        // Online softmax, base 2. Only chunks on the causal diagonal, at the sequence end or under a
        // partial row mask pay for the element mask.
        let rows = entry.y;
        let need_mask = k0 + BK > seq || (causal && k0 + BK - 1u > row0) || rows < BQ || rows >= ROWMASK_BITS_FLAG;
        let row_ok = qi < seq && row_attends(rows, r);
        var sv: array<vec4<f32>, MAX_BK8>;
        var mx = NEG_BIG;
        for (var i = 0u; i < BK / 8u; i++) {
            var x = s_s[r * SS4 + 2u * i + h] * params.scale_log2;
            if need_mask {
                let kj = vec4<u32>(k0 + 8u * i + 4u * h) + vec4<u32>(0u, 1u, 2u, 3u);
                let ok = vec4<bool>(row_ok) & (kj < vec4<u32>(seq)) & (vec4<bool>(!causal) | (kj <= vec4<u32>(qi)));
                x = select(vec4<f32>(NEG_BIG), x, ok);
            }
            sv[i] = x;
            mx = max(mx, max(max(x.x, x.y), max(x.z, x.w)));
        }
        mx = max(mx, subgroupShuffleXor(mx, 1u));
        var m_new = m;
        if mx > m + TAU {
            m_new = mx;
        }
        alpha = exp2(m - m_new);
        var sum = 0.0;
        for (var i = 0u; i < BK / 8u; i++) {
            var p = exp2(sv[i] - vec4<f32>(m_new));
            if need_mask {
                p = select(p, vec4<f32>(0.0), sv[i] <= vec4<f32>(NEG_BIG));
            }
            sum += p.x + p.y + p.z + p.w;
            p_s[r * PS4 + 2u * i + h] = vec4<f16>(p);
        }
        sum += subgroupShuffleXor(sum, 1u);
        if m_new != m && l > 0.0 {
            rescale_s = 1u;
        }
        l = l * alpha + sum;
        m = m_new;
        // The uniform load is also the barrier that publishes P.
        if workgroupUniformLoad(&rescale_s) != 0u {
            for (var j = 0u; j < D / 16u; j++) {
                coopStoreT(o[j], &s_s[16u * g * SS4], SS4);
                workgroupBarrier();
                s_s[r * SS4 + h] *= alpha;
                s_s[r * SS4 + h + 2u] *= alpha;
                workgroupBarrier();
                o[j] = coopLoadT<coop_mat16x16<f32, C>>(&s_s[16u * g * SS4], SS4);
                workgroupBarrier();
            }
        }

        // O += P V: V rows are the rows of the B matrix (row-major load).
        for (var t = 0u; t < BK / 16u; t++) {
            let pa = coopLoadT<coop_mat16x16<f16, A>>(&p_s[16u * g * PS4 + t * 4u], PS4);
            for (var j = 0u; j < D / 16u; j++) {
                let vb = coopLoadT<coop_mat16x16<f16, B>>(&v_s[t * 16u * KS4 + j * 4u], KS4);
                o[j] = coopMultiplyAdd(pa, vb, o[j]);
            }
        }
    }

    // Epilogue: O / l through workgroup memory, 16 columns at a time; each invocation writes 8 of its row.
    let inv_l = select(0.0, 1.0 / l, l > 0.0);
    for (var j = 0u; j < D / 16u; j++) {
        workgroupBarrier();
        coopStoreT(o[j], &s_s[16u * g * SS4], SS4);
        workgroupBarrier();
        if qi < seq {
            o_buf[o_index(b, qi, head, j * 4u + h, d4)] = vec4<f16>(s_s[r * SS4 + h] * inv_l);
            o_buf[o_index(b, qi, head, j * 4u + h + 2u, d4)] = vec4<f16>(s_s[r * SS4 + h + 2u] * inv_l);
        }
    }
    if h == 0u && qi < seq {
        var lse = params.neg_inf;
        if l > 0.0 {
            lse = (m + log2(l)) * LN2;
        }
        lse_buf[params.lse_off + (b * params.num_heads + head) * seq + qi] = lse;
    }
}
