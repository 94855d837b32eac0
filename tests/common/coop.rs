//! The problems the cooperative-matrix kernels and their CPU twins run (tests/forward_coop.rs and
//! tests/backward_coop.rs on a GPU with matrix units, tests/*_coop_twin.rs everywhere); the forward's: every block size and head dim, odd lengths
//! and partial blocks, GQA, batch, dense and all-local edge cases, merged-query bit masks, an empty row,
//! large softmax scales (the lazy rescale), and how each is run on the GPU.

use super::{random_mask, Problem};
use s2attn::cpu::CoopKernel;
use s2attn::plan::{coop_candidates, DeviceCaps};
use s2attn::{DType, Layout, S2Config};

/// ‖out−ref‖/‖ref‖ (and ‖grad−ref‖/‖ref‖) bound: f16 inputs, P (and dS) rounded to f16 for the matrix
/// units, f32 accumulation.
pub const COOP_TOL: f64 = 5e-3;
/// LSE bound (computed in f32 from f32 scores).
pub const LSE_TOL: f64 = 1e-4;

/// An S2 layout from a config the tests know is valid.
pub fn s2(c: S2Config) -> Layout {
    Layout::s2(c).expect("valid S2 config")
}

/// How a GPU test feeds a problem to the kernel.
#[derive(Clone, Copy, Debug)]
pub enum Run {
    /// `Attention::forward` on host slices.
    Host,
    /// Caller-owned buffers, poisoned with NaN.
    Encode,
    /// Interleaved QKV views.
    Strided,
}

/// The problems every tile runs.
pub fn coop_problems() -> Vec<(String, Problem, Run)> {
    let f16 = DType::F16;
    let mut out = Vec::new();
    let mut add = |name: &str, p: Problem, run: Run| out.push((name.to_string(), p, run));
    for bs in [16, 32, 64, 128] {
        for d in [64, 128] {
            let l = s2(S2Config::new(2, bs, 2, 3));
            add(&format!("block {bs} d {d}, odd length"), Problem::new(&l, 1, 4 * bs + 7, d, f16), Run::Encode);
        }
    }
    let l = s2(S2Config::new(4, 32, 2, 4).kv_heads(2));
    add("GQA 4/2, batch 2, partial block", Problem::new(&l, 2, 333, 128, f16), Run::Encode);
    let l = s2(S2Config::new(8, 16, 3, 5).kv_heads(2).offset(1).dense_heads(1));
    add("GQA 8/2, dense head, offset", Problem::new(&l, 1, 290, 64, f16), Run::Host);
    add("dense causal", Problem::new(&Layout::dense(2, 2, 64, true).expect("dense"), 1, 300, 128, f16), Run::Encode);
    add(
        "dense bidirectional",
        Problem::new(&Layout::dense(2, 1, 32, false).expect("dense"), 2, 150, 64, f16),
        Run::Encode,
    );
    add("all local", Problem::new(&s2(S2Config::new(2, 32, 64, 7)), 1, 400, 128, f16), Run::Encode);
    add(
        "bidirectional S2",
        Problem::new(&s2(S2Config::new(2, 16, 2, 3).bidirectional(2, 1)), 1, 200, 64, f16),
        Run::Encode,
    );
    let l = Layout::custom(random_mask(7, 2, 12, 16, true, None), 4, 2).expect("custom");
    add("custom mask (merged-query bit masks)", Problem::new(&l, 1, 12 * 16 - 5, 128, f16), Run::Encode);
    let l = Layout::custom(random_mask(8, 1, 8, 16, false, Some(3)), 2, 1).expect("custom");
    add("custom mask with an empty row", Problem::new(&l, 1, 8 * 16, 64, f16), Run::Encode);
    let l = s2(S2Config::new(2, 64, 3, 2));
    add("softmax scale 1 (lazy rescale)", Problem::new(&l, 1, 700, 128, f16).with_scale(1.0), Run::Encode);
    add("softmax scale 3 (lazy rescale)", Problem::new(&l, 1, 500, 64, f16).with_scale(3.0), Run::Encode);
    add("strided QKV views", Problem::new(&s2(S2Config::new(4, 64, 2, 3).kv_heads(2)), 1, 260, 128, f16), Run::Strided);
    out
}

fn custom(seed: u64, heads: u32, kv_heads: u32, blocks: u32, causal: bool, empty: Option<u32>) -> Layout {
    Layout::custom(random_mask(seed, heads, blocks, 16, causal, empty), heads, kv_heads).expect("custom layout")
}

/// The problems every backward tile setting runs (f16).
pub fn coop_backward_problems() -> Vec<(String, Problem)> {
    let f16 = DType::F16;
    let mut out = Vec::new();
    let mut add = |name: &str, p: Problem| out.push((name.to_string(), p));
    for bs in [16, 32, 64, 128] {
        for d in [64, 128] {
            add(
                &format!("block {bs} d {d}, odd length"),
                Problem::new(&s2(S2Config::new(2, bs, 2, 3)), 1, 4 * bs + 7, d, f16),
            );
        }
    }
    add("GQA 4/2, batch 2, partial block", Problem::new(&s2(S2Config::new(4, 32, 2, 4).kv_heads(2)), 2, 333, 128, f16));
    let l = s2(S2Config::new(8, 16, 3, 5).kv_heads(2).offset(1).dense_heads(1));
    add("GQA 8/2, dense head, offset", Problem::new(&l, 1, 290, 64, f16));
    add("dense causal", Problem::new(&Layout::dense(2, 2, 64, true).expect("dense"), 1, 300, 128, f16));
    add("dense bidirectional", Problem::new(&Layout::dense(2, 1, 32, false).expect("dense"), 2, 150, 64, f16));
    let l = s2(S2Config::new(2, 16, 1, 2).bidirectional(1, 1).offset(1));
    add("bidirectional windows", Problem::new(&l, 1, 200, 128, f16));
    add("custom causal, empty row", Problem::new(&custom(7, 2, 1, 12, true, Some(3)), 1, 185, 128, f16));
    add("custom bidirectional, GQA", Problem::new(&custom(8, 4, 2, 10, false, None), 1, 150, 64, f16));
    add("long S2, merged rows", Problem::new(&s2(S2Config::new(4, 64, 4, 4)), 1, 1200, 128, f16));
    add("custom scale", Problem::new(&s2(S2Config::new(2, 32, 2, 3)), 1, 200, 64, f16).with_scale(0.4));
    out
}

/// Every coop forward kernel the planner may build for `p` on an H100 (one per tile), as the CPU twin
/// models it, smallest footprint first.
pub fn coop_kernels(p: &Problem) -> Vec<CoopKernel> {
    coop_candidates(&p.shape(), &p.layout, &DeviceCaps::h100_vulkan()).into_iter().map(CoopKernel::new).collect()
}
