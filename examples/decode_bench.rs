//! Decode benchmark: one decode step (one query token per sequence) over the paged KV cache, S2
//! against dense attention on the same kernels, at 32k and 128k context, batch 1 and 16, 32 query heads,
//! 8 and 32 KV heads, head dim 128, f16, block 64, local 16 blocks, vert_stride 16. Kernel time from GPU
//! timestamps (median), KV bytes the step reads, the cache's memory report, the dense/S2 speedup, and the
//! ratio to the time of reading the step's KV bytes once at the device's measured copy bandwidth. Ends
//! with markdown rows for BENCHMARKS.md.
//!
//! `cargo run --release --example decode_bench -- [--ctx 32768,131072] [--batch 1,16] [--kv-heads 8,32]
//! [--iters 20] [--warmup 5] [--no-dense]` (env: `S2ATTN_ADAPTER`, `S2ATTN_BACKEND`).
//!
//! A cache larger than one storage binding (dense at 128k, batch 16) spreads over several segments; one
//! decode call then runs one split pass per segment, all inside the one timed compute pass.

use s2attn::{
    Backend, Context, ContextOptions, DType, Decode, KvCache, KvCacheConfig, Layout, MemoryReport, S2Config, SeqId,
};
use std::time::Instant;

const HEADS: u32 = 32;
const HEAD_DIM: u32 = 128;
const BLOCK: u32 = 64;
const LOCAL: u32 = 16;
const STRIDE: u32 = 16;
/// Tokens appended per call while filling a sequence.
const CHUNK: u32 = 4096;

struct Args {
    ctx: Vec<u32>,
    batch: Vec<u32>,
    kv_heads: Vec<u32>,
    iters: u32,
    warmup: u32,
    dense: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a =
        Args { ctx: vec![32768, 131072], batch: vec![1, 16], kv_heads: vec![8, 32], iters: 20, warmup: 5, dense: true };
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>, name: &str| -> Result<Vec<u32>, String> {
        let v = v.ok_or(format!("{name} needs a value"))?;
        v.split(',').map(|x| x.trim().parse().map_err(|_| format!("{name}: `{x}` is not a number"))).collect()
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--ctx" => a.ctx = list(it.next(), "--ctx")?,
            "--batch" => a.batch = list(it.next(), "--batch")?,
            "--kv-heads" => a.kv_heads = list(it.next(), "--kv-heads")?,
            "--iters" => a.iters = list(it.next(), "--iters")?[0],
            "--warmup" => a.warmup = list(it.next(), "--warmup")?[0],
            "--no-dense" => a.dense = false,
            "--help" | "-h" => {
                return Err("usage: decode_bench [--ctx 32768,131072] [--batch 1,16] [--kv-heads 8,32] \
                            [--iters 20] [--warmup 5] [--no-dense]"
                    .into())
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("decode_bench failed: {e}");
        std::process::exit(1);
    }
}

/// xorshift f16 values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn f16s(&mut self, n: usize) -> Vec<half::f16> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                half::f16::from_f32((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            })
            .collect()
    }
}

/// One layout's decode step at one (context, batch).
struct Measured {
    ms: f64,
    /// KV bytes the step reads (attended pages, K and V).
    read_bytes: u64,
    report: MemoryReport,
    explain: String,
}

