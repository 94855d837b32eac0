// The combine step of flash-decoding: one workgroup per split family (see shared/decode.wgsl), merging
// its `nsplit` partials by their LSE: lse = log2 sum_s 2^lse_s, O = sum_s 2^(lse_s - lse) O_s. Writes
// the rows' output and natural-log LSE. CPU twin: src/cpu/varlen.rs (`attend_worklist`).

#include storage
#include shared/decode.wgsl

override D: u32 = 64u;  // head dim (multiple of 4)
override R: u32 = 4u;   // query rows per family
override WG: u32 = 64u; // invocations

var<workgroup> lse_s: array<f32, R>; // merged base-2 LSE per row

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = item_id(wg, nwg);
    if id >= params.n_items {
        return;
    }
    let fam = items[id];
    let d4 = D / 4u;
    if lid < R {
        var m = NEG_BIG;
        for (var s = 0u; s < fam.nsplit; s++) {
            m = max(m, part_lse[(fam.slot + s) * R + lid]);
        }
        var lse2 = NEG_BIG;
        if m > NEG_BIG {
            var sum = 0.0;
            for (var s = 0u; s < fam.nsplit; s++) {
                sum += exp2(part_lse[(fam.slot + s) * R + lid] - m);
            }
            lse2 = m + log2(sum);
        }
        lse_s[lid] = lse2;
        if row_valid(fam, lid) {
            lse_buf[lse_index(fam, lid)] = lse_out(lse2);
        }
    }
    workgroupBarrier();
    for (var i = lid; i < R * d4; i += WG) {
        let r = i / d4;
        if row_valid(fam, r) {
            let lse2 = lse_s[r];
            var x = vec4<f32>(0.0);
            if lse2 > NEG_BIG {
                for (var s = 0u; s < fam.nsplit; s++) {
                    let slot = (fam.slot + s) * R + r;
                    x += exp2(part_lse[slot] - lse2) * part_o[slot * d4 + i % d4];
                }
            }
            store_o(o_index(fam, r, i % d4, d4), x);
        }
    }
}
