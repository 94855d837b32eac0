// Y[M, N] = X[M, K] · W[K, N], or Y += X · W (`accumulate`: the residual add, fused), f32 activations and
// accumulation, weights row-major [K, N] (f32 or f16, rows padded as weights.wgsl says): the chunks of
// rows of a prefill (one row runs on matvec.wgsl). A workgroup computes 64 columns of TM rows; its WG
// threads are 64 columns times WG / 64 slices of K, reduced in workgroup memory at the end. X rows are
// staged in workgroup memory per chunk of TILE_K.

#include matmul_io.wgsl

const COLS: u32 = 64u;
const TILE_K: u32 = 64u;
const MAX_TM: u32 = 8u;
const MAX_WG: u32 = 256u;

override WG: u32 = 256u;   // a multiple of COLS, at most MAX_WG
override TM: u32 = 8u;     // rows per workgroup, at most MAX_TM

#include weights.wgsl

var<workgroup> xs: array<f32, 512>;              // MAX_TM * TILE_K
var<workgroup> red: array<f32, 2048>;            // MAX_TM * MAX_WG

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let slices = WG / COLS;
    let slice = lid / COLS;
    let n = wid.x * COLS + lid % COLS;
    let m0 = wid.y * TM;
    let ws = row_stride(params.n);
    var acc: array<f32, MAX_TM>;
    for (var t = 0u; t < MAX_TM; t++) {
        acc[t] = 0.0;
    }
    for (var k0 = 0u; k0 < params.k; k0 += TILE_K) {
        for (var i = lid; i < TM * TILE_K; i += WG) {
            let r = m0 + i / TILE_K;
            let kk = k0 + i % TILE_K;
            var v = 0.0;
            if r < params.m && kk < params.k {
                v = x[params.x_off + r * params.x_stride + kk];
            }
            xs[i] = v;
        }
        workgroupBarrier();
        if n < params.n {
            let kend = min(TILE_K, params.k - k0);
            for (var kk = slice; kk < kend; kk += slices) {
                let wv = weight((k0 + kk) * ws + n);
                for (var t = 0u; t < TM; t++) {
                    acc[t] += xs[t * TILE_K + kk] * wv;
                }
            }
        }
        workgroupBarrier();
    }
    for (var t = 0u; t < TM; t++) {
        red[t * WG + lid] = acc[t];
    }
    workgroupBarrier();
    if slice != 0u || n >= params.n {
        return;
    }
    for (var t = 0u; t < TM; t++) {
        let r = m0 + t;
        if r < params.m {
            var v = 0.0;
            for (var s = 0u; s < slices; s++) {
                v += red[t * WG + s * COLS + lid];
            }
            let yi = params.y_off + r * params.y_stride + n;
            if params.accumulate != 0u {
                v += y[yi];
            }
            y[yi] = v;
        }
    }
}
