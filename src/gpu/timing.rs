//! Timing of encoded GPU work, for any op that can record itself into an encoder: `warmup` untimed runs,
//! then `iters` timed ones, with GPU timestamps around each run where the device has them (one query
//! pair per run: the first pass writes the beginning, the last pass the end) and the wall clock around
//! each waited submit elsewhere.

use super::forward::read_buffer;
use super::{Timing, WgpuContext};
use crate::error::Result;

/// Where one timed run writes its two timestamps.
#[derive(Clone, Copy)]
pub(crate) struct Stamps<'a> {
    /// The query set.
    pub set: &'a wgpu::QuerySet,
    /// Query written at the beginning of the run's first pass.
    pub begin: u32,
    /// Query written at the end of the run's last pass.
    pub end: u32,
}

/// Times `encode`, which records one run (writing `Stamps` when given some).
pub(crate) fn time_encoded(
    ctx: &WgpuContext,
    warmup: u32,
    iters: u32,
    encode: impl Fn(&mut wgpu::CommandEncoder, Option<Stamps<'_>>) -> Result<()>,
) -> Result<Timing> {
    let (device, queue) = (ctx.device(), ctx.queue());
    let run = |stamps| -> Result<wgpu::CommandBuffer> {
        let mut encoder = device.create_command_encoder(&Default::default());
        encode(&mut encoder, stamps)?;
        Ok(encoder.finish())
    };
    for _ in 0..warmup {
        queue.submit([run(None)?]);
    }
    ctx.wait()?;
    if !ctx.caps().timestamps {
        let mut samples_ms = Vec::with_capacity(iters as usize);
        for _ in 0..iters {
            let commands = run(None)?;
            let t = std::time::Instant::now();
            queue.submit([commands]);
            ctx.wait()?;
            samples_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        return Ok(Timing { samples_ms, gpu_timestamps: false });
    }
    let count = 2 * iters;
    let set = device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("s2attn timing"),
        ty: wgpu::QueryType::Timestamp,
        count,
    });
    let bytes = count as u64 * 8;
    let buffer = |label, usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let resolve = buffer("s2attn timestamps", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
    let readback = buffer("s2attn timestamps readback", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
    let mut encoder = device.create_command_encoder(&Default::default());
    for i in 0..iters {
        encode(&mut encoder, Some(Stamps { set: &set, begin: 2 * i, end: 2 * i + 1 }))?;
    }
    encoder.resolve_query_set(&set, 0..count, &resolve, 0);
    encoder.copy_buffer_to_buffer(&resolve, 0, &readback, 0, bytes);
    queue.submit([encoder.finish()]);
    let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&read_buffer(ctx, &readback, bytes)?);
    let period_ns = queue.get_timestamp_period() as f64;
    let samples_ms = ticks.chunks(2).map(|t| t[1].wrapping_sub(t[0]) as f64 * period_ns / 1e6).collect();
    Ok(Timing { samples_ms, gpu_timestamps: true })
}
