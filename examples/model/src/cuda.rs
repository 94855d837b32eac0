//! `CudaModel` and `CudaState` (feature `cuda`): the example transformer on a CUDA device, the twin of
//! [`Model`](crate::Model) and [`State`](crate::State) for the same [`ModelConfig`] and [`Weights`]: the
//! matmuls on cuBLAS (f16 operands, f32 accumulation; the residual stream f32, its adds fused into the
//! output projections), the model's own kernels (`shaders/cuda/model.cu`: embedding, RMSNorm, RoPE, SiLU
//! gate, argmax) through NVRTC, and the attention on s2attn's CUDA path: the prompt through the forward
//! op over the whole prompt, K/V into paged caches in CUDA memory by `KvCache::append_cuda` from the
//! fused QKV rows, each token by `Decode::run_cuda`. Everything of a token is enqueued on the context's
//! stream; the predicted id stays on the device for the next step's embedding lookup. f16 weights and
//! attention only.

use crate::config::ModelConfig;
use crate::prefill::{KeptOps, PrefillOps};
use crate::state::check_room;
use crate::weights::Weights;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use s2attn::cuda::{CudaContext, CudaTensor};
use s2attn::inference::{Decode, KvCache, KvCacheConfig, MemoryReport, SeqId};
use s2attn::{Context, CudaRows, DType};
use s2attn::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MODEL_CU: &str = include_str!("../shaders/cuda/model.cu");
/// Threads per block of the element-wise kernels (and `WG` of the reductions in `model.cu`).
const THREADS: u32 = 256;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn cuda_err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// The kernels of `model.cu`.
struct Kernels {
    embed: CudaFunction,
    rmsnorm: CudaFunction,
    rope: CudaFunction,
    swiglu: CudaFunction,
    argmax: CudaFunction,
}

impl Kernels {
    fn new(cuda: &CudaContext) -> Result<Self> {
        let (major, minor) = cuda.arch();
        let options = cudarc::nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "-std=c++17".into()],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(MODEL_CU, options)
            .map_err(|e| Error::Cuda(format!("compiling the model's kernels: {e}")))?;
        let module = cuda.cudarc().load_module(ptx).map_err(cuda_err("loading the model's kernels"))?;
        let f = |name: &str| module.load_function(name).map_err(cuda_err("finding a model kernel"));
        Ok(Self {
            embed: f("embed")?,
            rmsnorm: f("rmsnorm")?,
            rope: f("rope")?,
            swiglu: f("swiglu")?,
            argmax: f("argmax")?,
        })
    }
}

/// One layer's weights (f16 bits; matrices row-major `[in, out]`).
struct CudaLayer {
    attn_norm: CudaSlice<u16>,
    wqkv: CudaSlice<u16>,
    wo: CudaSlice<u16>,
    mlp_norm: CudaSlice<u16>,
    wgu: CudaSlice<u16>,
    wdown: CudaSlice<u16>,
}

/// The example transformer on a CUDA device: see the module docs.
pub struct CudaModel {
    ctx: Context,
    cuda: CudaContext,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    config: ModelConfig,
    kernels: Kernels,
    embed: CudaSlice<u16>,
    layers: Vec<CudaLayer>,
    final_norm: CudaSlice<u16>,
    lm_head: CudaSlice<u16>,
    weight_bytes: u64,
    id: u64,
    prefill_ops: KeptOps,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel").field("config", &self.config).finish()
    }
}

/// Generation state of one sequence on a [`CudaModel`]: per layer a paged KV cache in CUDA memory and a
/// decode op, the token ids on the device and one token's activations.
pub struct CudaState {
    model_id: u64,
    max_seq_len: u32,
    /// Tokens in the KV caches; `ids[len]` is the next token (predicted, not yet fed).
    len: u32,
    caches: Vec<KvCache>,
    decodes: Vec<Decode>,
    seqs: Vec<SeqId>,
    ids: CudaSlice<u32>,
    /// One token's activations.
    act: Activations,
}

impl std::fmt::Debug for CudaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaState").field("len", &self.len).field("max_seq_len", &self.max_seq_len).finish()
    }
}

/// The MLP's buffers for `rows` rows.
struct Mlp {
    rows: u32,
    /// Normed rows `[rows, d_model]`.
    h: CudaSlice<u16>,
    /// Gate and up projections `[rows, 2 ffn]`.
    gu: CudaSlice<u16>,
    /// The gated rows `[rows, ffn]`.
    gated: CudaSlice<u16>,
}

