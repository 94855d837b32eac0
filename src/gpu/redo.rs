//! The portable redo of a cooperative-matrix op: the indirect dispatch sizes that launch the portable
//! kernels after the coop ones, zero (nothing runs) unless a coop kernel met a non-finite value.
//!
//! The matrix units cannot keep the IEEE rules for NaN and infinities (`shaders/shared/nonfinite.wgsl`), so
//! the coop kernels only check, in their epilogues, whether what they write is non-finite; if so they
//! arm the redo (`shaders/shared/coop_redo.wgsl`): they copy the armed sizes over the cleared ones, and
//! the portable kernels, recorded after them with `dispatch_workgroups_indirect`, recompute every output.
//! With finite inputs an op does one `clear_buffer` of a few words and one empty indirect dispatch per
//! portable dispatch more than the coop kernels alone.

/// The binding the coop kernels arm the redo through.
pub(crate) const REDO_BINDING: u32 = 14;

/// Bytes of one dispatch's indirect arguments (x, y, z).
const ARGS_BYTES: u64 = 12;

/// The redo's dispatch sizes: `n` (x, y, z) triples, cleared before each op, then the `n` triples they
/// take when a coop kernel arms them.
pub(crate) struct RedoArgs {
    buffer: wgpu::Buffer,
    dispatches: usize,
}

impl RedoArgs {
    /// Room for `dispatches` portable dispatches, armed with nothing yet (see [`RedoArgs::arm_with`]).
    pub(crate) fn new(device: &wgpu::Device, dispatches: usize) -> Self {
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("s2attn portable redo dispatch sizes"),
            size: 2 * ARGS_BYTES * dispatches.max(1) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Self { buffer, dispatches }
    }

    /// Sets the sizes the dispatches take when armed, in recording order (as many as [`RedoArgs::new`]
    /// was given room for). Written through the queue, so it takes effect from the next submission on.
    pub(crate) fn arm_with(&self, queue: &wgpu::Queue, sizes: &[[u32; 3]]) {
        assert_eq!(sizes.len(), self.dispatches, "one armed size per redo dispatch");
        let words: Vec<u32> = sizes.iter().flatten().copied().collect();
        queue.write_buffer(&self.buffer, ARGS_BYTES * self.dispatches as u64, bytemuck::cast_slice(&words));
    }

    /// The buffer the coop kernels bind at [`REDO_BINDING`].
    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Zeroes the dispatch sizes (the armed copies stay), so that the op recorded next starts unarmed even
    /// after an earlier op in the same encoder armed them.
    pub(crate) fn clear(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.clear_buffer(&self.buffer, 0, Some(ARGS_BYTES * self.dispatches as u64));
    }

    /// Records dispatch `i` of the redo: indirect, from its (cleared or armed) sizes.
    pub(crate) fn dispatch(&self, pass: &mut wgpu::ComputePass<'_>, i: usize) {
        debug_assert!(i < self.dispatches);
        pass.dispatch_workgroups_indirect(&self.buffer, ARGS_BYTES * i as u64);
    }
}

/// How a kernel's dispatches are recorded: directly, or as dispatches of a portable redo.
#[derive(Clone, Copy)]
pub(crate) enum Launch<'a> {
    /// `dispatch_workgroups` with the kernel's sizes.
    Direct,
    /// `dispatch_workgroups_indirect` from the redo's sizes, the kernel's first dispatch at index `first`.
    Redo(&'a RedoArgs, usize),
}

impl Launch<'_> {
    /// Records the kernel's dispatch number `i`, of `size` workgroups when direct.
    pub(crate) fn dispatch(self, pass: &mut wgpu::ComputePass<'_>, i: usize, size: [u32; 3]) {
        match self {
            Launch::Direct => pass.dispatch_workgroups(size[0], size[1], size[2]),
            Launch::Redo(args, first) => args.dispatch(pass, first + i),
        }
    }
}

/// For the redo's tests (`forward.rs`, `backward.rs`): a probe kernel that arms the redo through
/// `shaders/shared/coop_redo.wgsl`, as the coop kernels' epilogues do, where its input holds a non-finite
/// value; it runs on any adapter (lavapipe in CI, which has no cooperative matrices).
#[cfg(test)]
pub(crate) mod probe {
    use super::{RedoArgs, REDO_BINDING};
    use crate::gpu::WgpuContext;
    use wgpu::util::DeviceExt;

    const PROBE: &str = "
@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if gid.x < arrayLength(&x) && nonfinite4(x[gid.x]) {
        arm_redo();
    }
}
";

    /// A storage buffer holding `words` (also a copy source).
    pub(crate) fn buffer(device: &wgpu::Device, words: &[f32]) -> wgpu::Buffer {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(words),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
    }

    /// The probe, ready to record: the pipeline and a bind group per input of `inputs`.
    pub(crate) fn probes(
        ctx: &WgpuContext,
        args: &RedoArgs,
        inputs: &[&[f32]],
    ) -> Vec<(wgpu::ComputePipeline, wgpu::BindGroup)> {
        let source = format!("{}{PROBE}", include_str!("../../shaders/shared/coop_redo.wgsl"));
        // SAFETY: the probe's only loop runs over the redo's few words.
        let pipeline = unsafe { ctx.wgsl_pipeline("redo probe", &source, &[]) }.expect("probe pipeline");
        inputs
            .iter()
            .map(|x| {
                let input = buffer(ctx.device(), x);
                let group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipeline.get_bind_group_layout(0),
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: input.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: REDO_BINDING, resource: args.buffer().as_entire_binding() },
                    ],
                });
                (pipeline.clone(), group)
            })
            .collect()
    }

    /// Probe inputs: one with a NaN, one finite, one with an infinity, and whether each arms the redo.
    pub(crate) const CASES: [([f32; 8], bool); 3] = [
        ([0.5, 0.5, f32::NAN, 0.5, 0.5, 0.5, 0.5, 0.5], true),
        ([0.5; 8], false),
        ([0.5, 0.5, 0.5, 0.5, 0.5, f32::NEG_INFINITY, 0.5, 0.5], true),
    ];

    /// `n` deterministic values in [-1, 1).
    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) % 1000).map(|x| x as f32 / 500.0 - 1.0).collect()
    }

    /// Records the probe into `pass`.
    pub(crate) fn record(pass: &mut wgpu::ComputePass<'_>, probe: &(wgpu::ComputePipeline, wgpu::BindGroup)) {
        pass.set_pipeline(&probe.0);
        pass.set_bind_group(0, &probe.1, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
}
