//! Hugging Face checkpoints of the Llama (`LlamaForCausalLM`) and Phi-3 (`Phi3ForCausalLM`) families,
//! whose blocks are this model's: `config.json` into a [`ModelConfig`] ([`HfConfig`]), safetensors shards
//! into [`Weights`] ([`Weights::from_safetensors`], whose docs list the tensor names), and a checkpoint
//! directory holding both ([`Checkpoint`]).
//!
//! RoPE: Hugging Face stores Q and K rows for rotate-half RoPE, which rotates the pairs
//! `(i, i + head_dim / 2)` (the conversion from Meta's interleaved checkpoints permuted the rows once).
//! That is what this model computes, so Q and K are loaded as stored, with no permutation.
//!
//! Memory: one shard's bytes at a time besides the f32 output; each tensor is converted (F32, F16 or
//! BF16 into f32, rounded to [`ModelConfig::weight_dtype`]) straight into its place, a tile of rows at a
//! time.

use super::config::ModelConfig;
use super::weights::{rounding, LayerWeights, Weights};
use s2attn::{Error, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Architectures whose blocks this model computes.
const SUPPORTED: [&str; 2] = ["LlamaForCausalLM", "Phi3ForCausalLM"];

/// Architectures near the supported ones whose blocks compute something else.
const DIFFERENT: [(&str, &str); 3] = [
    ("Phi3SmallForCausalLM", "LayerNorm with bias, a GEGELU MLP, muP scaling and block-sparse attention"),
    ("Qwen2ForCausalLM", "biases on the Q, K and V projections"),
    ("GemmaForCausalLM", "a GELU-gated MLP, (1 + w) norm weights and scaled embeddings"),
];

/// What a Hugging Face `config.json` says about a checkpoint of a supported architecture.
///
/// Read are `vocab_size`, `hidden_size`, `num_attention_heads`, `num_key_value_heads` (default: the
/// heads), `head_dim` (default: `hidden_size / num_attention_heads`), `intermediate_size`,
/// `num_hidden_layers`, `rms_norm_eps` (default: Llama 1e-6, Phi-3 1e-5), `rope_theta` (default 10000)
/// and `tie_word_embeddings` (default false). A config whose blocks differ from the model's is refused
/// by name: another architecture, `hidden_act` other than `silu`, RoPE scaling, partial rotary
/// embeddings, attention or MLP biases. The attention mask is the model's own (its `layers`): a
/// `sliding_window` is not read.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// The model's shape; its layers are [`ModelConfig::new`]'s hybrid and its weights f32 (change
    /// `layers` and `weight_dtype` before loading at will).
    pub model: ModelConfig,
    /// The LM head is the embedding's transpose; a stored `lm_head.weight` is then not read.
    pub tie_word_embeddings: bool,
}

impl HfConfig {
    /// Reads the text of a `config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json).map_err(|e| Error::Shape(format!("config.json: {e}")))?;
        let fields = Fields(value.as_object().ok_or_else(|| Error::Shape("config.json is not a JSON object".into()))?);
        let architecture = fields.architecture()?;
        fields.check_blocks()?;
        let vocab = fields.count("vocab_size")?;
        let d_model = fields.count("hidden_size")?;
        let heads = fields.count("num_attention_heads")?;
        let kv_heads = fields.optional_count("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match fields.optional_count("head_dim")? {
            Some(head_dim) => head_dim,
            None if d_model % heads == 0 => d_model / heads,
            None => {
                return Err(Error::Shape(format!(
                    "config.json: no `head_dim`, and `hidden_size` {d_model} is not a multiple of \
                     `num_attention_heads` {heads}"
                )))
            }
        };
        let layers = fields.count("num_hidden_layers")?;
        let mut model = ModelConfig::new(vocab, d_model, heads, kv_heads, head_dim, layers);
        model.ffn = fields.count("intermediate_size")?;
        let default_eps = if architecture == "LlamaForCausalLM" { 1e-6 } else { 1e-5 };
        model.norm_eps = fields.float("rms_norm_eps")?.unwrap_or(default_eps);
        model.rope_theta = fields.rope_theta()?;
        model.validate()?;
        let tie_word_embeddings = fields.flag("tie_word_embeddings")?.unwrap_or(false);
        Ok(Self { model, tie_word_embeddings })
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path).map_err(|e| read_error(path, e))?;
        Self::from_json(&json)
    }
}

