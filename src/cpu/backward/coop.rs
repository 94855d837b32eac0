//! CPU twin of the cooperative-matrix backward kernels (`shaders/backward_coop_dq.wgsl`,
//! `shaders/backward_coop_dkdv.wgsl`): the same two passes over the same lists, the same skips of 16-row
//! slices, the same mask predicates (element masks only where a chunk or block needs them; rows outside a
//! row mask, past the end or without keys carry an LSE of +BIG in the dK/dV pass, so their P is 0), the
//! same clamped and zero-filled rows, and the same f16 roundings: P^T before `dV += P^T dO`, dS before
//! `dQ += dS K` and `dK += dS^T Q` (dS from the f32 P in the dQ pass, dS^T from the f16 P^T the dV subgroup
//! hands over in the dK/dV pass), the gradients on the way out. Sums are f32, as on the matrix units; only
//! their order differs from the kernels'.
//!
//! Its numbers model finite inputs. Where either kernel writes a non-finite gradient, its epilogue arms the
//! portable redo of both passes and the op returns the portable kernels' gradients instead
//! (`shaders/shared/coop_redo.wgsl`); the twin also says whether a kernel would, so that tests can check
//! that an unarmed result is IEEE's (the dK/dV pass takes a NaN LSE for a masked row, as the kernel does).
//!
//! Tests hold it against the f64 oracle at every tile the planner offers an H100, in CI
//! (tests/backward_coop_twin.rs); the GPU test holds the kernels against the oracle and this twin.

use super::BackwardInputs;
use crate::backward::Grads;
use crate::cpu::tiles::{tile_tasks, TileTask};
use crate::cpu::to_f16;
use crate::layout::Layout;
use crate::plan::{BackwardPlan, ColumnPlan, CoopTile, MergeQPlan, Shape, ROWMASK_BITS_FLAG};
use std::f32::consts::{LN_2, LOG2_E};

/// The kernels' "minus infinity" (`NEG_BIG`, shared/params.wgsl) and the LSE that zeroes P (`POS_BIG`).
const NEG_BIG: f32 = -3.0e38;
const POS_BIG: f32 = 3.0e38;
/// Rows (dQ pass) or keys (dK/dV pass) per subgroup matrix tile.
const SUB: u32 = 16;

/// What the two coop backward kernels were specialised with, as far as it changes the numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopBackward {
    /// dQ pass: query rows per workgroup and keys per chunk.
    pub dq: CoopTile,
    /// dK/dV pass: query rows per staged tile and keys per workgroup.
    pub dkdv: CoopTile,
}

impl CoopBackward {
    /// The kernels a coop [`BackwardPlan`] runs.
    pub fn of_plan(plan: &BackwardPlan) -> Self {
        let tile = |p: &crate::plan::DispatchPlan| CoopTile { tile_q: p.tile_q, tile_kv: p.tile_kv };
        Self { dq: tile(&plan.dq), dkdv: tile(&plan.dkdv) }
    }
}

fn dot(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, c)| a * c).sum()
}

