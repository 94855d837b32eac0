//! CPU twin of `shaders/forward_portable.wgsl`: the same walk over the MergeQ tile lists, the same key
//! chunks, the same base-2 online softmax, in f32. It checks the plan's semantics without a GPU.

use super::tiles::{tile_tasks, TileTask};
use crate::layout::Layout;
use crate::plan::{DispatchPlan, MergeQPlan};

/// Forward attention as the portable kernel computes it. Inputs as for
/// [`attention_reference`](super::attention_reference); returns `(out, lse)`.
#[allow(clippy::too_many_arguments)] // mirrors the kernel's bindings one to one
pub fn forward_portable(
    layout: &Layout,
    plan: &DispatchPlan,
    mergeq: &MergeQPlan,
    batch: u32,
    head_dim: u32,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let seq = mergeq.seq_len();
    let (h_n, hk_n, d) = (layout.num_heads(), layout.num_kv_heads(), head_dim as usize);
    let bs = layout.block_size();
    let (tq, tk) = (plan.tile_q, plan.tile_kv);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let mut out = vec![0f32; (batch * seq * h_n) as usize * d];
    let mut lse = vec![f32::NEG_INFINITY; (batch * h_n * seq) as usize];
    let qi_of = |b: u32, t: u32, h: u32| ((b * seq + t) * h_n + h) as usize * d;
    let ki_of = |b: u32, t: u32, h: u32| ((b * seq + t) * hk_n + h) as usize * d;
    for TileTask { b, h, kv_head: kvh, pattern, tile, row0 } in tile_tasks(layout, mergeq, batch) {
        let rows = tq.min(seq - row0);
        let mut m = vec![f32::NEG_INFINITY; rows as usize];
        let mut l = vec![0f32; rows as usize];
        let mut acc = vec![0f32; rows as usize * d];
        for e in mergeq.tile(pattern, tile) {
            for sub in 0..bs / tk {
                let k0 = e.kv_block * bs + sub * tk;
                if k0 >= seq || (layout.causal() && k0 > row0 + tq - 1) {
                    break;
                }
                for r in 0..rows {
                    let qi = row0 + r;
                    let mut s = vec![f32::NEG_INFINITY; tk as usize];
                    for (kk, sv) in s.iter_mut().enumerate() {
                        let kj = k0 + kk as u32;
                        let ok = kj < seq && (!layout.causal() || kj <= qi) && e.rows.attends(r, bs);
                        if ok {
                            let qrow = &q[qi_of(b, qi, h)..][..d];
                            let krow = &k[ki_of(b, kj, kvh)..][..d];
                            *sv = qrow.iter().zip(krow).map(|(x, y)| x * y).sum::<f32>() * scale_log2;
                        }
                    }
                    let r = r as usize;
                    let m_new = s.iter().copied().fold(m[r], f32::max);
                    if m_new == f32::NEG_INFINITY {
                        continue;
                    }
                    let alpha = (m[r] - m_new).exp2();
                    let a = &mut acc[r * d..][..d];
                    a.iter_mut().for_each(|x| *x *= alpha);
                    l[r] *= alpha;
                    for (kk, &sv) in s.iter().enumerate() {
                        if sv == f32::NEG_INFINITY {
                            continue;
                        }
                        let p = (sv - m_new).exp2();
                        l[r] += p;
                        let vrow = &v[ki_of(b, k0 + kk as u32, kvh)..][..d];
                        a.iter_mut().zip(vrow).for_each(|(x, y)| *x += p * y);
                    }
                    m[r] = m_new;
                }
            }
        }
        for r in 0..rows as usize {
            let qi = row0 + r as u32;
            let o = &mut out[qi_of(b, qi, h)..][..d];
            if l[r] > 0.0 {
                o.iter_mut().zip(&acc[r * d..][..d]).for_each(|(x, a)| *x = a / l[r]);
                lse[((b * h_n + h) * seq + qi) as usize] = (m[r] + l[r].log2()) * std::f32::consts::LN_2;
            }
        }
    }
    (out, lse)
}
