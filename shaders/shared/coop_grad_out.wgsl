// The gradient epilogue of the cooperative-matrix backward kernels (backward_coop_dq.wgsl,
// backward_coop_dkdv.wgsl), after shared/coop_backward.wgsl. Included after the kernel's workgroup arrays:
// it stages through s_s (one row of SS4 vec4<f32> per subgroup row, SS4 >= 4), and naga must meet every
// named override before the anonymous override of an array size (its pipeline-constant pass cannot get
// past an anonymous override ahead of a named one).

// Writes head dims 16j..16j+15 of subgroup g's 16 rows (tokens tok0 + 16g ..) of a gradient times
// `scale`, through the subgroup's rows of s_s; lanes 2r and 2r+1 write row r. `which`: 0 dQ (query
// head `head`), 1 dK, 2 dV (KV head `head`).
fn write_grad(m: CM, g: u32, lid: u32, tok0: u32, b: u32, head: u32, j: u32, scale: f32, which: u32) {
    let r = lid / 2u;
    let h = lid % 2u;
    let tok = tok0 + r;
    let d4 = D / 4u;
    coopStoreT(m, &s_s[16u * g * SS4], SS4);
    subgroupBarrier();
    if tok < params.seq_len {
        for (var u = 0u; u < 2u; u++) {
            let c4 = j * 4u + h + 2u * u;
            let x = vec4<f16>(s_s[r * SS4 + h + 2u * u] * scale);
            if which == 0u {
                dq_buf[q_index(b, tok, head, c4, d4)] = x;
            } else if which == 1u {
                dk_buf[kv_index(0u, b, tok, head, c4, d4)] = x;
            } else {
                dv_buf[kv_index(0u, b, tok, head, c4, d4)] = x;
            }
        }
    }
    subgroupBarrier();
}