/// The top-level fields of a `config.json`; a `null` field counts as absent.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn invalid(name: &str, expected: &str, got: &Value) -> Error {
        Error::Shape(format!("config.json: `{name}` must be {expected}, got {got}"))
    }

    /// `architectures[0]`, one of [`SUPPORTED`].
    fn architecture(&self) -> Result<&str> {
        let name = self
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Shape("config.json: no `architectures` entry names the model class".into()))?;
        if SUPPORTED.contains(&name) {
            return Ok(name);
        }
        let why = match DIFFERENT.iter().find(|(n, _)| *n == name) {
            Some((_, blocks)) => format!(": its blocks have {blocks}"),
            None => String::new(),
        };
        Err(Error::Unsupported(format!(
            "architecture {name} is not this model{why}; supported are {}",
            SUPPORTED.join(", ")
        )))
    }

    /// Refuses settings under which a supported architecture computes other blocks than the model's.
    fn check_blocks(&self) -> Result<()> {
        let refuse =
            |what: String, ours: &str| Err(Error::Unsupported(format!("config.json: {what}: this model {ours}")));
        match self.get("hidden_act") {
            None => {}
            Some(Value::String(act)) if act == "silu" => {}
            Some(act) => return refuse(format!("`hidden_act` {act}"), "has a SiLU-gated MLP"),
        }
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(rope) = self.get(key) {
                let kind = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str);
                if kind != Some("default") {
                    return refuse(format!("`{key}` {rope}"), "computes RoPE without scaling");
                }
            }
        }
        if let Some(factor) = self.float("partial_rotary_factor")?.filter(|&f| f != 1.0) {
            return refuse(format!("`partial_rotary_factor` {factor}"), "rotates the whole head");
        }
        for bias in ["attention_bias", "mlp_bias"] {
            if self.flag(bias)? == Some(true) {
                return refuse(format!("`{bias}` true"), "has no biases");
            }
        }
        Ok(())
    }

    /// `rope_theta`, at the top level or in `rope_parameters`; default 10000.
    fn rope_theta(&self) -> Result<f32> {
        let nested = match self.get("rope_parameters") {
            Some(Value::Object(rope)) => Fields(rope).float("rope_theta")?,
            _ => None,
        };
        Ok(nested.or(self.float("rope_theta")?).unwrap_or(10000.0))
    }

    fn optional_count(&self, name: &str) -> Result<Option<u32>> {
        self.get(name)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| Self::invalid(name, "a positive integer", v))
            })
            .transpose()
    }

    fn count(&self, name: &str) -> Result<u32> {
        self.optional_count(name)?.ok_or_else(|| Error::Shape(format!("config.json: `{name}` is missing")))
    }

    fn float(&self, name: &str) -> Result<Option<f32>> {
        self.get(name)
            .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| Self::invalid(name, "a number", v)))
            .transpose()
    }

    fn flag(&self, name: &str) -> Result<Option<bool>> {
        self.get(name).map(|v| v.as_bool().ok_or_else(|| Self::invalid(name, "true or false", v))).transpose()
    }
}

/// A Hugging Face checkpoint directory: its `config.json` and its safetensors shards.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The model's configuration (edit it before [`Checkpoint::weights`] to choose the layers'
    /// attention or the weights' storage type).
    pub config: HfConfig,
    /// `model.safetensors`, or every `model-{i}-of-{n}.safetensors` in order.
    pub shards: Vec<PathBuf>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: reads `config.json` and finds the shards (none is read yet).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = HfConfig::from_file(dir.join("config.json"))?;
        let shards = shards_in(dir)?;
        Ok(Self { config, shards })
    }

    /// Reads the weights of every shard ([`Weights::from_safetensors`]).
    pub fn weights(&self) -> Result<Weights> {
        Weights::from_safetensors(&self.config, &self.shards)
    }
}

