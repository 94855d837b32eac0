// Sums the portable backward's split partials (backward_dq.wgsl / backward_dkdv.wgsl with `splits` > 1)
// into one gradient tensor: out[i] = sum over s of part[part_off + s * n4 + i], in split order (so the
// result is deterministic), stored in the tensor's storage type. CPU twin: the oracle itself.

#include storage

struct SumParams {
    n4: u32,        // vec4s of the output tensor
    splits: u32,    // partials per element
    part_off: u32,  // first partial, in vec4s
    _pad: u32,
}

@group(0) @binding(0) var<uniform> sum_params: SumParams;
@group(0) @binding(13) var<storage, read> part_buf: array<vec4<f32>>;

override WG: u32 = 64u;  // invocations

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * WG;
    if i >= sum_params.n4 {
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var s = 0u; s < sum_params.splits; s++) {
        acc += part_buf[sum_params.part_off + s * sum_params.n4 + i];
    }
    store_o(i, acc);
}
