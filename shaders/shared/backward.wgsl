// Shared by the backward kernels (backward_dq.wgsl, backward_dkdv.wgsl): the forward's LSE, the per-row
// D = rowsum(dO * O), the staged tiles, and the step both kernels repeat: probabilities P and score
// gradients dS = P * (dP - D) for a BQ x BK tile of (query, key) pairs, recomputed from Q, K and the LSE.
// Scores live in the base-2 domain as in the forward: Q is staged pre-scaled by scale * log2(e).

// LSE from the forward, [batch, heads, seq], f32 natural log (-inf for a row with no key).
@group(0) @binding(5) var<storage, read> lse_buf: array<f32>;
// D = rowsum(dO * O), [batch, heads, seq], f32: written by the dQ pass, read by the dK/dV pass.
@group(0) @binding(8) var<storage, read_write> delta_buf: array<f32>;
// Split partials of the gradients (where lists are split, plan/loop_budget.rs): [split] copies of dQ's
// layout in the dQ pass; [split] copies of dK's then [split] of dV's in the dK/dV pass. f32.
@group(0) @binding(13) var<storage, read_write> part_buf: array<vec4<f32>>;

override D: u32 = 64u;    // head dim (multiple of 4)
override BQ: u32 = 16u;   // query rows per tile
override BK: u32 = 16u;   // keys per tile (divides the block size)
override WG: u32 = 64u;   // invocations
const MAX_ACC: u32 = 16u; // vec4 accumulators per invocation
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

var<workgroup> q_s: array<vec4<f32>, BQ * D / 4u>;   // Q rows, pre-scaled by scale * log2(e)
var<workgroup> do_s: array<vec4<f32>, BQ * D / 4u>;  // dO rows
var<workgroup> k_s: array<vec4<f32>, BK * D / 4u>;   // K rows
var<workgroup> v_s: array<vec4<f32>, BK * D / 4u>;   // V rows
var<workgroup> lse_s: array<f32, BQ>;                // LSE in base 2; NEG_BIG for a row with no key
var<workgroup> delta_s: array<f32, BQ>;              // D per query row
var<workgroup> pds_s: array<vec2<f32>, BQ * BK>;     // (P, dS) of query row r and key c at r * BK + c

// Index of a row's LSE and D.
fn stat_index(b: u32, head: u32, tok: u32) -> u32 {
    return (b * params.num_heads + head) * params.seq_len + tok;
}

// The forward's LSE of a row, in base 2 (NEG_BIG for -inf, so that masked rows stay recognisable).
fn lse_log2(i: u32) -> f32 {
    let lse = lse_buf[params.lse_off + i];
    return select(lse * LOG2E, NEG_BIG, lse <= NEG_BIG);
}

// Stages query rows row0 .. row0 + BQ of `head`: Q (pre-scaled) and dO; zeros past the end.
fn stage_queries(b: u32, head: u32, row0: u32, lid: u32) {
    let d4 = D / 4u;
    for (var i = lid; i < BQ * d4; i += WG) {
        let tok = row0 + i / d4;
        var x = vec4<f32>(0.0);
        var g = vec4<f32>(0.0);
        if tok < params.seq_len {
            x = load_q(q_index(b, tok, head, i % d4, d4)) * params.scale_log2;
            g = load_do(o_index(b, tok, head, i % d4, d4));
        }
        q_s[i] = x;
        do_s[i] = g;
    }
}

// Stages key rows k0 .. k0 + BK of `kv_head`: K and V; zeros past the end.
fn stage_keys(b: u32, kv_head: u32, k0: u32, lid: u32) {
    let d4 = D / 4u;
    for (var i = lid; i < BK * d4; i += WG) {
        let tok = k0 + i / d4;
        var x = vec4<f32>(0.0);
        var y = vec4<f32>(0.0);
        if tok < params.seq_len {
            x = load_k(kv_index(params.k_off, b, tok, kv_head, i % d4, d4));
            y = load_v(kv_index(params.v_off, b, tok, kv_head, i % d4, d4));
        }
        k_s[i] = x;
        v_s[i] = y;
    }
}

// (P, dS) for every staged (query row, key) pair; zero where masked: past the end, after the query
// (causal), outside the entry's row mask `rows`, or in a row with no key. The accumulations skip zero
// values (`grad_term`), so that a masked pair adds nothing rather than 0 * a non-finite Q, K or dO.
fn pair_grads(row0: u32, k0: u32, rows: u32, lid: u32) {
    let d4 = D / 4u;
    let causal = params.causal != 0u;
    for (var i = lid; i < BQ * BK; i += WG) {
        let r = i / BK;
        let c = i % BK;
        let qi = row0 + r;
        let kj = k0 + c;
        var pd = vec2<f32>(0.0);
        // A row with no key has LSE NEG_BIG; a NaN LSE (a NaN row) goes on, so that its gradients are NaN.
        if qi < params.seq_len && kj < params.seq_len && (!causal || kj <= qi) && row_attends(rows, r)
            && bitcast<u32>(lse_s[r]) != bitcast<u32>(NEG_BIG) {
            var s = vec4<f32>(0.0);
            var dp = vec4<f32>(0.0);
            for (var x = 0u; x < d4; x++) {
                s += q_s[r * d4 + x] * k_s[c * d4 + x];
                dp += do_s[r * d4 + x] * v_s[c * d4 + x];
            }
            let p = exp2_exact(s.x + s.y + s.z + s.w - lse_s[r]);
            pd = vec2<f32>(p, p * (dp.x + dp.y + dp.z + dp.w - delta_s[r]));
            // An active pair's zero is -0, so that it still multiplies (0 * inf is NaN, as in IEEE).
            pd = select(pd, vec2<f32>(-0.0), pd == vec2<f32>(0.0));
        }
        pds_s[i] = pd;
    }
}

// `x * y`, or nothing where `x` is +0 (a masked pair; an active pair's zero is -0), even if `y` is not
// finite.
fn grad_term(x: f32, y: vec4<f32>) -> vec4<f32> {
    return select(x * y, vec4<f32>(0.0), bitcast<u32>(x) == 0u);
}

// `exp2(x)` with IEEE's answers where some drivers' `exp2` clamps its input first (llvmpipe): NaN for NaN,
// 0 for -inf. Bit tests, so that no float assumption drops them.
fn exp2_exact(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    if (bits & 0x7fffffffu) > 0x7f800000u {
        return x;
    }
    return select(exp2(x), 0.0, bits == 0xff800000u);
}
