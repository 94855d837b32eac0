// Shared by the cooperative-matrix kernels (forward_coop.wgsl, backward_coop_dq.wgsl): the workgroup's
// tile, the walk over a MergeQ tile list in chunks of BK keys, the register fetch and workgroup staging
// of each chunk's K and V rows, the K/V matrix loads and the score product S = Q K^T.
// The including kernel declares: overrides D, BK, WG, NPF, KS4; `alias Fetch`, AM/BM/CM; the workgroup
// arrays k_s and v_s (BK rows of KS4 vec4<f16>); the f16 k_buf and v_buf bindings.

// What one workgroup works on.
struct Tile {
    b: u32,
    head: u32,
    kv_head: u32,
    row0: u32,      // first query row
    row_last: u32,  // last query row inside the sequence
    lid: u32,
    g: u32,         // the invocation's subgroup: tile rows 16g..16g+15 in the matrix products
}

// The tile-list entry of chunk `c` (chunks are the tile list's KV blocks cut into `subs` = block / BK
// chunks of BK keys; both powers of two, so shifts and masks instead of integer divisions, which the
// drivers expand into ~20 instructions each).
fn chunk_entry(c: u32, subs: u32) -> vec2<u32> {
    return entries[c >> countTrailingZeros(subs)];
}

// First key of chunk `c`, whose tile-list entry is `e`.
fn entry_k0(e: vec2<u32>, c: u32, subs: u32) -> u32 {
    return e.x * params.block_size + (c & (subs - 1u)) * BK;
}

// First key of chunk `c`.
fn chunk_k0(c: u32, subs: u32) -> u32 {
    return entry_k0(chunk_entry(c, subs), c, subs);
}

// The first chunk at or after `c` with keys inside the sequence that some row may see (causality).
fn next_chunk(c: u32, c_end: u32, subs: u32, row_last: u32) -> u32 {
    var n = c;
    while n < c_end {
        let k0 = chunk_k0(n, subs);
        if k0 < params.seq_len && (params.causal == 0u || k0 <= row_last) {
            break;
        }
        n++;
    }
    return n;
}

// Loads the chunk at `k0` into registers. Branch-free on purpose: rows past the sequence end are read as
// its last row (finite values whose scores are masked, so their P is 0 and P V never sees them), and the
// caller clamps the chunk index rather than skipping the call. With a conditional load the NVIDIA driver
// copies each loaded register into the loop-carried one right after the load, and the copy waits for the
// data: the prefetch stalled for the whole memory latency every chunk (shaders/NOTES-coop.md, v6).
// Invocation `lid` holds vec4 column lid % d4 of rows lid / d4 + n WG / d4 (WG is a multiple of d4, as
// the planner's workgroups of 64 invocations and more are), and V's index is K's moved by v_off - k_off
// (u32 arithmetic wraps): per element one clamp, one multiply-add and one add (v7 notes: the general
// index formula cost ~10 integer instructions per element, between the chunk's two workgroup barriers).
fn fetch(t: Tile, k0: u32, fk: ptr<function, Fetch>, fv: ptr<function, Fetch>) {
    let d4 = D / 4u;
    let base = params.k_off + t.b * params.seq_len * params.kv_stride + t.kv_head * d4 + t.lid % d4;
    for (var n = 0u; n < NPF; n++) {
        let ik = base + min(k0 + t.lid / d4 + n * (WG / d4), params.seq_len - 1u) * params.kv_stride;
        (*fk)[n] = k_buf[ik];
        (*fv)[n] = v_buf[ik + params.v_off - params.k_off];
    }
}

// Fetches chunk `c`, or the last chunk of the list again when `c` is past it (`c_end` >= 1), so that the
// loads are unconditional (see `fetch`).
fn fetch_chunk(t: Tile, c: u32, c_end: u32, subs: u32, fk: ptr<function, Fetch>, fv: ptr<function, Fetch>) {
    fetch(t, chunk_k0(min(c, c_end - 1u), subs), fk, fv);
}

// Stores fetched rows to k_s / v_s (the element layout of `fetch`).
fn stash(t: Tile, fk: ptr<function, Fetch>, fv: ptr<function, Fetch>) {
    let d4 = D / 4u;
    let at = (t.lid / d4) * KS4 + t.lid % d4;
    for (var n = 0u; n < NPF; n++) {
        k_s[at + n * (WG / d4) * KS4] = (*fk)[n];
        v_s[at + n * (WG / d4) * KS4] = (*fv)[n];
    }
}

// K rows 16kt.. as the columns of a B matrix (column-major load), head dims 16j..
fn kmat(kt: u32, j: u32) -> BM {
    return coopLoad<BM>(&k_s[kt * 16u * KS4 + j * 4u], KS4);
}

// V rows 16kt.. as the rows of a B matrix, head dims 16j..
fn vmat(kt: u32, j: u32) -> BM {
    return coopLoadT<BM>(&v_s[kt * 16u * KS4 + j * 4u], KS4);
}

// Scores of the subgroup's rows against keys 16kt..16kt+15.
fn qk(kt: u32, q0: AM, q1: AM, q2: AM, q3: AM, q4: AM, q5: AM, q6: AM, q7: AM) -> CM {
    // Two chains (even and odd head-dim blocks) halve the dependent multiply-add latency.
    var s = coopMultiplyAdd(q0, kmat(kt, 0u), CM());
    var u = coopMultiplyAdd(q1, kmat(kt, 1u), CM());
    s = coopMultiplyAdd(q2, kmat(kt, 2u), s);
    u = coopMultiplyAdd(q3, kmat(kt, 3u), u);
    if D > 64u {
        s = coopMultiplyAdd(q4, kmat(kt, 4u), s);
        u = coopMultiplyAdd(q5, kmat(kt, 5u), u);
        s = coopMultiplyAdd(q6, kmat(kt, 6u), s);
        u = coopMultiplyAdd(q7, kmat(kt, 7u), u);
    }
    return s + u;
}

