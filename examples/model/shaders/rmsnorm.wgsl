// RMSNorm: y[r, :] = x[row0 + r, :] / sqrt(mean(x[row0 + r, :]^2) + eps) * weight, one workgroup per row.

struct NormParams {
    rows: u32,
    cols: u32,
    row0: u32,   // first input row (the final norm reads only the last row)
    eps: f32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: NormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

#include weights.wgsl

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x;
    let src = (params.row0 + r) * params.cols;
    var s = 0.0;
    for (var c = lid; c < params.cols; c += WG) {
        let v = x[src + c];
        s += v * v;
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var span = WG / 2u; span > 0u; span /= 2u) {
        if lid < span {
            partial[lid] += partial[lid + span];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(params.cols) + params.eps);
    for (var c = lid; c < params.cols; c += WG) {
        y[r * params.cols + c] = x[src + c] * inv * weight(c);
    }
}
