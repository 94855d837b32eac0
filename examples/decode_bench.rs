//! Decode benchmark: one decode step over the paged KV cache (one query token per sequence, or a
//! speculative window of several), S2 against dense attention on the same kernels, at 32k and 128k
//! context, batch 1 and 16, 32 query heads, 8 and 32 KV heads, head dim 128, f16, block 64, local 16
//! blocks, vert_stride 16. Kernel time from GPU timestamps or CUDA events (median), KV bytes the step
//! reads, the cache's memory report, the dense/S2 speedup, the ratio to the time of reading the step's KV
//! bytes once at the device's measured copy bandwidth, and for windows of several tokens the ratio to one
//! token; also the host's time to record one step of a token loop (`--host-steps` steps, a token
//! appended to every sequence between them; `--stagger T` first gives sequence i another i * T tokens
//! modulo the block, so that the sequences cross block boundaries at different steps, as in a real batch).
//! Ends with markdown rows for BENCHMARKS.md.
//!
//! `cargo run --release --example decode_bench -- [--ctx 32768,131072] [--batch 1,16] [--kv-heads 8,32]
//! [--window 1,4] [--iters 20] [--warmup 5] [--no-dense] [--host-steps 64] [--stagger 0]` (env: `S2ATTN_ADAPTER`, and
//! `S2ATTN_BACKEND`: the wgpu decode kernels unless it names `cuda`, which needs `--features cuda`).
//!
//! A cache larger than one storage binding (dense at 128k, batch 16) spreads over several segments; one
//! decode call then runs one split pass per segment, all inside the one timed compute pass.

use s2attn::{
    Backend, Context, ContextOptions, DType, Decode, KvCache, KvCacheConfig, Layout, MemoryReport, S2Config, SeqId,
    TensorView,
};
use std::time::Instant;

const HEADS: u32 = 32;
const HEAD_DIM: u32 = 128;
const BLOCK: u32 = 64;
const LOCAL: u32 = 16;
const STRIDE: u32 = 16;
/// Workgroups of the compute copy that measures the wgpu device's bandwidth (a grid-stride loop).
const COPY_WORKGROUPS: u32 = 4096;
/// Tokens appended per call while filling a sequence.
const CHUNK: u32 = 4096;

