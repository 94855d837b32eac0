//! GPU timing for `s2attn-bench` through the library's public encode API, rotating input sets.
//!
//! Each input set is uploaded once into buffers the bench owns (with its own outputs); pass `r` (warm-ups
//! first, then timed passes) uses set `r % sets`. On wgpu the forward is recorded with
//! [`Attention::encode_timed`] and the backward with [`AttentionGrad::encode_timed`]; a timed pass's sample
//! is the sum of its timestamp pairs (forward: start to end of the forward pass; forward+backward: that
//! plus start of the dQ pass to end of the dK/dV pass, so the gap between the two is not counted). Where
//! the adapter has no timestamps, the sample is the wall clock around one waited submit holding the pass
//! (recorded before the clock starts). On CUDA the forward runs on bench-owned device buffers through
//! `Attention::forward_cuda` (feature `cuda`) between CUDA events.

use crate::data::{Sample, Set};
use s2attn::gpu::{GradBuffers, TimestampQueries, WgpuContext};
use s2attn::{Attention, AttentionGrad, TensorView, Timing};

/// Device copies of one input set and the outputs its passes write: `inputs` are `q, k, v` (and `d_out`
/// for the backward), `outputs` are `o, lse` (and `dq, dk, dv`).
struct GpuSet {
    inputs: Vec<wgpu::Buffer>,
    outputs: Vec<wgpu::Buffer>,
}

impl GpuSet {
    fn grads(&self) -> GradBuffers<'_> {
        let (i, o) = (&self.inputs, &self.outputs);
        GradBuffers {
            q: &i[0],
            k: &i[1],
            v: &i[2],
            out: &o[0],
            lse: &o[1],
            d_out: &i[3],
            dq: &o[2],
            dk: &o[3],
            dv: &o[4],
        }
    }
}

/// Uploads every set; `outputs` are the byte sizes of the output buffers of one set. Outputs are cleared
/// here so that no lazy zero-fill lands before a timed pass.
fn upload<T: Sample>(ctx: &WgpuContext, sets: &[Set<T>], outputs: &[u64]) -> Vec<GpuSet> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let buffer = |label, size: u64| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(16),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    let gpu = sets
        .iter()
        .map(|set| {
            let inputs = set
                .iter()
                .map(|t| {
                    let bytes: &[u8] = bytemuck::cast_slice(t);
                    let b = buffer("s2attn-bench input", bytes.len() as u64);
                    queue.write_buffer(&b, 0, bytes);
                    b
                })
                .collect();
            let outputs = outputs
                .iter()
                .map(|&size| {
                    let b = buffer("s2attn-bench output", size);
                    encoder.clear_buffer(&b, 0, None);
                    b
                })
                .collect();
            GpuSet { inputs, outputs }
        })
        .collect();
    queue.submit([encoder.finish()]);
    gpu
}

/// Where one timed pass writes its timestamps: the query set and its first query.
type Stamps<'a> = Option<(&'a wgpu::QuerySet, u32)>;

