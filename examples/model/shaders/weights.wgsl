// Weight storage of the model kernels (included as `#include weights.wgsl`): weights live in a buffer
// `w` of 16-byte words (`array<vec4<u32>>`), each 32-bit lane f32 bits (W_F16 = 0) or a pair of f16
// (W_F16 = 1, element i in the low half of lane i / 2 when i is even), so one source serves both without
// the shader-f16 feature. The matrices of the matmuls, [K, N] row-major, have their rows padded with
// zeros to `row_stride(N)` elements, whole 16-byte words in either type (the one-row kernel reads them
// a word at a time); every buffer holds whole words.

override W_F16: u32 = 0u;

// Elements a matrix row is padded to a multiple of.
const ROW_ALIGN: u32 = 8u;

// Elements from one row of a matrix of `n` columns to the next.
fn row_stride(n: u32) -> u32 {
    return (n + ROW_ALIGN - 1u) / ROW_ALIGN * ROW_ALIGN;
}

// Element `i` of the buffer, as f32.
fn weight(i: u32) -> f32 {
    if W_F16 == 0u {
        return bitcast<f32>(w[i >> 2u][i & 3u]);
    }
    let pair = unpack2x16float(w[i >> 3u][(i >> 1u) & 3u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}
