//! The oracle checks of `s2attn-bench`: each configuration runs once at a small size (`--check-seq`
//! tokens) on fresh random inputs and is compared with the library's f64 oracle in `s2attn::cpu`. The
//! reported error is the largest relative L2 error over what the mode returns:
//! - `fwd`: O and the LSE ([`attention_reference`]);
//! - `fwd+bwd`: O, the LSE, dQ, dK and dV (the forward, then the backward on the forward's O and LSE with a
//!   random dO, against [`attention_backward_reference`]);
//! - `decode`: O and the LSE of the last token of up to two sequences decoded from a [`KvCache`] holding
//!   their histories ([`varlen_reference`], queries at the end of their KV history).
//!
//! An oracle (inputs and reference answer) is built once per configuration and reused on every device.

use crate::data::{random, sets, widen, widen64, Sample, Set};
use s2attn::cpu::{attention_backward_reference, attention_reference, rel_l2_error, varlen_reference, Reference};
use s2attn::{Attention, AttentionGrad, Context, Decode, Grads, KvCache, KvCacheConfig, Layout, SeqLens, Shape};

/// The sizes of a checked problem.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Sequences (forward: batch; decode: sequences decoded at once).
    pub batch: u32,
    /// Tokens per sequence (decode: the KV history).
    pub seq: u32,
    /// Features per head.
    pub head_dim: u32,
    /// Storage type.
    pub dtype: s2attn::DType,
}

impl Dims {
    fn shape(&self) -> Shape {
        Shape::new(self.batch, self.seq, self.head_dim, self.dtype)
    }
    fn elems(&self, layout: &Layout) -> (usize, usize) {
        let tokens = self.batch as usize * self.seq as usize * self.head_dim as usize;
        (tokens * layout.num_heads() as usize, tokens * layout.num_kv_heads() as usize)
    }
}

fn msg(e: s2attn::Error) -> String {
    e.to_string()
}

/// Inputs of a forward or forward+backward check and the oracle's answers.
pub struct PassOracle<T> {
    /// `[q, k, v]`, plus `d_out` when `grads` is set.
    x: Set<T>,
    fwd: Reference,
    grads: Option<Grads<f64>>,
}

impl<T: Sample> PassOracle<T> {
    /// Fresh inputs for `layout` at `dims` and the oracle's O and LSE (and gradients when `backward`).
    pub fn new(layout: &Layout, dims: &Dims, backward: bool, seed: u64) -> Self {
        let (nq, nkv) = dims.elems(layout);
        let lens: &[usize] = if backward { &[nq, nkv, nkv, nq] } else { &[nq, nkv, nkv] };
        let x = sets::<T>(1, lens, seed).remove(0);
        let w: Vec<Vec<f32>> = x.iter().map(|t| widen(t)).collect();
        let scale = 1.0 / (dims.head_dim as f64).sqrt();
        let fwd = attention_reference(layout, dims.batch, dims.seq, dims.head_dim, scale, &w[0], &w[1], &w[2]);
        let grads = backward.then(|| attention_backward_reference(layout, &dims.shape(), &w[0], &w[1], &w[2], &w[3]));
        Self { x, fwd, grads }
    }

    /// Runs the forward (and the backward when the oracle has gradients) on `ctx` and returns the largest
    /// relative error.
    pub fn error(&self, ctx: &Context, layout: &Layout, dims: &Dims) -> Result<f64, String> {
        let op = Attention::new(ctx, layout, dims.shape()).map_err(msg)?;
        let [q, k, v] = [&self.x[0], &self.x[1], &self.x[2]];
        let out = op.forward(q, k, v).map_err(msg)?;
        let mut err = rel_l2_error(widen64(&out.out), &self.fwd.out)
            .max(rel_l2_error(out.lse.iter().map(|&x| x as f64), &self.fwd.lse));
        if let Some(want) = &self.grads {
            let grad = AttentionGrad::new(ctx, layout, dims.shape()).map_err(msg)?;
            let got = grad.backward(q, k, v, &out.out, &out.lse, &self.x[3]).map_err(msg)?;
            for (g, w) in [(&got.dq, &want.dq), (&got.dk, &want.dk), (&got.dv, &want.dv)] {
                err = err.max(rel_l2_error(widen64(g), w));
            }
        }
        Ok(err)
    }
}

/// Inputs of a decode check and the oracle's answer for the last token of each sequence.
pub struct DecodeOracle<T> {
    /// `[sequences, heads, head_dim]`: the last token's queries.
    q: Vec<T>,
    /// `[sequences * seq, kv_heads, head_dim]` each.
    k: Vec<T>,
    v: Vec<T>,
    /// O `[sequences, heads, head_dim]`.
    out: Vec<f64>,
    /// LSE reordered to the decode op's `[sequences, heads]`.
    lse: Vec<f64>,
}

impl<T: Sample> DecodeOracle<T> {
    /// Fresh histories of `dims.seq` tokens for `dims.batch` sequences and the oracle's last rows.
    pub fn new(layout: &Layout, dims: &Dims, seed: u64) -> Result<Self, String> {
        let (b, s, d) = (dims.batch as usize, dims.seq as usize, dims.head_dim as usize);
        let (h, hk) = (layout.num_heads() as usize, layout.num_kv_heads() as usize);
        let q = random::<T>(b * h * d, seed);
        let k = random::<T>(b * s * hk * d, seed.wrapping_add(1));
        let v = random::<T>(b * s * hk * d, seed.wrapping_add(2));
        let cu_q: Vec<u32> = (0..=dims.batch).collect();
        let cu_k: Vec<u32> = (0..=dims.batch).map(|i| i * dims.seq).collect();
        let lens = SeqLens::new(&cu_q, &cu_k).map_err(msg)?;
        let scale = 1.0 / (dims.head_dim as f64).sqrt();
        let r = varlen_reference(layout, &lens, dims.head_dim, scale, &widen(&q), &widen(&k), &widen(&v));
        // The oracle's LSE is [heads, total_q]; the decode op's [sequences, heads, 1].
        let lse = (0..b * h).map(|i| r.lse[(i % h) * b + i / h]).collect();
        Ok(Self { q, k, v, out: r.out, lse })
    }

    /// Appends the histories to a fresh [`KvCache`] on `ctx`, decodes the last token of every sequence,
    /// and returns the larger relative error of O and the LSE.
    pub fn error(&self, ctx: &Context, layout: &Layout, dims: &Dims) -> Result<f64, String> {
        let config = KvCacheConfig::new(dims.head_dim, dims.dtype, dims.seq).sequences(dims.batch);
        let mut cache = KvCache::new(ctx, layout, config).map_err(msg)?;
        let per_seq = self.k.len() / dims.batch as usize;
        let mut seqs = Vec::new();
        for i in 0..dims.batch as usize {
            let id = cache.add_sequence();
            let r = i * per_seq..(i + 1) * per_seq;
            cache.append(id, &self.k[r.clone()], &self.v[r]).map_err(msg)?;
            seqs.push(id);
        }
        let out = Decode::new(&cache).and_then(|op| op.run(&cache, &seqs, &self.q)).map_err(msg)?;
        Ok(rel_l2_error(widen64(&out.out), &self.out).max(rel_l2_error(out.lse.iter().map(|&x| x as f64), &self.lse)))
    }
}
