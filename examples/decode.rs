//! The decode example of issue 10: a small decoder-only transformer (`s2attn::model`: embedding, per
//! layer RMSNorm, QKV projection, RoPE, attention over a paged KV cache, output projection, SiLU-gated
//! MLP, residual adds; final norm, LM head, greedy argmax), weights from a seeded generator, all on the
//! GPU. It prefills a long prompt in chunks, then generates tokens one by one, one submit per token (the
//! next token's id never leaves the GPU until the end), once with every layer dense and once hybrid as
//! the paper recommends (layer 0 dense, the others S2), and prints prefill time, tokens/s, ms/token and
//! the KV caches' memory.
//!
//! `cargo run --release --example decode` (small defaults, seconds on a software rasterizer); env
//! `PROMPT`, `TOKENS`, `LAYERS`, `D_MODEL`, `HEADS`, `KV_HEADS`, `HEAD_DIM`, `VOCAB`, `FFN` (default 4
//! `D_MODEL`), `CHUNK` (prefill rows per submit), `WEIGHTS` (`f32` or `f16`), `LOCAL` and `STRIDE` (the S2
//! layers' local blocks and vertical stride, block 64; small defaults so that a short prompt shows them),
//! `ONLY` (`dense` or `hybrid`: one of the two runs).
//! A GPU-sized run:
//! `PROMPT=32768 TOKENS=64 LAYERS=4 D_MODEL=2048 HEADS=32 KV_HEADS=8 HEAD_DIM=128 VOCAB=32000 LOCAL=16
//! STRIDE=16 WEIGHTS=f16 cargo run --release --example decode`.

use s2attn::model::{Model, ModelConfig, State};
use s2attn::{Backend, Context, ContextOptions, DType};
use std::time::Instant;

fn env(name: &str, default: u32) -> Result<u32, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

struct Run {
    prompt: u32,
    tokens: u32,
    config: ModelConfig,
}

fn settings() -> Result<Run, String> {
    let d_model = env("D_MODEL", 128)?;
    let mut config = ModelConfig::new(
        env("VOCAB", 512)?,
        d_model,
        env("HEADS", 4)?,
        env("KV_HEADS", 2)?,
        env("HEAD_DIM", 32)?,
        env("LAYERS", 2)?.max(1),
    );
    config.ffn = env("FFN", 4 * d_model)?;
    config.prefill_chunk = env("CHUNK", config.prefill_chunk)?;
    config.local_blocks = env("LOCAL", 4)?;
    config.vert_stride = env("STRIDE", 4)?;
    config.weight_dtype = match std::env::var("WEIGHTS").as_deref() {
        Err(_) | Ok("f32") => DType::F32,
        Ok("f16") => DType::F16,
        Ok(other) => return Err(format!("WEIGHTS={other}: use f32 or f16")),
    };
    Ok(Run { prompt: env("PROMPT", 1024)?.max(1), tokens: env("TOKENS", 8)?.max(1), config })
}

fn main() {
    let result = settings().and_then(|r| run(&r).map_err(|e| e.to_string()));
    if let Err(e) = result {
        eprintln!("decode failed: {e}");
        std::process::exit(1);
    }
}

fn run(r: &Run) -> s2attn::Result<()> {
    let mut options = ContextOptions::from_env()?;
    if options.backend == Backend::Auto {
        options.backend = Backend::Wgpu;
    }
    let ctx = Context::with_options(&options)?;
    println!("{}", ctx.describe());
    let c = &r.config;
    println!(
        "prompt {} tokens, {} generated; {} layers, d_model {}, {} heads / {} KV heads x {}, ffn {}, vocab {}, \
         {} weights, f32 KV cache; S2 block {}, local {} blocks, stride {}\n",
        r.prompt,
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
    // A deterministic prompt of valid ids.
    let prompt: Vec<u32> = (0..r.prompt as u64).map(|i| ((i * 2_654_435_761) % c.vocab as u64) as u32).collect();
    let only = std::env::var("ONLY").unwrap_or_default();
    let runs = [("dense", c.clone().all_dense()), ("hybrid S2 (layer 0 dense)", c.clone())];
    for (name, config) in runs.into_iter().filter(|(name, _)| name.starts_with(only.as_str())) {
        let model = Model::random(&ctx, config, 7)?;
        let mut state = State::new(&model, r.prompt + r.tokens + 1)?;
        let t = Instant::now();
        let first = model.prefill(&mut state, &prompt)?;
        let prefill_s = t.elapsed().as_secs_f64();
        // One warm-up token, then the timed loop (one submit per token, ids read back at the end).
        let second = model.step(&mut state)?;
        let t = Instant::now();
        let generated = model.generate(&mut state, r.tokens - 1)?;
        let per_token_ms = t.elapsed().as_secs_f64() * 1e3 / (r.tokens - 1).max(1) as f64;
        let reports = state.memory_report();
        let resident: u64 = reports.iter().map(|m| m.resident_bytes()).sum();
        let dense: u64 = reports.iter().map(|m| m.dense_bytes).sum();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "{name:>26}: prefill {:8.2} s ({:9.0} tokens/s, {} rows per submit); decode {:8.1} tokens/s, {:7.3} ms/token; \
             KV {:9.1} MiB resident of {:9.1} MiB dense; weights {:7.1} MiB",
            prefill_s,
            r.prompt as f64 / prefill_s,
            state.prefill_rows(),
            1e3 / per_token_ms,
            per_token_ms,
            mib(resident),
            mib(dense),
            mib(model.weight_bytes())
        );
        let shown: Vec<String> = [first, second].iter().chain(&generated).take(12).map(|t| t.to_string()).collect();
        println!("{:>26}  tokens: {} ...", "", shown.join(" "));
    }
    Ok(())
}
