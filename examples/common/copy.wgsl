// dst = src in 16-byte words, a grid-stride loop: the device-memory copy bandwidth a compute kernel
// reaches (what the decode kernels' loads are held against), unlike a buffer copy command, which some
// drivers run on a slower copy engine.

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = arrayLength(&src);
    let stride = groups.x * 256u;
    for (var i = gid.x; i < n; i += stride) {
        dst[i] = src[i];
    }
}
