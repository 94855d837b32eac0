//! The CUDA forward and backward with NaN and infinities in Q, K and V against the f64 oracle of
//! `tests/oracle` (IEEE softmax attention): every output (O, LSE, dQ, dK, dV) must be non-finite exactly
//! where the oracle's is (NaN for NaN, infinities of the same sign) and within the dtype's tolerance
//! elsewhere. The tensor-core kernels flag a non-finite output and the exact kernels (`shaders/cuda/
//! s2_exact.cu`) redo the op, so this covers both and the hand-over. The first sequence of the batch gets:
//! a NaN Q element (a NaN row); a +inf Q element in a row whose keys' K all make it score -inf or +inf (a NaN
//! row); +inf K elements that make some keys score -inf for the rows of their KV head (they contribute
//! nothing; dQ is NaN where a zero dS meets the +inf K); a NaN and a +inf V element in the middle of a
//! block, so that the rows before them (causality) mask them inside a computed chunk. Later sequences stay
//! finite, and a finite run after the non-finite one checks that the flag was cleared. Cases: f16 head dim
//! 64 with 16-token blocks (MergeQ row masks), bf16 head dim 128 with 64-token blocks, and a grid large
//! enough for the wgmma forward on sm_90. Every test needs a CUDA device and skips with a message without one.
//! Tolerances (‖out − ref‖ / ‖ref‖ over the finite entries, the tensor-core ones of tests/cuda_backward.rs):
//! fp16 5e-3, bf16 1.5e-2; LSE 1e-3.
#![cfg(feature = "cuda")]

mod common;

use common::oracle::{Problem, Rule};
use s2attn::{Attention, AttentionGrad, DType, Element, Layout, S2Config, Shape};

/// One problem: an S2 layout (causal), its shape, and whether to run the backward too.
struct Case {
    heads: u32,
    kv_heads: u32,
    block: u32,
    local: u32,
    vs: u32,
    batch: u32,
    seq: u32,
    d: u32,
    backward: bool,
}

/// `got` has a non-finite value exactly where `want` has one, of the same kind, and ‖got − want‖ / ‖want‖
/// over the finite entries is below `tol`; returns the error and the count of non-finite values.
fn judge(what: &str, got: &[f32], want: &[f64], tol: f64) -> (f64, usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den, mut nonfinite) = (0f64, 0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if w.is_finite() {
            assert!(g.is_finite(), "{what}[{i}] = {g}, the oracle has {w}");
            num += (g - w) * (g - w);
            den += w * w;
        } else {
            nonfinite += 1;
            assert!(if w.is_nan() { g.is_nan() } else { g == w }, "{what}[{i}] = {g}, the oracle has {w}");
        }
    }
    let err = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    assert!(err < tol, "{what}: ‖got−ref‖/‖ref‖ = {err:.3e} >= {tol:.1e}");
    (err, nonfinite)
}

/// Puts the non-finite values into the first sequence (`[seq, heads, d]` rows of `q`, `[seq, kv_heads, d]`
/// of `k` and `v`): see the module's documentation. KV head 0's query heads get element 0 of Q at -0.5 and
/// element 0 of K at -0.5, so that a +inf there scores -inf (K) or makes every score infinite (Q).
fn poison(c: &Case, q: &mut [f32], k: &mut [f32], v: &mut [f32]) {
    let (h, hk, d) = (c.heads as usize, c.kv_heads as usize, c.d as usize);
    let group = h / hk;
    let (qi, ki) =
        (|t: usize, hh: usize, e: usize| (t * h + hh) * d + e, |t: usize, hh: usize, e: usize| (t * hk + hh) * d + e);
    let seq = c.seq as usize;
    for t in 0..seq {
        for hh in 0..group {
            q[qi(t, hh, 0)] = -0.5;
        }
        k[ki(t, 0, 0)] = -0.5;
    }
    let b = c.block as usize;
    for t in (b + 3..b + 9).filter(|&t| t < seq) {
        k[ki(t, 0, 0)] = f32::INFINITY; // scores -inf for KV head 0's rows
    }
    q[qi(seq / 3, 0, 5)] = f32::NAN; // a NaN row
    q[qi(seq / 2, group - 1, 0)] = f32::INFINITY; // every score infinite: a NaN row
    let kv = hk - 1;
    v[ki((2 * b + b / 2).min(seq - 1), kv, 2)] = f32::NAN;
    v[ki((3 * b + b / 2 + 1).min(seq - 1), kv, 7)] = f32::INFINITY;
}

