//! The prefill of a fresh [`State`] through the library's forward kernels: layer by layer, the matmuls
//! run over the prompt in chunks of [`State::prefill_rows`] rows (the residual stream of the whole
//! prompt stays on the GPU, in windows of whole chunks that each fit one storage binding), each chunk's rotated Q/K/V are packed into whole-prompt tensors in the
//! attention op's storage type (f16 on tensor-core devices, as the paged caches) and its packed K/V rows
//! go into the layer's paged cache (`KvCache::append_encoded`), then one [`Attention`] pass covers the
//! whole prompt and the output projection and MLP run chunk by chunk again. The whole-prompt tensors live
//! for the call only.

use super::ops::{self, dispatch, elementwise, pass, Binder, Bound};
use super::state::{bind_layer, LayerOps, State};
use super::transformer::Model;
use crate::{LayerAttention, ModelConfig};
use s2attn::TensorView;
use s2attn::{Attention, Context, DType, Shape};
use s2attn::{Error, Result};
use std::sync::{Arc, Mutex};

/// A layer's pack (Q, K, V) and unpack (attention output) copies.
struct Casts {
    pack: [Bound; 3],
    unpack: Bound,
}

/// Prompt lengths whose forward ops a model keeps.
const KEPT_LENGTHS: usize = 4;

/// The forward ops of one prompt length, one per kind of layer (the layers of a kind share the layout).
pub(super) type PrefillOps = Vec<(LayerAttention, Arc<Attention>)>;

/// A model's prefill forward ops by prompt length, made on first use, the last few lengths kept (most
/// recently used last).
#[derive(Default)]
pub(super) struct KeptOps(Mutex<Vec<(u32, PrefillOps)>>);

impl KeptOps {
    /// The ops of `config`'s layers for a prompt of `n` tokens with Q/K/V in `dtype` on `ctx`.
    pub(super) fn get(&self, ctx: &Context, config: &ModelConfig, dtype: DType, n: u32) -> Result<PrefillOps> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = kept.iter().position(|(len, _)| *len == n) {
            let entry = kept.remove(pos);
            let ops = entry.1.clone();
            kept.push(entry);
            return Ok(ops);
        }
        let shape = Shape::new(1, n, config.head_dim, dtype);
        let mut ops: PrefillOps = Vec::new();
        for (l, kind) in config.layers.iter().enumerate() {
            if !ops.iter().any(|(k, _)| k == kind) {
                ops.push((*kind, Arc::new(Attention::new(ctx, &config.layout(l)?, shape)?)));
            }
        }
        if kept.len() >= KEPT_LENGTHS {
            kept.remove(0);
        }
        kept.push((n, ops.clone()));
        Ok(ops)
    }
}

impl Model {
    /// Plans and compiles the forward attention ops a prefill of `prompt_len` tokens on a fresh state
    /// runs (one per kind of layer), so that [`Model::prefill`] then spends no time on them; the model
    /// keeps the ops of the last few lengths.
    pub fn prepare_prefill(&self, prompt_len: u32) -> Result<()> {
        self.prefill_ops(prompt_len).map(|_| ())
    }

    /// The forward ops for `n` tokens, made on first use.
    fn prefill_ops(&self, n: u32) -> Result<PrefillOps> {
        self.prefill_ops.get(&self.ctx, &self.config, self.attention_dtype, n)
    }