fn run(args: &Args) -> s2attn::Result<()> {
    // The decode kernels are WGSL: take the wgpu device the environment names (never CUDA under Auto).
    let mut options = ContextOptions::from_env()?;
    if options.backend == Backend::Auto {
        options.backend = Backend::Wgpu;
    }
    let ctx = Context::with_options(&options)?;
    println!("{}\n", ctx.describe());
    let bw = copy_bandwidth(&ctx)?;
    println!("copy bandwidth {:.0} GB/s (read + write of a device-to-device copy)\n", bw / 1e9);
    let mut rows = Vec::new();
    for &kv_heads in &args.kv_heads {
        for &ctx_len in &args.ctx {
            for &batch in &args.batch {
                let s2 = Layout::s2(S2Config::new(HEADS, BLOCK, LOCAL, STRIDE).kv_heads(kv_heads))?;
                let sparse = measure(&ctx, &s2, ctx_len, batch, args)?;
                let dense = if args.dense {
                    Some(measure(&ctx, &Layout::dense(HEADS, kv_heads, BLOCK, true)?, ctx_len, batch, args)?)
                } else {
                    None
                };
                let ideal_ms = sparse.read_bytes as f64 / bw * 1e3;
                println!("ctx {ctx_len} batch {batch} kv_heads {kv_heads}");
                println!(
                    "  S2    {:.4} ms, reads {:.1} MB ({:.1} GB/s), {:.2}x the read time at copy bandwidth\n        {}\n        {}",
                    sparse.ms,
                    sparse.read_bytes as f64 / 1e6,
                    sparse.read_bytes as f64 / sparse.ms / 1e6,
                    sparse.ms / ideal_ms,
                    sparse.report,
                    sparse.explain
                );
                if let Some(d) = &dense {
                    println!(
                        "  dense {:.4} ms, reads {:.1} MB ({:.1} GB/s); S2 is {:.2}x faster\n        {}",
                        d.ms,
                        d.read_bytes as f64 / 1e6,
                        d.read_bytes as f64 / d.ms / 1e6,
                        d.ms / sparse.ms,
                        d.explain
                    );
                }
                rows.push(format!(
                    "| {} | {ctx_len} | {batch} | {kv_heads} | {:.4} | {} | {} | {:.3} | {:.2} |",
                    ctx.adapter_name(),
                    sparse.ms,
                    dense.as_ref().map_or("-".into(), |d| format!("{:.4}", d.ms)),
                    dense.as_ref().map_or("-".into(), |d| format!("{:.2}x", d.ms / sparse.ms)),
                    sparse.report.fraction(),
                    sparse.ms / ideal_ms,
                ));
            }
        }
    }
    println!(
        "\n| device | context | batch | KV heads | S2 decode ms | dense decode ms | speedup | KV cache / dense bytes | S2 time / KV read time at copy bandwidth |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    rows.iter().for_each(|r| println!("{r}"));
    Ok(())
}

/// Fills a cache with `batch` sequences of `ctx_len` random tokens and times one decode step.
fn measure(ctx: &Context, layout: &Layout, ctx_len: u32, batch: u32, args: &Args) -> s2attn::Result<Measured> {
    let config = KvCacheConfig::new(HEAD_DIM, DType::F16, ctx_len).sequences(batch);
    let mut cache = KvCache::new(ctx, layout, config)?;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ctx_len as u64);
    let kv_row = (layout.num_kv_heads() * HEAD_DIM) as usize;
    let chunk_k = rng.f16s(CHUNK as usize * kv_row);
    let chunk_v = rng.f16s(CHUNK as usize * kv_row);
    let t = Instant::now();
    let seqs: Vec<SeqId> = (0..batch).map(|_| cache.add_sequence()).collect();
    for &s in &seqs {
        let mut len = 0;
        while len < ctx_len {
            let c = CHUNK.min(ctx_len - len) as usize;
            cache.append(s, &chunk_k[..c * kv_row], &chunk_v[..c * kv_row])?;
            len += c as u32;
        }
    }
    ctx.wait()?;
    let fill_s = t.elapsed().as_secs_f64();
    let decode = Decode::new(&cache)?;
    let q = rng.f16s((batch * HEADS * HEAD_DIM) as usize);
    let timing = decode.time(&cache, &seqs, &q, args.warmup, args.iters)?;
    let blocks: usize = decode.work_lists(&cache, &seqs, 1)?.iter().map(|(_, l)| l.entries().len()).sum();
    let explain = format!(
        "{} (fill {fill_s:.1} s, {} timestamps, min {:.4} / max {:.4} ms)",
        decode.explain(&cache, &seqs, 1)?,
        if timing.gpu_timestamps { "GPU" } else { "wall-clock" },
        timing.min_ms(),
        timing.max_ms()
    );
    Ok(Measured {
        ms: timing.median_ms(),
        read_bytes: blocks as u64 * 2 * (BLOCK * HEAD_DIM) as u64 * 2,
        report: cache.memory_report(),
        explain,
    })
}

/// Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written), from the wall
/// clock around waited submits of 8 back-to-back copies.
fn copy_bandwidth(ctx: &Context) -> s2attn::Result<f64> {
    let Some(w) = ctx.wgpu() else {
        return Err(s2attn::Error::Unsupported("decode_bench needs a wgpu device".into()));
    };
    let size = (1u64 << 30).min(w.caps().max_buffer / 2) & !3;
    let mk = |usage| {
        w.device().create_buffer(&wgpu::BufferDescriptor { label: Some("bw"), size, usage, mapped_at_creation: false })
    };
    let (src, dst) = (mk(wgpu::BufferUsages::COPY_SRC), mk(wgpu::BufferUsages::COPY_DST));
    let copies = |n: u32| -> s2attn::Result<f64> {
        let mut encoder = w.device().create_command_encoder(&Default::default());
        for _ in 0..n {
            encoder.copy_buffer_to_buffer(&src, 0, &dst, 0, size);
        }
        let t = Instant::now();
        w.queue().submit([encoder.finish()]);
        w.wait()?;
        Ok(t.elapsed().as_secs_f64())
    };
    copies(2)?;
    let best = (0..3).map(|_| copies(8)).collect::<s2attn::Result<Vec<f64>>>()?.into_iter().fold(f64::MAX, f64::min);
    Ok(2.0 * 8.0 * size as f64 / best)
}
