//! The backward oracle: analytic f64 gradients of the masked attention with respect to Q, K and V, which
//! every backward kernel is judged against (the oracle itself is checked by finite differences in
//! `tests/backward.rs`). [`backward_portable`] is the CPU twin of the portable WGSL backward kernels,
//! [`backward_coop`] that of the cooperative-matrix ones.
//!
//! For a query row `i` with probabilities `P_ij = softmax_j(scale * q_i . k_j)` over its active keys and
//! output `o_i = sum_j P_ij v_j`, a loss with output gradient `dO` has
//! `D_i = dO_i . o_i`, `dS_ij = P_ij (dO_i . v_j - D_i)`, and
//! `dQ_i = scale * sum_j dS_ij k_j`, `dK_j = scale * sum_i dS_ij q_i`, `dV_j = sum_i P_ij dO_i`,
//! where the sums over `i` run over every query head of the key's GQA group.

mod coop;
mod portable;

pub use coop::{backward_coop, CoopBackward};
pub use portable::{backward_portable, BackwardInputs};

use crate::backward::Grads;
use crate::layout::Layout;
use crate::plan::Shape;

/// Analytic gradients of `sum(d_out * O(q, k, v))` in f64, for inputs in `[batch, seq, heads (or
/// kv_heads), head_dim]` layout masked by `layout` element by element, at `shape`'s batch, length, head
/// dim and scale (the dtype is ignored: inputs are taken as given). Rows with no active key contribute
/// nothing.
pub fn attention_backward_reference(
    layout: &Layout,
    shape: &Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
) -> Grads<f64> {
    let (b_n, s_n, d_n) = (shape.batch as usize, shape.seq_len as usize, shape.head_dim as usize);
    let (h_n, hk_n) = (layout.num_heads() as usize, layout.num_kv_heads() as usize);
    let scale = shape.softmax_scale() as f64;
    let group = h_n / hk_n;
    let q_row = |b: usize, t: usize, h: usize| ((b * s_n + t) * h_n + h) * d_n;
    let kv_row = |b: usize, t: usize, h: usize| ((b * s_n + t) * hk_n + h) * d_n;
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>();
    let mut grads = Grads { dq: vec![0f64; q.len()], dk: vec![0f64; k.len()], dv: vec![0f64; v.len()] };
    let mut p = vec![0f64; s_n];
    let mut o = vec![0f64; d_n];
    for b in 0..b_n {
        for h in 0..h_n {
            let kvh = h / group;
            let pattern = layout.pattern_of_head(h as u32);
            for i in 0..s_n {
                let qi = &q[q_row(b, i, h)..][..d_n];
                let doi = &d_out[q_row(b, i, h)..][..d_n];
                let active: Vec<usize> =
                    (0..s_n).filter(|&j| layout.element_active(pattern, i as u32, j as u32)).collect();
                if active.is_empty() {
                    continue;
                }
                for &j in &active {
                    p[j] = dot(qi, &k[kv_row(b, j, kvh)..][..d_n]) * scale;
                }
                let max = active.iter().map(|&j| p[j]).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = active.iter().map(|&j| (p[j] - max).exp()).sum();
                o.iter_mut().for_each(|x| *x = 0.0);
                for &j in &active {
                    p[j] = (p[j] - max).exp() / sum;
                    o.iter_mut().zip(&v[kv_row(b, j, kvh)..][..d_n]).for_each(|(x, &y)| *x += p[j] * y as f64);
                }
                let delta: f64 = doi.iter().zip(&o).map(|(&g, &x)| g as f64 * x).sum();
                for &j in &active {
                    let r = kv_row(b, j, kvh);
                    let ds = p[j] * (dot(doi, &v[r..][..d_n]) - delta);
                    for c in 0..d_n {
                        grads.dq[q_row(b, i, h) + c] += scale * ds * k[r + c] as f64;
                        grads.dk[r + c] += scale * ds * qi[c] as f64;
                        grads.dv[r + c] += p[j] * doi[c] as f64;
                    }
                }
            }
        }
    }
    grads
}
