//! The decode example: a decoder-only transformer (`s2attn_model`: embedding, per layer RMSNorm, QKV
//! projection, RoPE, attention, output projection, SiLU-gated MLP, residual adds; final norm, LM head,
//! greedy argmax), weights from a seeded generator, all on the GPU. It prefills a long prompt (each
//! layer's attention over the whole prompt through the library's forward op, the tensor-core kernel where
//! the device has one; K/V into paged caches on the GPU), then generates tokens one by one, one submit per
//! token (the next token's id never leaves the GPU until the end), once with every layer dense and once
//! hybrid (some layers dense, the others S2), and prints prefill time, tokens/s, ms/token and the KV
//! caches' memory.
//!
//! `cargo run --release -p s2attn-model --example decode` (small defaults, seconds on a software rasterizer; `cargo
//! test` runs it smaller still). Environment:
//! - `PRESET`: `small` (default), `phi3-small` (Phi-3-small's attention shape: 32 layers, hidden 4096,
//!   32 / 8 heads of 128, local 16, vertical stride 8, dense attention on every other layer) or
//!   `llama-7b` (a 7B Llama shape, 32 / 32 heads, the paper's hybrid with layer 0 dense).
//! - `HYBRID`: which layers of the hybrid stack are dense: `first`, `alternate` (1, 3, 5, ...) or
//!   `everyN` (0, N, 2N, ...); default the preset's.
//! - `PROMPT` (one length, or several comma-separated: `8192,32768,131072`), `TOKENS` (timed tokens).
//! - Sizes over the preset's: `LAYERS`, `D_MODEL`, `HEADS`, `KV_HEADS`, `HEAD_DIM`, `VOCAB`, `FFN`,
//!   `CHUNK` (prefill rows per matmul pass), `WEIGHTS` (`f32` or `f16`), `LOCAL` and `STRIDE` (the S2
//!   layers' local blocks and vertical stride, block 64).
//! - `ONLY` (`dense` or `hybrid`: one of the two runs).
//! - `S2ATTN_BACKEND=cuda` (a build with `--features cuda`): the model's CUDA twin (`CudaModel`: cuBLAS
//!   matmuls, the library's CUDA forward, KV append and decode on device buffers, f16 weights) instead of
//!   the wgpu model.
//! - `JSON`: a file to which one JSON line per (stack, prompt) run is appended (`"mode": "e2e"`).
//! - `CHECKPOINT`: a Hugging Face checkpoint directory (`config.json` and safetensors; Llama or Phi-3
//!   names) whose shape and weights the model runs instead of a preset's random ones (the shape variables
//!   are then ignored; `HYBRID`, `LOCAL`, `STRIDE`, `CHUNK` and `WEIGHTS` still apply).
//!
//! The Phi-3-small shape at 8k, 32k and 128k, both stacks:
//! `PRESET=phi3-small PROMPT=8192,32768,131072 TOKENS=32 cargo run --release -p s2attn-model --example decode`.

use s2attn::{Backend, Context, ContextOptions, DType, MemoryReport};
use s2attn_model::{Checkpoint, DenseLayers, HfConfig, Model, ModelConfig, State, Weights};
use std::time::Instant;

fn env(name: &str, default: u32) -> Result<u32, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

struct Run {
    prompts: Vec<u32>,
    tokens: u32,
    config: ModelConfig,
    /// Weights from this checkpoint (`CHECKPOINT`), else from a seeded generator.
    checkpoint: Option<Checkpoint>,
    /// Where the shape comes from: the preset's name, or `checkpoint DIR`.
    preset: String,
    only: String,
}

