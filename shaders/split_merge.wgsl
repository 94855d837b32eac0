// Combines the portable forward's split partials (forward_portable.wgsl with `params.splits` > 1): for each
// query row, the splits' unnormalised O and running (max m, sum l) in base 2 merge as
// M = max m_s, L = sum l_s 2^(m_s - M), O = sum O_s 2^(m_s - M) / L, LSE = (M + log2 L) ln 2.
// A row no split attended gets O = 0 and LSE = -inf, a row whose flags say NaN gets NaN, as the unsplit
// kernel writes.
// CPU twin: the oracle itself (the merge is exact up to rounding).
//
// One invocation per (row, head, batch); rows before `params.first_row` are left unwritten.

#include shared/params.wgsl
#include shared/nonfinite.wgsl
#include storage

@group(0) @binding(5) var<storage, read_write> lse_buf: array<f32>;
@group(0) @binding(13) var<storage, read> part_buf: array<vec4<f32>>;

override D: u32 = 64u;   // head dim (multiple of 4)
override WG: u32 = 64u;  // invocations

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let d4 = D / 4u;
    let seq = params.seq_len;
    let tok = params.first_row + gid.x;
    let head = gid.y;
    let b = gid.z;
    if tok >= seq {
        return;
    }
    let splits = params.splits;
    // Partial row of split s: ((b * splits + s) * heads + head) * seq + tok, D / 4 + 1 vec4s each.
    let row_of = (b * splits * params.num_heads + head) * seq + tok;
    let split_stride = params.num_heads * seq;
    var m = NEG_BIG;
    for (var s = 0u; s < splits; s++) {
        m = max(m, part_buf[(row_of + s * split_stride) * (d4 + 1u) + d4].x);
    }
    var l = 0.0;
    var flags = 0u;
    for (var s = 0u; s < splits; s++) {
        let ml = part_buf[(row_of + s * split_stride) * (d4 + 1u) + d4];
        flags |= u32(ml.z);
        if ml.x > NEG_BIG {
            l += ml.y * exp2(ml.x - m);
        }
    }
    let nan = row_is_nan(flags, l);
    for (var c = 0u; c < d4; c++) {
        var o = vec4<f32>(0.0);
        if nan {
            o = vec4<f32>(quiet_nan());
        } else if l > 0.0 {
            for (var s = 0u; s < splits; s++) {
                let at = (row_of + s * split_stride) * (d4 + 1u);
                let ms = part_buf[at + d4].x;
                if ms > NEG_BIG {
                    o += part_buf[at + c] * exp2(ms - m);
                }
            }
            o = o / l;
        }
        store_o(o_index(b, tok, head, c, d4), o);
    }
    var lse = params.neg_inf;
    if nan {
        lse = quiet_nan();
    } else if l > 0.0 {
        lse = (m + log2(l)) * 0.6931471805599453;
    }
    lse_buf[params.lse_off + (b * params.num_heads + head) * seq + tok] = lse;
}
