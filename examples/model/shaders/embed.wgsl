// Embedding lookup: x[r, :] = table[ids[pos0 + r], :] for `rows` rows. The token ids stay on the GPU
// (the argmax kernel writes the next one), so a decode step needs no upload.

struct EmbedParams {
    rows: u32,
    cols: u32,   // d_model
    pos0: u32,   // index into `ids` of row 0
    vocab: u32,
}

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> params: EmbedParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

#include weights.wgsl

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= params.rows * params.cols {
        return;
    }
    let r = i / params.cols;
    let c = i % params.cols;
    let id = min(ids[params.pos0 + r], params.vocab - 1u);
    x[i] = weight(id * params.cols + c);
}
