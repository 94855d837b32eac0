// The combine step of flash-decoding: one workgroup per split family (see shared/decode.wgsl), merging
// its `nsplit` partials by their LSE: lse = log2 sum_s 2^lse_s, O = sum_s 2^(lse_s - lse) O_s. Writes
// the rows' output and natural-log LSE. CPU twin: src/cpu/varlen.rs (`attend_worklist`).
//
// A family of a long history has tens of partials: the splits are spread over the invocations (LL
// lanes per row for the LSE, SL lanes per output vec4 for O, loads four at a time) and the lanes meet in
// workgroup memory, so no invocation walks all partials one dependent load after another.

#include storage
#include shared/decode.wgsl
#include shared/nonfinite.wgsl

override D: u32 = 64u;   // head dim (multiple of 4)
override R: u32 = 4u;    // query rows per family
override WG: u32 = 256u; // invocations (>= R)
override LL: u32 = 16u;  // lanes per row of the LSE merge (LL * R <= WG)
override N4: u32 = R * D / 4u; // output vec4s
override SL: u32 = 1u;         // lanes per output vec4 (max(1, WG / N4))

var<workgroup> m_s: array<f32, WG>;        // lane maxima
var<workgroup> s_s: array<f32, WG>;        // lane sums (relative to their maxima)
var<workgroup> lse_s: array<f32, R>;       // merged base-2 LSE per row
var<workgroup> o_s: array<vec4<f32>, WG>;  // lane sums of O
var<workgroup> f_s: array<u32, WG>;        // lane flags: 1 a NaN partial, 2 a -inf one (keys, all -inf)

fn fold(m: ptr<function, f32>, s: ptr<function, f32>, f: ptr<function, u32>, x: f32) {
    let bits = bitcast<u32>(x);
    if (bits & 0x7fffffffu) > 0x7f800000u {
        *f |= 1u;
    } else if bits == 0xff800000u {
        *f |= 2u;
    }
    if x > *m {
        *s = *s * exp2(*m - x) + 1.0;
        *m = x;
    } else if x > NEG_BIG {
        *s += exp2(x - *m);
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = item_id(wg, nwg);
    if id >= params.n_families {
        return;
    }
    let fam = load_item(id);
    let d4 = D / 4u;
    let n = fam.nsplit;
    // LSE: lane `lane` of row r folds partials lane, lane + LL, ... (four loads in flight).
    if lid < R * LL {
        let r = lid / LL;
        let lane = lid % LL;
        var m = NEG_BIG;
        var s = 0.0;
        var f = 0u;
        var k = lane;
        for (; k + 3u * LL < n; k += 4u * LL) {
            let a = part_lse[(fam.slot + k) * R + r];
            let b = part_lse[(fam.slot + k + LL) * R + r];
            let c = part_lse[(fam.slot + k + 2u * LL) * R + r];
            let d = part_lse[(fam.slot + k + 3u * LL) * R + r];
            fold(&m, &s, &f, a);
            fold(&m, &s, &f, b);
            fold(&m, &s, &f, c);
            fold(&m, &s, &f, d);
        }
        for (; k < n; k += LL) {
            fold(&m, &s, &f, part_lse[(fam.slot + k) * R + r]);
        }
        m_s[lid] = m;
        s_s[lid] = s;
        f_s[lid] = f;
    }
    workgroupBarrier();
    if lid < R {
        var m = NEG_BIG;
        var f = 0u;
        for (var x = 0u; x < LL; x++) {
            m = max(m, m_s[lid * LL + x]);
            f |= f_s[lid * LL + x];
        }
        var lse2 = NEG_BIG;
        if m > NEG_BIG {
            var sum = 0.0;
            for (var x = 0u; x < LL; x++) {
                let mx = m_s[lid * LL + x];
                if mx > NEG_BIG {
                    sum += s_s[lid * LL + x] * exp2(mx - m);
                }
            }
            lse2 = m + log2(sum);
        }
        // A NaN partial, or keys that all scored -inf in every split that has keys: a NaN row.
        if (f & 1u) != 0u || ((f & 2u) != 0u && !(m > NEG_BIG)) {
            lse2 = quiet_nan();
        }
        lse_s[lid] = lse2;
        if row_valid(fam, lid) {
            lse_buf[lse_index(fam, lid)] = lse_out(lse2);
        }
    }
    workgroupBarrier();
    // O: lane `lane` of output vec4 o sums partials lane, lane + SL, ... (outputs past WG: one lane each).
    let lane = lid / N4;
    for (var o = lid % N4; o < N4; o += WG) {
        let r = o / d4;
        let lse2 = lse_s[r];
        if lane < SL {
            var x = vec4<f32>(0.0);
            if (bitcast<u32>(lse2) & 0x7fffffffu) > 0x7f800000u {
                x = vec4<f32>(quiet_nan());
            } else if lse2 > NEG_BIG {
                var k = lane;
                for (; k + 3u * SL < n; k += 4u * SL) {
                    let s0 = (fam.slot + k) * R + r;
                    let s1 = (fam.slot + k + SL) * R + r;
                    let s2 = (fam.slot + k + 2u * SL) * R + r;
                    let s3 = (fam.slot + k + 3u * SL) * R + r;
                    let w = exp2(vec4<f32>(part_lse[s0], part_lse[s1], part_lse[s2], part_lse[s3]) - lse2);
                    x += w.x * part_o[s0 * d4 + o % d4] + w.y * part_o[s1 * d4 + o % d4]
                        + w.z * part_o[s2 * d4 + o % d4] + w.w * part_o[s3 * d4 + o % d4];
                }
                for (; k < n; k += SL) {
                    let s0 = (fam.slot + k) * R + r;
                    x += exp2(part_lse[s0] - lse2) * part_o[s0 * d4 + o % d4];
                }
            }
            if SL == 1u {
                if row_valid(fam, r) {
                    store_o(o_index(fam, r, o % d4, d4), x);
                }
            } else {
                o_s[lid] = x;
            }
        }
    }
    if SL > 1u {
        workgroupBarrier();
        if lid < N4 {
            let r = lid / d4;
            var x = vec4<f32>(0.0);
            for (var s = 0u; s < SL; s++) {
                x += o_s[s * N4 + lid];
            }
            if row_valid(fam, r) {
                store_o(o_index(fam, r, lid % d4, d4), x);
            }
        }
    }
}