/// `model.safetensors`, or the complete set `model-00001-of-0000n.safetensors` .. `n` in order.
fn shards_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut numbered: Vec<(usize, usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_error(dir, e))? {
        let path = entry.map_err(|e| read_error(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let index_of_total = name.strip_prefix("model-").and_then(|n| n.strip_suffix(".safetensors"));
        if let Some((index, total)) = index_of_total.and_then(|n| n.split_once("-of-")) {
            if let (Ok(index), Ok(total)) = (index.parse(), total.parse()) {
                numbered.push((index, total, path));
            }
        }
    }
    numbered.sort();
    let Some(&(_, total, _)) = numbered.first() else {
        return Err(Error::Shape(format!(
            "{}: no model.safetensors nor model-*-of-*.safetensors shards",
            dir.display()
        )));
    };
    let expected = 1..=total;
    if numbered.len() != total || numbered.iter().zip(expected).any(|((i, n, _), want)| (*i, *n) != (want, total)) {
        let found: Vec<String> = numbered.iter().map(|(i, n, _)| format!("{i} of {n}")).collect();
        return Err(Error::Shape(format!(
            "{}: the shards are not one complete set of {total} (found {})",
            dir.display(),
            found.join(", ")
        )));
    }
    Ok(numbered.into_iter().map(|(_, _, path)| path).collect())
}

impl Weights {
    /// Reads the weights of `config.model` from safetensors shards of a Hugging Face checkpoint, in any
    /// order. F32, F16 and BF16 tensors are converted to f32 and rounded to `config.model.weight_dtype`.
    ///
    /// Tensor names: `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (not read when
    /// `config.tie_word_embeddings`: the LM head is then the embedding's transpose) and per layer
    /// `model.layers.{i}.` + `input_layernorm`, `post_attention_layernorm`, `self_attn.o_proj`,
    /// `mlp.down_proj` and either Llama's separate `self_attn.{q,k,v}_proj` and `mlp.{gate,up}_proj` or
    /// Phi-3's fused `self_attn.qkv_proj` (`[q; k; v]` rows) and `mlp.gate_up_proj` (`[gate; up]` rows),
    /// each + `.weight`. Projections are PyTorch `Linear` weights, `[out, in]`: each lands transposed in
    /// its columns of the model's `[in, out]` matrix, so Llama's separate Q, K and V fill the fused QKV
    /// matrix side by side. Q and K rows are read as stored (Hugging Face's rotate-half RoPE is the
    /// model's). Tensors of other names (`rotary_emb.inv_freq`) are ignored.
    ///
    /// Refused, each naming the tensor: a missing tensor, a shape other than the config's, a dtype other
    /// than those three, a tensor in two shards (or a fused and a separate projection filling the same
    /// columns), a bias, a layer past the config's.
    pub fn from_safetensors<P: AsRef<Path>>(config: &HfConfig, shards: &[P]) -> Result<Self> {
        config.model.validate()?;
        if shards.is_empty() {
            return Err(Error::Shape("no safetensors shard to read".into()));
        }
        let mut loader = Loader::new(config);
        for shard in shards {
            loader.read_shard(shard.as_ref())?;
        }
        loader.finish()
    }
}

/// A parameter of [`Weights`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Param {
    Embed,
    FinalNorm,
    LmHead,
    Layer(usize, LayerParam),
}

/// A parameter of [`LayerWeights`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum LayerParam {
    AttnNorm,
    Wqkv,
    Wo,
    MlpNorm,
    Wgu,
    Wdown,
}

/// Where a checkpoint tensor lands: as stored (vectors, the embedding), or a PyTorch `[out, in]` weight
/// transposed into columns `col0 .. col0 + out` of the parameter's `[in, cols]` matrix.
#[derive(Clone, Debug)]
struct Target {
    param: Param,
    shape: Vec<usize>,
    transposed_at: Option<usize>,
}

impl Target {
    /// The parameter's columns the tensor fills.
    fn columns(&self) -> Range<usize> {
        let last = self.shape.last().copied().unwrap_or(0);
        match self.transposed_at {
            Some(col0) => col0..col0 + self.shape[0],
            None => 0..last,
        }
    }
}

