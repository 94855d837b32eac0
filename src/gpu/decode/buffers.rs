//! Device buffers the decode kernels reuse from call to call, so that steady-state decoding creates no
//! buffers and no bind groups: per call part (KV cache segment) the params, work items, entries and
//! combine records, written with `queue.write_buffer`, in upload sets (one per call whose work has not
//! run yet, `gpu/upload_sets.rs`); the shared partials; the host path's staging; and the bind groups of
//! the last few sets of caller buffers. Buffers grow geometrically (never past a bound the caller knows,
//! e.g. the pages of a cache) and never shrink.

use crate::gpu::{new_buffer, UploadSets, WgpuContext};

/// Bind groups kept per distinct set of caller buffers (an app usually alternates between a few).
const BIND_CACHE: usize = 8;

/// A device buffer that grows geometrically and never shrinks.
pub(super) struct Grown {
    label: &'static str,
    usage: wgpu::BufferUsages,
    buffer: wgpu::Buffer,
}

/// Bytes of a fresh [`Grown`] buffer (wgpu refuses empty bindings).
const MIN_BYTES: u64 = 64;
/// The smallest grown buffer (a work list of tens of thousands of entries; below a caller's bound).
const GROW_FROM: u64 = 1 << 20;

impl Grown {
    /// A buffer of [`MIN_BYTES`].
    pub(super) fn new(ctx: &WgpuContext, label: &'static str, usage: wgpu::BufferUsages) -> Self {
        Self { label, usage, buffer: create(ctx, label, MIN_BYTES, usage) }
    }

    /// Makes the buffer hold at least `needed` bytes. A new buffer takes `bound` bytes when the caller
    /// knows that no call needs more (`bound >= needed`) and it is small, else it grows geometrically
    /// (twice what is needed, a power of two, at least 1 MiB, never past `bound`). Returns whether a
    /// buffer was created.
    pub(super) fn reserve(&mut self, ctx: &WgpuContext, needed: u64, bound: u64) -> bool {
        let needed = needed.next_multiple_of(4).max(MIN_BYTES);
        let bound = bound.next_multiple_of(4);
        // A small bound is taken at once, so that growing calls stop creating buffers early.
        let enough = if bound >= needed { needed.max(bound.min(GROW_FROM)) } else { needed };
        if self.buffer.size() >= enough {
            return false;
        }
        let grown = (2 * needed).next_power_of_two().max(GROW_FROM);
        let size = if bound >= needed { grown.min(bound) } else { grown };
        let size = size.min(ctx.caps().max_buffer).max(needed);
        self.buffer = create(ctx, self.label, size, self.usage);
        true
    }

    /// The buffer.
    pub(super) fn get(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

fn create(ctx: &WgpuContext, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    new_buffer(ctx.device(), label, size, usage)
}

/// What one call part uploads: its parameters as bytes, and the tags of its work list's items and
/// combine records (`WorkList::items_tag`) and of its entries (`WorkList::upload_tag`): equal tags, equal
/// contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PartContents {
    pub params: Vec<u8>,
    pub items_tag: u64,
    pub entries_tag: u64,
}

/// The buffers of one call part.
pub(super) struct PartBuffers {
    /// The call's parameters, read by both passes.
    pub params: wgpu::Buffer,
    pub items: Grown,
    pub entries: Grown,
    pub families: Grown,
    /// What the buffers hold (none before the first write and after a buffer was replaced).
    pub held: Option<PartContents>,
}

impl PartBuffers {
    /// Buffers created by [`PartBuffers::new`].
    pub(super) const BUFFERS: usize = 4;

