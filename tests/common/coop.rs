//! The problems the cooperative-matrix kernels and their CPU twins run (tests/forward_coop.rs and
//! tests/backward_coop.rs on a GPU with matrix units, tests/*_coop_twin.rs everywhere); the forward's: every block size and head dim, odd lengths
//! and partial blocks, GQA, batch, dense and all-local edge cases, merged-query bit masks, an empty row,
//! large softmax scales (the lazy rescale), and how each is run on the GPU. Also the twins' non-finite
//! cases, with the f64 oracle's own statement of each layout.

use super::oracle::{self, Rule};
use super::{random_mask, Inputs, Problem, Rng};
use s2attn::cpu::CoopKernel;
use s2attn::plan::{coop_candidates, DeviceCaps};
use s2attn::{BlockMask, DType, Layout, S2Config};

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

/// The block-mask layout of [`nonfinite_layouts`]: its query block that attends nothing and its key block
/// that no query attends.
pub const EMPTY_ROW: u32 = 2;
pub const EMPTY_COL: u32 = 3;

/// Layouts for the twins' non-finite tests, each with the oracle's statement of its rule, a length, a head
/// dim and whether it has the empty blocks: causal S2, bidirectional S2, GQA with a dense head, and a causal
/// block mask whose query block [`EMPTY_ROW`] attends nothing and whose key block [`EMPTY_COL`] no query
/// attends (a value placed there is read by no active pair).
pub fn nonfinite_layouts() -> Vec<(Layout, Rule, u32, u32, bool)> {
    let rule = |block, local, vs, dense, bidir| Rule::S2 {
        block,
        local,
        vert_stride: vs,
        homo: false,
        offset: 0,
        dense_heads: dense,
        bidirectional: bidir,
    };
    let mut out = vec![
        (s2(S2Config::new(2, 16, 2, 3)), rule(16, 2, 3, 0, None), 71, 64, false),
        (s2(S2Config::new(2, 16, 2, 3).bidirectional(2, 1)), rule(16, 2, 3, 0, Some((2, 1))), 90, 64, false),
        (s2(S2Config::new(4, 32, 1, 4).kv_heads(2).dense_heads(1)), rule(32, 1, 4, 1, None), 100, 128, false),
    ];
    let blocks = 6u32;
    let bits: Vec<bool> = (0..blocks * blocks)
        .map(|i| (i / blocks, i % blocks))
        .map(|(q, k)| q != EMPTY_ROW && k != EMPTY_COL && (k == q || k == 0))
        .collect();
    let mask = BlockMask::new(1, blocks, blocks, 16, true, bits.clone()).expect("mask");
    let rule = Rule::Mask { block: 16, mask_heads: 1, q_blocks: blocks, kv_blocks: blocks, causal: true, bits };
    out.push((Layout::custom(mask, 2, 1).expect("custom layout"), rule, blocks * 16, 64, true));
    out
}

/// Puts `value` into one element of `t` (`seq` token rows) at random, or, where `block` is given, into that
/// block of 16 tokens; returns the element's index.
pub fn place(rng: &mut Rng, t: &mut [f32], seq: u32, block: Option<u32>, value: f32) -> usize {
    let mut at = rng.below(t.len() as u32) as usize;
    if let Some(block) = block {
        let row = t.len() / seq as usize;
        at = (block * 16) as usize * row + at % (16 * row);
    }
    t[at] = value;
    at
}

/// The oracle's statement of batch-1 problem `p` (of `layout`'s heads) with inputs `x`.
pub fn oracle_problem<'a>(p: &Problem, rule: &'a Rule, pos: &'a [u32], x: &'a Inputs) -> oracle::Problem<'a> {
    oracle::Problem {
        rule,
        heads: p.layout.num_heads(),
        kv_heads: p.layout.num_kv_heads(),
        d: p.head_dim as usize,
        scale: p.shape().softmax_scale() as f64,
        pos,
        q: &x.q,
        k: &x.k,
        v: &x.v,
    }
}
