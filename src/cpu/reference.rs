//! The oracle: plain f64 attention over the dense element mask derived from a [`Layout`].

use crate::layout::Layout;

/// Output of the oracle.
#[derive(Clone, Debug)]
pub struct Reference {
    /// `[batch, seq, heads, head_dim]`.
    pub out: Vec<f64>,
    /// Natural-log log-sum-exp of the scaled scores, `[batch, heads, seq]`; `-inf` for rows with no key.
    pub lse: Vec<f64>,
}

/// Dense f64 attention for `q`, `k`, `v` in `[batch, seq, heads(or kv_heads), head_dim]` layout, masked
/// by `layout` element by element. Rows with no active key give zeros and `lse = -inf`.
#[allow(clippy::too_many_arguments)] // the problem's sizes and tensors, as every caller holds them
pub fn attention_reference(
    layout: &Layout,
    batch: u32,
    seq_len: u32,
    head_dim: u32,
    scale: f64,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Reference {
    let (b_n, s_n, h_n, hk_n, d_n) = (
        batch as usize,
        seq_len as usize,
        layout.num_heads() as usize,
        layout.num_kv_heads() as usize,
        head_dim as usize,
    );
    let group = h_n / hk_n;
    let mut out = vec![0f64; b_n * s_n * h_n * d_n];
    let mut lse = vec![f64::NEG_INFINITY; b_n * h_n * s_n];
    let mut scores = vec![0f64; s_n];
    for b in 0..b_n {
        for h in 0..h_n {
            let kvh = h / group;
            let pattern = layout.pattern_of_head(h as u32);
            for i in 0..s_n {
                let qrow = &q[((b * s_n + i) * h_n + h) * d_n..][..d_n];
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = f64::NEG_INFINITY;
                    if layout.element_active(pattern, i as u32, j as u32) {
                        let krow = &k[((b * s_n + j) * hk_n + kvh) * d_n..][..d_n];
                        let dot: f64 = qrow.iter().zip(krow).map(|(&a, &c)| a as f64 * c as f64).sum();
                        *s = dot * scale;
                        max = max.max(*s);
                    }
                }
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let o = &mut out[((b * s_n + i) * h_n + h) * d_n..][..d_n];
                let mut sum = 0f64;
                for (j, &s) in scores.iter().enumerate() {
                    if s == f64::NEG_INFINITY {
                        continue;
                    }
                    let p = (s - max).exp();
                    sum += p;
                    let vrow = &v[((b * s_n + j) * hk_n + kvh) * d_n..][..d_n];
                    for (acc, &x) in o.iter_mut().zip(vrow) {
                        *acc += p * x as f64;
                    }
                }
                o.iter_mut().for_each(|x| *x /= sum);
                lse[(b * h_n + h) * s_n + i] = max + sum.ln();
            }
        }
    }
    Reference { out, lse }
}

/// ‖got − want‖ / ‖want‖ over the finite entries of `want`. Non-finite entries (the `-inf` LSE of a row
/// with no key) must match exactly; a NaN, a mismatched non-finite value or a length mismatch gives
/// `f64::INFINITY`.
pub fn rel_l2_error(got: impl IntoIterator<Item = f64>, want: &[f64]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    let mut got = got.into_iter();
    for &w in want {
        let Some(g) = got.next() else {
            return f64::INFINITY;
        };
        if !g.is_finite() || !w.is_finite() {
            if g != w {
                return f64::INFINITY;
            }
            continue;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if got.next().is_some() {
        return f64::INFINITY;
    }
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}
