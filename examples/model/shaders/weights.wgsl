// Weight accessor of the model kernels (included as `#include weights.wgsl`): weights live in a
// buffer `w` of 32-bit words, f32 bits (W_F16 = 0) or pairs of f16 (W_F16 = 1, element i in the low half
// of word i / 2 when i is even), so one source serves both without the shader-f16 feature.

override W_F16: u32 = 0u;

fn weight(i: u32) -> f32 {
    if W_F16 == 0u {
        return bitcast<f32>(w[i]);
    }
    let pair = unpack2x16float(w[i >> 1u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}