/// Activation buffers for `rows` rows, the MLP's for fewer.
struct Activations {
    /// The residual stream `[rows, d_model]`, f32.
    x: CudaSlice<f32>,
    /// Normed rows `[rows, d_model]`.
    h: CudaSlice<u16>,
    /// Rotated Q, K, V `[rows, qkv_cols]`.
    qkv: CudaSlice<u16>,
    /// Attention output `[rows, heads * head_dim]`.
    attn: CudaSlice<u16>,
    /// The attention's LSE `[heads, rows]`.
    lse: CudaSlice<f32>,
    /// The last position's logits.
    logits: CudaSlice<f32>,
    mlp: Mlp,
}

impl Activations {
    fn new(stream: &Arc<CudaStream>, c: &ModelConfig, rows: u32, mlp_rows: u32) -> Result<Self> {
        let (r, m) = (rows as usize, mlp_rows as usize);
        let (d, q, f) = (c.d_model as usize, (c.heads * c.head_dim) as usize, c.ffn as usize);
        let oom = cuda_err("allocating the model's activations");
        Ok(Self {
            x: stream.alloc_zeros(r * d).map_err(&oom)?,
            h: stream.alloc_zeros(r * d).map_err(&oom)?,
            qkv: stream.alloc_zeros(r * c.qkv_cols() as usize).map_err(&oom)?,
            attn: stream.alloc_zeros(r * q).map_err(&oom)?,
            lse: stream.alloc_zeros(r * c.heads as usize).map_err(&oom)?,
            logits: stream.alloc_zeros(c.vocab as usize).map_err(&oom)?,
            mlp: Mlp {
                rows: mlp_rows,
                h: stream.alloc_zeros(m * d).map_err(&oom)?,
                gu: stream.alloc_zeros(m * 2 * f).map_err(&oom)?,
                gated: stream.alloc_zeros(m * f).map_err(&oom)?,
            },
        })
    }
}