/// The modules read, by Hugging Face name (without `.weight`): the LM head only where it is not tied.
fn targets(config: &HfConfig) -> HashMap<String, Target> {
    let c = &config.model;
    let [vocab, d, q, kv, ffn] =
        [c.vocab, c.d_model, c.heads * c.head_dim, c.kv_heads * c.head_dim, c.ffn].map(|n| n as usize);
    let stored = |param, shape: &[usize]| Target { param, shape: shape.to_vec(), transposed_at: None };
    let linear = |param, col0, out, inner| Target { param, shape: vec![out, inner], transposed_at: Some(col0) };
    let mut targets = HashMap::from([
        ("model.embed_tokens".to_string(), stored(Param::Embed, &[vocab, d])),
        ("model.norm".to_string(), stored(Param::FinalNorm, &[d])),
    ]);
    if !config.tie_word_embeddings {
        targets.insert("lm_head".into(), linear(Param::LmHead, 0, vocab, d));
    }
    for i in 0..c.layers.len() {
        let p = |param| Param::Layer(i, param);
        let layer = [
            ("input_layernorm", stored(p(LayerParam::AttnNorm), &[d])),
            ("self_attn.q_proj", linear(p(LayerParam::Wqkv), 0, q, d)),
            ("self_attn.k_proj", linear(p(LayerParam::Wqkv), q, kv, d)),
            ("self_attn.v_proj", linear(p(LayerParam::Wqkv), q + kv, kv, d)),
            ("self_attn.qkv_proj", linear(p(LayerParam::Wqkv), 0, q + 2 * kv, d)),
            ("self_attn.o_proj", linear(p(LayerParam::Wo), 0, d, q)),
            ("post_attention_layernorm", stored(p(LayerParam::MlpNorm), &[d])),
            ("mlp.gate_proj", linear(p(LayerParam::Wgu), 0, ffn, d)),
            ("mlp.up_proj", linear(p(LayerParam::Wgu), ffn, ffn, d)),
            ("mlp.gate_up_proj", linear(p(LayerParam::Wgu), 0, 2 * ffn, d)),
            ("mlp.down_proj", linear(p(LayerParam::Wdown), 0, d, ffn)),
        ];
        targets.extend(layer.map(|(name, target)| (format!("model.layers.{i}.{name}"), target)));
    }
    targets
}

/// `[rows, cols]` of a parameter (a vector is one row).
fn dims(config: &ModelConfig, param: Param) -> (usize, usize) {
    let c = config;
    let (d, q, ffn) = (c.d_model as usize, (c.heads * c.head_dim) as usize, c.ffn as usize);
    match param {
        Param::Embed => (c.vocab as usize, d),
        Param::FinalNorm | Param::Layer(_, LayerParam::AttnNorm | LayerParam::MlpNorm) => (1, d),
        Param::LmHead => (d, c.vocab as usize),
        Param::Layer(_, LayerParam::Wqkv) => (d, c.qkv_cols() as usize),
        Param::Layer(_, LayerParam::Wo) => (q, d),
        Param::Layer(_, LayerParam::Wgu) => (d, 2 * ffn),
        Param::Layer(_, LayerParam::Wdown) => (ffn, d),
    }
}

/// Every parameter the checkpoint must fill.
fn params(config: &HfConfig) -> Vec<Param> {
    let layer = [
        LayerParam::AttnNorm,
        LayerParam::Wqkv,
        LayerParam::Wo,
        LayerParam::MlpNorm,
        LayerParam::Wgu,
        LayerParam::Wdown,
    ];
    let mut params = vec![Param::Embed, Param::FinalNorm];
    if !config.tie_word_embeddings {
        params.push(Param::LmHead);
    }
    params.extend((0..config.model.layers.len()).flat_map(|i| layer.map(|p| Param::Layer(i, p))));
    params
}

/// Weights of zeros in the shapes of `config`.
fn zeros(config: &ModelConfig) -> Weights {
    let buffer = |param| {
        let (rows, cols) = dims(config, param);
        vec![0.0; rows * cols]
    };
    let layers = (0..config.layers.len())
        .map(|i| {
            let p = |param| buffer(Param::Layer(i, param));
            LayerWeights {
                attn_norm: p(LayerParam::AttnNorm),
                wqkv: p(LayerParam::Wqkv),
                wo: p(LayerParam::Wo),
                mlp_norm: p(LayerParam::MlpNorm),
                wgu: p(LayerParam::Wgu),
                wdown: p(LayerParam::Wdown),
            }
        })
        .collect();
    Weights {
        embed: buffer(Param::Embed),
        layers,
        final_norm: buffer(Param::FinalNorm),
        lm_head: buffer(Param::LmHead),
    }
}

