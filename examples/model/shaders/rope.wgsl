// Rotary position embedding, in place on the Q and K heads of QKV rows: for head h < heads and pair
// i < head_dim / 2 of the row at position pos0 + r, (a, b) = (x[i], x[i + head_dim / 2]) turns by the
// angle (pos0 + r) * theta^(-2 i / head_dim) (the rotate-half convention).

struct RopeParams {
    rows: u32,
    heads: u32,       // Q heads + K heads (contiguous from column 0)
    head_dim: u32,
    row_stride: u32,  // elements between rows
    pos0: u32,
    theta: f32,
    pad0: u32,
    pad1: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> params: RopeParams;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let hd2 = params.head_dim / 2u;
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= params.rows * params.heads * hd2 {
        return;
    }
    let r = i / (params.heads * hd2);
    let h = (i / hd2) % params.heads;
    let p = i % hd2;
    let inv_freq = pow(params.theta, -2.0 * f32(p) / f32(params.head_dim));
    let angle = f32(params.pos0 + r) * inv_freq;
    let c = cos(angle);
    let s = sin(angle);
    let base = r * params.row_stride + h * params.head_dim + p;
    let a = qkv[base];
    let b = qkv[base + hd2];
    qkv[base] = a * c - b * s;
    qkv[base + hd2] = a * s + b * c;
}
