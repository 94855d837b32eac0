//! CPU twin of `shaders/forward_coop.wgsl`: the same walk over a MergeQ tile list in chunks of `tile_kv`
//! keys, every 16-row subgroup running every chunk (the kernel's straight-line chunk loop), the same mask
//! predicate (only chunks on the causal diagonal, at the sequence end or under a partial row mask are masked
//! element by element; that mask alone keeps out what a subgroup's rows do not see), the same lazy base-2
//! online softmax (the running max moves only past `tau`), P rounded to f16 before `O += P V`, O times
//! `1 / l` rounded to f16 on the way out. Scores and sums are f32, as on the matrix units; only the order of the
//! f32 additions differs from the kernel's.
//!
//! Its numbers model finite inputs. Where the kernel writes a non-finite O or LSE, or a row with an active
//! key ends with no positive sum, its epilogue arms the portable redo and the op returns the portable
//! kernel's result instead (`shaders/shared/coop_redo.wgsl`); the twin also says whether the kernel would,
//! so that tests can check that an unarmed result is IEEE's.
//!
//! Tests hold it against the f64 oracle on every tile the planner can choose, in CI
//! (tests/forward_coop_twin.rs), so that a walk or mask bug shows up without a matrix unit; the GPU test
//! holds the kernel against the oracle and against this twin.

use super::tiles::{tile_tasks, TileTask};
use super::to_f16;
use crate::layout::Layout;
use crate::plan::{CoopTile, MergeQPlan, Shape, COOP_TAU, ROWMASK_BITS_FLAG};

/// The kernel's initial running max (`NEG_BIG` in shared/params.wgsl; masked scores are a true -inf).
const NEG_BIG: f32 = -3.0e38;

/// What the kernel was specialised with, as far as it changes the numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CoopKernel {
    /// Query rows per workgroup (`BQ`) and keys per staged chunk (`BK`).
    pub tile: CoopTile,
    /// Lazy rescale threshold in log2 units (`TAU`): P stays below `2^tau`, so at most 15 keeps it
    /// finite in f16.
    pub tau: f32,
}

impl CoopKernel {
    /// The kernel as the planner builds it for `tile` (threshold [`COOP_TAU`]).
    pub fn new(tile: CoopTile) -> Self {
        Self { tile, tau: COOP_TAU }
    }
}

/// One query row's online softmax state: the lazy running max and the sum relative to it, base 2.
#[derive(Clone, Copy, Debug)]
struct RowState {
    m: f32,
    l: f32,
}

impl Default for RowState {
    fn default() -> Self {
        Self { m: NEG_BIG, l: 0.0 }
    }
}

impl RowState {
    /// One chunk of the row: the chunk's raw scores `s` (-inf where masked), P as f16 into `p`,
    /// the row's O accumulator `acc` rescaled when the max moved.
    fn softmax_chunk(&mut self, tau: f32, scale_log2: f32, s: &[f32], p: &mut [f32], acc: &mut [f32]) {
        // Raw scores, masked ones -inf; the scale applied to the max and in the exponent (the kernel fuses
        // that multiply-add: one f32 rounding apart).
        let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale_log2;
        let m_new = if mx > self.m + tau { mx } else { self.m };
        let alpha = (self.m - m_new).exp2();
        let mut sum = 0f32;
        for (pj, &sj) in p.iter_mut().zip(s) {
            let x = (sj * scale_log2 - m_new).exp2();
            sum += x;
            *pj = to_f16(x);
        }
        // The kernel rescales a subgroup's O when any of its rows moved, each row by its own alpha: exactly
        // 1 for the rows that did not (and O is still zero where l is).
        if m_new != self.m && self.l > 0.0 {
            acc.iter_mut().for_each(|x| *x *= alpha);
        }
        self.l = self.l * alpha + sum;
        self.m = m_new;
    }
}