/// Gradients as the coop kernels compute them: the dQ pass over `mergeq` (built for `kernels.dq.tile_q`),
/// which also computes `D = rowsum(dO * O)`, then the dK/dV pass over `columns` (built for
/// `kernels.dkdv.tile_q`). Inputs as the kernels' f16 storage holds them (rounded here); the gradients
/// come back rounded to f16, with whether a kernel's epilogue arms the portable redo (a gradient it writes
/// is non-finite).
pub fn backward_coop(
    layout: &Layout,
    shape: &Shape,
    kernels: &CoopBackward,
    mergeq: &MergeQPlan,
    columns: &ColumnPlan,
    x: &BackwardInputs<'_>,
) -> (Grads<f32>, bool) {
    let (batch, seq, d) = (shape.batch, shape.seq_len, shape.head_dim as usize);
    let (h_n, hk_n, bs, causal) = (layout.num_heads(), layout.num_kv_heads(), layout.block_size(), layout.causal());
    let group = h_n / hk_n;
    let scale_log2 = shape.softmax_scale() * LOG2_E;
    let scale = scale_log2 * LN_2;
    let r16 = |v: &[f32]| v.iter().map(|&a| to_f16(a)).collect::<Vec<f32>>();
    let (q, k, v, o, g) = (r16(x.q), r16(x.k), r16(x.v), r16(x.out), r16(x.d_out));
    let q_row = |b: u32, t: u32, h: u32| ((b * seq + t) * h_n + h) as usize * d;
    let kv_row = |b: u32, t: u32, h: u32| ((b * seq + t) * hk_n + h) as usize * d;
    let stat = |b: u32, h: u32, t: u32| ((b * h_n + h) * seq + t) as usize;
    // The forward's LSE in base 2, +BIG for rows without keys (lse_log2 in shared/coop_backward.wgsl).
    let lse2 = |b: u32, h: u32, t: u32| {
        let l = x.lse[stat(b, h, t)];
        if l <= NEG_BIG {
            POS_BIG
        } else {
            l * LOG2_E
        }
    };
    let mut delta = vec![0f32; x.lse.len()];
    for b in 0..batch {
        for h in 0..h_n {
            for t in 0..seq {
                delta[stat(b, h, t)] = dot(&g[q_row(b, t, h)..][..d], &o[q_row(b, t, h)..][..d]);
            }
        }
    }
    let mut grads = Grads { dq: vec![0f32; x.q.len()], dk: vec![0f32; x.k.len()], dv: vec![0f32; x.v.len()] };
    let mut redo = false;
    // A written gradient value, and whether it arms the redo.
    let mut write = |o: &mut f32, a: f32| {
        redo |= !a.is_finite();
        *o = to_f16(a);
    };

    // dQ pass: the forward's walk (shared/coop_chunks.wgsl); K and V rows past the end read as the last.
    let (bq, bk) = (kernels.dq.tile_q, kernels.dq.tile_kv);
    for TileTask { b, h, kv_head, pattern, tile, row0 } in tile_tasks(layout, mergeq, batch) {
        let row_last = (row0 + bq).min(seq) - 1;
        let mut acc = vec![0f32; bq as usize * d];
        for e in mergeq.tile(pattern, tile) {
            let word = e.rows.encode();
            for k0 in (0..bs / bk).map(|sub| e.kv_block * bs + sub * bk) {
                // The walk visits only chunks inside the sequence that some row may see (`next_chunk`).
                if k0 >= seq || (causal && k0 > row_last) {
                    continue;
                }
                let need_mask =
                    k0 + bk > seq || (causal && k0 + bk - 1 > row0) || word < bq || word >= ROWMASK_BITS_FLAG;
                for sg in 0..bq / SUB {
                    let sg_row0 = row0 + SUB * sg;
                    let sees = sg_row0 < seq && (!causal || k0 < sg_row0 + SUB) && e.rows.attends(SUB * sg, bs);
                    if !sees {
                        continue;
                    }
                    for r in SUB * sg..(SUB * (sg + 1)).min(seq - row0) {
                        let qi = row0 + r;
                        let (lse, dl) = (lse2(b, h, qi), delta[stat(b, h, qi)]);
                        let row_ok = e.rows.attends(r, bs);
                        let (qr, gr) = (&q[q_row(b, qi, h)..][..d], &g[q_row(b, qi, h)..][..d]);
                        let a = &mut acc[r as usize * d..][..d];
                        for kj in k0..k0 + bk {
                            let at = kv_row(b, kj.min(seq - 1), kv_head);
                            let (kr, vr) = (&k[at..][..d], &v[at..][..d]);
                            let mut p = (dot(qr, kr) * scale_log2 - lse).exp2();
                            if need_mask && !(row_ok && kj < seq && (!causal || kj <= qi)) {
                                p = 0.0;
                            }
                            let ds = to_f16(p * (dot(gr, vr) - dl));
                            a.iter_mut().zip(kr).for_each(|(x, &kv)| *x += ds * kv);
                        }
                    }
                }
            }
        }
        for r in 0..bq.min(seq - row0) {
            let out = &mut grads.dq[q_row(b, row0 + r, h)..][..d];
            out.iter_mut().zip(&acc[r as usize * d..][..d]).for_each(|(o, &a)| write(o, a * scale));
        }
    }

    // dK/dV pass: one KV tile of one KV head, its column list per query head of the group; K and V rows
    // past the end staged as zeros, Q and dO rows past it read as the last row (their LSE is +BIG).
    let (bq, bk) = (kernels.dkdv.tile_q, kernels.dkdv.tile_kv);
    for (b, kvh, kv_tile) in
        (0..batch).flat_map(|b| (0..hk_n).flat_map(move |h| (0..seq.div_ceil(bk)).map(move |t| (b, h, t))))
    {
        let k_start = kv_tile * bk;
        let (mut dk, mut dv) = (vec![0f32; bk as usize * d], vec![0f32; bk as usize * d]);
        let zeros = vec![0f32; d];
        let kv_at = |t: u32| if t < seq { kv_row(b, t, kvh) } else { usize::MAX };
        for h in kvh * group..(kvh + 1) * group {
            for e in columns.column(layout.pattern_of_head(h), k_start / bs) {
                let row0 = e.q_tile * bq;
                // The staged tile's LSE column: +BIG past the end, outside the row mask, without keys (or
                // NaN: the kernel's `lse > NEG_BIG` test fails there).
                let lse_s: Vec<f32> = (0..bq)
                    .map(|r| {
                        let t = row0 + r;
                        match t < seq && e.rows.attends(r, bs) {
                            true if x.lse[stat(b, h, t)] > NEG_BIG => x.lse[stat(b, h, t)] * LOG2_E,
                            _ => POS_BIG,
                        }
                    })
                    .collect();
                for key0 in (0..bk / SUB).map(|kt| k_start + SUB * kt) {
                    for q0 in (0..bq / SUB).map(|s| row0 + SUB * s) {
                        let live = key0 < seq && q0 < seq && (!causal || key0 <= (q0 + SUB - 1).min(seq - 1));
                        if !live {
                            continue;
                        }
                        let need_mask = key0 + SUB > seq || (causal && key0 + SUB - 1 > q0);
                        for kj in key0..key0 + SUB {
                            let at = kv_at(kj);
                            let (kr, vr) = if at == usize::MAX {
                                (&zeros[..], &zeros[..])
                            } else {
                                (&k[at..][..d], &v[at..][..d])
                            };
                            let c = (kj - k_start) as usize * d;
                            for qi in q0..q0 + SUB {
                                let qt = qi.min(seq - 1);
                                let (qr, gr) = (&q[q_row(b, qt, h)..][..d], &g[q_row(b, qt, h)..][..d]);
                                let mut p = (dot(kr, qr) * scale_log2 - lse_s[(qi - row0) as usize]).exp2();
                                if need_mask && !(kj < seq && (!causal || kj <= qi)) {
                                    p = 0.0;
                                }
                                // dS^T from the f16 P^T the dV subgroup hands to the dK one.
                                let p16 = to_f16(p);
                                let ds = to_f16(p16 * (dot(vr, gr) - delta[stat(b, h, qt)]));
                                dv[c..][..d].iter_mut().zip(gr).for_each(|(a, &y)| *a += p16 * y);
                                dk[c..][..d].iter_mut().zip(qr).for_each(|(a, &y)| *a += ds * y);
                            }
                        }
                    }
                }
            }
        }
        for kj in k_start..(k_start + bk).min(seq) {
            let at = kv_row(b, kj, kvh);
            let c = (kj - k_start) as usize * d;
            grads.dk[at..][..d].iter_mut().zip(&dk[c..][..d]).for_each(|(o, &a)| write(o, a * scale));
            grads.dv[at..][..d].iter_mut().zip(&dv[c..][..d]).for_each(|(o, &a)| write(o, a));
        }
    }
    (grads, redo)
}
