//! `ModelConfig`: the shape of the example decoder-only transformer and which attention each layer runs.

use s2attn::DType;
use s2attn::{Error, Result};
use s2attn::{Layout, S2Config};

/// The attention a layer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttention {
    /// Causal dense attention over the whole history (the cache keeps every page).
    Dense,
    /// S2 attention: each KV head keeps its local window and its vertical stripes.
    S2,
}

/// Which layers of a hybrid model run dense attention (the others run S2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseLayers {
    /// None: every layer S2.
    None,
    /// Layer 0 only (the paper's recommended hybrid).
    First,
    /// Layers `phase`, `phase + period`, `phase + 2 period`, ... (Phi-3-small: `period` 2, `phase` 1, dense
    /// attention on every other layer).
    Every {
        /// Layers from one dense layer to the next (positive).
        period: u32,
        /// The first dense layer (below `period`).
        phase: u32,
    },
    /// Every layer (the all-dense baseline).
    All,
}

impl DenseLayers {
    /// Whether layer `layer` is dense.
    pub fn is_dense(self, layer: usize) -> bool {
        match self {
            Self::None => false,
            Self::First => layer == 0,
            Self::Every { period, phase } => period > 0 && layer % period as usize == phase as usize % period as usize,
            Self::All => true,
        }
    }
}

impl std::fmt::Display for DenseLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "no dense layer"),
            Self::First => write!(f, "layer 0 dense"),
            Self::Every { period, phase } => write!(f, "every {period}th layer dense from layer {phase}"),
            Self::All => write!(f, "all layers dense"),
        }
    }
}

/// Shape and settings of the model: a pre-norm decoder (RMSNorm, GQA attention with RoPE, SiLU-gated
/// MLP, residual adds), embedding and LM head untied.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Tokens in the vocabulary.
    pub vocab: u32,
    /// Width of the residual stream.
    pub d_model: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads (GQA: `heads` is a multiple).
    pub kv_heads: u32,
    /// Features per head.
    pub head_dim: u32,
    /// Hidden width of the MLP.
    pub ffn: u32,
    /// Attention per layer; its length is the number of layers.
    pub layers: Vec<LayerAttention>,
    /// Storage type of the weights: f32 or f16 (activations and accumulation are f32).
    pub weight_dtype: DType,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Attention block size (also the KV cache's page size in tokens).
    pub block_size: u32,
    /// S2 local window in blocks (including the query's own).
    pub local_blocks: u32,
    /// S2 vertical stride in blocks.
    pub vert_stride: u32,
    /// Prompt rows per prefill matmul pass (the prefill of a fresh state runs each layer's matmuls over
    /// the prompt in chunks of this many rows, then its attention over the whole prompt at once).
    pub prefill_chunk: u32,
    /// Storage type of Q, K and V in the attention (f32 or f16): the prefill's forward op, the KV caches
    /// and the decode kernels (activations stay f32; Q/K/V are cast on the way in, the output on the way
    /// out); `None`: f16 where the device has cooperative matrices (the tensor-core kernel), f32
    /// elsewhere.
    pub prefill_dtype: Option<DType>,
}

impl ModelConfig {
    /// A hybrid model of `layers` layers as the paper recommends: layer 0 dense, the others S2 (block 64,
    /// 16 local blocks, vertical stride 16); MLP width 4 `d_model`, f32 weights, prefill matmuls in chunks
    /// of 2048 rows (16 row tiles of the cooperative-matrix matmul), the prefill attention's dtype chosen
    /// by the device.
    pub fn new(vocab: u32, d_model: u32, heads: u32, kv_heads: u32, head_dim: u32, layers: u32) -> Self {
        let layers = (0..layers as usize)
            .map(|i| if DenseLayers::First.is_dense(i) { LayerAttention::Dense } else { LayerAttention::S2 })
            .collect();
        Self {
            vocab,
            d_model,
            heads,
            kv_heads,
            head_dim,
            ffn: 4 * d_model,
            layers,
            weight_dtype: DType::F32,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            block_size: 64,
            local_blocks: 16,
            vert_stride: 16,
            prefill_chunk: 2048,
            prefill_dtype: None,
        }
    }

    /// Every layer dense (the baseline the hybrid model is compared with).
    pub fn all_dense(self) -> Self {
        self.with_dense_layers(DenseLayers::All)
    }