/// Forward attention as the coop kernel computes it, over `mergeq` (built for `kernel.tile.tile_q`).
/// Inputs `[batch, seq, heads, head_dim]` (K and V with the layout's KV heads), rounded to f16 as the
/// kernel's storage holds them; returns `(out, lse)` as [`attention_reference`](super::attention_reference)
/// lays them out, `out` rounded to f16, and whether the kernel's epilogue arms the portable redo (some O
/// or LSE it writes is non-finite, or a row with an active key ends with no positive sum).
pub fn forward_coop(
    layout: &Layout,
    shape: &Shape,
    kernel: &CoopKernel,
    mergeq: &MergeQPlan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<f32>, bool) {
    let (batch, seq, d) = (shape.batch, shape.seq_len, shape.head_dim as usize);
    let (h_n, hk_n) = (layout.num_heads(), layout.num_kv_heads());
    let (bs, causal) = (layout.block_size(), layout.causal());
    let (tq, bk) = (kernel.tile.tile_q, kernel.tile.tile_kv);
    let scale_log2 = shape.softmax_scale() * std::f32::consts::LOG2_E;
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        q.iter().map(|&x| to_f16(x)).collect(),
        k.iter().map(|&x| to_f16(x)).collect(),
        v.iter().map(|&x| to_f16(x)).collect(),
    );
    let mut out = vec![0f32; (batch * seq * h_n) as usize * d];
    let mut lse = vec![f32::NEG_INFINITY; (batch * h_n * seq) as usize];
    // Rows past the sequence end are read as its last row (the kernel's clamped fetch); masked there.
    let kv_at = |b: u32, t: u32, h: u32| ((b * seq + t.min(seq - 1)) * hk_n + h) as usize * d;

    let (mut s, mut p) = (vec![0f32; bk as usize], vec![0f32; bk as usize]);
    let mut redo = false;
    for TileTask { b, h, kv_head: kvh, pattern, tile, row0 } in tile_tasks(layout, mergeq, batch) {
        let mut rows = vec![RowState::default(); tq as usize];
        let mut o = vec![0f32; tq as usize * d];
        for e in mergeq.tile(pattern, tile) {
            let word = e.rows.encode();
            for k0 in (0..bs / bk).map(|sub| e.kv_block * bs + sub * bk) {
                let need_mask =
                    k0 + bk > seq || (causal && k0 + bk - 1 > row0) || word < tq || word >= ROWMASK_BITS_FLAG;
                // Rows past the sequence end are computed by the kernel but never written.
                for r in 0..tq.min(seq - row0) {
                    let qi = row0 + r;
                    let qr = &q[((b * seq + qi) * h_n + h) as usize * d..][..d];
                    let row_ok = e.rows.attends(r, bs);
                    // Raw scores, masked (-inf) only where the chunk needs it.
                    for (sj, kj) in s.iter_mut().zip(k0..) {
                        *sj = if need_mask && !(row_ok && kj < seq && (!causal || kj <= qi)) {
                            f32::NEG_INFINITY
                        } else {
                            let kr = &k[kv_at(b, kj, kvh)..][..d];
                            qr.iter().zip(kr).map(|(a, c)| a * c).sum::<f32>()
                        };
                    }
                    let acc = &mut o[r as usize * d..][..d];
                    rows[r as usize].softmax_chunk(kernel.tau, scale_log2, &s, &mut p, acc);
                    for (j, &pj) in p.iter().enumerate() {
                        let vr = &v[kv_at(b, k0 + j as u32, kvh)..][..d];
                        acc.iter_mut().zip(vr).for_each(|(x, y)| *x += pj * y);
                    }
                }
            }
        }
        for (r, row) in rows.iter().enumerate().take(tq.min(seq - row0) as usize) {
            let qi = row0 + r as u32;
            let inv_l = if row.l > 0.0 { 1.0 / row.l } else { 0.0 };
            let dst = &mut out[((b * seq + qi) * h_n + h) as usize * d..][..d];
            for (x, a) in dst.iter_mut().zip(&o[r * d..][..d]) {
                redo |= !(a * inv_l).is_finite();
                *x = to_f16(a * inv_l);
            }
            if row.l > 0.0 {
                let at = ((b * h_n + h) * seq + qi) as usize;
                lse[at] = (row.m + row.l.log2()) * std::f32::consts::LN_2;
                redo |= !lse[at].is_finite();
            } else {
                // The row's active keys: inside the sequence, not after the row (causal), in its row mask.
                let lim = if causal { seq.min(qi + 1) } else { seq };
                let sees_a_key =
                    mergeq.tile(pattern, tile).iter().any(|e| e.kv_block * bs < lim && e.rows.attends(r as u32, bs));
                redo |= row.l.is_nan() || sees_a_key;
            }
        }
    }
    (out, lse, redo)
}
