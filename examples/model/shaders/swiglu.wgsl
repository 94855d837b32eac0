// SiLU-gated MLP activation: a[r, j] = silu(gu[r, j]) * gu[r, ffn + j], gu being the fused gate and up
// projections [rows, 2 ffn].

struct SwigluParams {
    rows: u32,
    ffn: u32,
    pad0: u32,
    pad1: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> params: SwigluParams;
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read_write> a: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= params.rows * params.ffn {
        return;
    }
    let r = i / params.ffn;
    let j = i % params.ffn;
    let g = gu[r * 2u * params.ffn + j];
    let u = gu[r * 2u * params.ffn + params.ffn + j];
    a[i] = g / (1.0 + exp(-g)) * u;
}