struct Args {
    ctx: Vec<u32>,
    batch: Vec<u32>,
    kv_heads: Vec<u32>,
    /// Query tokens per sequence per step (1: plain decode; more: a speculative window).
    window: Vec<u32>,
    iters: u32,
    warmup: u32,
    dense: bool,
    /// Steps of the host-side token loop after the timed steps (wgpu only).
    host_steps: u32,
    /// Tokens between consecutive sequences' phases in the host-side token loop (modulo the block).
    stagger: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        ctx: vec![32768, 131072],
        batch: vec![1, 16],
        kv_heads: vec![8, 32],
        window: vec![1],
        iters: 20,
        warmup: 5,
        dense: true,
        host_steps: 64,
        stagger: 0,
    };
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
            "--window" => a.window = list(it.next(), "--window")?,
            "--iters" => a.iters = list(it.next(), "--iters")?[0],
            "--warmup" => a.warmup = list(it.next(), "--warmup")?[0],
            "--no-dense" => a.dense = false,
            "--host-steps" => a.host_steps = list(it.next(), "--host-steps")?[0],
            "--stagger" => a.stagger = list(it.next(), "--stagger")?[0],
            "--help" | "-h" => {
                return Err("usage: decode_bench [--ctx 32768,131072] [--batch 1,16] [--kv-heads 8,32] \
                            [--window 1,4] [--iters 20] [--warmup 5] [--no-dense] [--host-steps 64] [--stagger 0]"
                    .into())
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    if a.window.contains(&0) {
        return Err("--window: a step queries at least one token per sequence".into());
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

/// One layout's decode steps at one (context, batch).
struct Measured {
    /// One per window, in the order asked.
    steps: Vec<Step>,
    report: MemoryReport,
    explain: String,
}

fn run(args: &Args) -> s2attn::Result<()> {
    // The wgpu decode kernels unless the environment names CUDA (never CUDA under Auto).
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
                let sparse = measure(&ctx, &s2, ctx_len, batch, &args.window, args)?;
                let dense = if args.dense {
                    Some(measure(&ctx, &Layout::dense(HEADS, kv_heads, BLOCK, true)?, ctx_len, batch, &[1], args)?)
                } else {
                    None
                };
                println!("ctx {ctx_len} batch {batch} kv_heads {kv_heads}");
                println!("  S2    {}\n        {}", sparse.report, sparse.explain);
                let one = sparse.steps.iter().find(|s| s.window == 1).map(|s| s.ms);
                for step in &sparse.steps {
                    let vs_one = match one {
                        Some(one) if step.window > 1 => format!(", {:.2}x one token", step.ms / one),
                        _ => String::new(),
                    };
                    println!(
                        "  S2    window {}: {:.4} ms, reads {:.1} MB ({:.1} GB/s), {:.2}x the read time at copy bandwidth{vs_one}",
                        step.window,
                        step.ms,
                        step.read_bytes as f64 / 1e6,
                        step.read_bytes as f64 / step.ms / 1e6,
                        step.over_floor(bw),
                    );
                }
                let dense_one = dense.as_ref().map(|d| &d.steps[0]);
                if let (Some(dense), Some(d), Some(one)) = (&dense, dense_one, one) {
                    println!(
                        "  dense {:.4} ms, reads {:.1} MB ({:.1} GB/s); S2 is {:.2}x faster\n        {}",
                        d.ms,
                        d.read_bytes as f64 / 1e6,
                        d.read_bytes as f64 / d.ms / 1e6,
                        d.ms / one,
                        dense.explain
                    );
                }
                for step in &sparse.steps {
                    let dense_ms = dense_one.filter(|_| step.window == 1).map(|d| d.ms);
                    rows.push(format!(
                        "| {} | {} | {ctx_len} | {batch} | {kv_heads} | {} | {:.4} | {} | {} | {:.3} | {:.2} | {} |",
                        ctx.adapter_name(),
                        ctx.backend_name(),
                        step.window,
                        step.ms,
                        dense_ms.map_or("-".into(), |d| format!("{d:.4}")),
                        dense_ms.map_or("-".into(), |d| format!("{:.2}x", d / step.ms)),
                        sparse.report.fraction(),
                        step.over_floor(bw),
                        one.filter(|_| step.window > 1).map_or("-".into(), |o| format!("{:.2}x", step.ms / o)),
                    ));
                }
            }
        }
    }
    println!(
        "\n| device | backend | context | batch | KV heads | window | S2 decode ms | dense decode ms | speedup | KV cache / dense bytes | S2 time / KV read time at copy bandwidth | window / one token |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    rows.iter().for_each(|r| println!("{r}"));
    Ok(())
}

/// One timed decode step of a window.
struct Step {
    /// Query tokens per sequence.
    window: u32,
    /// Median time.
    ms: f64,
    /// KV bytes the step reads at least once (attended pages, K and V).
    read_bytes: u64,
}

impl Step {
    /// The time over that of reading `read_bytes` once at `bandwidth` bytes per second.
    fn over_floor(&self, bandwidth: f64) -> f64 {
        self.ms / (self.read_bytes as f64 / bandwidth * 1e3)
    }
}