    /// The same layers, dense where `dense` says and S2 elsewhere.
    pub fn with_dense_layers(mut self, dense: DenseLayers) -> Self {
        for (i, l) in self.layers.iter_mut().enumerate() {
            *l = if dense.is_dense(i) { LayerAttention::Dense } else { LayerAttention::S2 };
        }
        self
    }

    /// The attention shape of Phi-3-small (a public model trained with this local + vertical-stride
    /// attention): 32 layers, hidden 4096, 32 query heads, 8 KV heads of 128, block 64, 16 local blocks,
    /// vertical stride 8, dense attention on every other layer (1, 3, 5, ...); MLP width 14336, vocabulary
    /// 100352, RoPE base 1e6, f16 weights. Its blocks are this crate's (RMSNorm, SiLU-gated MLP), not
    /// Phi-3-small's own (LayerNorm, GEGELU): the same attention, matmul and cache sizes, not its outputs.
    pub fn phi3_small() -> Self {
        let mut c =
            Self::new(100_352, 4096, 32, 8, 128, 32).with_dense_layers(DenseLayers::Every { period: 2, phase: 1 });
        c.ffn = 14_336;
        c.vert_stride = 8;
        c.rope_theta = 1e6;
        c.weight_dtype = DType::F16;
        c
    }

    /// A 7B Llama shape (Llama-2-7B: 32 layers, hidden 4096, 32 heads of 128 with as many KV heads, MLP
    /// width 11008, vocabulary 32000, f16 weights) with the paper's hybrid: layer 0 dense, the others S2
    /// (block 64, 16 local blocks, vertical stride 16). [`ModelConfig::with_dense_layers`] picks another
    /// hybrid (e.g. every 4th layer dense).
    pub fn llama_7b() -> Self {
        let mut c = Self::new(32_000, 4096, 32, 32, 128, 32);
        c.ffn = 11_008;
        c.weight_dtype = DType::F16;
        c
    }

    /// The layers' dense/S2 pattern, e.g. `DSSS...` (D dense, S S2).
    pub fn pattern(&self) -> String {
        self.layers.iter().map(|l| if *l == LayerAttention::Dense { 'D' } else { 'S' }).collect()
    }

    /// Columns of one QKV row: Q heads, then K heads, then V heads.
    pub fn qkv_cols(&self) -> u32 {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// The attention layout of layer `layer`.
    pub fn layout(&self, layer: usize) -> Result<Layout> {
        match self.layers.get(layer) {
            None => Err(Error::Shape(format!("layer {layer}: the model has {} layers", self.layers.len()))),
            Some(LayerAttention::Dense) => Layout::dense(self.heads, self.kv_heads, self.block_size, true),
            Some(LayerAttention::S2) => Layout::s2(
                S2Config::new(self.heads, self.block_size, self.local_blocks, self.vert_stride).kv_heads(self.kv_heads),
            ),
        }
    }

    /// The length of a prompt of `tokens` if it can be fed: not empty, every token in the vocabulary.
    pub fn check_prompt(&self, tokens: &[u32]) -> Result<u32> {
        let n = u32::try_from(tokens.len()).map_err(|_| Error::Shape("prompt longer than 2^32 tokens".into()))?;
        if n == 0 {
            return Err(Error::Shape("prefill: the prompt is empty".into()));
        }
        if let Some(t) = tokens.iter().find(|&&t| t >= self.vocab) {
            return Err(Error::Shape(format!("token {t} is outside the vocabulary of {}", self.vocab)));
        }
        Ok(n)
    }

    /// Checks the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("prefill_chunk", self.prefill_chunk),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Shape(format!("model {name} must be positive")));
        }
        if self.layers.is_empty() {
            return Err(Error::Shape("a model needs at least one layer".into()));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::Shape(format!("head_dim {} must be even (RoPE rotates pairs)", self.head_dim)));
        }
        if let Some(dtype) = self.prefill_dtype.filter(|d| !matches!(d, DType::F32 | DType::F16)) {
            return Err(Error::Unsupported(format!("prefill attention in {dtype}: use f32 or f16")));
        }
        if !matches!(self.weight_dtype, DType::F32 | DType::F16) {
            return Err(Error::Unsupported(format!("model weights in {}: use f32 or f16", self.weight_dtype)));
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 1.0 || !self.norm_eps.is_finite() || self.norm_eps < 0.0 {
            return Err(Error::Shape(format!(
                "rope_theta {} / norm_eps {} out of range",
                self.rope_theta, self.norm_eps
            )));
        }
        for i in 0..self.layers.len() {
            self.layout(i)?;
        }
        Ok(())
    }
}
