// Greedy sampling: ids[dst] = argmax(logits[0..n]) (the lowest index among equal maxima), one workgroup.
// The id stays on the GPU for the next step's embedding lookup.

struct ArgmaxParams {
    n: u32,
    dst: u32,
    pad0: u32,
    pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: ArgmaxParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    var v = -3.4e38;
    var idx = 0xffffffffu;
    for (var i = lid; i < params.n; i += WG) {
        let x = logits[i];
        if x > v || idx == 0xffffffffu {
            v = x;
            idx = i;
        }
    }
    best_v[lid] = v;
    best_i[lid] = idx;
    workgroupBarrier();
    for (var span = WG / 2u; span > 0u; span /= 2u) {
        if lid < span {
            let ov = best_v[lid + span];
            let oi = best_i[lid + span];
            if oi != 0xffffffffu && (best_i[lid] == 0xffffffffu || ov > best_v[lid] || (ov == best_v[lid] && oi < best_i[lid])) {
                best_v[lid] = ov;
                best_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        ids[params.dst] = best_i[0];
    }
}
