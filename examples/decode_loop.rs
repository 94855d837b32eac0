//! The attention half of a decoder's token loop on the GPU, dense vs hybrid S2: per layer a
//! paged [`KvCache`] and a [`Decode`] op; per generated token one encoder and ONE submit that, for every
//! layer, appends the token's K/V from a device QKV buffer (`KvCache::append_encoded`) and decodes its
//! query (`Decode::encode`). The QKV rows are fixed random data standing in for the projections (the
//! full transformer, with norms, matmuls, RoPE, MLP and argmax, is not here yet). The prompt's K/V are
//! appended from the device in chunks. Prints tokens/s, time per token, the host's recording time per
//! token (every layer's append and decode encoded, before the submit) and KV memory.
//!
//! `PROMPT=32768 LAYERS=4 TOKENS=64 HEADS=32 KV_HEADS=8 HEAD_DIM=128 cargo run --release --example decode_loop`
//! (those are the defaults; `PROMPT=131072` for 128k).

use s2attn::{Backend, Context, ContextOptions, DType, Decode, KvCache, KvCacheConfig, Layout, S2Config, TensorView};
use std::time::Instant;

const BLOCK: u32 = 64;
const LOCAL: u32 = 16;
const STRIDE: u32 = 16;
const CHUNK: u32 = 4096;

fn env(name: &str, default: u32) -> Result<u32, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

struct Sizes {
    prompt: u32,
    layers: u32,
    tokens: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
}

fn main() {
    let sizes = (|| -> Result<Sizes, String> {
        Ok(Sizes {
            prompt: env("PROMPT", 32768)?,
            layers: env("LAYERS", 4)?.max(1),
            tokens: env("TOKENS", 64)?.max(1),
            heads: env("HEADS", 32)?,
            kv_heads: env("KV_HEADS", 8)?,
            head_dim: env("HEAD_DIM", 128)?,
        })
    })();
    let result = sizes.map_err(|e| e.to_string()).and_then(|s| run(&s).map_err(|e| e.to_string()));
    if let Err(e) = result {
        eprintln!("decode_loop failed: {e}");
        std::process::exit(1);
    }
}

fn run(s: &Sizes) -> s2attn::Result<()> {
    let mut options = ContextOptions::from_env()?;
    if options.backend == Backend::Auto {
        options.backend = Backend::Wgpu;
    }
    let ctx = Context::with_options(&options)?;
    println!("{}", ctx.describe());
    println!(
        "prompt {} tokens, {} generated, {} layers, {} heads / {} KV heads x {}, f16\n",
        s.prompt, s.tokens, s.layers, s.heads, s.kv_heads, s.head_dim
    );
    let dense = Layout::dense(s.heads, s.kv_heads, BLOCK, true)?;
    let sparse = Layout::s2(S2Config::new(s.heads, BLOCK, LOCAL, STRIDE).kv_heads(s.kv_heads))?;
    let all_dense: Vec<&Layout> = vec![&dense; s.layers as usize];
    let hybrid: Vec<&Layout> = (0..s.layers).map(|i| if i == 0 { &dense } else { &sparse }).collect();
    for (name, layers) in [("dense", all_dense), ("hybrid S2 (layer 0 dense)", hybrid)] {
        let (per_token_ms, host_us, kv_bytes, dense_bytes) = measure(&ctx, s, &layers)?;
        println!(
            "{name:>26}: {:8.1} tokens/s, {:7.3} ms/token, host recording {:6.1} us/token, KV {:8.1} MiB \
             resident (dense {:8.1} MiB)",
            1e3 / per_token_ms,
            per_token_ms,
            host_us,
            kv_bytes as f64 / (1u64 << 20) as f64,
            dense_bytes as f64 / (1u64 << 20) as f64
        );
    }
    Ok(())
}

