//! The work list the decode kernels read (`shaders/shared/decode.wgsl`), built on the host per call: one
//! *family* per (sequence, KV head[, query tile]) holding the query rows of that KV head's group, with the
//! KV blocks those rows attend as entries, and the flash-decoding split of long families into several
//! work items whose partials a combine pass merges.
//!
//! Entries carry the address of their block's first K/V row, so the kernel never sees where KV lives:
//! the decode path fills them from the cache's page tables, the variable-length path from the packed
//! tensors' sequence offsets. Pure Rust, so the plan is tested (and twinned on the CPU) without a GPU.

use crate::layout::Layout;
use std::ops::Range;

/// One workgroup's job, as the kernel reads it (`WorkItem` in `shaders/shared/decode.wgsl`).
///
/// Row `r = g * n_tok + t` is query head `head0 + g` and query token `tok0 + t` (row of the packed Q),
/// at position `pos0 + t` of its sequence; rows with `t >= n_valid` are padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WorkItem {
    /// First query head of the rows.
    pub head0: u32,
    /// First query token (row of the packed Q and O).
    pub tok0: u32,
    /// Position of the first query token in its sequence (key coordinates).
    pub pos0: u32,
    /// Valid query tokens.
    pub n_valid: u32,
    /// Keys in the sequence.
    pub kv_len: u32,
    /// First entry.
    pub e0: u32,
    /// One past the last entry.
    pub e1: u32,
    /// Partial slot (split items), or the family's first slot (combine records).
    pub slot: u32,
    /// LSE index of row 0.
    pub lse0: u32,
    /// Items the family is split into (1: the item writes the output itself).
    pub nsplit: u32,
    /// Padding to 48 bytes.
    pub pad: [u32; 2],
}

/// A KV block one item attends (`entries` in `shaders/shared/decode.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WorkEntry {
    /// Offset of the block's first K (and V) row in vec4 units (4 elements).
    pub base: u32,
    /// Position of the block's first key in its sequence.
    pub key0: u32,
    /// Bit `r` (of 64): whether row `r` attends the block.
    pub mask: [u32; 2],
}

/// When long KV runs are split over several workgroups (flash-decoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPolicy {
    /// Workgroups a call should offer the device; families are split until there are about this many.
    pub target_workgroups: u32,
    /// Fewest KV blocks a split item reads (below this the combine step costs more than it wins).
    pub min_blocks_per_split: u32,
}

/// Workgroups per compute unit the split aims at: about as many as are resident at once (the decode
/// kernels hold 3 to 5 workgroups of 128 invocations per SM by registers), so that a batch-1 call runs in
/// one wave, each workgroup streaming a few KV blocks with the next one's loads in flight.
const WORKGROUPS_PER_UNIT: u32 = 4;
/// Compute units assumed where the device does not say (wgpu exposes no count): a 132-SM H100/H200.
/// Extra items on a smaller GPU cost only their combine.
const DEFAULT_UNITS: u32 = 128;

impl Default for SplitPolicy {
    /// [`SplitPolicy::for_compute_units`] of a large GPU (128 units: 512 workgroups).
    fn default() -> Self {
        Self::for_compute_units(DEFAULT_UNITS)
    }
}

impl SplitPolicy {
    /// Splits until a call offers about 4 workgroups per compute unit (streaming multiprocessor), at
    /// least 2 KV blocks per split (one block would cost a partial write per block read).
    pub fn for_compute_units(units: u32) -> Self {
        Self { target_workgroups: units.max(1) * WORKGROUPS_PER_UNIT, min_blocks_per_split: 2 }
    }
    /// Never split: one item per family.
    pub fn never() -> Self {
        Self { target_workgroups: 0, min_blocks_per_split: u32::MAX }
    }
    /// Blocks per split item for `families` families holding `entries` entries in all (`u32::MAX`: no
    /// split). Splitting starts when there are fewer families than target workgroups, and spreads the
    /// entries evenly over the target, never below the minimum per split.
    pub fn blocks_per_split(&self, families: usize, entries: usize) -> u32 {
        if families == 0 || families >= self.target_workgroups as usize {
            return u32::MAX;
        }
        let even = entries.div_ceil(self.target_workgroups as usize);
        even.max(self.min_blocks_per_split as usize).min(u32::MAX as usize) as u32
    }
}

/// How the rows and keys of a work list are laid out (what the kernel's parameters say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShape {
    /// Query heads.
    pub num_heads: u32,
    /// Query heads per KV head (rows per token).
    pub group: u32,
    /// Query tokens per item.
    pub n_tok: u32,
    /// Keys per KV block.
    pub block_size: u32,
    /// Whether keys after a query's position are masked.
    pub causal: bool,
    /// Vec4s from one key of a block to the next.
    pub kv_tok_stride: u32,
    /// LSE elements from one head's row to the next.
    pub lse_head_stride: u32,
}

