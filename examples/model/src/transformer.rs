//! `Model`: the example transformer's weights on the GPU and its compiled kernels; generation state lives
//! in a [`State`](super::State) (KV caches and activations), so one model serves several states.

use super::config::ModelConfig;
use super::ops::Pipelines;
use super::prefill::KeptOps;
use super::weights::Weights;
use s2attn::gpu::WgpuContext;
use s2attn::Context;
use s2attn::DType;
use s2attn::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use wgpu::util::DeviceExt;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Elements the rows of a matmul's weights are padded to a multiple of (`ROW_ALIGN` of
/// `shaders/weights.wgsl`): whole 16-byte words in f16 and in f32.
const ROW_ALIGN: u64 = 8;

/// One layer's weight buffers.
pub(super) struct LayerBuffers {
    pub attn_norm: wgpu::Buffer,
    pub wqkv: wgpu::Buffer,
    pub wo: wgpu::Buffer,
    pub mlp_norm: wgpu::Buffer,
    pub wgu: wgpu::Buffer,
    pub wdown: wgpu::Buffer,
}

/// A decoder-only transformer on the GPU: see the [module docs](super).
pub struct Model {
    pub(super) ctx: Context,
    pub(super) gpu: WgpuContext,
    pub(super) config: ModelConfig,
    pub(super) pipelines: Pipelines,
    /// Storage type of the attention's Q/K/V (the prefill's forward op, the KV caches, the decode
    /// kernels; see [`ModelConfig::prefill_dtype`]).
    pub(super) attention_dtype: DType,
    pub(super) embed: wgpu::Buffer,
    pub(super) layers: Vec<LayerBuffers>,
    pub(super) final_norm: wgpu::Buffer,
    pub(super) lm_head: wgpu::Buffer,
    weight_bytes: u64,
    pub(super) id: u64,
    /// Forward ops of the prefill by prompt length.
    pub(super) prefill_ops: KeptOps,
    /// Most bytes of one window of the prefill's residual stream (a storage binding's limit).
    pub(super) residual_window_bytes: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("config", &self.config).finish()
    }
}

impl Model {
    /// A model with weights from a seeded generator ([`Weights::random`]).
    pub fn random(ctx: &Context, config: ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let weights = Weights::random(&config, seed);
        Self::from_weights(ctx, config, &weights)
    }

