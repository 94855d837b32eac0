// The gradient epilogue of the cooperative-matrix backward kernels (backward_coop_dq.wgsl,
// backward_coop_dkdv.wgsl), after shared/coop_backward.wgsl and shared/coop_redo.wgsl. Included after the kernel's workgroup arrays:
// it stages through s_s (one row of SS4 vec4<f32> per subgroup row, SS4 >= 4), and naga must meet every
// named override before the anonymous override of an array size (its pipeline-constant pass cannot get
// past an anonymous override ahead of a named one).

// Writes head dims 16j..16j+15 of subgroup g's 16 rows (tokens tok0 + 16g ..) of a gradient times
// `scale`, through the subgroup's rows of s_s; lanes 2r and 2r+1 write row r, through the kernel's
// `store_grad(which, b, tok, head, c4, x)` (each kernel binds only the gradients it writes). Returns
// whether a value it wrote is non-finite (the kernel then arms the portable redo, shared/coop_redo.wgsl).
fn write_grad(m: CM, g: u32, lid: u32, tok0: u32, b: u32, head: u32, j: u32, scale: f32, which: u32) -> bool {
    let r = lid / 2u;
    let h = lid % 2u;
    let tok = tok0 + r;
    coopStoreT(m, &s_s[16u * g * SS4], SS4);
    subgroupBarrier();
    var bad = false;
    if tok < params.seq_len {
        for (var u = 0u; u < 2u; u++) {
            let c4 = j * 4u + h + 2u * u;
            let y = s_s[r * SS4 + h + 2u * u] * scale;
            store_grad(which, b, tok, head, c4, vec4<f16>(y));
            bad = bad || nonfinite4(y);
        }
    }
    subgroupBarrier();
    return bad;
}
