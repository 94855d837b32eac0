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