    /// Runs the prompt `ids[0..n]` (already uploaded) through every layer, leaving the greedy next token
    /// in `ids[n]` and the logits of position `n - 1`; the caches then hold the prompt.
    pub(super) fn prefill_forward(&self, state: &mut State, n: u32) -> Result<()> {
        let (c, gpu) = (&self.config, &self.gpu);
        let dt = self.attention_dtype;
        let (d, q, kv, qkv_cols) = (c.d_model, c.heads * c.head_dim, c.kv_heads * c.head_dim, c.qkv_cols());
        let storage = wgpu::BufferUsages::STORAGE;
        let mk = |label: &'static str, bytes: u64| {
            gpu.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.next_multiple_of(4).max(16),
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let n64 = n as u64;
        // The residual stream in windows of whole chunks, each within one storage binding (a 128k prompt
        // of d_model 4096 in f32 is 2 GiB).
        let rows = state.rows;
        let row_bytes = d as u64 * 4;
        let chunks_per_window = (self.residual_window_bytes / (rows as u64 * row_bytes)).max(1);
        let window = (chunks_per_window * rows as u64).min(n64) as u32;
        let xs: Vec<wgpu::Buffer> = (0..n.div_ceil(window))
            .map(|i| mk("model prefill x", window.min(n - i * window) as u64 * row_bytes))
            .collect();
        let q_all = mk("model prefill q", n64 * q as u64 * dt.size());
        let k_all = mk("model prefill k", n64 * kv as u64 * dt.size());
        let v_all = mk("model prefill v", n64 * kv as u64 * dt.size());
        let o_all = mk("model prefill out", n64 * q as u64 * dt.size());
        let lse = mk("model prefill lse", n64 * c.heads as u64 * 4);

        // Bound ops on a params buffer of their own: per window an embedding and per layer 12 (both
        // matmul modes), per layer 4 copies, and the prediction's 3.
        let layers = c.layers.len();
        let params = ops::params_buffer(gpu, 3 + 4 * layers + xs.len() * (1 + 12 * layers));
        let p = &self.pipelines;
        let b = &state.buffers;
        let mut binder = Binder::new(gpu, &params);
        let mut embeds = Vec::with_capacity(xs.len());
        let mut window_ops: Vec<Vec<LayerOps>> = Vec::with_capacity(xs.len());
        for x in &xs {
            embeds.push(binder.bind(&p.embed, &[&b.ids, &self.embed, x])?);
            window_ops.push(self.layers.iter().map(|w| bind_layer(&mut binder, self, w, x, b)).collect::<Result<_>>()?);
        }
        let mut casts: Vec<Casts> = Vec::with_capacity(layers);
        for _ in &self.layers {
            casts.push(Casts {
                pack: [
                    binder.bind(&p.pack, &[&b.qkv, &q_all])?,
                    binder.bind(&p.pack, &[&b.qkv, &k_all])?,
                    binder.bind(&p.pack, &[&b.qkv, &v_all])?,
                ],
                unpack: binder.bind(&p.unpack, &[&o_all, &b.attn])?,
            });
        }
        let last_x = xs.last().ok_or_else(|| Error::Shape("an empty prompt".into()))?;
        let final_norm = binder.bind(&p.norm, &[last_x, &self.final_norm, &b.last])?;
        let lm_head = binder.bind(p.matmul_for(0, c.vocab), &[&b.last, &self.lm_head, &b.logits])?;
        let argmax = binder.bind(&p.argmax, &[&b.logits, &b.ids])?;
        let mut staging = vec![0u32; ops::staging_words(binder.slots())];

        let attention = self.prefill_ops(n)?;

        // Chunks as (first row, rows, window, first row in the window): a window holds whole chunks.
        let chunks =
            || (0..n).step_by(rows as usize).map(move |r0| (r0, rows.min(n - r0), (r0 / window) as usize, r0 % window));
        let new_encoder = || gpu.device().create_command_encoder(&Default::default());
        let mut encoder = new_encoder();
        {
            let mut pass = pass(&mut encoder);
            for (i, embed) in embeds.iter().enumerate() {
                let (r0, m) = (i as u32 * window, window.min(n - i as u32 * window));
                let groups = elementwise(m as u64 * d as u64);
                dispatch(gpu, &mut pass, &mut staging, embed, &[m, d, r0, c.vocab], groups)?;
            }
        }
        for (l, casts) in casts.iter().enumerate() {
            for (r0, m, w, x_row) in chunks() {
                {
                    let mut pass = pass(&mut encoder);
                    self.encode_pre_attention(&mut pass, &mut staging, &window_ops[w][l], m, x_row, r0)?;
                    let [pq, pk, pv] = &casts.pack;
                    let pack = [(pq, q, 0), (pk, kv, q), (pv, kv, q + kv)];
                    for (op, cols, col0) in pack {
                        let copy = [m, cols, col0, qkv_cols, r0 * cols, cols];
                        let groups = elementwise(m as u64 * cols as u64 / 2);
                        dispatch(gpu, &mut pass, &mut staging, op, &copy, groups)?;
                    }
                }
                // The chunk's K/V rows, just packed in the caches' storage type.
                let k = TensorView::strided(&k_all, r0 as u64 * kv as u64, kv as u64);
                let v = TensorView::strided(&v_all, r0 as u64 * kv as u64, kv as u64);
                state.caches[l].append_encoded(&mut encoder, state.seqs[l], &k, &v, m)?;
                self.submit_with(&params, &staging, std::mem::replace(&mut encoder, new_encoder()));
            }
            let op = attention.iter().find(|(k, _)| *k == c.layers[l]).map(|(_, op)| op);
            let op = op.ok_or_else(|| Error::Device("the prefill attention op is missing".into()))?;
            let (qv, kv_, vv, ov) =
                (TensorView::new(&q_all), TensorView::new(&k_all), TensorView::new(&v_all), TensorView::new(&o_all));
            op.encode(&mut encoder, &qv, &kv_, &vv, &ov, (&lse, 0))?;
            for (r0, m, w, x_row) in chunks() {
                {
                    let mut pass = pass(&mut encoder);
                    let copy = [m, q, r0 * q, q, 0, q];
                    let groups = elementwise(m as u64 * q as u64 / 2);
                    dispatch(gpu, &mut pass, &mut staging, &casts.unpack, &copy, groups)?;
                    self.encode_post_attention(&mut pass, &mut staging, &window_ops[w][l], m, x_row)?;
                }
                self.submit_with(&params, &staging, std::mem::replace(&mut encoder, new_encoder()));
            }
        }
        let last_row = (n - 1) % window;
        let predict = [&final_norm, &lm_head, &argmax];
        self.encode_predict(&mut pass(&mut encoder), &mut staging, predict, last_row, n)?;
        self.submit_with(&params, &staging, encoder);
        state.len = n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! A prompt whose residual stream spans several windows gives the same logits and tokens as one in
    //! a single window.

    use crate::{Model, ModelConfig, State};
    use s2attn::{Backend, Context, ContextOptions, DType};

    /// A wgpu context (lavapipe in CI; the wgpu backend where the default is CUDA).
    fn context() -> Context {
        let ctx = Context::new().unwrap_or_else(|e| panic!("no GPU adapter (lavapipe in CI): {e}"));
        if ctx.wgpu().is_some() {
            return ctx;
        }
        let mut options = ContextOptions::from_env().unwrap_or_else(|e| panic!("{e}"));
        options.backend = Backend::Wgpu;
        Context::with_options(&options).unwrap_or_else(|e| panic!("no wgpu adapter: {e}"))
    }

    #[test]
    fn residual_windows_change_nothing() {
        let ctx = context();
        let mut config = ModelConfig::new(97, 64, 4, 2, 32, 2);
        config.weight_dtype = DType::F16;
        (config.ffn, config.block_size, config.local_blocks, config.vert_stride) = (96, 16, 1, 2);
        config.prefill_chunk = 8;
        let prompt: Vec<u32> = (0..45u32).map(|i| (i * 37 + 11) % 97).collect();
        let run = |window_rows: Option<u64>| {
            let mut model = Model::random(&ctx, config.clone(), 3).expect("model");
            if let Some(rows) = window_rows {
                model.residual_window_bytes = rows * config.d_model as u64 * 4;
            }
            let mut state = State::new(&model, 64).expect("state");
            let first = model.prefill(&mut state, &prompt).expect("prefill");
            let second = model.step(&mut state).expect("step");
            ((first, second), model.logits(&state).expect("logits"))
        };
        let whole = run(None);
        // Two chunks per window (windows of 16, 16 and 13 rows); and one row, which still takes a whole
        // chunk (six windows, the last of 5 rows).
        for rows in [16, 1] {
            let windowed = run(Some(rows));
            assert_eq!(windowed.0, whole.0, "tokens, windows of {rows} rows");
            let same = windowed.1.iter().zip(&whole.1).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "logits differ with windows of {rows} rows");
        }
    }
}