    /// A model with the given weights (stored in `config.weight_dtype`).
    pub fn from_weights(ctx: &Context, config: ModelConfig, weights: &Weights) -> Result<Self> {
        weights.check(&config)?;
        let gpu = ctx.wgpu().ok_or_else(|| Error::Unsupported("the model runs on a wgpu device".into()))?.clone();
        let attention_dtype =
            config.prefill_dtype.unwrap_or(if gpu.caps().coop_f16_16x16 { DType::F16 } else { DType::F32 });
        let pipelines = Pipelines::new(&gpu, config.weight_dtype, attention_dtype)?;
        let mut weight_bytes = 0;
        let mut upload = |name: &'static str, values: &[f32], shape: Tensor| -> Result<wgpu::Buffer> {
            let buffer = upload_weights(&gpu, config.weight_dtype, name, values, shape)?;
            weight_bytes += buffer.size();
            Ok(buffer)
        };
        let c = &config;
        let (d, v, f) = (c.d_model as u64, c.vocab as u64, c.ffn as u64);
        let q = (c.heads * c.head_dim) as u64;
        let embed = upload("embed", &weights.embed, Tensor::Table(v, d))?;
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(LayerBuffers {
                    attn_norm: upload("attn_norm", &l.attn_norm, Tensor::Table(1, d))?,
                    wqkv: upload("wqkv", &l.wqkv, Tensor::Matrix(d, c.qkv_cols() as u64))?,
                    wo: upload("wo", &l.wo, Tensor::Matrix(q, d))?,
                    mlp_norm: upload("mlp_norm", &l.mlp_norm, Tensor::Table(1, d))?,
                    wgu: upload("wgu", &l.wgu, Tensor::Matrix(d, 2 * f))?,
                    wdown: upload("wdown", &l.wdown, Tensor::Matrix(f, d))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = upload("final_norm", &weights.final_norm, Tensor::Table(1, d))?;
        let lm_head = upload("lm_head", &weights.lm_head, Tensor::Matrix(d, v))?;
        let residual_window_bytes = gpu.caps().max_storage_binding;
        Ok(Self {
            ctx: ctx.clone(),
            gpu,
            config,
            pipelines,
            attention_dtype,
            embed,
            layers,
            final_norm,
            lm_head,
            weight_bytes,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            prefill_ops: KeptOps::default(),
            residual_window_bytes,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Storage type of the attention's Q/K/V: the prefill's forward op, the KV caches' K and V, and the
    /// decode kernels' Q and output.
    pub fn prefill_dtype(&self) -> DType {
        self.attention_dtype
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
}

/// The shape of a weight tensor, `(rows, columns)`, and how the kernels read it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Tensor {
    /// Rows stored back to back (embeddings, norm weights).
    Table(u64, u64),
    /// A matmul's `[K, N]`: rows padded to whole 16-byte words ([`ROW_ALIGN`] elements).
    Matrix(u64, u64),
}

/// A storage buffer of `values` (`shape`, row-major) in `dtype` as `shaders/weights.wgsl` reads them:
/// f32 bits or pairs of f16 per 32-bit word, matrix rows padded with zeros to [`ROW_ALIGN`] elements,
/// the whole padded to 16-byte words.
pub(super) fn upload_weights(
    gpu: &WgpuContext,
    dtype: DType,
    name: &'static str,
    values: &[f32],
    shape: Tensor,
) -> Result<wgpu::Buffer> {
    let (rows, cols, stride) = match shape {
        Tensor::Table(rows, cols) => (rows, cols, cols),
        Tensor::Matrix(rows, cols) => (rows, cols, cols.next_multiple_of(ROW_ALIGN)),
    };
    if values.len() as u64 != rows * cols {
        return Err(Error::Length {
            tensor: name,
            got: values.len(),
            expected: (rows * cols) as usize,
            layout: "see ModelConfig and Weights".into(),
        });
    }
    let es = if dtype == DType::F16 { 2 } else { 4 };
    let max = gpu.caps().max_storage_binding;
    let size = (rows * stride * es).next_multiple_of(16).max(16);
    if size > max {
        return Err(Error::DeviceLimit {
            what: format!("the {name} weights"),
            limit: "max_storage_buffer_binding_size",
            needed: size,
            max,
        });
    }
    // Rows padded to `stride` elements, the whole to `size` bytes; converted in parallel in runs of rows
    // (a 7B model's weights are billions of values).
    fn padded<T: bytemuck::Pod + Default + Send>(
        values: &[f32],
        cols: u64,
        stride: u64,
        len: u64,
        f: fn(f32) -> T,
    ) -> Vec<T> {
        let mut out = vec![T::default(); len as usize];
        let rows = values.len() / cols.max(1) as usize;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let run = rows.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let src = values.chunks(run * cols as usize);
            for (dst, src) in out.chunks_mut(run * stride as usize).zip(src) {
                s.spawn(move || {
                    for (row, dst) in src.chunks(cols as usize).zip(dst.chunks_mut(stride as usize)) {
                        for (d, &v) in dst.iter_mut().zip(row) {
                            *d = f(v);
                        }
                    }
                });
            }
        });
        out
    }
    let (halves, words);
    let bytes: &[u8] = match dtype {
        DType::F16 => {
            halves = padded(values, cols, stride, size / 2, half::f16::from_f32);
            bytemuck::cast_slice(&halves)
        }
        _ => {
            words = padded(values, cols, stride, size / 4, |v| v);
            bytemuck::cast_slice(&words)
        }
    };
    Ok(gpu.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(name),
        contents: bytes,
        usage: wgpu::BufferUsages::STORAGE,
    }))
}
