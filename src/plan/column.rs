//! Backward planning: the column plan (for every KV block, the query tiles that attend it: the transposed
//! twin of [`MergeQPlan`]) and the tile sizes of the two portable backward kernels.
//!
//! The dK/dV kernel keeps one KV tile's gradients in registers and walks the query tiles of its KV block's
//! column list; the dQ kernel walks the forward's [`MergeQPlan`] row lists. Both lists carry the same
//! per-entry [`RowMask`] over the query tile's rows, so a (query tile, KV block) pair is masked the same
//! way in the forward and in both backward passes (`ColumnPlan` is exactly the transpose of the
//! `MergeQPlan` with the same tile size; a test holds it to that).

use super::{DeviceCaps, DispatchPlan, KernelVariant, MergeQPlan, RowMask, Shape};
use super::{PORTABLE_HEAD_DIMS, PORTABLE_MAX_ACC, PORTABLE_WORKGROUP};
use crate::error::{Error, Result};
use crate::layout::{BlockIndex, Layout};
use std::fmt;

/// One query tile of a KV block's column list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryEntry {
    /// Query tile id (rows `q_tile * tile_q ..`).
    pub q_tile: u32,
    /// The tile rows that attend the KV block (causality still masks keys after each query).
    pub rows: RowMask,
}

/// The column lists of every (pattern, KV block), in query tiles of `tile_q` rows, as kernels read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnPlan {
    tile_q: u32,
    seq_len: u32,
    kv_blocks: u32,
    patterns: u32,
    col_ptr: Vec<u32>,
    entries: Vec<QueryEntry>,
}

impl ColumnPlan {
    /// Regroups the transpose of `index` into query tiles of `tile_q` rows (a power of two merging at
    /// most 31 blocks), with the row masks [`MergeQPlan::build`] gives the same (tile, KV block) pair.
    pub fn build(index: &BlockIndex, block_size: u32, causal: bool, tile_q: u32) -> Self {
        debug_assert!(tile_q.is_power_of_two() && tile_q / block_size <= 31);
        let columns = index.transpose();
        let (seq_len, nb) = (index.seq_len(), index.q_blocks());
        let tiles = seq_len.div_ceil(tile_q);
        let mut col_ptr = vec![0u32];
        let mut entries = Vec::new();
        for p in 0..index.patterns() {
            for kb in 0..nb {
                let rows = columns.column(p, kb);
                if tile_q <= block_size {
                    // Each attending block is a run of whole tiles.
                    let per = block_size / tile_q;
                    for &qb in rows {
                        let tiles_of_block = qb * per..((qb + 1) * per).min(tiles);
                        entries
                            .extend(tiles_of_block.map(|q_tile| QueryEntry { q_tile, rows: RowMask::Prefix(tile_q) }));
                    }
                } else {
                    let per = tile_q / block_size;
                    let mut i = 0;
                    while i < rows.len() {
                        let q_tile = rows[i] / per;
                        let mut bits = 0u32;
                        while i < rows.len() && rows[i] / per == q_tile {
                            bits |= 1 << (rows[i] % per);
                            i += 1;
                        }
                        // Blocks masked whole by causality or past the end may join a prefix.
                        let first = q_tile * per;
                        let dont_care = (0..per)
                            .filter(|b| first + b >= nb || (causal && first + b < kb))
                            .fold(0u32, |m, b| m | 1 << b);
                        entries.push(QueryEntry { q_tile, rows: row_mask(bits, dont_care, block_size) });
                    }
                }
                col_ptr.push(entries.len() as u32);
            }
        }
        Self { tile_q, seq_len, kv_blocks: nb, patterns: index.patterns(), col_ptr, entries }
    }

    /// The transpose of `mergeq`'s row lists (the reference the column plan is tested against).
    pub fn transpose_of(mergeq: &MergeQPlan) -> Self {
        let nb = mergeq.seq_len().div_ceil(mergeq.block_size());
        let slots = (mergeq.patterns() * nb) as usize;
        let mut lists: Vec<Vec<QueryEntry>> = vec![Vec::new(); slots];
        for p in 0..mergeq.patterns() {
            for q_tile in 0..mergeq.tiles() {
                for e in mergeq.tile(p, q_tile) {
                    lists[(p * nb + e.kv_block) as usize].push(QueryEntry { q_tile, rows: e.rows });
                }
            }
        }
        let mut col_ptr = vec![0u32];
        let mut entries = Vec::new();
        for list in lists {
            entries.extend(list);
            col_ptr.push(entries.len() as u32);
        }
        Self {
            tile_q: mergeq.tile_q(),
            seq_len: mergeq.seq_len(),
            kv_blocks: nb,
            patterns: mergeq.patterns(),
            col_ptr,
            entries,
        }
    }