/// Times passes recorded by `encode(encoder, pass, stamps)`: `warmup` untimed passes (a submit each), then
/// `iters` timed ones (one submit per query set of up to 4096 stamps). With a `budget` (seconds), each
/// warm-up is waited for and timed on the wall clock; warm-ups stop once they have taken a quarter of the
/// budget, and the timed passes are cut to what the rest of the budget holds at the last warm-up's pace
/// (at least one). Warm-ups then go on, each waited for, until they have taken `warm_s` seconds of wall
/// clock (within a quarter of the budget): GPU clocks ramp up from idle over ~0.1 s and more, and two
/// warm-ups of a 25 ms pass left some timed passes at half speed. A timed pass with stamps writes
/// `2 * pairs` queries from the first one given; its sample is the sum over the pairs of end minus start,
/// and each pair's own samples come back too (one list per pair). Without timestamps, each pass is its
/// own waited submit, the sample is its wall clock, and there are no per-pair samples.
fn time_rotating(
    ctx: &WgpuContext,
    (warmup, iters): (u32, u32),
    budget: Option<f64>,
    warm_s: f64,
    pairs: u32,
    encode: impl Fn(&mut wgpu::CommandEncoder, u32, Stamps<'_>) -> s2attn::Result<()>,
) -> Result<(Timing, Vec<Vec<f64>>), String> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let e = |e: s2attn::Error| e.to_string();
    let (mut spent, mut pace, mut warmed) = (0.0, None, 0);
    let warm_start = std::time::Instant::now();
    let warm_s = budget.map_or(warm_s, |b| warm_s.min(b / 4.0));
    loop {
        // The counted warm-ups go out unwaited; past them, one at a time, each waited for, until `warm_s`.
        let counted = warmed < warmup;
        if !counted {
            ctx.wait().map_err(e)?;
            if warmed == 0 || warm_start.elapsed().as_secs_f64() >= warm_s {
                break;
            }
        }
        let mut encoder = device.create_command_encoder(&Default::default());
        encode(&mut encoder, warmed, None).map_err(e)?;
        let commands = encoder.finish();
        let t = std::time::Instant::now();
        queue.submit([commands]);
        warmed += 1;
        if !counted || budget.is_some() {
            ctx.wait().map_err(e)?;
        }
        if let Some(b) = budget {
            let s = t.elapsed().as_secs_f64();
            spent += s;
            pace = Some(s);
            if spent >= b / 4.0 {
                break;
            }
        }
    }
    ctx.wait().map_err(e)?;
    let iters = match (budget, pace) {
        (Some(b), Some(p)) if p > 0.0 => (((b - spent) / p).floor().max(1.0) as u32).min(iters),
        _ => iters,
    };
    let warmup = warmed;
    let mut samples_ms = Vec::with_capacity(iters as usize);
    if !ctx.caps().timestamps {
        for i in 0..iters {
            let mut encoder = device.create_command_encoder(&Default::default());
            encode(&mut encoder, warmup + i, None).map_err(e)?;
            let commands = encoder.finish();
            let t = std::time::Instant::now();
            queue.submit([commands]);
            ctx.wait().map_err(e)?;
            samples_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        return Ok((Timing { samples_ms, gpu_timestamps: false }, Vec::new()));
    }
    let mut parts = vec![Vec::with_capacity(iters as usize); pairs as usize];
    let per_pass = 2 * pairs;
    let passes_per_set = (wgpu::QUERY_SET_MAX_QUERIES / per_pass).max(1);
    let mut done = 0;
    while done < iters {
        let n = passes_per_set.min(iters - done);
        let queries = TimestampQueries::new(ctx, n * per_pass);
        let mut encoder = device.create_command_encoder(&Default::default());
        for i in 0..n {
            encode(&mut encoder, warmup + done + i, Some((queries.set(), i * per_pass))).map_err(e)?;
        }
        queries.resolve(&mut encoder);
        queue.submit([encoder.finish()]);
        for ms in queries.read_pairs_ms(ctx).map_err(e)?.chunks(pairs as usize) {
            samples_ms.push(ms.iter().sum());
            parts.iter_mut().zip(ms).for_each(|(part, &ms)| part.push(ms));
        }
        done += n;
    }
    Ok((Timing { samples_ms, gpu_timestamps: true }, parts))
}

/// A timed configuration: the samples, and with a backward and GPU timestamps the median milliseconds
/// of the forward pass and of the backward passes on their own.
pub struct Timed {
    /// Per timed pass (forward, or forward plus backward).
    pub timing: Timing,
    /// (forward, backward) medians.
    pub split_ms: Option<(f64, f64)>,
}

/// Times the forward of `op` alone (`bwd` = `None`), or the forward and then the backward `bwd` of the
/// same set, rotating through `sets` (`[q, k, v]`, plus `d_out` with a backward). `lse_elems` is the
/// forward's LSE length; `runs` is (warm-ups, timed passes), cut to fit `budget` seconds when given.
#[allow(clippy::too_many_arguments)]
pub fn time_wgpu<T: Sample>(
    ctx: &WgpuContext,
    op: &Attention,
    bwd: Option<&AttentionGrad>,
    sets: &[Set<T>],
    lse_elems: u64,
    runs: (u32, u32),
    budget: Option<f64>,
    warm_s: f64,
) -> Result<Timed, String> {
    let Some(first) = sets.first() else { return Err("no input set".into()) };
    let bytes = |i: usize| std::mem::size_of_val(first[i].as_slice()) as u64;
    let mut outputs = vec![bytes(0), lse_elems * 4];
    if bwd.is_some() {
        if first.len() < 4 {
            return Err("the backward needs d_out in each input set".into());
        }
        outputs.extend([bytes(0), bytes(1), bytes(2)]);
    }
    let gpu = upload(ctx, sets, &outputs);
    let pairs = if bwd.is_some() { 2 } else { 1 };
    let (timing, parts) = time_rotating(ctx, runs, budget, warm_s, pairs, |encoder, pass, stamps| {
        let s = &gpu[pass as usize % gpu.len()];
        let view = |b| TensorView::new(b);
        let (q, k, v, o) = (view(&s.inputs[0]), view(&s.inputs[1]), view(&s.inputs[2]), view(&s.outputs[0]));
        let lse = (&s.outputs[1], 0);
        match stamps {
            Some((set, first)) => {
                let writes = wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(first),
                    end_of_pass_write_index: Some(first + 1),
                };
                op.encode_timed(encoder, &q, &k, &v, &o, lse, writes)?;
                if let Some(g) = bwd {
                    g.encode_timed(encoder, &s.grads(), set, (first + 2, first + 3))?;
                }
            }
            None => {
                op.encode(encoder, &q, &k, &v, &o, lse)?;
                if let Some(g) = bwd {
                    g.encode(encoder, &s.grads())?;
                }
            }
        }
        Ok(())
    })?;
    let median = |x: &[f64]| Timing { samples_ms: x.to_vec(), gpu_timestamps: true }.median_ms();
    let split_ms = match parts.as_slice() {
        [f, b] => Some((median(f), median(b))),
        _ => None,
    };
    Ok(Timed { timing, split_ms })
}

