// Shared by every kernel that runs an online softmax (after the file that defines `params` and NEG_BIG):
// how non-finite inputs come out. As IEEE softmax attention computes it, a row whose scores hold a NaN or
// +inf, or whose active keys all score -inf, is NaN (O and LSE); a -inf score only contributes nothing; a
// masked key contributes nothing, whatever its K or V hold.

// Row flags of the online softmax: the row has an active key; an active score was NaN or +inf.
const ROW_HAS_KEY: u32 = 1u;
const ROW_NAN: u32 = 2u;

// What one score says about its row. `NEG_BIG` marks a masked (query, key) pair; any other value is an
// active key's score, and as IEEE softmax goes, a NaN or +inf score makes the whole row NaN (a -inf score
// only contributes nothing). Bit tests, so that no compiler's float assumptions can drop a NaN.
fn score_flags(s: f32) -> u32 {
    if s == NEG_BIG {
        return 0u;
    }
    let bits = bitcast<u32>(s);
    let nan_or_inf = (bits & 0x7fffffffu) > 0x7f800000u || bits == 0x7f800000u;
    return ROW_HAS_KEY | select(0u, ROW_NAN, nan_or_inf);
}

// Whether a row's softmax is NaN: a NaN or +inf score, or keys whose scores were all -inf (sum 0).
fn row_is_nan(flags: u32, l: f32) -> bool {
    return (flags & ROW_NAN) != 0u || ((flags & ROW_HAS_KEY) != 0u && !(l > 0.0));
}

// A quiet NaN, made at run time (a WGSL constant expression may not be NaN).
fn quiet_nan() -> f32 {
    return bitcast<f32>(0x7fc00000u | (params.causal & 0u));
}
