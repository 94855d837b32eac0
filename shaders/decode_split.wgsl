// Decode and variable-length attention over a host-built work list (see shared/decode.wgsl): one
// workgroup per work item, R query rows (the query heads of one KV group times the item's query tokens)
// against the item's KV blocks, read through the entries' offsets (pages of the KV cache, or blocks of
// packed K/V). Portable: plain f32 arithmetic and workgroup memory; f16 storage is unpacked from words,
// so no `enable f16` is needed. CPU twin: src/cpu/varlen.rs (`attend_worklist`).
//
// K and V are read as 16-byte words (vec4<u32>: 8 halves or 4 floats), coalesced, one chunk of BK keys
// ahead: the loads of chunk c + 1 are issued into registers before chunk c is computed, so their latency
// hides behind the arithmetic. Per chunk: the staged chunk goes to workgroup memory, S = Q K^T (one key
// per invocation, a few rows each), then every invocation of the O pass takes its row's chunk maximum
// from the scores itself (no serial softmax step, no extra barrier), rescales its own accumulators and
// adds P V for its keys. When the rows hold fewer outputs than the workgroup has invocations, KS
// invocations share an output, each over every KS-th key, and their partial sums meet at the end.

#include shared/decode.wgsl
#include shared/nonfinite.wgsl

override D: u32 = 64u;            // head dim (multiple of 8)
override R: u32 = 4u;             // query rows per item (<= 64)
override BK: u32 = 16u;           // keys per chunk (divides the block size and WG)
override WG: u32 = 64u;           // invocations
override HALF: u32 = 1u;          // 1: f16 storage, 0: f32
override NL: u32 = 1u;            // 16-byte words of K (and of V) each invocation loads per chunk
override NA: u32 = 1u;            // outputs (16-byte words of a row of O) per invocation
override KS: u32 = 1u;            // invocations sharing one output (key splits)
override EW: u32 = 8u - 4u * (1u - HALF); // elements per 16-byte word
override W: u32 = D / EW;         // 16-byte words per key row
override KP: u32 = W + 1u;        // padded word stride of staged K rows (no bank conflicts in S = Q K^T)
const MAX_NL: u32 = 16u;
const MAX_NA: u32 = 16u;

#include shared/decode_words.wgsl

