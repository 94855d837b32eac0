// The matmul kernels' params and bindings (included as `#include matmul_io.wgsl`, before weights.wgsl):
// Y[M, N] = X[M, K] · W[K, N], or Y += X · W, with X and Y f32 rows at an offset and a stride, W the
// weights buffer as weights.wgsl reads it.

struct MatmulParams {
    m: u32,          // rows of X (the one-row kernel reads row 0)
    n: u32,
    k: u32,
    accumulate: u32, // Y += X · W (the residual add, fused)
    x_off: u32,      // element offset of X row 0
    x_stride: u32,   // elements between X rows
    y_off: u32,      // element offset of Y row 0
    y_stride: u32,   // elements between Y rows
}

@group(0) @binding(0) var<uniform> params: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
