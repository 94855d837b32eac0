// y[N] = x[K] · W[K, N] for one row of activations (a decode step's projections, the LM head), or
// y += x · W (`accumulate`: the residual add, fused); f32 activations and accumulation, weights row-major
// [K, N] as weights.wgsl stores them (f32 or f16, rows padded to whole 16-byte words). Bound by reading
// the weights: an invocation reads whole 16-byte words of weight rows (8 f16 or 4 f32 columns), ROWS
// rows per loop step (independent loads in flight); a workgroup covers TN words along N times WG / TN
// slices of K, interleaved (slice s takes rows s, s + WG / TN, ...), with no barrier until the slices'
// sums are reduced in workgroup memory at the end. Words past the padded row (in the last workgroup)
// are not read, columns past N not written.

#include matmul_io.wgsl

const MAX_WG: u32 = 256u;
const MAX_ROWS: u32 = 8u;

override WG: u32 = 256u;   // a power of two, at most MAX_WG
override TN: u32 = 4u;     // words along N per workgroup: a power of two dividing WG
override ROWS: u32 = 4u;   // weight rows per loop step of an invocation, 1 to MAX_ROWS

#include weights.wgsl

// Partial sums by invocation: two vec4 each (8 f16 columns; f32 weights use the first).
var<workgroup> red: array<vec4<f32>, 512>;       // 2 * MAX_WG

// Columns 0..3 of a word.
fn low(v: vec4<u32>) -> vec4<f32> {
    if W_F16 == 1u {
        return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
    }
    return bitcast<vec4<f32>>(v);
}

// Columns 4..7 of a word of f16.
fn high(v: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let per_word = select(4u, 8u, W_F16 == 1u);
    let slices = WG / TN;
    let slice = lid / TN;
    let col_word = wid.x * TN + lid % TN;
    let row_words = row_stride(params.n) / per_word;
    let in_row = col_word < row_words;
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    if in_row {
        let step = ROWS * slices;
        var k = slice;
        // Whole steps: ROWS independent loads, then their sums.
        var wv: array<vec4<u32>, MAX_ROWS>;
        var xv: array<f32, MAX_ROWS>;
        for (; k + (ROWS - 1u) * slices < params.k; k += step) {
            for (var r = 0u; r < ROWS; r++) {
                let kr = k + r * slices;
                wv[r] = w[kr * row_words + col_word];
                xv[r] = x[params.x_off + kr];
            }
            for (var r = 0u; r < ROWS; r++) {
                lo += xv[r] * low(wv[r]);
                if W_F16 == 1u {
                    hi += xv[r] * high(wv[r]);
                }
            }
        }
        for (; k < params.k; k += slices) {
            let v = w[k * row_words + col_word];
            let xk = x[params.x_off + k];
            lo += xk * low(v);
            if W_F16 == 1u {
                hi += xk * high(v);
            }
        }
    }
    red[2u * lid] = lo;
    red[2u * lid + 1u] = hi;
    workgroupBarrier();
    for (var span = slices / 2u; span > 0u; span /= 2u) {
        if slice < span {
            let other = 2u * (lid + span * TN);
            red[2u * lid] += red[other];
            red[2u * lid + 1u] += red[other + 1u];
        }
        workgroupBarrier();
    }
    if slice != 0u || !in_row {
        return;
    }
    var sums = array<vec4<f32>, 2>(red[2u * lid], red[2u * lid + 1u]);
    for (var e = 0u; e < per_word; e++) {
        let c = col_word * per_word + e;
        if c < params.n {
            var v = sums[e / 4u][e % 4u];
            let yi = params.y_off + c;
            if params.accumulate != 0u {
                v += y[yi];
            }
            y[yi] = v;
        }
    }
}
