// Decode over a host-built work list (see shared/decode.wgsl) for narrow items, R <= 4 query rows (a GQA
// group of up to 4 heads, one token): the split kernel of `decode_split.wgsl` with Q, K, V and O in
// registers instead of workgroup memory, which bounds that kernel on the shared-memory port. Output
// semantics are the same (rows written, or partials for decode_combine). CPU twin: src/cpu/varlen.rs
// (`attend_worklist`).
//
// Invocation (g, w) = (lid / W, lid % W) owns 16-byte word w of every key row (8 halves or 4 floats) and
// the keys g, g + G, ... of each chunk of BK keys. It loads its words of K and V straight into
// registers (coalesced: the W invocations of a key read its row), one chunk ahead, keeps its slice of
// the R query rows and of their O rows in registers, and runs its own online softmax over its keys:
// the only shared traffic per chunk is the partial dot products (one vec4 of R rows per key and word),
// their sums, and two barriers. At the end the G key groups of each word merge their (max, sum, O)
// as the split combine does, through workgroup memory.
//
// The rows are the lanes of every per-row value: Q and O slices are 4x4 matrices whose column e holds
// element e of the word for the 4 rows, so a key's partial dots are one matrix-vector product and its
// P V update one column-wise multiply-add, with no per-row array (no indexing the compiler could leave
// in local memory). A single row (R = 1) keeps its word as plain vec4s instead (a quarter of the work); the
// epilogue puts them in column layout.

#include shared/decode.wgsl
#include shared/nonfinite.wgsl

override D: u32 = 64u;            // head dim (a multiple of 8)
override R: u32 = 4u;             // query rows per item (<= 4)
override BK: u32 = 16u;           // keys per chunk (divides the block size; a multiple of G)
override HALF: u32 = 1u;          // 1: f16 storage, 0: f32
override EW: u32 = 8u - 4u * (1u - HALF); // elements per 16-byte word
override W: u32 = D / EW;         // words per key row (divides 128)
override G: u32 = 128u / W;       // key groups
override WG: u32 = W * G;         // invocations
override NK: u32 = BK / G;        // keys per invocation per chunk (<= MAX_NK)
override RED: u32 = 512u;         // vec4s of the reduction buffer: max(BK * W, 4 * WG)
const MAX_NK: u32 = 16u;

#include shared/decode_words.wgsl