/// Prefills every layer's cache, then times the token loop: (ms per token, host recording us per token,
/// resident KV bytes, dense bytes).
fn measure(ctx: &Context, s: &Sizes, layers: &[&Layout]) -> s2attn::Result<(f64, f64, u64, u64)> {
    let wgpu = ctx.wgpu().ok_or_else(|| s2attn::Error::Unsupported("decode_loop needs a wgpu device".into()))?;
    let (device, queue) = (wgpu.device(), wgpu.queue());
    let max_len = s.prompt + s.tokens;
    let mut caches = Vec::new();
    let mut ops = Vec::new();
    for layout in layers {
        let cache = KvCache::new(ctx, layout, KvCacheConfig::new(s.head_dim, DType::F16, max_len))?;
        ops.push(Decode::new(&cache)?);
        caches.push(cache);
    }
    let seqs: Vec<_> = caches.iter_mut().map(|c| c.add_sequence()).collect();
    // QKV rows [tokens, heads + 2 kv_heads, head_dim] of random f16: the projections' stand-in.
    let row = ((s.heads + 2 * s.kv_heads) * s.head_dim) as u64;
    let chunk = CHUNK.min(s.prompt.max(1));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<half::f16> = (0..chunk as u64 * row)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            half::f16::from_f32((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect();
    let qkv = wgpu::util::DeviceExt::create_buffer_init(
        device,
        &wgpu::util::BufferInitDescriptor {
            label: Some("decode_loop qkv"),
            contents: bytemuck::cast_slice(&data),
            usage: wgpu::BufferUsages::STORAGE,
        },
    );
    let q_cols = (s.heads * s.head_dim) as u64;
    let kv_cols = (s.kv_heads * s.head_dim) as u64;
    let k_view = TensorView::strided(&qkv, q_cols, row);
    let v_view = TensorView::strided(&qkv, q_cols + kv_cols, row);
    let q_view = TensorView::strided(&qkv, 0, row);
    let mut done = 0;
    while done < s.prompt {
        let n = chunk.min(s.prompt - done);
        for (cache, &seq) in caches.iter_mut().zip(&seqs) {
            let mut encoder = device.create_command_encoder(&Default::default());
            cache.append_encoded(&mut encoder, seq, &k_view, &v_view, n)?;
            queue.submit([encoder.finish()]);
        }
        done += n;
    }
    ctx.wait()?;
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("decode_loop out"),
        size: q_cols * 2 * layers.len() as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let lse = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("decode_loop lse"),
        size: 4 * (s.heads as u64) * layers.len() as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    // One token: every layer's append and decode in one encoder, one submit; returns the recording time.
    let step = |caches: &mut [KvCache]| -> s2attn::Result<f64> {
        let t = Instant::now();
        let mut encoder = device.create_command_encoder(&Default::default());
        for (i, ((cache, op), &seq)) in caches.iter_mut().zip(&ops).zip(&seqs).enumerate() {
            cache.append_encoded(&mut encoder, seq, &k_view, &v_view, 1)?;
            let o = TensorView::strided(&out, i as u64 * q_cols, q_cols);
            op.encode(&mut encoder, cache, &[seq], 1, &q_view, &o, (&lse, i as u64 * s.heads as u64))?;
        }
        let recorded = t.elapsed().as_secs_f64();
        queue.submit([encoder.finish()]);
        Ok(recorded)
    };
    // One warm-up token (kernels compiled, buffers sized), then the timed loop.
    step(&mut caches)?;
    ctx.wait()?;
    let t = Instant::now();
    let mut recording = 0.0;
    for _ in 1..s.tokens {
        recording += step(&mut caches)?;
    }
    ctx.wait()?;
    let timed = (s.tokens - 1).max(1) as f64;
    let per_token_ms = t.elapsed().as_secs_f64() * 1e3 / timed;
    let reports: Vec<_> = caches.iter().map(|c| c.memory_report()).collect();
    Ok((
        per_token_ms,
        recording * 1e6 / timed,
        reports.iter().map(|r| r.resident_bytes()).sum(),
        reports.iter().map(|r| r.dense_bytes).sum(),
    ))
}
