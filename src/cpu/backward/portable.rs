//! CPU twin of the portable backward kernels (`shaders/backward_dq.wgsl`, `shaders/backward_dkdv.wgsl`):
//! the same two passes over the same lists in the same tiles, in f32 and the base-2 domain, from the
//! forward's O and LSE rather than recomputed softmax statistics. It checks the plans' semantics (the
//! column plan, the row masks, the causal skips) against the oracle without a GPU.

use crate::backward::Grads;
use crate::layout::Layout;
use crate::plan::{BackwardPlan, ColumnPlan, MergeQPlan, Shape};
use std::f32::consts::{LN_2, LOG2_E};

/// What a backward pass reads, as f32 host slices (`[batch, seq, heads, head_dim]`; K, V with kv heads;
/// LSE `[batch, heads, seq]`).
#[derive(Clone, Copy, Debug)]
pub struct BackwardInputs<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// The forward's output.
    pub out: &'a [f32],
    /// The forward's natural-log log-sum-exp.
    pub lse: &'a [f32],
    /// Gradient of the loss with respect to the output.
    pub d_out: &'a [f32],
}

/// Gradients as the portable kernels compute them: the dQ pass over `mergeq` (tiles of
/// `plan.dq.tile_q` rows, keys in chunks of `plan.dq.tile_kv`), which also computes `D = rowsum(dO * O)`,
/// then the dK/dV pass over `columns` (KV tiles of `plan.dkdv.tile_kv` keys, query tiles of
/// `plan.dkdv.tile_q` rows), summing the query heads of each KV head's group in order.
pub fn backward_portable(
    layout: &Layout,
    shape: &Shape,
    plan: &BackwardPlan,
    mergeq: &MergeQPlan,
    columns: &ColumnPlan,
    x: &BackwardInputs<'_>,
) -> Grads<f32> {
    debug_assert_eq!((mergeq.tile_q(), columns.tile_q()), (plan.dq.tile_q, plan.dkdv.tile_q));
    let (batch, seq, d) = (shape.batch, shape.seq_len, shape.head_dim as usize);
    let (h_n, hk_n, bs, causal) = (layout.num_heads(), layout.num_kv_heads(), layout.block_size(), layout.causal());
    let group = h_n / hk_n;
    let scale_log2 = shape.softmax_scale() * LOG2_E;
    let q_row = |b: u32, t: u32, h: u32| ((b * seq + t) * h_n + h) as usize * d;
    let kv_row = |b: u32, t: u32, h: u32| ((b * seq + t) * hk_n + h) as usize * d;
    let stat = |b: u32, h: u32, t: u32| ((b * h_n + h) * seq + t) as usize;
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, c)| a * c).sum::<f32>();
    // Q as the kernels stage it: pre-scaled into the base-2 domain.
    let qs: Vec<f32> = x.q.iter().map(|&a| a * scale_log2).collect();
    let mut delta = vec![0f32; x.lse.len()];
    // (P, dS) of query `qi` of head `h` against key `kj`, or None where masked.
    let pair = |delta: &[f32], b: u32, h: u32, qi: u32, kj: u32, attends: bool| {
        if qi >= seq || kj >= seq || (causal && kj > qi) || !attends {
            return None;
        }
        let lse = x.lse[stat(b, h, qi)];
        if lse == f32::NEG_INFINITY {
            return None;
        }
        let kvh = h / group;
        let p = (dot(&qs[q_row(b, qi, h)..][..d], &x.k[kv_row(b, kj, kvh)..][..d]) - lse * LOG2_E).exp2();
        let dp = dot(&x.d_out[q_row(b, qi, h)..][..d], &x.v[kv_row(b, kj, kvh)..][..d]);
        Some((p, p * (dp - delta[stat(b, h, qi)])))
    };
    let mut grads = Grads { dq: vec![0f32; x.q.len()], dk: vec![0f32; x.k.len()], dv: vec![0f32; x.v.len()] };

    // dQ pass: one query tile of one head at a time, walking the forward's row list.
    let (tq, tk) = (plan.dq.tile_q, plan.dq.tile_kv);
    for (b, h, tile) in (0..batch).flat_map(|b| (0..h_n).flat_map(move |h| (0..mergeq.tiles()).map(move |t| (b, h, t))))
    {
        let row0 = tile * tq;
        let rows = tq.min(seq - row0);
        for t in row0..row0 + rows {
            delta[stat(b, h, t)] = dot(&x.d_out[q_row(b, t, h)..][..d], &x.out[q_row(b, t, h)..][..d]);
        }
        let mut acc = vec![0f32; rows as usize * d];
        for e in mergeq.tile(layout.pattern_of_head(h), tile) {
            for k0 in (e.kv_block * bs..(e.kv_block + 1) * bs).step_by(tk as usize) {
                if k0 >= seq || (causal && k0 > row0 + tq - 1) {
                    break;
                }
                for (r, c) in (0..rows).flat_map(|r| (0..tk).map(move |c| (r, c))) {
                    if let Some((_, ds)) = pair(&delta, b, h, row0 + r, k0 + c, e.rows.attends(r, bs)) {
                        let krow = &x.k[kv_row(b, k0 + c, h / group)..][..d];
                        acc[r as usize * d..][..d].iter_mut().zip(krow).for_each(|(a, &kv)| *a += ds * kv);
                    }
                }
            }
        }
        for (r, a) in acc.chunks(d).enumerate() {
            let out = &mut grads.dq[q_row(b, row0 + r as u32, h)..][..d];
            out.iter_mut().zip(a).for_each(|(o, &a)| *o = a * scale_log2 * LN_2);
        }
    }

    // dK/dV pass: one KV tile of one KV head at a time, walking its block's column list per query head.
    let (tk, tq) = (plan.dkdv.tile_kv, plan.dkdv.tile_q);
    for (b, kvh, kv_tile) in
        (0..batch).flat_map(|b| (0..hk_n).flat_map(move |h| (0..seq.div_ceil(tk)).map(move |t| (b, h, t))))
    {
        let k0 = kv_tile * tk;
        let keys = tk.min(seq - k0);
        let (mut dk, mut dv) = (vec![0f32; keys as usize * d], vec![0f32; keys as usize * d]);
        for h in kvh * group..(kvh + 1) * group {
            for e in columns.column(layout.pattern_of_head(h), k0 / bs) {
                let row0 = e.q_tile * tq;
                if causal && row0 + tq <= k0 {
                    continue;
                }
                for (r, c) in (0..tq).flat_map(|r| (0..keys).map(move |c| (r, c))) {
                    if let Some((p, ds)) = pair(&delta, b, h, row0 + r, k0 + c, e.rows.attends(r, bs)) {
                        let (qrow, dorow) = (&qs[q_row(b, row0 + r, h)..][..d], &x.d_out[q_row(b, row0 + r, h)..][..d]);
                        let c = c as usize * d;
                        dk[c..][..d].iter_mut().zip(qrow).for_each(|(a, &qv)| *a += ds * qv);
                        dv[c..][..d].iter_mut().zip(dorow).for_each(|(a, &g)| *a += p * g);
                    }
                }
            }
        }
        for c in 0..keys {
            let at = kv_row(b, k0 + c, kvh);
            let src = c as usize * d..(c as usize + 1) * d;
            grads.dk[at..][..d].iter_mut().zip(&dk[src.clone()]).for_each(|(o, &a)| *o = a * LN_2);
            grads.dv[at..][..d].copy_from_slice(&dv[src]);
        }
    }
    grads
}