    /// Query rows per tile.
    pub fn tile_q(&self) -> u32 {
        self.tile_q
    }
    /// Tokens this plan covers.
    pub fn seq_len(&self) -> u32 {
        self.seq_len
    }
    /// KV blocks per pattern.
    pub fn kv_blocks(&self) -> u32 {
        self.kv_blocks
    }
    /// Pattern heads.
    pub fn patterns(&self) -> u32 {
        self.patterns
    }
    /// The query tiles of pattern `pattern` that attend KV block `kv_block`, ascending.
    pub fn column(&self, pattern: u32, kv_block: u32) -> &[QueryEntry] {
        let c = (pattern * self.kv_blocks + kv_block) as usize;
        &self.entries[self.col_ptr[c] as usize..self.col_ptr[c + 1] as usize]
    }
    /// Offsets into [`ColumnPlan::entries`] (`patterns * kv_blocks + 1`).
    pub fn col_ptr(&self) -> &[u32] {
        &self.col_ptr
    }
    /// All entries (pattern-major, KV-block-major).
    pub fn entries(&self) -> &[QueryEntry] {
        &self.entries
    }
    /// The longest column list (query tiles one KV tile's workgroup walks per query head).
    pub fn max_column_len(&self) -> u32 {
        self.col_ptr.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
    /// The entries as GPU words: `[q_tile, RowMask::encode()]` pairs.
    pub fn gpu_entries(&self) -> Vec<[u32; 2]> {
        self.entries.iter().map(|e| [e.q_tile, e.rows.encode()]).collect()
    }
}

/// The row mask of a merged query tile whose blocks `bits` attend: a prefix row count when the smallest
/// prefix covering them adds only `dont_care` blocks (as [`MergeQPlan::build`] encodes it), else the bits.
fn row_mask(bits: u32, dont_care: u32, block_size: u32) -> RowMask {
    let covered = 32 - bits.leading_zeros();
    let prefix = (1u32 << covered) - 1;
    if prefix & !(bits | dont_care) == 0 {
        RowMask::Prefix(covered * block_size)
    } else {
        RowMask::Blocks(bits)
    }
}

/// How one backward call is dispatched: the dQ pass (which also computes `D = rowsum(dO * O)`) then the
/// dK/dV pass.
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardPlan {
    /// The dQ kernel: `tile_q` query rows per workgroup (its MergeQ tile size), keys in chunks of
    /// `tile_kv`.
    pub dq: DispatchPlan,
    /// The dK/dV kernel: `tile_kv` keys per workgroup, query tiles of `tile_q` rows (its column plan's
    /// tile size).
    pub dkdv: DispatchPlan,
}

impl fmt::Display for BackwardPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dQ pass: {}; dK/dV pass: {}", self.dq, self.dkdv)
    }
}

/// Workgroup bytes of either portable backward kernel: Q and dO rows, K and V rows, a (P, dS) pair per
/// (query, key) and two floats per query row.
pub fn backward_workgroup_bytes(tile_q: u32, tile_kv: u32, head_dim: u32) -> u32 {
    4 * (2 * (tile_q + tile_kv) * head_dim + 2 * tile_q * tile_kv + 2 * tile_q)
}

/// Tile sizes the portable backward kernels try, largest first.
const BACKWARD_TILES: [u32; 4] = [32, 16, 8, 4];

/// Plans the portable backward kernels: for the dQ pass the largest query tile (K/V loads shared by more
/// rows) whose dQ accumulators fit the register budget, for the dK/dV pass the largest KV tile whose dK
/// and dV accumulators fit it; then the largest partner tile that fits the device's workgroup memory.
pub fn plan_backward_portable(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Result<BackwardPlan> {
    let d = shape.head_dim;
    if !PORTABLE_HEAD_DIMS.contains(&d) {
        return Err(Error::HeadDim { got: d, what: "the portable WGSL backward", supported: PORTABLE_HEAD_DIMS });
    }
    let bs = layout.block_size();
    let wg = PORTABLE_WORKGROUP.min(caps.max_invocations.max(1));
    // Accumulator vec4s per invocation: `outputs` tensors of `rows x d` spread evenly over the workgroup.
    let fits_registers = |rows: u32, outputs: u32| {
        let vec4s = rows * d / 4;
        vec4s % wg == 0 && outputs * vec4s <= wg * PORTABLE_MAX_ACC
    };
    let fits_memory = |tq: u32, tk: u32| backward_workgroup_bytes(tq, tk, d) <= caps.max_workgroup_storage;
    let pick = |outer: &dyn Fn(u32) -> bool, pair: &dyn Fn(u32, u32) -> bool| {
        BACKWARD_TILES
            .iter()
            .filter(|&&t| outer(t))
            .find_map(|&t| BACKWARD_TILES.iter().find(|&&u| pair(t, u)).map(|&u| (t, u)))
    };
    let dq = pick(&|tq| fits_registers(tq, 1), &|tq, tk| tk <= bs && fits_memory(tq, tk));
    let dkdv = pick(&|tk| tk <= bs && fits_registers(tk, 2), &|tk, tq| fits_memory(tq, tk));
    let too_small = || Error::DeviceLimit {
        what: format!("the portable backward at head_dim {d}"),
        limit: "max_compute_workgroup_storage_size",
        needed: backward_workgroup_bytes(BACKWARD_TILES[3], BACKWARD_TILES[3], d) as u64,
        max: caps.max_workgroup_storage as u64,
    };
    let (dq_q, dq_k) = dq.ok_or_else(too_small)?;
    let (dkdv_k, dkdv_q) = dkdv.ok_or_else(too_small)?;
    for (tiles, what) in [(shape.seq_len.div_ceil(dq_q), "query tiles"), (shape.seq_len.div_ceil(dkdv_k), "KV tiles")] {
        if tiles > caps.max_dispatch {
            return Err(Error::DeviceLimit {
                what: format!("{tiles} {what} of the backward"),
                limit: "max_compute_workgroups_per_dimension",
                needed: tiles as u64,
                max: caps.max_dispatch as u64,
            });
        }
    }
    let plan = |tile_q, tile_kv, reason: &str| DispatchPlan {
        variant: KernelVariant::Portable,
        tile_q,
        tile_kv,
        workgroup_size: wg,
        workgroup_bytes: backward_workgroup_bytes(tile_q, tile_kv, d),
        reason: format!("{reason} in registers, {} B of workgroup memory", caps.max_workgroup_storage),
    };
    Ok(BackwardPlan { dq: plan(dq_q, dq_k, "largest dQ tile"), dkdv: plan(dkdv_q, dkdv_k, "largest dK/dV tile") })
}