/// The model's shape: a checkpoint's (`CHECKPOINT`), or a preset (`PRESET`) or the small default, each
/// size overridable by its variable; with the checkpoint and the source's name.
fn model_config() -> Result<(ModelConfig, Option<Checkpoint>, String), String> {
    if let Ok(dir) = std::env::var("CHECKPOINT") {
        let checkpoint = Checkpoint::open(&dir).map_err(|e| format!("CHECKPOINT={dir}: {e}"))?;
        let base = checkpoint.config.model.clone();
        let config = attention_settings(base.clone(), &base, DenseLayers::First)?;
        return Ok((config, Some(checkpoint), format!("checkpoint {dir}")));
    }
    // A preset and its own hybrid pattern.
    let name = std::env::var("PRESET").unwrap_or_else(|_| "small".into());
    let (preset, preset_dense) = match name.as_str() {
        "small" => (None, DenseLayers::First),
        "phi3-small" => (Some(ModelConfig::phi3_small()), DenseLayers::Every { period: 2, phase: 1 }),
        "llama-7b" => (Some(ModelConfig::llama_7b()), DenseLayers::First),
        other => return Err(format!("PRESET={other}: use small, phi3-small or llama-7b")),
    };
    let base = preset.clone().unwrap_or_else(|| {
        let mut c = ModelConfig::new(512, 128, 4, 2, 32, 2);
        (c.local_blocks, c.vert_stride) = (4, 4);
        c
    });
    let d_model = env("D_MODEL", base.d_model)?;
    let layers = env("LAYERS", base.layers.len() as u32)?.max(1);
    let mut config = ModelConfig::new(
        env("VOCAB", base.vocab)?,
        d_model,
        env("HEADS", base.heads)?,
        env("KV_HEADS", base.kv_heads)?,
        env("HEAD_DIM", base.head_dim)?,
        layers,
    );
    config.ffn = env("FFN", if preset.is_some() { base.ffn } else { 4 * d_model })?;
    config.rope_theta = base.rope_theta;
    Ok((attention_settings(config, &base, preset_dense)?, None, name))
}

/// `config` with the settings over its shape: prefill chunk, S2 local blocks and stride, weight storage
/// and the hybrid pattern (`default_dense` unless `HYBRID` says), from the variables or `base`.
fn attention_settings(
    mut config: ModelConfig,
    base: &ModelConfig,
    default_dense: DenseLayers,
) -> Result<ModelConfig, String> {
    config.prefill_chunk = env("CHUNK", base.prefill_chunk)?;
    config.local_blocks = env("LOCAL", base.local_blocks)?;
    config.vert_stride = env("STRIDE", base.vert_stride)?;
    config.weight_dtype = match std::env::var("WEIGHTS").as_deref() {
        Err(_) => base.weight_dtype,
        Ok("f32") => DType::F32,
        Ok("f16") => DType::F16,
        Ok(other) => return Err(format!("WEIGHTS={other}: use f32 or f16")),
    };
    let dense = match std::env::var("HYBRID").as_deref() {
        Err(_) => default_dense,
        Ok("first") => DenseLayers::First,
        Ok("alternate") => DenseLayers::Every { period: 2, phase: 1 },
        Ok(every) if every.starts_with("every") => {
            let period = every[5..].parse().map_err(|_| format!("HYBRID={every}: use everyN, e.g. every4"))?;
            DenseLayers::Every { period, phase: 0 }
        }
        Ok(other) => return Err(format!("HYBRID={other}: use first, alternate or everyN (e.g. every4)")),
    };
    Ok(config.with_dense_layers(dense))
}

fn settings() -> Result<Run, String> {
    let (config, checkpoint, preset) = model_config()?;
    let prompts = match std::env::var("PROMPT") {
        Err(_) => vec![1024],
        Ok(list) => list
            .split(',')
            .map(|p| p.trim().parse::<u32>().map(|p| p.max(1)).map_err(|_| format!("PROMPT={list}: not numbers")))
            .collect::<Result<_, _>>()?,
    };
    let only = std::env::var("ONLY").unwrap_or_default();
    Ok(Run { prompts, tokens: env("TOKENS", 8)?.max(1), config, checkpoint, preset, only })
}

