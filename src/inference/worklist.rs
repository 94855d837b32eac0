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
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Index of the family's combine record in [`WorkList::split_families`] (split items only).
    pub family: u32,
    /// Padding to 48 bytes.
    pub pad: u32,
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
///
/// The device runs a *wave* of workgroups at once, and the items of a call are of about equal length, so
/// a call takes about `waves * (longest item + a fixed cost per item)`, plus a combine pass where a family
/// is split. The policy picks the blocks per split item that minimise that estimate: a call of few long
/// families splits them until the wave is full, a call of a little more than one wave of families splits
/// them so that the last wave is not nearly empty. Where the device does not say how many workgroups it
/// holds at once the estimate is averaged over the wave sizes it may have (`min_wave..=max_wave`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPolicy {
    /// Fewest workgroups the device may run at once.
    pub min_wave: u32,
    /// Most workgroups the device may run at once (`min_wave` where the residency is known).
    pub max_wave: u32,
    /// Fewest KV blocks a split item reads (below this the combine step costs more than it wins).
    pub min_blocks_per_split: u32,
}

/// Workgroups of 128 invocations a compute unit holds at once, where the device does not say: the
/// decode kernels hold 2 to 5 per SM by registers.
const RESIDENT_PER_UNIT: (u32, u32) = (2, 5);
/// Compute units assumed where the device does not say (wgpu exposes no count): a 132-SM H100/H200.
/// Extra items on a smaller GPU cost only their combine.
const DEFAULT_UNITS: u32 = 132;
/// The fixed cost of a work item (its work list, queries, first loads and output) and of the combine
/// pass, in the time of one KV block read by one workgroup.
const ITEM_COST: u64 = 1;
const COMBINE_COST: u64 = 1;
/// Most partial slots a split call uses, in waves (bounds the partials' buffers).
const MAX_SPLIT_WAVES: u64 = 4;

impl Default for SplitPolicy {
    /// [`SplitPolicy::for_compute_units`] of a 132-unit GPU.
    fn default() -> Self {
        Self::for_compute_units(DEFAULT_UNITS)
    }
}

impl SplitPolicy {
    /// For a device of `units` compute units whose residency is not known: waves of 2 to 5 workgroups
    /// per unit, at least 2 KV blocks per split (one block would cost a partial write per block read).
    pub fn for_compute_units(units: u32) -> Self {
        let units = units.max(1);
        Self { min_wave: units * RESIDENT_PER_UNIT.0, max_wave: units * RESIDENT_PER_UNIT.1, min_blocks_per_split: 2 }
    }
    /// For a device that runs exactly `wave` workgroups of the decode kernel at once (compute units times
    /// the kernel's occupancy), at least 2 KV blocks per split.
    pub fn for_wave(wave: u32) -> Self {
        Self { min_wave: wave.max(1), max_wave: wave.max(1), min_blocks_per_split: 2 }
    }
    /// The finest split: every family longer than `blocks + 1` KV blocks split into items of at most
    /// `blocks` (for tests and studies).
    pub fn split_to(blocks: u32) -> Self {
        Self { min_wave: 1 << 20, max_wave: 1 << 20, min_blocks_per_split: blocks.max(1) }
    }
    /// Never split: one item per family.
    pub fn never() -> Self {
        Self { min_wave: 1, max_wave: 1, min_blocks_per_split: u32::MAX }
    }
    /// Most partial slots a call under this policy uses.
    pub fn max_partial_slots(&self) -> u64 {
        MAX_SPLIT_WAVES * self.max_wave.max(self.min_wave) as u64
    }
    /// Blocks per split item for families of `lens` KV blocks each (`u32::MAX`: no split), the one of
    /// least estimated time (see [`SplitPolicy`]); on a tie the fewer items.
    pub fn blocks_per_split(&self, lens: &[u32]) -> u32 {
        let longest = lens.iter().copied().max().unwrap_or(0);
        let min = self.min_blocks_per_split.max(1);
        if longest <= min || min == u32::MAX {
            return u32::MAX;
        }
        let (lo, hi) = (self.min_wave.max(1) as u64, self.max_wave.max(self.min_wave).max(1) as u64);
        let waves: Vec<u64> = (0..4u64).map(|i| lo + (hi - lo) * i / 3).collect();
        let total: u64 = lens.iter().map(|&n| n as u64).sum();
        let cost = |b: u32| -> Option<u64> {
            let (items, len) = split_shape(lens, b);
            let split = b < longest;
            if split && items > self.max_partial_slots() {
                return None;
            }
            let time: u64 = waves.iter().map(|&w| items.div_ceil(w) * (len + ITEM_COST)).sum();
            Some(time + if split { COMBINE_COST * waves.len() as u64 } else { 0 })
        };
        let mut candidates: Vec<u32> = (1..=64u32).map(|k| longest.div_ceil(k)).collect();
        for &w in &waves {
            candidates.extend((1..=MAX_SPLIT_WAVES).map(|x| total.div_ceil(w * x).min(u32::MAX as u64) as u32));
        }
        candidates.retain(|&b| b >= min && b < longest);
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        candidates.dedup();
        let mut best = (cost(longest).unwrap_or(u64::MAX), u32::MAX);
        for b in candidates {
            if let Some(c) = cost(b) {
                if c < best.0 {
                    best = (c, b);
                }
            }
        }
        best.1
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
/// Two lists are equal when they hold the same work (whatever their upload tags).
#[derive(Clone, Debug)]
pub struct WorkList {
    shape: RowShape,
    items: Vec<WorkItem>,
    families: Vec<WorkItem>,
    entries: Vec<WorkEntry>,
    slots: Range<u32>,
    blocks_per_split: u32,
    family_count: usize,
    /// Each family's entries, in the order the families were added (before splitting).
    family_entries: Vec<Range<u32>>,
    /// Tells the entries of this build apart from any other's (see [`WorkList::upload_tag`]).
    upload_tag: u64,
    /// Tells these items and combine records apart from any other list's: fresh at every build and
    /// every patch of the items ([`WorkList::shift_keys`]); [`WorkList::shift_all_keys`] keeps it.
    items_tag: u64,
    /// Added by the kernels to every item's and combine record's key count and first position.
    key_shift: u32,
}

impl PartialEq for WorkList {
    fn eq(&self, other: &Self) -> bool {
        // Items as the kernels see them: their key counts and positions with the list's key shift added.
        let same = |a: &[WorkItem], b: &[WorkItem]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| shifted(x, self.key_shift) == shifted(y, other.key_shift))
        };
        self.shape == other.shape
            && same(&self.items, &other.items)
            && same(&self.families, &other.families)
            && self.entries == other.entries
            && self.slots == other.slots
            && self.blocks_per_split == other.blocks_per_split
            && self.family_count == other.family_count
            && self.family_entries == other.family_entries
    }
}

