//! The differential test's reference: plain f64 attention over a token mask computed straight from the S2
//! rule (or from the bits of a custom block mask), sharing no code with the library's layouts, index, plans
//! or kernels. Gradients are analytic (checked against finite differences by the test that uses them).
//!
//! Semantics, as every framework computes softmax attention in IEEE arithmetic: a query row with no
//! attended key gives O = 0 and LSE = -inf; every other row is `softmax(q k^T * scale) v` with NaN and
//! infinities propagating as the arithmetic takes them (a NaN in a Q row makes that row NaN; a NaN in a V
//! element makes that element NaN in every row that attends the key; +inf in a score makes the row NaN).

/// The attention pattern, as its definition states it.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// The S2 pattern: the last `local` blocks plus every `vert_stride`-th block, stripes offset per KV head
    /// (`(kv_block + kv_head * step + offset) % vert_stride == 0`, `step = max(1, vert_stride / heads)`).
    S2 {
        /// Tokens per block.
        block: u32,
        /// Local window in blocks (causal), own block included.
        local: u32,
        /// Stripe stride (1 = dense).
        vert_stride: u32,
        /// Every sparse head uses KV head 0's stripes.
        homo: bool,
        /// Added to every head's stripe phase.
        offset: u32,
        /// The last `dense_heads` KV heads attend everything.
        dense_heads: u32,
        /// `None`: causal; `Some((left, right))`: bidirectional window of `left` blocks back (own block
        /// included) and `right` ahead, stripes counted from the window's edges.
        bidirectional: Option<(u32, u32)>,
    },
    /// A block mask: `bits[(mask_head * q_blocks + qb) * kv_blocks + kb]`, query head `h` using mask head
    /// `h / (heads / mask_heads)`; causal masks also hide keys after the query.
    Mask { block: u32, mask_heads: u32, q_blocks: u32, kv_blocks: u32, causal: bool, bits: Vec<bool> },
}

impl Rule {
    /// Tokens per block.
    pub fn block(&self) -> u32 {
        match self {
            Rule::S2 { block, .. } | Rule::Mask { block, .. } => *block,
        }
    }

    /// Whether keys after the query are hidden.
    pub fn causal(&self) -> bool {
        match self {
            Rule::S2 { bidirectional, .. } => bidirectional.is_none(),
            Rule::Mask { causal, .. } => *causal,
        }
    }

    /// Whether query head `h` (of `heads`, `kv_heads` KV heads) at token `i` attends key token `j`.
    pub fn attends(&self, heads: u32, kv_heads: u32, h: u32, i: u32, j: u32) -> bool {
        if self.causal() && j > i {
            return false;
        }
        let (qb, kb) = (i / self.block(), j / self.block());
        match self {
            Rule::Mask { mask_heads, q_blocks, kv_blocks, bits, .. } => {
                let m = h / (heads / mask_heads);
                bits[((m * q_blocks + qb) * kv_blocks + kb) as usize]
            }
            Rule::S2 { local, vert_stride, homo, offset, dense_heads, bidirectional, .. } => {
                let kvh = h / (heads / kv_heads);
                if kvh >= kv_heads - dense_heads {
                    return true;
                }
                let step = (vert_stride / heads).max(1) as u64;
                let phase = if *homo { 0 } else { kvh as u64 } * step + *offset as u64;
                let stripe = |x: u32| (x as u64 + phase) % *vert_stride as u64 == 0;
                match bidirectional {
                    None => qb - kb < *local || stripe(kb),
                    Some((left, right)) => {
                        if kb <= qb {
                            qb - kb < *left || stripe(qb - kb - left + 1)
                        } else {
                            kb - qb <= *right || stripe(kb - qb - right)
                        }
                    }
                }
            }
        }
    }
}

/// One sequence's attention problem: `rows` query rows at absolute positions `pos` (ascending) over
/// `keys` key tokens; tensors `[rows or keys, heads or kv_heads, d]`.
pub struct Problem<'a> {
    pub rule: &'a Rule,
    pub heads: u32,
    pub kv_heads: u32,
    pub d: usize,
    pub scale: f64,
    pub pos: &'a [u32],
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// Forward result of one sequence: O `[rows, heads, d]`, LSE `[heads, rows]` (natural log).
pub struct Forward {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Gradients of one sequence, shaped like Q, K, V.
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

impl Problem<'_> {
    fn keys(&self) -> usize {
        self.k.len() / (self.kv_heads as usize * self.d)
    }