fn main() {
    let result = settings().and_then(|mut r| {
        let ctx = context().map_err(|e| e.to_string())?;
        println!("{}", ctx.describe());
        // The CUDA model stores f16 weights: the small default's f32 becomes f16 there unless WEIGHTS says.
        if ctx.wgpu().is_none() && std::env::var_os("WEIGHTS").is_none() {
            r.config.weight_dtype = DType::F16;
        }
        let measured = run(&ctx, &r).map_err(|e| e.to_string())?;
        if measured.is_empty() {
            return Err("no run completed (see the errors above)".to_string());
        }
        summary(&measured);
        if let Ok(path) = std::env::var("JSON") {
            json_lines(&path, &ctx, &r, &measured).map_err(|e| format!("JSON={path}: {e}"))?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("decode failed: {e}");
        std::process::exit(1);
    }
}

/// Appends one JSON line per run to `path`.
fn json_lines(path: &str, ctx: &Context, r: &Run, measured: &[Measured]) -> std::io::Result<()> {
    use std::io::Write;
    let c = &r.config;
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    for m in measured {
        let line = serde_json::json!({
            "impl": "s2attn-model",
            "mode": "e2e",
            "device": ctx.adapter_name(),
            "backend": ctx.backend_name(),
            "preset": r.preset,
            "stack": m.stack,
            "layers": c.layers.len(),
            "d_model": c.d_model,
            "heads": c.heads,
            "kv_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "weights": c.weight_dtype.to_string(),
            "prompt": m.prompt,
            "prefill_s": m.prefill_s,
            "decode_tokens_per_s": 1e3 / m.ms_per_token,
            "ms_per_token": m.ms_per_token,
            "kv_resident_bytes": m.kv_resident,
            "kv_dense_bytes": m.kv_dense,
            "kv_dtype": m.kv_dtype.to_string(),
            "timed_tokens": r.tokens,
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The runs as a markdown table.
fn summary(measured: &[Measured]) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!("\n| stack | prompt | prefill s | prefill tokens/s | decode tokens/s | ms/token | KV resident MiB | KV dense MiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for m in measured {
        println!(
            "| {} | {} | {:.3} | {:.0} | {:.1} | {:.3} | {:.1} | {:.1} |",
            m.stack,
            m.prompt,
            m.prefill_s,
            m.prompt as f64 / m.prefill_s,
            1e3 / m.ms_per_token,
            m.ms_per_token,
            mib(m.kv_resident),
            mib(m.kv_dense)
        );
    }
}

fn context() -> s2attn::Result<Context> {
    let mut options = ContextOptions::from_env()?;
    if options.backend == Backend::Auto {
        options.backend = Backend::Wgpu;
    }
    Context::with_options(&options)
}

/// What one (stack, prompt length) run measured.
struct Measured {
    stack: String,
    prompt: u32,
    prefill_s: f64,
    ms_per_token: f64,
    kv_resident: u64,
    kv_dense: u64,
    /// Storage type of the KV caches.
    kv_dtype: DType,
    tokens: Vec<u32>,
}

fn run(ctx: &Context, r: &Run) -> s2attn::Result<Vec<Measured>> {
    let c = &r.config;
    println!(
        "after each prompt: 1 warm-up and {} timed tokens; {} layers, d_model {}, {} heads / {} KV heads x {}, ffn {}, \
         vocab {}, {} weights; S2 block {}, local {} blocks, stride {}\n",
        r.tokens,
        c.layers.len(),
        c.d_model,
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.ffn,
        c.vocab,
        c.weight_dtype,
        c.block_size,
        c.local_blocks,
        c.vert_stride
    );
    // The weights (a checkpoint's, or random ones) are made once, for both stacks.
    let t = Instant::now();
    let weights = match &r.checkpoint {
        Some(checkpoint) => {
            let hf = HfConfig { model: c.clone(), ..checkpoint.config.clone() };
            let w = Weights::from_safetensors(&hf, &checkpoint.shards)?;
            println!("weights read from {} shards in {:.1} s", checkpoint.shards.len(), t.elapsed().as_secs_f64());
            w
        }
        None => {
            let w = Weights::random(c, 7);
            println!("random weights drawn in {:.1} s", t.elapsed().as_secs_f64());
            w
        }
    };
    let hybrid = format!("hybrid S2 ({})", c.pattern());
    let stacks = [("dense".to_string(), c.clone().all_dense()), (hybrid, c.clone())];
    let mut measured = Vec::new();
    for (stack, config) in stacks.into_iter().filter(|(name, _)| name.starts_with(r.only.as_str())) {
        // A run that fails (e.g. the device's memory) is reported and the others go on.
        let t = Instant::now();
        let loaded = match ctx.wgpu() {
            Some(_) => Model::from_weights(ctx, config, &weights).map(|m| measure(&m, &stack, r, t, &mut measured)),
            #[cfg(feature = "cuda")]
            None => s2attn_model::CudaModel::from_weights(ctx, config, &weights)
                .map(|m| measure(&m, &stack, r, t, &mut measured)),
            #[cfg(not(feature = "cuda"))]
            None => Err(s2attn::Error::Unsupported("the model runs on CUDA in a build with --features cuda".into())),
        };
        if let Err(e) = loaded {
            eprintln!("{stack:>26}: the model does not load: {e}");
        }
    }
    Ok(measured)
}

/// What the runs need of a model on either backend (the wgpu [`Model`] and `CudaModel`).
trait Lm {
    type State;
    fn new_state(&self, max_seq_len: u32) -> s2attn::Result<Self::State>;
    fn prepare_prefill(&self, prompt_len: u32) -> s2attn::Result<()>;
    fn prefill(&self, state: &mut Self::State, prompt: &[u32]) -> s2attn::Result<u32>;
    fn step(&self, state: &mut Self::State) -> s2attn::Result<u32>;
    fn generate(&self, state: &mut Self::State, n: u32) -> s2attn::Result<Vec<u32>>;
    fn memory_reports(&self, state: &Self::State) -> Vec<MemoryReport>;
    fn prefill_rows(&self, state: &Self::State) -> u32;
    fn kv_dtype(&self) -> DType;
    fn weight_bytes(&self) -> u64;
}

impl Lm for Model {
    type State = State;
    fn new_state(&self, max_seq_len: u32) -> s2attn::Result<State> {
        State::new(self, max_seq_len)
    }
    fn prepare_prefill(&self, prompt_len: u32) -> s2attn::Result<()> {
        Model::prepare_prefill(self, prompt_len)
    }
    fn prefill(&self, state: &mut State, prompt: &[u32]) -> s2attn::Result<u32> {
        Model::prefill(self, state, prompt)
    }
    fn step(&self, state: &mut State) -> s2attn::Result<u32> {
        Model::step(self, state)
    }
    fn generate(&self, state: &mut State, n: u32) -> s2attn::Result<Vec<u32>> {
        Model::generate(self, state, n)
    }
    fn memory_reports(&self, state: &State) -> Vec<MemoryReport> {
        state.memory_report()
    }
    fn prefill_rows(&self, state: &State) -> u32 {
        state.prefill_rows()
    }
    fn kv_dtype(&self) -> DType {
        self.prefill_dtype()
    }
    fn weight_bytes(&self) -> u64 {
        Model::weight_bytes(self)
    }
}

#[cfg(feature = "cuda")]
impl Lm for s2attn_model::CudaModel {
    type State = s2attn_model::CudaState;
    fn new_state(&self, max_seq_len: u32) -> s2attn::Result<Self::State> {
        s2attn_model::CudaState::new(self, max_seq_len)
    }
    fn prepare_prefill(&self, prompt_len: u32) -> s2attn::Result<()> {
        s2attn_model::CudaModel::prepare_prefill(self, prompt_len)
    }
    fn prefill(&self, state: &mut Self::State, prompt: &[u32]) -> s2attn::Result<u32> {
        s2attn_model::CudaModel::prefill(self, state, prompt)
    }
    fn step(&self, state: &mut Self::State) -> s2attn::Result<u32> {
        s2attn_model::CudaModel::step(self, state)
    }
    fn generate(&self, state: &mut Self::State, n: u32) -> s2attn::Result<Vec<u32>> {
        s2attn_model::CudaModel::generate(self, state, n)
    }
    fn memory_reports(&self, state: &Self::State) -> Vec<MemoryReport> {
        state.memory_report()
    }
    fn prefill_rows(&self, state: &Self::State) -> u32 {
        state.prefill_rows(self)
    }
    fn kv_dtype(&self) -> DType {
        self.prefill_dtype()
    }
    fn weight_bytes(&self) -> u64 {
        s2attn_model::CudaModel::weight_bytes(self)
    }
}

/// Every prompt length of `r` on `model` (loaded in the time since `t`), pushed to `measured`; a length
/// that fails is reported and the others go on.
fn measure<M: Lm>(model: &M, stack: &str, r: &Run, t: Instant, measured: &mut Vec<Measured>) {
    let c = &r.config;
    println!("{stack:>26}: weights uploaded in {:.1} s", t.elapsed().as_secs_f64());
    for &prompt_len in &r.prompts {
        let one = || -> s2attn::Result<Measured> {
            // A deterministic prompt of valid ids.
            let prompt: Vec<u32> =
                (0..prompt_len as u64).map(|i| ((i * 2_654_435_761) % c.vocab as u64) as u32).collect();
            let mut state = model.new_state(prompt_len + r.tokens + 2)?;
            // Planning and compiling the prompt's attention ops (and autotuning them, first time on a
            // device) is not part of the timed prefill.
            let t = Instant::now();
            model.prepare_prefill(prompt_len)?;
            let plan_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let first = model.prefill(&mut state, &prompt)?;
            let prefill_s = t.elapsed().as_secs_f64();
            // One warm-up token, then the timed loop (no readback until the end).
            let second = model.step(&mut state)?;
            let t = Instant::now();
            let generated = model.generate(&mut state, r.tokens)?;
            let ms_per_token = t.elapsed().as_secs_f64() * 1e3 / r.tokens as f64;
            let reports = model.memory_reports(&state);
            let m = Measured {
                stack: stack.to_string(),
                prompt: prompt_len,
                prefill_s,
                ms_per_token,
                kv_resident: reports.iter().map(|m| m.resident_bytes()).sum(),
                kv_dense: reports.iter().map(|m| m.dense_bytes).sum(),
                kv_dtype: model.kv_dtype(),
                tokens: [first, second].into_iter().chain(generated).collect(),
            };
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!(
                "{stack:>26} prompt {prompt_len:>7}: prefill {:8.3} s ({:9.0} tokens/s; attention and KV cache in {}, {} rows per \
                 matmul pass; ops planned in {plan_s:.2} s); decode {:8.1} tokens/s, {:7.3} ms/token; KV {:9.1} MiB resident of {:9.1} MiB dense; \
                 weights {:7.1} MiB",
                m.prefill_s,
                prompt_len as f64 / m.prefill_s,
                m.kv_dtype,
                model.prefill_rows(&state),
                1e3 / m.ms_per_token,
                m.ms_per_token,
                mib(m.kv_resident),
                mib(m.kv_dense),
                mib(model.weight_bytes())
            );
            let shown: Vec<String> = m.tokens.iter().take(12).map(|t| t.to_string()).collect();
            println!("{:>26}  tokens: {} ...", "", shown.join(" "));
            Ok(m)
        };
        match one() {
            Ok(m) => measured.push(m),
            Err(e) => eprintln!("{stack:>26} prompt {prompt_len:>7}: failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example at a small size (as CI runs it): both stacks over a prompt of several prefill chunks
    /// and S2 blocks, every token a valid id, the same number of tokens, and the hybrid stack's caches
    /// holding less than the dense stack's (its S2 layer evicts).
    #[test]
    fn runs_at_a_small_size() {
        let mut config = ModelConfig::new(97, 64, 4, 2, 32, 2);
        config.ffn = 96;
        config.local_blocks = 2;
        config.vert_stride = 3;
        config.prefill_chunk = 128;
        let run = Run {
            prompts: vec![700],
            tokens: 4,
            config,
            checkpoint: None,
            preset: "small".into(),
            only: String::new(),
        };
        let ctx = context().expect("a device (lavapipe in CI)");
        let m = super::run(&ctx, &run).expect("the example runs");
        assert_eq!(m.len(), 2);
        for r in &m {
            // The prefill's prediction, the warm-up token and the timed ones.
            assert_eq!(r.tokens.len(), 6, "{}", r.stack);
            assert!(r.tokens.iter().all(|&t| t < 97), "{}: {:?}", r.stack, r.tokens);
            assert!(r.prefill_s > 0.0 && r.ms_per_token > 0.0);
        }
        assert_eq!(m[0].kv_dense, m[1].kv_dense);
        assert!(m[1].kv_resident < m[0].kv_resident, "hybrid {} vs dense {} bytes", m[1].kv_resident, m[0].kv_resident);
    }
}