fn run<T: Element>(c: &Case, dtype: DType, tol: f64) {
    let Some(ctx) = common::cuda_context() else { return };
    let cfg =
        S2Config::new(c.heads, c.block, c.local, c.vs).kv_heads(c.kv_heads).homo_head(false).offset(0).dense_heads(0);
    let layout = Layout::s2(cfg).unwrap_or_else(|e| panic!("{e}"));
    let rule = Rule::S2 {
        block: c.block,
        local: c.local,
        vert_stride: c.vs,
        homo: false,
        offset: 0,
        dense_heads: 0,
        bidirectional: None,
    };
    let shape = Shape::new(c.batch, c.seq, c.d, dtype);
    let (seq, d) = (c.seq as usize, c.d as usize);
    let (nq, nk) = (seq * c.heads as usize * d, seq * c.kv_heads as usize * d);
    let fwd = Attention::new(ctx, &layout, shape).unwrap_or_else(|e| panic!("{e}"));
    let grad = c.backward.then(|| AttentionGrad::new(ctx, &layout, shape).unwrap_or_else(|e| panic!("{e}")));
    let what = format!("{dtype} d{} bs{} seq{} x{} ({})", c.d, c.block, c.seq, c.batch, fwd.explain());
    for (run, nonfinite) in [(0u64, true), (1, false)] {
        let n = c.batch as usize;
        let mut rng = common::Rng::new(11 + run);
        let mut q = rng.tensor(n * nq, dtype);
        let mut k = rng.tensor(n * nk, dtype);
        let mut v = rng.tensor(n * nk, dtype);
        let d_out = rng.tensor(n * nq, dtype);
        if nonfinite {
            poison(c, &mut q[..nq], &mut k[..nk], &mut v[..nk]);
        }
        let conv = |x: &[f32]| x.iter().map(|&a| T::from_f32(a)).collect::<Vec<T>>();
        let (tq, tk, tv, td) = (conv(&q), conv(&k), conv(&v), conv(&d_out));
        let o = fwd.forward(&tq, &tk, &tv).unwrap_or_else(|e| panic!("{what}: {e}"));
        let grads = grad
            .as_ref()
            .map(|g| g.backward(&tq, &tk, &tv, &o.out, &o.lse, &td).unwrap_or_else(|e| panic!("{what}: {e}")));
        let pos: Vec<u32> = (0..c.seq).collect();
        let mut counts = [0usize; 5];
        for b in 0..n {
            let p = Problem {
                rule: &rule,
                heads: c.heads,
                kv_heads: c.kv_heads,
                d,
                scale: 1.0 / (d as f64).sqrt(),
                pos: &pos,
                q: &q[b * nq..][..nq],
                k: &k[b * nk..][..nk],
                v: &v[b * nk..][..nk],
            };
            let tag = format!("{what}, sequence {b}, {}", if nonfinite { "non-finite inputs" } else { "finite rerun" });
            let want = p.forward();
            let widen = |x: &[T]| x.iter().map(|a| a.to_f32()).collect::<Vec<f32>>();
            let lse_n = c.heads as usize * seq;
            counts[0] += judge(&format!("{tag}: O"), &widen(&o.out[b * nq..][..nq]), &want.out, tol).1;
            counts[1] += judge(&format!("{tag}: LSE"), &o.lse[b * lse_n..][..lse_n], &want.lse, 1e-3).1;
            if let Some(g) = &grads {
                let want = p.backward(&d_out[b * nq..][..nq]);
                let gtol = tol;
                counts[2] += judge(&format!("{tag}: dQ"), &widen(&g.dq[b * nq..][..nq]), &want.dq, gtol).1;
                counts[3] += judge(&format!("{tag}: dK"), &widen(&g.dk[b * nk..][..nk]), &want.dk, gtol).1;
                counts[4] += judge(&format!("{tag}: dV"), &widen(&g.dv[b * nk..][..nk]), &want.dv, gtol).1;
            }
        }
        if nonfinite {
            assert!(counts[0] > 0 && counts[1] > 0, "{what}: the inputs gave no non-finite output");
        } else {
            assert_eq!(counts, [0; 5], "{what}: non-finite values from finite inputs");
        }
        eprintln!("{what}: non-finite O, LSE, dQ, dK, dV: {counts:?}");
    }
}

#[test]
fn f16_head_dim_64_small_blocks_gqa_batch() {
    let c = Case { heads: 4, kv_heads: 2, block: 16, local: 2, vs: 3, batch: 2, seq: 300, d: 64, backward: true };
    run::<half::f16>(&c, DType::F16, 5e-3);
}

#[test]
fn bf16_head_dim_128_blocks_of_64() {
    let c = Case { heads: 4, kv_heads: 2, block: 64, local: 2, vs: 3, batch: 1, seq: 333, d: 128, backward: true };
    run::<half::bf16>(&c, DType::BF16, 1.5e-2);
}

/// 11 tiles of 128 rows x 8 heads x 3 sequences: 264 CTAs, enough for 128-row tiles, hence the wgmma kernel
/// on sm_90 (mma.sync elsewhere). Forward only (the oracle's backward is slow at this size).
#[test]
fn f16_head_dim_128_wgmma_grid() {
    let c = Case { heads: 8, kv_heads: 2, block: 64, local: 1, vs: 8, batch: 3, seq: 1408, d: 128, backward: false };
    run::<half::f16>(&c, DType::F16, 5e-3);
}