/// Times the CUDA forward of `op` rotating through `sets` (`[q, k, v]`), each on device buffers the
/// bench owns, between CUDA events on the op's stream.
#[cfg(feature = "cuda")]
pub fn time_cuda<T: Sample>(
    ctx: &s2attn::Context,
    op: &Attention,
    sets: &[Set<T>],
    lse_elems: u64,
    (warmup, iters): (u32, u32),
) -> Result<Timing, String> {
    use cudarc::driver::sys::CUevent_flags;
    let cuda = ctx.cuda().ok_or("not a CUDA context")?;
    let stream = cuda.stream();
    let e = |what: &'static str| move |e: cudarc::driver::DriverError| format!("{what}: {e}");
    struct Dev {
        qkv: Vec<cudarc::driver::CudaSlice<u8>>,
        out: cudarc::driver::CudaSlice<u8>,
        lse: cudarc::driver::CudaSlice<f32>,
    }
    let mut dev = Vec::with_capacity(sets.len());
    for set in sets {
        let qkv = set[..3]
            .iter()
            .map(|t| stream.clone_htod(bytemuck::cast_slice::<T, u8>(t)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(e("uploading an input set"))?;
        let out = stream.alloc_zeros::<u8>(std::mem::size_of_val(set[0].as_slice())).map_err(e("allocating O"))?;
        let lse = stream.alloc_zeros::<f32>(lse_elems as usize).map_err(e("allocating the LSE"))?;
        dev.push(Dev { qkv, out, lse });
    }
    let mut run = |pass: u32| -> Result<(), String> {
        let n = dev.len();
        let d = &mut dev[pass as usize % n];
        op.forward_cuda(&d.qkv[0], &d.qkv[1], &d.qkv[2], &mut d.out, &mut d.lse).map_err(|e| e.to_string())
    };
    for r in 0..warmup {
        run(r)?;
    }
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut events = Vec::with_capacity(iters as usize);
    for i in 0..iters {
        let start = cuda.cudarc().new_event(flags).map_err(e("creating an event"))?;
        let end = cuda.cudarc().new_event(flags).map_err(e("creating an event"))?;
        start.record(stream).map_err(e("recording an event"))?;
        run(warmup + i)?;
        end.record(stream).map_err(e("recording an event"))?;
        events.push((start, end));
    }
    stream.synchronize().map_err(e("running the forward"))?;
    let samples_ms = events
        .iter()
        .map(|(s, end)| s.elapsed_ms(end).map(f64::from).map_err(e("reading an event")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Timing { samples_ms, gpu_timestamps: true })
}