/// Fills a cache with `batch` sequences of `ctx_len` random tokens and times one decode step of each
/// window in `windows`.
fn measure(
    ctx: &Context,
    layout: &Layout,
    ctx_len: u32,
    batch: u32,
    windows: &[u32],
    args: &Args,
) -> s2attn::Result<Measured> {
    let max_window = windows.iter().copied().max().unwrap_or(1);
    // Room for the token loop of `host_steps` after the timed steps, and its stagger.
    let room = ctx_len + args.host_steps + BLOCK;
    let config = KvCacheConfig::new(HEAD_DIM, DType::F16, room).sequences(batch).query_window(max_window);
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
    let mut steps = Vec::with_capacity(windows.len());
    let mut explain = format!("fill {fill_s:.1} s");
    for &window in windows {
        let q = rng.f16s((batch * window * HEADS * HEAD_DIM) as usize);
        let timing = decode.time(&cache, &seqs, &q, args.warmup, args.iters)?;
        // Distinct blocks (a window split into several families reads some blocks more than once).
        let blocks: usize = decode
            .work_lists(&cache, &seqs, window)?
            .iter()
            .map(|(_, l)| l.entries().iter().map(|e| e.base).collect::<std::collections::HashSet<u32>>().len())
            .sum();
        explain += &format!(
            "\n        window {window}: {} ({} timing, min {:.4} / max {:.4} ms)",
            decode.explain(&cache, &seqs, window)?,
            if timing.gpu_timestamps { "GPU" } else { "wall-clock" },
            timing.min_ms(),
            timing.max_ms()
        );
        steps.push(Step {
            window,
            ms: timing.median_ms(),
            read_bytes: blocks as u64 * 2 * (BLOCK * HEAD_DIM) as u64 * 2,
        });
    }
    let report = cache.memory_report();
    if let Some(us) = host_step_us(ctx, &mut cache, &decode, &seqs, &mut rng, args.host_steps, args.stagger)? {
        let stagger =
            if args.stagger > 0 { format!(", sequences {} tokens apart", args.stagger) } else { String::new() };
        explain +=
            &format!("\n        host: {us:.1} us recording one decode step, over {} steps{stagger}", args.host_steps);
    }
    Ok(Measured { steps, report, explain })
}

/// The host's share of a token loop's step: the time `Decode::encode` (wgpu) or `Decode::run_cuda` (CUDA,
/// enqueueing on device buffers) takes to record one step (its work lists patched, or rebuilt from the page
/// tables where a block boundary was crossed, and on CUDA uploaded where they changed), with one token
/// appended to every sequence between steps (not timed) and each step run to completion; mean over `steps`
/// steps (`None` for 0 steps).
fn host_step_us(
    ctx: &Context,
    cache: &mut KvCache,
    decode: &Decode,
    seqs: &[SeqId],
    rng: &mut Rng,
    steps: u32,
    stagger: u32,
) -> s2attn::Result<Option<f64>> {
    if steps == 0 {
        return Ok(None);
    }
    let rows = seqs.len() as u64 * (HEADS * HEAD_DIM) as u64;
    let q = rng.f16s(rows as usize);
    let kv_row = (cache.layout().num_kv_heads() * HEAD_DIM) as usize;
    let (k, v) = (rng.f16s(kv_row), rng.f16s(kv_row));
    for (i, &s) in seqs.iter().enumerate() {
        let extra = (i as u32 * stagger % BLOCK) as usize;
        if extra > 0 {
            let (ks, vs) = (rng.f16s(extra * kv_row), rng.f16s(extra * kv_row));
            cache.append(s, &ks, &vs)?;
        }
    }
    let mut recording = 0.0;
    let mut step = |cache: &mut KvCache, record: &mut dyn FnMut(&KvCache) -> s2attn::Result<()>| {
        for &s in seqs {
            cache.append(s, &k, &v)?;
        }
        let t = Instant::now();
        record(cache)?;
        recording += t.elapsed().as_secs_f64();
        Ok::<(), s2attn::Error>(())
    };
    #[cfg(feature = "cuda")]
    if let Some(c) = ctx.cuda() {
        let fail = |e: cudarc::driver::DriverError| s2attn::Error::Unsupported(format!("CUDA buffers: {e}"));
        let stream = c.stream().clone();
        let q = stream.clone_htod(&q.iter().map(|x| x.to_bits()).collect::<Vec<u16>>()).map_err(fail)?;
        let mut out = stream.alloc_zeros::<u16>(rows as usize).map_err(fail)?;
        let mut lse = stream.alloc_zeros::<f32>((rows / HEAD_DIM as u64) as usize).map_err(fail)?;
        for _ in 0..steps {
            step(cache, &mut |cache| decode.run_cuda(cache, seqs, 1, &q, &mut out, &mut lse))?;
            ctx.wait()?;
        }
        return Ok(Some(recording * 1e6 / steps as f64));
    }
    let Some(w) = ctx.wgpu() else { return Ok(None) };
    let (device, queue) = (w.device(), w.queue());
    let buffer = |label, size| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (qb, out, lse) = (buffer("q", rows * 2), buffer("out", rows * 2), buffer("lse", rows / HEAD_DIM as u64 * 4));
    queue.write_buffer(&qb, 0, bytemuck::cast_slice(&q));
    for _ in 0..steps {
        let mut encoder = device.create_command_encoder(&Default::default());
        step(cache, &mut |cache| {
            decode.encode(&mut encoder, cache, seqs, 1, &TensorView::new(&qb), &TensorView::new(&out), (&lse, 0))
        })?;
        queue.submit([encoder.finish()]);
        ctx.wait()?;
    }
    Ok(Some(recording * 1e6 / steps as f64))
}

/// Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written), from the wall
/// clock around waited runs of 8 back-to-back copies of up to 1 GiB, on the context's own device (a
/// compute kernel copying 16-byte words on wgpu, a device-to-device copy on the CUDA stream).
fn copy_bandwidth(ctx: &Context) -> s2attn::Result<f64> {
    let (size, mut copies) = copier(ctx)?;
    copies(2)?;
    let best = (0..3).map(|_| copies(8)).collect::<s2attn::Result<Vec<f64>>>()?.into_iter().fold(f64::MAX, f64::min);
    Ok(2.0 * 8.0 * size as f64 / best)
}

/// Bytes per copy and a function timing `n` copies (seconds, waited).
type Copier<'a> = (u64, Box<dyn FnMut(u32) -> s2attn::Result<f64> + 'a>);

fn copier(ctx: &Context) -> s2attn::Result<Copier<'_>> {
    #[cfg(feature = "cuda")]
    if let Some(c) = ctx.cuda() {
        let size = 1usize << 30;
        let fail = |e: cudarc::driver::DriverError| s2attn::Error::Unsupported(format!("CUDA copy: {e}"));
        let stream = c.stream().clone();
        let src = stream.alloc_zeros::<u8>(size).map_err(fail)?;
        let mut dst = stream.alloc_zeros::<u8>(size).map_err(fail)?;
        return Ok((
            size as u64,
            Box::new(move |n| {
                let t = Instant::now();
                for _ in 0..n {
                    stream.memcpy_dtod(&src, &mut dst).map_err(fail)?;
                }
                stream.synchronize().map_err(fail)?;
                Ok(t.elapsed().as_secs_f64())
            }),
        ));
    }
    let Some(w) = ctx.wgpu() else {
        return Err(s2attn::Error::Unsupported("decode_bench: no device to copy on".into()));
    };
    let device = w.device();
    let size = (1u64 << 30).min(w.caps().max_buffer / 2).min(w.caps().max_storage_binding) & !15;
    let mk = |usage| {
        device.create_buffer(&wgpu::BufferDescriptor { label: Some("bw"), size, usage, mapped_at_creation: false })
    };
    let (src, dst) = (mk(wgpu::BufferUsages::STORAGE), mk(wgpu::BufferUsages::STORAGE));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("copy"),
        source: wgpu::ShaderSource::Wgsl(include_str!("common/copy.wgsl").into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("copy"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("copy"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: src.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: dst.as_entire_binding() },
        ],
    });
    Ok((
        size,
        Box::new(move |n| {
            let mut encoder = device.create_command_encoder(&Default::default());
            for _ in 0..n {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(COPY_WORKGROUPS, 1, 1);
            }
            let t = Instant::now();
            w.queue().submit([encoder.finish()]);
            w.wait()?;
            Ok(t.elapsed().as_secs_f64())
        }),
    ))
}