/// The values of `param` in `weights`.
fn param_mut(weights: &mut Weights, param: Param) -> &mut [f32] {
    match param {
        Param::Embed => &mut weights.embed,
        Param::FinalNorm => &mut weights.final_norm,
        Param::LmHead => &mut weights.lm_head,
        Param::Layer(i, p) => {
            let l = &mut weights.layers[i];
            match p {
                LayerParam::AttnNorm => &mut l.attn_norm,
                LayerParam::Wqkv => &mut l.wqkv,
                LayerParam::Wo => &mut l.wo,
                LayerParam::MlpNorm => &mut l.mlp_norm,
                LayerParam::Wgu => &mut l.wgu,
                LayerParam::Wdown => &mut l.wdown,
            }
        }
    }
}

/// Rows of a transposed tensor decoded at a time.
const TILE_ROWS: usize = 64;

/// Fills [`Weights`] shard by shard and keeps track of which tensor filled which columns.
struct Loader<'a> {
    config: &'a HfConfig,
    targets: HashMap<String, Target>,
    weights: Weights,
    /// Each tensor read, with its file.
    read: HashMap<String, PathBuf>,
    /// Per parameter, the columns filled so far and by which tensor.
    filled: HashMap<Param, Vec<(Range<usize>, String)>>,
}

impl<'a> Loader<'a> {
    fn new(config: &'a HfConfig) -> Self {
        Self {
            config,
            targets: targets(config),
            weights: zeros(&config.model),
            read: HashMap::new(),
            filled: HashMap::new(),
        }
    }

    fn read_shard(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| read_error(path, e))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Shape(format!("{}: not a safetensors file: {e}", path.display())))?;
        for (name, view) in tensors.iter() {
            if let Some(target) = self.target(name)? {
                self.claim(name, &target, path)?;
                self.store(name, &target, &view, path)?;
            }
        }
        Ok(())
    }

    /// Where tensor `name` goes; `None` for a tensor the model does not read.
    fn target(&self, name: &str) -> Result<Option<Target>> {
        let layers = self.config.model.layers.len();
        let layer =
            name.strip_prefix("model.layers.").and_then(|n| n.split_once('.')).and_then(|(i, _)| i.parse().ok());
        if let Some(i) = layer.filter(|&i: &usize| i >= layers) {
            return Err(Error::Shape(format!("tensor {name} is of layer {i}, the config has {layers} layers")));
        }
        if name.strip_suffix(".bias").is_some_and(|module| self.targets.contains_key(module)) {
            return Err(Error::Unsupported(format!("tensor {name}: this model's projections and norms have no bias")));
        }
        Ok(name.strip_suffix(".weight").and_then(|module| self.targets.get(module)).cloned())
    }

    /// Records that `name` fills its columns, refusing a second copy or an overlap.
    fn claim(&mut self, name: &str, target: &Target, path: &Path) -> Result<()> {
        if let Some(first) = self.read.insert(name.to_string(), path.to_path_buf()) {
            return Err(Error::Shape(format!("tensor {name} is in both {} and {}", first.display(), path.display())));
        }
        let columns = target.columns();
        let filled = self.filled.entry(target.param).or_default();
        if let Some((_, other)) = filled.iter().find(|(r, _)| r.start < columns.end && columns.start < r.end) {
            return Err(Error::Shape(format!(
                "tensors {other} and {name} both fill columns of {}",
                describe(target.param)
            )));
        }
        filled.push((columns, name.to_string()));
        Ok(())
    }

    fn store(&mut self, name: &str, target: &Target, view: &TensorView, path: &Path) -> Result<()> {
        if view.shape() != target.shape.as_slice() {
            return Err(Error::Shape(format!(
                "tensor {name} in {} has shape {:?}, expected {:?}",
                path.display(),
                view.shape(),
                target.shape
            )));
        }
        let dtype = view.dtype();
        let decode = decoder(dtype).ok_or_else(|| {
            Error::Unsupported(format!("tensor {name} in {} is {dtype}, expected F32, F16 or BF16", path.display()))
        })?;
        let round = rounding(self.config.model.weight_dtype);
        let (_, cols) = dims(&self.config.model, target.param);
        let dst = param_mut(&mut self.weights, target.param);
        match target.transposed_at {
            None => {
                decode(view.data(), dst);
                dst.iter_mut().for_each(|v| *v = round(*v));
            }
            Some(col0) => {
                let inner = target.shape[1];
                let mut tile = vec![0.0; TILE_ROWS * inner];
                let row_bytes = inner * dtype.bitsize() / 8;
                for (t, rows) in view.data().chunks(TILE_ROWS * row_bytes).enumerate() {
                    let n = rows.len() / row_bytes;
                    decode(rows, &mut tile[..n * inner]);
                    scatter_transposed(&tile[..n * inner], inner, dst, cols, col0 + t * TILE_ROWS, round);
                }
            }
        }
        Ok(())
    }

    /// Checks every parameter is filled, ties the LM head and hands the weights over.
    fn finish(mut self) -> Result<Weights> {
        for param in params(self.config) {
            let (_, cols) = dims(&self.config.model, param);
            if let Some(col) = first_gap(self.filled.get(&param).map_or(&[], Vec::as_slice), cols) {
                // The separate tensor that holds the column first, then a fused one.
                let mut holders: Vec<(usize, String)> = self
                    .targets
                    .iter()
                    .filter(|(_, t)| t.param == param && t.columns().contains(&col))
                    .map(|(name, t)| (t.columns().len(), format!("{name}.weight")))
                    .collect();
                holders.sort();
                let mut names = holders.into_iter().map(|(_, name)| name);
                let separate = names.next().unwrap_or_default();
                let fused: Vec<String> = names.collect();
                let fused = if fused.is_empty() { String::new() } else { format!(" nor a fused {}", fused.join(", ")) };
                return Err(Error::Shape(format!(
                    "the checkpoint has no tensor {separate}{fused} for {}",
                    describe(param)
                )));
            }
        }
        if self.config.tie_word_embeddings {
            let (vocab, d) = dims(&self.config.model, Param::Embed);
            let w = &mut self.weights;
            scatter_transposed(&w.embed, d, &mut w.lm_head, vocab, 0, |v| v);
        }
        Ok(self.weights)
    }
}