/// The launch of an element-wise kernel over `n` items, grid-strided.
fn elementwise(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as u64).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
fn per_row(rows: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl CudaModel {
    /// A model with the given weights (a checkpoint's, or [`Weights::random`]) on the CUDA device of `ctx`;
    /// `config.weight_dtype` must be f16.
    pub fn from_weights(ctx: &Context, config: ModelConfig, weights: &Weights) -> Result<Self> {
        weights.check(&config)?;
        let cuda = ctx.cuda().ok_or_else(|| Error::Unsupported("CudaModel runs on a CUDA context".into()))?.clone();
        if config.weight_dtype != DType::F16 {
            return Err(Error::Unsupported(format!(
                "CudaModel stores f16 weights; the config asks for {}",
                config.weight_dtype
            )));
        }
        if config.prefill_dtype.is_some_and(|d| d != DType::F16) {
            return Err(Error::Unsupported("CudaModel runs its attention in f16".into()));
        }
        let stream = cuda.stream().clone();
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err("opening cuBLAS"))?;
        let kernels = Kernels::new(&cuda)?;
        let c = &config;
        let (d, v, f) = (c.d_model as usize, c.vocab as usize, c.ffn as usize);
        let q = (c.heads * c.head_dim) as usize;
        let mut weight_bytes = 0u64;
        let mut upload = |name: &'static str, values: &[f32], len: usize| -> Result<CudaSlice<u16>> {
            if values.len() != len {
                return Err(Error::Length {
                    tensor: name,
                    got: values.len(),
                    expected: len,
                    layout: "see ModelConfig and Weights".into(),
                });
            }
            let bits: Vec<u16> = values.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
            weight_bytes += 2 * len as u64;
            stream.clone_htod(&bits).map_err(cuda_err("uploading the weights"))
        };
        let embed = upload("embed", &weights.embed, v * d)?;
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(CudaLayer {
                    attn_norm: upload("attn_norm", &l.attn_norm, d)?,
                    wqkv: upload("wqkv", &l.wqkv, d * c.qkv_cols() as usize)?,
                    wo: upload("wo", &l.wo, q * d)?,
                    mlp_norm: upload("mlp_norm", &l.mlp_norm, d)?,
                    wgu: upload("wgu", &l.wgu, d * 2 * f)?,
                    wdown: upload("wdown", &l.wdown, f * d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = upload("final_norm", &weights.final_norm, d)?;
        let lm_head = upload("lm_head", &weights.lm_head, d * v)?;
        Ok(Self {
            ctx: ctx.clone(),
            cuda,
            stream,
            blas,
            config,
            kernels,
            embed,
            layers,
            final_norm,
            lm_head,
            weight_bytes,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            prefill_ops: KeptOps::default(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Storage type of the attention's Q/K/V and of the KV caches (f16).
    pub fn prefill_dtype(&self) -> DType {
        DType::F16
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// `y[y_row0.., :n] = x[x_row0.., :k] w` (plus what `y` held with `accumulate`) over `m` rows: `x` row-major
    /// `[_, k]` f16, `w` the row-major `[k, n]` f16 weights, `y` row-major `[_, n]` in f32 or f16 (its element
    /// type), f32 accumulation. Fails where a buffer is too small for its rows.
    #[allow(clippy::too_many_arguments)]
    fn matmul<Y>(
        &self,
        (m, n, k): (u32, u32, u32),
        x: &CudaSlice<u16>,
        x_row0: u32,
        w: &CudaSlice<u16>,
        y: &mut CudaSlice<Y>,
        y_row0: u32,
        accumulate: bool,
    ) -> Result<()> {
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        for (what, len, needed) in [
            ("matmul input", x.len(), (x_row0 as u64 + m64) * k64),
            ("matmul weights", w.len(), k64 * n64),
            ("matmul output", y.len(), (y_row0 as u64 + m64) * n64),
        ] {
            if (len as u64) < needed {
                return Err(Error::BufferTooSmall { tensor: what, got: len as u64, needed });
            }
        }
        let y_size = std::mem::size_of::<Y>() as u64;
        let f16 = blas_sys::cudaDataType::CUDA_R_16F;
        let y_type = match y_size {
            4 => blas_sys::cudaDataType::CUDA_R_32F,
            2 => f16,
            _ => return Err(Error::DType { tensor: "matmul output", expected: "f32 or f16", got: "another size" }),
        };
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        let (xp, _x) = x.device_ptr(&self.stream);
        let (wp, _w) = w.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        let (xp, yp) = (xp + x_row0 as u64 * k64 * 2, yp + y_row0 as u64 * n64 * y_size);
        // Row-major y = x w is column-major y^T = w^T x^T: cuBLAS sees w as n x k (ld n), x as k x m (ld k).
        // SAFETY: the three buffers were checked to hold the rows read and written; alpha and beta are host
        // f32 (the handle's default pointer mode); the guards order the stream's later work after the call.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                wp as *const _,
                f16,
                n as i32,
                xp as *const _,
                f16,
                k as i32,
                (&beta as *const f32).cast(),
                yp as *mut _,
                y_type,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cuda_err("a cuBLAS matmul"))
    }

    /// Where a layer's K and V rows sit in its fused QKV rows (for `KvCache::append_cuda`).
    fn kv_rows(&self) -> CudaRows {
        let c = &self.config;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        CudaRows { k_offset: q as u64, v_offset: (q + kv) as u64, token_stride: Some(c.qkv_cols() as u64) }
    }

    /// Plans and compiles the forward attention ops a prefill of `prompt_len` tokens on a fresh state runs
    /// (one per kind of layer), so that [`CudaModel::prefill`] then spends no time on them.
    pub fn prepare_prefill(&self, prompt_len: u32) -> Result<()> {
        self.prefill_ops(prompt_len).map(|_| ())
    }

    fn prefill_ops(&self, n: u32) -> Result<PrefillOps> {
        self.prefill_ops.get(&self.ctx, &self.config, DType::F16, n)
    }

    fn check_state(&self, state: &CudaState, tokens: u32) -> Result<()> {
        check_room(self.id, state.model_id, state.len, state.max_seq_len, tokens)
    }

    /// Enqueues the embedding of the `rows` ids from `ids[id0]` on into `x`.
    fn embed_rows(&self, ids: &CudaSlice<u32>, id0: u32, x: &mut CudaSlice<f32>, rows: u32) -> Result<()> {
        let d = self.config.d_model;
        let mut l = self.stream.launch_builder(&self.kernels.embed);
        l.arg(ids).arg(&id0).arg(&self.embed).arg(x).arg(&d);
        // SAFETY: `ids` holds id0 + rows ids below the vocabulary (checked on upload; argmax writes such),
        // `x` rows x d_model.
        unsafe { l.launch(per_row(rows)) }.map_err(cuda_err("launching embed"))?;
        Ok(())
    }

    /// RMSNorm of `rows` rows of `x` from row `row0` into `h`.
    fn norm(&self, x: &CudaSlice<f32>, row0: u32, w: &CudaSlice<u16>, h: &mut CudaSlice<u16>, rows: u32) -> Result<()> {
        let (d, eps) = (self.config.d_model, self.config.norm_eps);
        let mut l = self.stream.launch_builder(&self.kernels.rmsnorm);
        l.arg(x).arg(&row0).arg(w).arg(h).arg(&d).arg(&eps);
        // SAFETY: x holds row0 + rows rows, h rows rows, of d_model.
        unsafe { l.launch(per_row(rows)) }.map_err(cuda_err("launching rmsnorm"))?;
        Ok(())
    }

    /// The attention's input for the `rows` rows of the residual stream `x`: RMSNorm into `h`, the QKV
    /// projection into `qkv` and RoPE at positions `pos0..`.
    fn pre_attention(
        &self,
        layer: &CudaLayer,
        x: &CudaSlice<f32>,
        h: &mut CudaSlice<u16>,
        qkv: &mut CudaSlice<u16>,
        rows: u32,
        pos0: u32,
    ) -> Result<()> {
        let c = &self.config;
        let (d, cols) = (c.d_model, c.qkv_cols());
        self.norm(x, 0, &layer.attn_norm, h, rows)?;
        self.matmul((rows, cols, d), h, 0, &layer.wqkv, qkv, 0, false)?;
        let (heads, hd, theta) = (c.heads + c.kv_heads, c.head_dim, c.rope_theta);
        let mut l = self.stream.launch_builder(&self.kernels.rope);
        l.arg(qkv).arg(&rows).arg(&heads).arg(&hd).arg(&cols).arg(&pos0).arg(&theta);
        // SAFETY: qkv holds rows rows of cols >= heads x head_dim.
        unsafe { l.launch(elementwise(rows as u64 * heads as u64 * hd as u64 / 2)) }
            .map_err(cuda_err("launching rope"))?;
        Ok(())
    }

    /// The ops after the attention on `rows` rows from row `row0` (of both the residual stream `x` and the
    /// attention output `attn`): the output projection and the MLP (in `mlp`'s buffers), each added to
    /// the stream.
    fn post_attention(
        &self,
        layer: &CudaLayer,
        x: &mut CudaSlice<f32>,
        attn: &CudaSlice<u16>,
        row0: u32,
        rows: u32,
        mlp: &mut Mlp,
    ) -> Result<()> {
        let c = &self.config;
        let (d, q, f) = (c.d_model, c.heads * c.head_dim, c.ffn);
        if rows > mlp.rows {
            return Err(Error::Shape(format!("{rows} rows for MLP buffers of {}", mlp.rows)));
        }
        self.matmul((rows, d, q), attn, row0, &layer.wo, x, row0, true)?;
        self.norm(x, row0, &layer.mlp_norm, &mut mlp.h, rows)?;
        self.matmul((rows, 2 * f, d), &mlp.h, 0, &layer.wgu, &mut mlp.gu, 0, false)?;
        let mut l = self.stream.launch_builder(&self.kernels.swiglu);
        l.arg(&mlp.gu).arg(&mut mlp.gated).arg(&rows).arg(&f);
        // SAFETY: gu rows x 2f, gated rows x f.
        unsafe { l.launch(elementwise(rows as u64 * f as u64)) }.map_err(cuda_err("launching swiglu"))?;
        self.matmul((rows, d, f), &mlp.gated, 0, &layer.wdown, x, row0, true)
    }

    /// The final norm of residual row `row`, the LM head and the argmax into `ids[slot]`.
    fn predict(&self, act: &mut Activations, row: u32, ids: &mut CudaSlice<u32>, slot: u32) -> Result<()> {
        let c = &self.config;
        self.norm(&act.x, row, &self.final_norm, &mut act.h, 1)?;
        self.matmul((1, c.vocab, c.d_model), &act.h, 0, &self.lm_head, &mut act.logits, 0, false)?;
        let mut l = self.stream.launch_builder(&self.kernels.argmax);
        l.arg(&act.logits).arg(&c.vocab).arg(ids).arg(&slot);
        // SAFETY: logits holds vocab values, ids slot + 1 ids.
        unsafe { l.launch(per_row(1)) }.map_err(cuda_err("launching argmax"))?;
        Ok(())
    }

    /// Feeds `tokens` (the prompt, or more of it) and returns the greedy next token (also kept on the
    /// device for [`CudaModel::step`]). On a fresh state each layer's matmuls run over the whole prompt
    /// (the MLP in chunks of `prefill_chunk` rows) and its attention through the forward op; more prompt
    /// after earlier tokens runs token by token through the decode path.
    pub fn prefill(&self, state: &mut CudaState, tokens: &[u32]) -> Result<u32> {
        let n = self.config.check_prompt(tokens)?;
        self.check_state(state, n)?;
        let start = state.len as usize;
        let mut view = state.ids.slice_mut(start..start + tokens.len());
        self.stream.memcpy_htod(tokens, &mut view).map_err(cuda_err("uploading the prompt"))?;
        if start == 0 {
            self.prefill_forward(state, n)?;
        } else {
            for i in 0..n {
                self.token(state, i + 1 == n)?;
            }
        }
        self.read_id(state, state.len)
    }

    /// The whole-prompt forward of a fresh state over `n` tokens (ids uploaded).
    fn prefill_forward(&self, state: &mut CudaState, n: u32) -> Result<()> {
        let c = &self.config;
        let ops = self.prefill_ops(n)?;
        let (q, kv, cols) = (c.heads * c.head_dim, c.kv_heads * c.head_dim, c.qkv_cols());
        // The whole prompt's residual stream, QKV and attention output; the MLP's in chunks of rows (4x
        // wider).
        let chunk = c.prefill_chunk.clamp(1, n);
        let mut act = Activations::new(&self.stream, c, n, chunk)?;
        self.embed_rows(&state.ids, 0, &mut act.x, n)?;
        for (l, layer) in self.layers.iter().enumerate() {
            self.pre_attention(layer, &act.x, &mut act.h, &mut act.qkv, n, 0)?;
            state.caches[l].append_cuda(&[(state.seqs[l], n)], &act.qkv, &act.qkv, self.kv_rows())?;
            let op = ops
                .iter()
                .find(|(kind, _)| *kind == c.layers[l])
                .map(|(_, op)| op.clone())
                .ok_or_else(|| Error::Shape("a layer without its forward op".into()))?;
            {
                let (qp, _q) = act.qkv.device_ptr(&self.stream);
                let (out, _o) = act.attn.device_ptr_mut(&self.stream);
                let (lp, _l) = act.lse.device_ptr_mut(&self.stream);
                let view = |col: u32| CudaTensor::strided(qp + col as u64 * 2, cols as u64);
                let out = CudaTensor::new(out);
                // SAFETY: qkv holds n rows of cols (Q, K, V columns), attn n x q, lse heads x n f32.
                unsafe {
                    op.forward_cuda_raw(Some(self.stream.as_ref()), &view(0), &view(q), &view(q + kv), &out, lp)?
                };
            }
            let mut row0 = 0;
            while row0 < n {
                let rows = chunk.min(n - row0);
                self.post_attention(layer, &mut act.x, &act.attn, row0, rows, &mut act.mlp)?;
                row0 += rows;
            }
        }
        self.predict(&mut act, n - 1, &mut state.ids, n)?;
        state.act.logits = act.logits;
        state.len = n;
        Ok(())
    }

    /// Enqueues one token (the id at `ids[len]`) through every layer; with `predict`, its greedy successor
    /// into `ids[len + 1]`.
    fn token(&self, state: &mut CudaState, predict: bool) -> Result<()> {
        let c = &self.config;
        let pos = state.len;
        let q = c.heads * c.head_dim;
        let CudaState { caches, decodes, seqs, ids, act, .. } = state;
        self.embed_rows(ids, pos, &mut act.x, 1)?;
        for (l, layer) in self.layers.iter().enumerate() {
            self.pre_attention(layer, &act.x, &mut act.h, &mut act.qkv, 1, pos)?;
            caches[l].append_cuda(&[(seqs[l], 1)], &act.qkv, &act.qkv, self.kv_rows())?;
            // One row: its Q columns are contiguous.
            let q_view = act.qkv.slice(0..q as usize);
            decodes[l].run_cuda(&caches[l], &[seqs[l]], 1, &q_view, &mut act.attn, &mut act.lse)?;
            self.post_attention(layer, &mut act.x, &act.attn, 0, 1, &mut act.mlp)?;
        }
        if predict {
            self.predict(act, 0, ids, pos + 1)?;
        }
        state.len += 1;
        Ok(())
    }

    /// Reads `ids[at]` (after the enqueued work).
    fn read_id(&self, state: &CudaState, at: u32) -> Result<u32> {
        let mut out = [0u32];
        let view = state.ids.slice(at as usize..at as usize + 1);
        self.stream.memcpy_dtoh(&view, &mut out).map_err(cuda_err("reading the next token"))?;
        self.stream.synchronize().map_err(cuda_err("waiting for the model"))?;
        Ok(out[0])
    }

    /// Feeds the last predicted token and returns the next one.
    pub fn step(&self, state: &mut CudaState) -> Result<u32> {
        self.steps(state, 1)?;
        self.read_id(state, state.len)
    }

    /// `n` steps enqueued with no readback in between; returns the `n` tokens generated.
    pub fn generate(&self, state: &mut CudaState, n: u32) -> Result<Vec<u32>> {
        let first = state.len as usize + 1;
        self.steps(state, n)?;
        let mut out = vec![0u32; n as usize];
        let view = state.ids.slice(first..first + n as usize);
        self.stream.memcpy_dtoh(&view, &mut out).map_err(cuda_err("reading the generated tokens"))?;
        self.stream.synchronize().map_err(cuda_err("waiting for the model"))?;
        Ok(out)
    }

    fn steps(&self, state: &mut CudaState, n: u32) -> Result<()> {
        if state.len == 0 {
            return Err(Error::Shape("step: prefill a prompt first".into()));
        }
        self.check_state(state, n)?;
        for _ in 0..n {
            self.token(state, true)?;
        }
        Ok(())
    }

    /// The logits `[vocab]` of the last position fed.
    pub fn logits(&self, state: &CudaState) -> Result<Vec<f32>> {
        let out = self.stream.clone_dtoh(&state.act.logits).map_err(cuda_err("reading the logits"))?;
        self.stream.synchronize().map_err(cuda_err("waiting for the model"))?;
        Ok(out)
    }

    /// The CUDA context the model runs on.
    pub fn cuda(&self) -> &CudaContext {
        &self.cuda
    }
}

impl CudaState {
    /// A fresh state for one sequence of up to `max_seq_len` tokens (prompt and generated).
    pub fn new(model: &CudaModel, max_seq_len: u32) -> Result<Self> {
        let c = &model.config;
        if max_seq_len == 0 {
            return Err(Error::Shape("max_seq_len must be positive".into()));
        }
        let mut caches = Vec::with_capacity(c.layers.len());
        let mut decodes = Vec::with_capacity(c.layers.len());
        let mut seqs = Vec::with_capacity(c.layers.len());
        for i in 0..c.layers.len() {
            let config = KvCacheConfig::new(c.head_dim, DType::F16, max_seq_len);
            let mut cache = KvCache::new(&model.ctx, &c.layout(i)?, config)?;
            seqs.push(cache.add_sequence());
            decodes.push(Decode::new(&cache)?);
            caches.push(cache);
        }
        let stream = &model.stream;
        let ids = stream.alloc_zeros(max_seq_len as usize + 1).map_err(cuda_err("allocating the token ids"))?;
        Ok(Self {
            model_id: model.id,
            max_seq_len,
            len: 0,
            caches,
            decodes,
            seqs,
            ids,
            act: Activations::new(stream, c, 1, 1)?,
        })
    }

    /// Tokens fed so far.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether no token was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows of a prefill's MLP pass.
    pub fn prefill_rows(&self, model: &CudaModel) -> u32 {
        model.config.prefill_chunk.min(self.max_seq_len)
    }

    /// What each layer's KV cache holds against a dense cache.
    pub fn memory_report(&self) -> Vec<MemoryReport> {
        self.caches.iter().map(|c| c.memory_report()).collect()
    }
}
