// Shared by the cooperative-matrix backward kernels (backward_coop_dq.wgsl, backward_coop_dkdv.wgsl):
// the f16 tensor bindings (as vec4<f16>: one element per 4 halves, the params' vec4 units; same binding
// numbers as the portable backward), the forward's LSE and the D scratch buffer, and the overrides both
// kernels size their tiles with. Included before the kernel's own overrides and workgroup arrays; the
// gradient epilogue (shared/coop_grad_out.wgsl) comes after them.

@group(0) @binding(1) var<storage, read> q_buf: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read> o_buf: array<vec4<f16>>;
// LSE from the forward, [batch, heads, seq], f32 natural log (-inf for a row with no key).
@group(0) @binding(5) var<storage, read> lse_buf: array<f32>;
// D = rowsum(dO * O), [batch, heads, seq], f32: written by the dQ pass, read by the dK/dV pass.
@group(0) @binding(8) var<storage, read_write> delta_buf: array<f32>;
@group(0) @binding(9) var<storage, read> do_buf: array<vec4<f16>>;
@group(0) @binding(10) var<storage, read_write> dk_buf: array<vec4<f16>>;
@group(0) @binding(11) var<storage, read_write> dv_buf: array<vec4<f16>>;
@group(0) @binding(12) var<storage, read_write> dq_buf: array<vec4<f16>>;

override D: u32 = 128u;  // head dim: 64 or 128
override BQ: u32 = 64u;  // query rows per tile (dQ: per workgroup; dK/dV: per staged query tile)
override BK: u32 = 32u;  // keys per chunk (dQ) or per workgroup (dK/dV), dividing the block size
override WG: u32 = 128u; // invocations: 32 per subgroup of 16 matrix rows (two per row)
override KS4: u32 = (D + 8u) / 4u;  // vec4s per staged head-dim row (padded against bank conflicts)

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// Stands for +inf: the LSE of a row that must get P = 0 (past the end, masked, or without keys).
const POS_BIG: f32 = 3.0e38;

alias AM = coop_mat16x16<f16, A>;
alias BM = coop_mat16x16<f16, B>;
alias CM = coop_mat16x16<f32, C>;

// Index of a row's LSE and D.
fn stat_index(b: u32, head: u32, tok: u32) -> u32 {
    return (b * params.num_heads + head) * params.seq_len + tok;
}

// The forward's LSE of a row in base 2; POS_BIG for -inf (a row with no key), so that P = 0 there.
fn lse_log2(i: u32) -> f32 {
    let lse = lse_buf[params.lse_off + i];
    return select(lse * LOG2E, POS_BIG, lse <= NEG_BIG);
}