    fn qrow(&self, r: usize, h: usize) -> &[f32] {
        &self.q[(r * self.heads as usize + h) * self.d..][..self.d]
    }

    fn krow<'b>(&self, t: &'b [f32], j: usize, h: usize) -> &'b [f32] {
        let kvh = h / (self.heads / self.kv_heads) as usize;
        &t[(j * self.kv_heads as usize + kvh) * self.d..][..self.d]
    }

    /// The attended keys of row `r` of head `h` with their probabilities, or `None` for a row with no key.
    /// The probabilities follow IEEE arithmetic: NaN and infinities propagate.
    fn probs(&self, r: usize, h: usize) -> Option<(Vec<usize>, Vec<f64>, f64)> {
        let keys: Vec<usize> = (0..self.keys())
            .filter(|&j| self.rule.attends(self.heads, self.kv_heads, h as u32, self.pos[r], j as u32))
            .collect();
        if keys.is_empty() {
            return None;
        }
        let q = self.qrow(r, h);
        let s: Vec<f64> = keys
            .iter()
            .map(|&j| {
                let k = self.krow(self.k, j, h);
                q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * self.scale
            })
            .collect();
        // A NaN-propagating max: IEEE `max` would drop a NaN.
        let m = s.iter().fold(f64::NEG_INFINITY, |m, &x| if x.is_nan() || m.is_nan() { f64::NAN } else { m.max(x) });
        let e: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
        let l: f64 = e.iter().sum();
        let p = e.iter().map(|&x| x / l).collect();
        Some((keys, p, m + l.ln()))
    }

    /// O and LSE.
    pub fn forward(&self) -> Forward {
        let (rows, h_n, d) = (self.pos.len(), self.heads as usize, self.d);
        let mut out = vec![0f64; rows * h_n * d];
        let mut lse = vec![f64::NEG_INFINITY; h_n * rows];
        for r in 0..rows {
            for h in 0..h_n {
                let Some((keys, p, l)) = self.probs(r, h) else { continue };
                let o = &mut out[(r * h_n + h) * d..][..d];
                for (&j, &pj) in keys.iter().zip(&p) {
                    for (acc, &x) in o.iter_mut().zip(self.krow(self.v, j, h)) {
                        *acc += pj * x as f64;
                    }
                }
                lse[h * rows + r] = l;
            }
        }
        Forward { out, lse }
    }

    /// dQ, dK, dV of `sum(d_out * O)`: dS = P (dP - D) with D = rowsum(dO * O), dQ = scale dS K,
    /// dK = scale dS^T Q, dV = P^T dO, summed over each KV head's query heads.
    pub fn backward(&self, d_out: &[f32]) -> Grads {
        let (rows, h_n, d) = (self.pos.len(), self.heads as usize, self.d);
        let group = (self.heads / self.kv_heads) as usize;
        let fwd = self.forward();
        let mut g = Grads { dq: vec![0f64; self.q.len()], dk: vec![0f64; self.k.len()], dv: vec![0f64; self.v.len()] };
        for r in 0..rows {
            for h in 0..h_n {
                let Some((keys, p, _)) = self.probs(r, h) else { continue };
                let dor = &d_out[(r * h_n + h) * d..][..d];
                let o = &fwd.out[(r * h_n + h) * d..][..d];
                let delta: f64 = dor.iter().zip(o).map(|(&a, &b)| a as f64 * b).sum();
                for (&j, &pj) in keys.iter().zip(&p) {
                    let vj = self.krow(self.v, j, h);
                    let dp: f64 = dor.iter().zip(vj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let ds = pj * (dp - delta);
                    let kv = (j * self.kv_heads as usize + h / group) * d;
                    let kj = self.krow(self.k, j, h);
                    let qr = self.qrow(r, h);
                    for c in 0..d {
                        g.dq[(r * h_n + h) * d + c] += self.scale * ds * kj[c] as f64;
                        g.dk[kv + c] += self.scale * ds * qr[c] as f64;
                        g.dv[kv + c] += pj * dor[c] as f64;
                    }
                }
            }
        }
        g
    }
}
