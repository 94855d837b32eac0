// Strided copy of a matrix with a storage-type change: dst[dst_off + r * dst_stride + c] =
// src[src_off + r * src_stride + c] for r < rows, c < cols, each side f32 or f16 (SRC_F16 / DST_F16;
// f16 as pairs in 32-bit words, element i in the low half of word i / 2 when i is even, so no
// shader-f16 feature is needed). One invocation moves two neighbouring elements: cols, offsets and
// strides are even. The prefill packs Q/K/V rows of a chunk into the attention op's tensors with it and
// unpacks the attention output.

struct CastParams {
    rows: u32,
    cols: u32,
    src_off: u32,
    src_stride: u32,
    dst_off: u32,
    dst_stride: u32,
    pad0: u32,
    pad1: u32,
}

override WG: u32 = 64u;
override SRC_F16: u32 = 0u;
override DST_F16: u32 = 0u;

@group(0) @binding(0) var<uniform> params: CastParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let pairs = params.cols / 2u;
    if i >= params.rows * pairs {
        return;
    }
    let r = i / pairs;
    let c = (i % pairs) * 2u;
    let s = params.src_off + r * params.src_stride + c;
    var v: vec2<f32>;
    if SRC_F16 == 1u {
        v = unpack2x16float(src[s >> 1u]);
    } else {
        v = vec2<f32>(bitcast<f32>(src[s]), bitcast<f32>(src[s + 1u]));
    }
    let d = params.dst_off + r * params.dst_stride + c;
    if DST_F16 == 1u {
        dst[d >> 1u] = pack2x16float(v);
    } else {
        dst[d] = bitcast<u32>(v.x);
        dst[d + 1u] = bitcast<u32>(v.y);
    }
}