var<workgroup> q_s: array<vec4<f32>, R * D / 4u>; // query rows, pre-scaled by scale * log2(e)
var<workgroup> k_s: array<vec4<u32>, BK * KP>;
var<workgroup> v_s: array<vec4<u32>, BK * W>;
var<workgroup> p_s: array<f32, R * BK>;          // scores of the chunk (row r at r * BK)
var<workgroup> flag_s: array<atomic<u32>, R>;    // row flags (shared/nonfinite.wgsl)

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
    let it = load_item(id);
    let d4 = D / 4u;
    let causal = params.causal != 0u;
    let key_end = item_key_end(it);
    let words = kv_words();
    let per = EW / 4u;
    let k_off = words.x;
    let v_off = words.y;
    let tok_stride = words.z;

    for (var i = lid; i < R * d4; i += WG) {
        var x = vec4<f32>(0.0);
        if row_valid(it, i / d4) {
            x = load_q4(q_index(it, i / d4, i % d4, d4)) * params.scale_log2;
        }
        q_s[i] = x;
    }

    for (var r = lid; r < R; r += WG) {
        atomicStore(&flag_s[r], 0u);
    }
    // Row flags of the rows this invocation scores (rows lid / BK + i * WG / BK, at most 64), two bits each.
    var flags: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        flags[i] = 0u;
    }

    // The O pass: output o = lid % (R * W) (row o / W, word o % W), key split ks = lid / (R * W).
    let n_out = R * W;
    let ks = lid / n_out;
    let active_o = lid < KS * n_out;
    var acc_lo: array<vec4<f32>, MAX_NA>;
    var acc_hi: array<vec4<f32>, MAX_NA>;
    var m_r: array<f32, MAX_NA>;
    var l_r: array<f32, MAX_NA>;
    for (var j = 0u; j < NA; j++) {
        acc_lo[j] = vec4<f32>(0.0);
        acc_hi[j] = vec4<f32>(0.0);
        m_r[j] = NEG_BIG;
        l_r[j] = 0.0;
    }

    // Chunks: entry e0 + c / per_block, keys (c % per_block) * BK of it.
    let per_block = params.block_size / BK;
    let n_chunks = (it.e1 - it.e0) * per_block;
    var pk: array<vec4<u32>, MAX_NL>;
    var pv: array<vec4<u32>, MAX_NL>;
    // Loads chunk c into pk / pv (zeros past the keys needed).
    var c = 0u;
    var next_k0 = 0u;
    if n_chunks > 0u {
        let entry = entries[it.e0];
        next_k0 = entry.y;
        for (var j = 0u; j < NL; j++) {
            let i = lid + j * WG;
            let kk = i / W;
            var kx = vec4<u32>(0u);
            var vx = vec4<u32>(0u);
            if i < BK * W && entry.y + kk < key_end {
                let at = entry.x / per + kk * tok_stride + i % W;
                kx = k_buf[k_off + at];
                vx = v_buf[v_off + at];
            }
            pk[j] = kx;
            pv[j] = vx;
        }
    }
    loop {
        if c >= n_chunks {
            break;
        }
        let k0 = next_k0;
        if k0 >= key_end {
            break;
        }
        let entry = entries[it.e0 + c / per_block];
        workgroupBarrier(); // the previous chunk's O pass is done with k_s, v_s and p_s
        for (var j = 0u; j < NL; j++) {
            let i = lid + j * WG;
            if i < BK * W {
                k_s[(i / W) * KP + i % W] = pk[j];
                v_s[i] = pv[j];
            }
        }
        workgroupBarrier();
        // Prefetch the next chunk while this one is computed.
        c += 1u;
        if c < n_chunks {
            let ne = entries[it.e0 + c / per_block];
            let sub = (c % per_block) * BK;
            next_k0 = ne.y + sub;
            if next_k0 < key_end {
                for (var j = 0u; j < NL; j++) {
                    let i = lid + j * WG;
                    let kk = i / W;
                    var kx = vec4<u32>(0u);
                    var vx = vec4<u32>(0u);
                    if i < BK * W && next_k0 + kk < key_end {
                        let at = ne.x / per + (sub + kk) * tok_stride + i % W;
                        kx = k_buf[k_off + at];
                        vx = v_buf[v_off + at];
                    }
                    pk[j] = kx;
                    pv[j] = vx;
                }
            }
        }
        // S = Q K^T: key kk = lid % BK, rows lid / BK, + WG / BK, ...
        let kk = lid % BK;
        let kpos = k0 + kk;
        for (var r = lid / BK; r < R; r += WG / BK) {
            var s = NEG_BIG;
            let i = (r - lid / BK) / (WG / BK);
            if row_valid(it, r) && kpos < key_end && (!causal || kpos <= it.pos0 + r % params.n_tok)
                && row_attends(entry.zw, r) {
                var dot = vec4<f32>(0.0);
                for (var w = 0u; w < W; w++) {
                    let kw = k_s[kk * KP + w];
                    if HALF == 1u {
                        dot += q_s[r * d4 + 2u * w] * lo4(kw) + q_s[r * d4 + 2u * w + 1u] * hi4(kw);
                    } else {
                        dot += q_s[r * d4 + w] * lo4(kw);
                    }
                }
                s = dot.x + dot.y + dot.z + dot.w;
            }
            p_s[r * BK + kk] = s;
            flags[i / 16u] |= score_flags(s) << (2u * (i % 16u));
        }
        workgroupBarrier();
        // O += P V with the running maximum of each row (every invocation of a row finds the same).
        if active_o {
            for (var j = 0u; j < NA; j++) {
                let o = lid % n_out + j * WG;
                if o < n_out {
                    let r = o / W;
                    let w = o % W;
                    var mc = NEG_BIG;
                    for (var k = 0u; k < BK; k++) {
                        mc = max(mc, p_s[r * BK + k]);
                    }
                    let m_new = max(m_r[j], mc);
                    if m_new > NEG_BIG {
                        let alpha = exp2(m_r[j] - m_new);
                        var a_lo = acc_lo[j] * alpha;
                        var a_hi = acc_hi[j] * alpha;
                        var l = l_r[j] * alpha;
                        for (var k = ks; k < BK; k += KS) {
                            let s = p_s[r * BK + k];
                            let p = select(0.0, exp2(s - m_new), s > NEG_BIG);
                            let vw = v_s[k * W + w];
                            l += p;
                            // A zero P (masked, or a -inf score) adds nothing, not 0 * a non-finite V.
                            a_lo += select(p * lo4(vw), vec4<f32>(0.0), p == 0.0);
                            if HALF == 1u {
                                a_hi += select(p * hi4(vw), vec4<f32>(0.0), p == 0.0);
                            }
                        }
                        acc_lo[j] = a_lo;
                        acc_hi[j] = a_hi;
                        l_r[j] = l;
                        m_r[j] = m_new;
                    }
                }
            }
        }
    }

    // The rows' flags meet.
    for (var r = lid / BK; r < R; r += WG / BK) {
        let i = (r - lid / BK) / (WG / BK);
        let f = (flags[i / 16u] >> (2u * (i % 16u))) & 3u;
        if f != 0u {
            atomicOr(&flag_s[r], f);
        }
    }
    workgroupBarrier();

    // Key splits meet: split ks > 0 leaves its sums in k_s (accumulators) and v_s (row sums), split 0 adds.
    if KS > 1u {
        workgroupBarrier();
        if active_o && ks > 0u {
            let t = lid - n_out;
            k_s[2u * t] = bitcast<vec4<u32>>(acc_lo[0]);
            k_s[2u * t + 1u] = bitcast<vec4<u32>>(acc_hi[0]);
            v_s[t] = vec4<u32>(bitcast<u32>(l_r[0]), 0u, 0u, 0u);
        }
        workgroupBarrier();
        if ks == 0u {
            for (var s = 1u; s < KS; s++) {
                let t = (s - 1u) * n_out + lid;
                acc_lo[0] += bitcast<vec4<f32>>(k_s[2u * t]);
                acc_hi[0] += bitcast<vec4<f32>>(k_s[2u * t + 1u]);
                l_r[0] += bitcast<f32>(v_s[t].x);
            }
        }
    }
    if !active_o || ks != 0u {
        return;
    }
    for (var j = 0u; j < NA; j++) {
        let o = lid + j * WG;
        let r = o / W;
        let w = o % W;
        if o < n_out && row_valid(it, r) {
            let l = l_r[j];
            let row_flags = atomicLoad(&flag_s[r]);
            let inv = o_scale(row_flags, l, it.nsplit);
            // Word w of the row holds elements w * EW ..: vec4 units (w * EW) / 4 (and + 1 for f16).
            let u = w * EW / 4u;
            if it.nsplit == 1u {
                store_o4(o_index(it, r, u, d4), acc_lo[j] * inv);
                if HALF == 1u {
                    store_o4(o_index(it, r, u + 1u, d4), acc_hi[j] * inv);
                }
            } else {
                part_o[(it.slot * R + r) * d4 + u] = acc_lo[j] * inv;
                if HALF == 1u {
                    part_o[(it.slot * R + r) * d4 + u + 1u] = acc_hi[j] * inv;
                }
            }
            if w == 0u {
                let lse2 = partial_lse2(row_flags, m_r[j], l);
                if it.nsplit == 1u {
                    lse_buf[lse_index(it, r)] = lse_out(lse2);
                } else {
                    part_lse[it.slot * R + r] = lse2;
                }
            }
        }
    }
}
