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
    let queries = TimestampQueries::new(ctx, 2 * iters);
    let mut encoder = device.create_command_encoder(&Default::default());
    for i in 0..iters {
        encode(&mut encoder, Some(Stamps { set: queries.set(), begin: 2 * i, end: 2 * i + 1 }))?;
    }
    queries.resolve(&mut encoder);
    queue.submit([encoder.finish()]);
    let samples_ms = queries.read_pairs_ms(ctx)?;
    Ok(Timing { samples_ms, gpu_timestamps: true })
}

/// A timestamp query set and the buffers that bring its ticks back to the host: the plumbing behind
/// GPU-timestamp timing, for callers that record their own timed passes (as `s2attn-bench` does).
///
/// Record passes that write the queries of [`set`](Self::set), then [`resolve`](Self::resolve) into the
/// same (or a later) encoder, submit it, and [`read_pairs_ms`](Self::read_pairs_ms). Needs a device with
/// timestamps (`ctx.caps().timestamps`).
pub struct TimestampQueries {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    count: u32,
}

impl TimestampQueries {
    /// A query set of `count` timestamps (at most `wgpu::QUERY_SET_MAX_QUERIES`) and its buffers.
    pub fn new(ctx: &WgpuContext, count: u32) -> Self {
        let device = ctx.device();
        let set = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("s2attn timing"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: count as u64 * 8,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolve = buffer("s2attn timestamps", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let readback =
            buffer("s2attn timestamps readback", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        TimestampQueries { set, resolve, readback, count }
    }

    /// The query set the timed passes write.
    pub fn set(&self) -> &wgpu::QuerySet {
        &self.set
    }

    /// Records resolving every query and copying the ticks to the readback buffer.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.set, 0..self.count, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, self.count as u64 * 8);
    }

    /// Waits for the device, reads the ticks back and returns, for each pair of queries (`2i`, `2i + 1`),
    /// the milliseconds from the first to the second.
    pub fn read_pairs_ms(&self, ctx: &WgpuContext) -> Result<Vec<f64>> {
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&read_buffer(ctx, &self.readback, self.count as u64 * 8)?);
        let period_ns = ctx.queue().get_timestamp_period() as f64;
        Ok(ticks.chunks(2).map(|t| t[1].wrapping_sub(t[0]) as f64 * period_ns / 1e6).collect())
    }
}