var<workgroup> red_s: array<vec4<f32>, RED>; // partial dots [key][word] (rows in lanes), then the merge
var<workgroup> s_s: array<vec4<f32>, BK>;    // scores of the chunk per key (rows in lanes), base 2
var<workgroup> flag_s: array<atomic<u32>, 4>; // row flags (shared/nonfinite.wgsl)

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wgid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = item_id(wgid, nwg);
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
    let w = lid % W;
    let g = lid / W;
    // Vec4 unit of element w * EW within a row.
    let u = w * EW / 4u;

    // Q: column e of `ql` (`qh`) is element e (4 + e) of word w for the 4 rows, pre-scaled.
    let ql = transpose(mat4x4<f32>(q_part(it, 0u, u, d4), q_part(it, 1u, u, d4), q_part(it, 2u, u, d4),
        q_part(it, 3u, u, d4))) * params.scale_log2;
    var qh = mat4x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if HALF == 1u {
        qh = transpose(mat4x4<f32>(q_part(it, 0u, u + 1u, d4), q_part(it, 1u, u + 1u, d4),
            q_part(it, 2u, u + 1u, d4), q_part(it, 3u, u + 1u, d4))) * params.scale_log2;
    }
    // O accumulators, laid out as Q.
    var al = mat4x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var ah = al;
    // R = 1: row 0's Q and O word, elements in lanes.
    let q1l = transpose(ql)[0];
    let q1h = transpose(qh)[0];
    var a1l = vec4<f32>(0.0);
    var a1h = vec4<f32>(0.0);
    if lid < 4u {
        atomicStore(&flag_s[lid], 0u);
    }
    // Row flags of the keys this invocation scores (invocations lid < BK), two bits per row.
    var flags = 0u;
    // Running max and sum of the rows (lanes) over this invocation's keys.
    var m = vec4<f32>(NEG_BIG);
    var l = vec4<f32>(0.0);

    let per_block = params.block_size / BK;
    let n_chunks = (it.e1 - it.e0) * per_block;
    var pk: array<vec4<u32>, MAX_NK>;
    var pv: array<vec4<u32>, MAX_NK>;
    // Chunk c's words of this invocation: key g + G * j at word w.
    var k0 = 0u;
    var base = 0u;
    if n_chunks > 0u {
        let e = entries[it.e0];
        k0 = e.y;
        base = e.x / per;
        for (var j = 0u; j < NK; j++) {
            let kk = g + G * j;
            var kx = vec4<u32>(0u);
            var vx = vec4<u32>(0u);
            if k0 + kk < key_end {
                let at = base + kk * tok_stride + w;
                kx = k_buf[k_off + at];
                vx = v_buf[v_off + at];
            }
            pk[j] = kx;
            pv[j] = vx;
        }
    }
    var c = 0u;
    loop {
        if c >= n_chunks || k0 >= key_end {
            break;
        }
        let mask = entries[it.e0 + c / per_block].zw;
        // The next chunk, if any keys of it are needed.
        let c1 = c + 1u;
        var k1 = key_end;
        var base1 = 0u;
        if c1 < n_chunks {
            let e = entries[it.e0 + c1 / per_block];
            let sub = (c1 % per_block) * BK;
            k1 = e.y + sub;
            base1 = e.x / per + sub * tok_stride;
        }
        // Partial dots of this invocation's keys over its word, rows in lanes.
        for (var j = 0u; j < NK; j++) {
            var part: vec4<f32>;
            if R == 1u {
                part = vec4<f32>(dot(q1l, lo4(pk[j])) + select(0.0, dot(q1h, hi4(pk[j])), HALF == 1u), 0.0, 0.0, 0.0);
            } else {
                part = ql * lo4(pk[j]);
                if HALF == 1u {
                    part += qh * hi4(pk[j]);
                }
            }
            red_s[(g + G * j) * W + w] = part;
        }
        // The next chunk's K while the sums run.
        if k1 < key_end {
            for (var j = 0u; j < NK; j++) {
                let kk = g + G * j;
                var kx = vec4<u32>(0u);
                if k1 + kk < key_end {
                    kx = k_buf[k_off + base1 + kk * tok_stride + w];
                }
                pk[j] = kx;
            }
        }
        workgroupBarrier();
        // Scores: one invocation per key sums the W partials and masks.
        if lid < BK {
            var s = vec4<f32>(0.0);
            for (var x = 0u; x < W; x++) {
                s += red_s[lid * W + x];
            }
            let kpos = k0 + lid;
            for (var r = 0u; r < 4u; r++) {
                let live = r < R && row_valid(it, r) && kpos < key_end
                    && (!causal || kpos <= it.pos0 + r % params.n_tok) && row_attends(mask, r);
                if !live {
                    s[r] = NEG_BIG;
                }
                flags |= score_flags(s[r]) << (2u * r);
            }
            s_s[lid] = s;
        }
        workgroupBarrier();
        // Online softmax over this invocation's keys, then O += P V on its word.
        var mc = m;
        for (var j = 0u; j < NK; j++) {
            mc = max(mc, s_s[g + G * j]);
        }
        let alpha = exp2(m - mc);
        l *= alpha;
        if R == 1u {
            a1l *= alpha.x;
            a1h *= alpha.x;
        } else {
            al = mat4x4<f32>(al[0] * alpha, al[1] * alpha, al[2] * alpha, al[3] * alpha);
            if HALF == 1u {
                ah = mat4x4<f32>(ah[0] * alpha, ah[1] * alpha, ah[2] * alpha, ah[3] * alpha);
            }
        }
        for (var j = 0u; j < NK; j++) {
            let s = s_s[g + G * j];
            let p = select(vec4<f32>(0.0), exp2(s - mc), s > vec4<f32>(NEG_BIG));
            l += p;
            // A zero P (masked, or a -inf score) adds nothing, not 0 * a non-finite V.
            let live = p != vec4<f32>(0.0);
            if R == 1u {
                if live.x {
                    a1l += p.x * lo4(pv[j]);
                    a1h += p.x * hi4(pv[j]);
                }
            } else {
                al += pv_columns(p, live, lo4(pv[j]));
                if HALF == 1u {
                    ah += pv_columns(p, live, hi4(pv[j]));
                }
            }
        }
        m = mc;
        // The next chunk's V.
        if k1 < key_end {
            for (var j = 0u; j < NK; j++) {
                let kk = g + G * j;
                var vx = vec4<u32>(0u);
                if k1 + kk < key_end {
                    vx = v_buf[v_off + base1 + kk * tok_stride + w];
                }
                pv[j] = vx;
            }
        }
        c = c1;
        k0 = k1;
    }

    // The G key groups of word w merge: common max, scaled sums, then O row by row; the rows' flags meet.
    for (var r = 0u; r < 4u; r++) {
        let f = (flags >> (2u * r)) & 3u;
        if f != 0u {
            atomicOr(&flag_s[r], f);
        }
    }
    workgroupBarrier();
    red_s[lid] = m;
    workgroupBarrier();
    var mx = vec4<f32>(NEG_BIG);
    for (var x = 0u; x < G; x++) {
        mx = max(mx, red_s[x * W + w]);
    }
    let scale = select(vec4<f32>(0.0), exp2(m - mx), mx > vec4<f32>(NEG_BIG));
    workgroupBarrier();
    red_s[lid] = l * scale;
    workgroupBarrier();
    var lt = vec4<f32>(0.0);
    for (var x = 0u; x < G; x++) {
        lt += red_s[x * W + w];
    }
    // O word by halves (4 elements each: one for f32 storage): the key groups' scaled columns meet,
    // then each row's four elements are a column of the transpose.
    if R == 1u {
        let z = vec4<f32>(0.0);
        al = transpose(mat4x4<f32>(a1l, z, z, z));
        ah = transpose(mat4x4<f32>(a1h, z, z, z));
    }
    for (var h = 0u; h < 1u + HALF; h++) {
        var a = al;
        if h == 1u {
            a = ah;
        }
        workgroupBarrier();
        for (var e = 0u; e < 4u; e++) {
            red_s[4u * lid + e] = a[e] * scale;
        }
        workgroupBarrier();
        if g == 0u {
            var o = mat4x4<f32>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
            for (var x = 0u; x < G; x++) {
                for (var e = 0u; e < 4u; e++) {
                    o[e] += red_s[4u * (x * W + w) + e];
                }
            }
            let rows = transpose(o);
            for (var r = 0u; r < R; r++) {
                if !row_valid(it, r) {
                    continue;
                }
                let row_flags = atomicLoad(&flag_s[r]);
                let inv = o_scale(row_flags, lt[r], it.nsplit);
                if it.nsplit == 1u {
                    store_o4(o_index(it, r, u + h, d4), rows[r] * inv);
                } else {
                    part_o[(it.slot * R + r) * d4 + u + h] = rows[r] * inv;
                }
                if w == 0u && h == 0u {
                    let lse2 = partial_lse2(row_flags, mx[r], lt[r]);
                    if it.nsplit == 1u {
                        lse_buf[lse_index(it, r)] = lse_out(lse2);
                    } else {
                        part_lse[it.slot * R + r] = lse2;
                    }
                }
            }
        }
    }
}

// Four elements of row r's Q at vec4 unit `unit` (zero for a row past R or not valid).
fn q_part(it: WorkItem, r: u32, unit: u32, d4: u32) -> vec4<f32> {
    if r < R && row_valid(it, r) {
        return load_q4(q_index(it, r, unit, d4));
    }
    return vec4<f32>(0.0);
}

// The P V update of 4 elements `v` of one key: column e is p * v[e] in the rows (lanes) where p is live.
fn pv_columns(p: vec4<f32>, live: vec4<bool>, v: vec4<f32>) -> mat4x4<f32> {
    let z = vec4<f32>(0.0);
    return mat4x4<f32>(select(z, p * v.x, live), select(z, p * v.y, live), select(z, p * v.z, live),
        select(z, p * v.w, live));
}