impl Eq for WorkList {}

/// `item` with `d` added to its key count and first position (what the kernels read it as).
fn shifted(item: &WorkItem, d: u32) -> WorkItem {
    WorkItem { kv_len: item.kv_len + d, pos0: item.pos0 + d, ..*item }
}

/// Upload tags, unique in the process.
static NEXT_UPLOAD_TAG: AtomicU64 = AtomicU64::new(1);

impl WorkList {
    /// Row and key layout.
    pub fn shape(&self) -> &RowShape {
        &self.shape
    }
    /// Work items (one workgroup each), as stored: the kernels add [`WorkList::key_shift`] to each one's
    /// key count and first position.
    pub fn items(&self) -> &[WorkItem] {
        &self.items
    }
    /// One combine record per split family: its rows, first partial slot and split count (stored as
    /// [`WorkList::items`] are).
    pub fn split_families(&self) -> &[WorkItem] {
        &self.families
    }
    /// What the kernels add to every item's and combine record's `kv_len` and `pos0`: the tokens every
    /// sequence of a token loop grew by since the items were last written, so that a step in which each
    /// sequence gains the same number of tokens changes one word of the call's parameters instead of
    /// every item (0 for a fresh build).
    pub fn key_shift(&self) -> u32 {
        self.key_shift
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
    /// The entries of family `k` (in the order the families were added; none past the last).
    pub(crate) fn entries_of_family(&self, k: usize) -> &[WorkEntry] {
        self.family_entries.get(k).map_or(&[], |r| &self.entries[r.start as usize..r.end as usize])
    }
    /// Blocks per split item chosen by the [`SplitPolicy`] (`u32::MAX`: no split).
    pub fn blocks_per_split(&self) -> u32 {
        self.blocks_per_split
    }
    /// A number no list with other entries has: a device copy of the entries made from a list of the same
    /// tag can be reused. Each build takes a fresh one; a list that [`crate::Decode`] patches from one step
    /// of a token loop to the next keeps its own.
    pub fn upload_tag(&self) -> u64 {
        self.upload_tag
    }
    /// As [`WorkList::upload_tag`] for the items and combine records: a device copy made from a list of
    /// the same tag holds these. Changes with every build and every patch.
    pub(crate) fn items_tag(&self) -> u64 {
        self.items_tag
    }
    /// The same query tokens `shift(tok0)` positions later in sequences as many keys longer: adds it (and
    /// the pending [`WorkList::key_shift`], which becomes 0) to each item's and combine record's key count
    /// and first position. Valid only while every shifted row stays in its query block and the sequences
    /// keep their pages (the entries stay those of a fresh build).
    pub(crate) fn shift_keys(&mut self, shift: impl Fn(u32) -> u32) {
        self.items_tag = NEXT_UPLOAD_TAG.fetch_add(1, Ordering::Relaxed);
        let pending = std::mem::take(&mut self.key_shift);
        for item in self.items.iter_mut().chain(self.families.iter_mut()) {
            *item = shifted(item, shift(item.tok0) + pending);
        }
    }

    /// As [`WorkList::shift_keys`] with the same `d` for every sequence: only the key shift grows, and
    /// the items (and their upload tag) stay as they are.
    pub(crate) fn shift_all_keys(&mut self, d: u32) {
        self.key_shift += d;
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

    /// Adds a family whose entries are already known (those [`WorkListBuilder::family`] gave the same rows'
    /// query blocks against the same resident blocks).
    pub(crate) fn family_of_entries(&mut self, rows: WorkItem, entries: &[WorkEntry]) {
        let e0 = self.entries.len() as u32;
        self.entries.extend_from_slice(entries);
        self.families.push((rows, e0..self.entries.len() as u32));
    }

    /// Splits the families by `policy` into items and combine records, numbering partial slots from
    /// `first_slot`.
    pub(crate) fn finish(self, policy: &SplitPolicy, first_slot: u32) -> WorkList {
        let lens: Vec<u32> = self.families.iter().map(|(_, r)| r.end - r.start).collect();
        let bps = policy.blocks_per_split(&lens);
        let mut items = Vec::with_capacity(self.families.len());
        let mut families = Vec::new();
        let mut slots = first_slot;
        for (rows, range) in &self.families {
            let n = range.end - range.start;
            let (nsplit, chunk) = split_family(n, bps);
            if nsplit == 1 {
                items.push(WorkItem { e0: range.start, e1: range.end, slot: 0, nsplit: 1, ..*rows });
                continue;
            }
            let family = families.len() as u32;
            for s in 0..nsplit {
                let e0 = (range.start + s * chunk).min(range.end);
                let e1 = (e0 + chunk).min(range.end);
                items.push(WorkItem { e0, e1, slot: slots + s, nsplit, family, ..*rows });
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
            family_entries: self.families.iter().map(|(_, r)| r.clone()).collect(),
            upload_tag: NEXT_UPLOAD_TAG.fetch_add(1, Ordering::Relaxed),
            items_tag: NEXT_UPLOAD_TAG.fetch_add(1, Ordering::Relaxed),
            key_shift: 0,
        }
    }
}

/// A family of `n` KV blocks split at `b` blocks per item: its item count and the blocks of its
/// longest item (the items are evened out, so the counts differ by at most one chunk's rounding).
fn split_family(n: u32, b: u32) -> (u32, u32) {
    let items = n.div_ceil(b.max(1)).max(1);
    (items, n.div_ceil(items))
}

/// Families of `lens` KV blocks split at `b` blocks per item: their item count and the blocks of the
/// longest item.
fn split_shape(lens: &[u32], b: u32) -> (u64, u64) {
    lens.iter().fold((0, 0), |(items, len), &n| {
        let (k, chunk) = split_family(n, b);
        (items + k as u64, len.max(chunk as u64))
    })
}

#[cfg(test)]
mod tests {
    use super::{split_shape as split, SplitPolicy};

    #[test]
    fn few_long_families_fill_one_wave() {
        // Batch 1, 8 KV heads, 144 resident blocks each, 396 workgroups at once: 3 blocks per item.
        let b = SplitPolicy::for_wave(396).blocks_per_split(&[144; 8]);
        assert_eq!(b, 3);
        assert!(split(&[144; 8], b).0 <= 396);
    }

    #[test]
    fn a_wave_and_a_bit_of_families_is_split_to_no_ragged_wave() {
        // 128 families on 396 slots: 4 splits of 36 blocks would give 512 items, two waves; 3 of 48, one.
        let b = SplitPolicy::for_wave(396).blocks_per_split(&[144; 128]);
        assert_eq!(split(&[144; 128], b), (384, 48));
        // 512 families: unsplit they take two waves, the second a third full; split they fill 4 waves of
        // shorter items (1536 items of 48 blocks: 4 * 49 < 2 * 145).
        let b = SplitPolicy::for_wave(396).blocks_per_split(&[144; 512]);
        assert!(b < 144, "{b}");
        let (items, len) = split(&[144; 512], b);
        assert!(items.div_ceil(396) * (len + 1) < 2 * 145, "{items} items of {len}");
    }

    #[test]
    fn many_families_or_short_ones_are_not_split() {
        // Four full waves of families: splitting only adds combine work.
        assert_eq!(SplitPolicy::for_wave(396).blocks_per_split(&[144; 1584]), u32::MAX);
        assert_eq!(SplitPolicy::for_wave(396).blocks_per_split(&[2; 4]), u32::MAX);
        assert_eq!(SplitPolicy::never().blocks_per_split(&[144; 8]), u32::MAX);
        assert_eq!(SplitPolicy::default().blocks_per_split(&[]), u32::MAX);
    }

    #[test]
    fn split_to_splits_every_long_family_and_stays_in_its_slots() {
        assert_eq!(SplitPolicy::split_to(1).blocks_per_split(&[7, 3, 1]), 1);
        assert_eq!(SplitPolicy::split_to(2).blocks_per_split(&[7, 3, 1]), 2);
        for policy in [SplitPolicy::default(), SplitPolicy::for_wave(264), SplitPolicy::for_compute_units(20)] {
            for lens in [vec![2048u32; 3], vec![144; 700], vec![37, 1, 500, 9, 144]] {
                let b = policy.blocks_per_split(&lens);
                if b != u32::MAX {
                    assert!(split(&lens, b).0 <= policy.max_partial_slots(), "{policy:?} {lens:?}");
                    assert!(b >= policy.min_blocks_per_split);
                }
            }
        }
    }
}