impl RowShape {
    /// Query rows per item: `group * n_tok`.
    pub fn rows(&self) -> u32 {
        self.group * self.n_tok
    }
}

/// A call's work list: items for the split pass, combine records for the split families, entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkList {
    shape: RowShape,
    items: Vec<WorkItem>,
    families: Vec<WorkItem>,
    entries: Vec<WorkEntry>,
    slots: Range<u32>,
    blocks_per_split: u32,
    family_count: usize,
}

impl WorkList {
    /// Row and key layout.
    pub fn shape(&self) -> &RowShape {
        &self.shape
    }
    /// Work items (one workgroup each).
    pub fn items(&self) -> &[WorkItem] {
        &self.items
    }
    /// One combine record per split family: its rows, first partial slot and split count.
    pub fn split_families(&self) -> &[WorkItem] {
        &self.families
    }
    /// KV block entries.
    pub fn entries(&self) -> &[WorkEntry] {
        &self.entries
    }
    /// Partial slots the split items write (a call over several lists gives each its own range).
    pub fn partial_slots(&self) -> Range<u32> {
        self.slots.clone()
    }
    /// Families (before splitting).
    pub fn families(&self) -> usize {
        self.family_count
    }
    /// Blocks per split item chosen by the [`SplitPolicy`] (`u32::MAX`: no split).
    pub fn blocks_per_split(&self) -> u32 {
        self.blocks_per_split
    }
}

/// Builds a [`WorkList`] family by family.
pub(crate) struct WorkListBuilder<'a> {
    layout: &'a Layout,
    shape: RowShape,
    families: Vec<(WorkItem, Range<u32>)>,
    entries: Vec<WorkEntry>,
}

impl<'a> WorkListBuilder<'a> {
    pub(crate) fn new(layout: &'a Layout, shape: RowShape) -> Self {
        Self { layout, shape, families: Vec::new(), entries: Vec::new() }
    }

    /// The family's distinct (pattern, query block) pairs, each with the mask of its rows.
    fn row_masks(&self, rows: &WorkItem) -> Vec<(u32, u32, u64)> {
        let (n_tok, bs) = (self.shape.n_tok, self.shape.block_size);
        let mut combos: Vec<(u32, u32, u64)> = Vec::new();
        for g in 0..self.shape.group {
            let pattern = self.layout.pattern_of_head(rows.head0 + g);
            for t in 0..rows.n_valid {
                let qb = (rows.pos0 + t) / bs;
                let bit = 1u64 << (g * n_tok + t);
                match combos.iter_mut().find(|c| c.0 == pattern && c.1 == qb) {
                    Some(c) => c.2 |= bit,
                    None => combos.push((pattern, qb, bit)),
                }
            }
        }
        combos
    }

    /// Adds a family: `rows` (entries, slot and split fields are filled in later) against the candidate
    /// blocks `(kb, base)` in ascending order, keeping those some row attends.
    pub(crate) fn family(&mut self, rows: WorkItem, blocks: impl IntoIterator<Item = (u32, u32)>) {
        let combos = self.row_masks(&rows);
        let causal = self.shape.causal;
        let e0 = self.entries.len() as u32;
        for (kb, base) in blocks {
            let mask = combos
                .iter()
                .filter(|&&(p, qb, _)| (!causal || kb <= qb) && self.layout.block_active(p, qb, kb))
                .fold(0u64, |m, c| m | c.2);
            if mask != 0 {
                let mask = [mask as u32, (mask >> 32) as u32];
                self.entries.push(WorkEntry { base, key0: kb * self.shape.block_size, mask });
            }
        }
        self.families.push((rows, e0..self.entries.len() as u32));
    }

    /// Splits the families by `policy` into items and combine records, numbering partial slots from
    /// `first_slot`.
    pub(crate) fn finish(self, policy: &SplitPolicy, first_slot: u32) -> WorkList {
        let bps = policy.blocks_per_split(self.families.len(), self.entries.len());
        let mut items = Vec::with_capacity(self.families.len());
        let mut families = Vec::new();
        let mut slots = first_slot;
        for (rows, range) in &self.families {
            let n = range.end - range.start;
            let nsplit = n.div_ceil(bps).max(1);
            if nsplit == 1 {
                items.push(WorkItem { e0: range.start, e1: range.end, slot: 0, nsplit: 1, ..*rows });
                continue;
            }
            let chunk = n.div_ceil(nsplit);
            for s in 0..nsplit {
                let e0 = (range.start + s * chunk).min(range.end);
                let e1 = (e0 + chunk).min(range.end);
                items.push(WorkItem { e0, e1, slot: slots + s, nsplit, ..*rows });
            }
            families.push(WorkItem { e0: range.start, e1: range.end, slot: slots, nsplit, ..*rows });
            slots += nsplit;
        }
        WorkList {
            shape: self.shape,
            items,
            families,
            entries: self.entries,
            slots: first_slot..slots,
            blocks_per_split: bps,
            family_count: self.families.len(),
        }
    }
}