/// What a parameter is, for messages.
fn describe(param: Param) -> String {
    match param {
        Param::Embed => "the token embedding".into(),
        Param::FinalNorm => "the final norm".into(),
        Param::LmHead => "the LM head".into(),
        Param::Layer(i, p) => {
            let what = match p {
                LayerParam::AttnNorm => "attention norm",
                LayerParam::Wqkv => "QKV projection",
                LayerParam::Wo => "output projection",
                LayerParam::MlpNorm => "MLP norm",
                LayerParam::Wgu => "gate and up projection",
                LayerParam::Wdown => "down projection",
            };
            format!("layer {i}'s {what}")
        }
    }
}

/// The first column of `0..cols` no range in `filled` (disjoint ranges) covers.
fn first_gap(filled: &[(Range<usize>, String)], cols: usize) -> Option<usize> {
    let mut ranges: Vec<&Range<usize>> = filled.iter().map(|(r, _)| r).collect();
    ranges.sort_by_key(|r| r.start);
    let mut next = 0;
    for r in ranges {
        if r.start > next {
            return Some(next);
        }
        next = next.max(r.end);
    }
    (next < cols).then_some(next)
}

/// Converts little-endian stored elements into f32 values, one per element.
type Decode = fn(&[u8], &mut [f32]);

/// The conversion of F32, F16 or BF16 tensor bytes; `None` for other dtypes.
fn decoder(dtype: Dtype) -> Option<Decode> {
    match dtype {
        Dtype::F32 => Some(|bytes, out| {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }),
        Dtype::F16 => Some(|bytes, out| {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }),
        Dtype::BF16 => Some(|bytes, out| {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }),
        _ => None,
    }
}

/// Rows `[n, inner]` of `src` into columns `col0 .. col0 + n` of the `[inner, cols]` matrix `dst`,
/// rounded.
fn scatter_transposed(src: &[f32], inner: usize, dst: &mut [f32], cols: usize, col0: usize, round: fn(f32) -> f32) {
    let n = src.len() / inner;
    for (k, dst_row) in dst.chunks_exact_mut(cols).enumerate().take(inner) {
        for (j, d) in dst_row[col0..col0 + n].iter_mut().enumerate() {
            *d = round(src[j * inner + k]);
        }
    }
}

/// An I/O error, naming the file.
fn read_error(path: &Path, e: std::io::Error) -> Error {
    Error::Unsupported(format!("reading {}: {e}", path.display()))
}