    /// A uniform buffer of `params_bytes` and three small work list buffers.
    pub(super) fn new(ctx: &WgpuContext, params_bytes: u64) -> Self {
        let uniform = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
        let list = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        Self {
            params: create(ctx, "s2attn decode params", params_bytes, uniform),
            items: Grown::new(ctx, "s2attn decode items", list),
            entries: Grown::new(ctx, "s2attn decode entries", list),
            families: Grown::new(ctx, "s2attn decode families", list),
            held: None,
        }
    }
}

/// The upload buffers of one call: one [`PartBuffers`] per part (at least as many as the call has).
pub(super) struct UploadSet {
    pub parts: Vec<PartBuffers>,
}

impl UploadSet {
    /// Whether the set's first parts hold `contents`, part for part.
    pub(super) fn holds(&self, contents: &[PartContents]) -> bool {
        self.parts.len() >= contents.len()
            && self.parts.iter().zip(contents).all(|(part, c)| part.held.as_ref() == Some(c))
    }
}

/// The host path's staging: Q in, O and LSE out, one readback buffer (held for a whole host call).
pub(super) struct HostBuffers {
    pub q: Grown,
    pub out: Grown,
    pub lse: Grown,
    pub readback: Grown,
    /// Buffers created so far.
    pub created: usize,
}

impl HostBuffers {
    /// Small buffers, grown on first use.
    pub(super) fn new(ctx: &WgpuContext) -> Self {
        let storage = wgpu::BufferUsages::STORAGE;
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let readback = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        Self {
            q: Grown::new(ctx, "s2attn decode q", storage | copy),
            out: Grown::new(ctx, "s2attn decode out", storage | copy),
            lse: Grown::new(ctx, "s2attn decode lse", storage | copy),
            readback: Grown::new(ctx, "s2attn decode readback", readback),
            created: 4,
        }
    }
}

/// The caller buffers a part's bind groups hold: Q, O, LSE, K, V, and the upload set's and part's index.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct BindKey {
    pub set: usize,
    pub part: usize,
    pub buffers: [wgpu::Buffer; 5],
}

/// Everything an op reuses across calls, behind one lock.
pub(super) struct CallBuffers {
    pub uploads: UploadSets<UploadSet>,
    pub part_o: Grown,
    pub part_lse: Grown,
    /// (key, split bind group, combine bind group), least recently used first.
    binds: Vec<(BindKey, wgpu::BindGroup, wgpu::BindGroup)>,
    /// The most parts a call had.
    pub parts_seen: usize,
    /// Buffers created so far.
    pub created: usize,
    /// Calls so far that wrote their work items (and combine records) to the device.
    pub item_uploads: u64,
}

impl CallBuffers {
    /// The partials, small; upload sets and their parts are added on first use.
    pub(super) fn new(ctx: &WgpuContext) -> Self {
        let storage = wgpu::BufferUsages::STORAGE;
        Self {
            uploads: UploadSets::new(),
            part_o: Grown::new(ctx, "s2attn decode partial O", storage),
            part_lse: Grown::new(ctx, "s2attn decode partial LSE", storage),
            binds: Vec::new(),
            parts_seen: 0,
            created: 2,
            item_uploads: 0,
        }
    }

    /// Forgets every cached bind group (after an internal buffer was replaced).
    pub(super) fn forget_binds(&mut self) {
        self.binds.clear();
    }

    /// The cached bind groups of `key`, or those `make` builds (then cached, evicting the oldest).
    pub(super) fn binds(
        &mut self,
        key: BindKey,
        make: impl FnOnce(&Self) -> (wgpu::BindGroup, wgpu::BindGroup),
    ) -> (wgpu::BindGroup, wgpu::BindGroup) {
        if let Some(pos) = self.binds.iter().position(|(k, _, _)| *k == key) {
            let hit = self.binds.remove(pos);
            let groups = (hit.1.clone(), hit.2.clone());
            self.binds.push(hit);
            return groups;
        }
        let (split, combine) = make(self);
        if self.binds.len() >= BIND_CACHE * self.uploads.len().max(1) * self.parts_seen.max(1) {
            self.binds.remove(0);
        }
        self.binds.push((key, split.clone(), combine.clone()));
        (split, combine)
    }
}
