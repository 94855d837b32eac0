//! MergeQ: regroup the per-block index into kernel query tiles.
//!
//! A tile of `tile_q` query rows is either several query blocks merged (`tile_q > block_size`, the
//! paper's MergeQ: each KV block is loaded once for all merged queries and matrix tiles stay full) or a
//! slice of one block (`tile_q <= block_size`, when registers or workgroup memory call for small tiles).
//! A tile's KV list is the union of its blocks' lists. Each entry says which of the tile's rows attend
//! the KV block: for S2 layouts those rows form a prefix (a block that leaves the local window never
//! returns; rows above the block are masked by causality anyway), so the entry carries a row count and
//! the kernel masks with one comparison; other masks fall back to one bit per merged query block.

use crate::layout::BlockIndex;

/// Flag in a GPU entry's second word: the low bits are a per-block bit mask, not a row count.
pub const ROWMASK_BITS_FLAG: u32 = 1 << 31;

/// Which rows of a query tile attend one KV block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMask {
    /// Rows `0..n` of the tile (causality still masks keys after each query).
    Prefix(u32),
    /// Bit `b` set: the rows of the tile's `b`-th query block attend.
    Blocks(u32),
}

impl RowMask {
    /// Whether tile row `row` attends (before causal masking).
    pub fn attends(self, row: u32, block_size: u32) -> bool {
        match self {
            RowMask::Prefix(n) => row < n,
            RowMask::Blocks(bits) => (bits >> (row / block_size)) & 1 == 1,
        }
    }
    /// The word kernels read.
    pub fn encode(self) -> u32 {
        match self {
            RowMask::Prefix(n) => n,
            RowMask::Blocks(bits) => ROWMASK_BITS_FLAG | bits,
        }
    }
}

/// One KV block of a tile's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvEntry {
    /// KV block id.
    pub kv_block: u32,
    /// The tile rows that attend it.
    pub rows: RowMask,
}

/// The tile lists of every (pattern, query tile), as kernels read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeQPlan {
    tile_q: u32,
    block_size: u32,
    seq_len: u32,
    tiles: u32,
    patterns: u32,
    row_ptr: Vec<u32>,
    entries: Vec<KvEntry>,
}

impl MergeQPlan {
    /// Regroups `index` into tiles of `tile_q` rows. `tile_q` must be a power of two; when larger than the
    /// block size it may merge at most 31 blocks.
    pub fn build(index: &BlockIndex, block_size: u32, causal: bool, tile_q: u32) -> Self {
        debug_assert!(tile_q.is_power_of_two() && tile_q / block_size <= 31);
        let seq_len = index.seq_len();
        let nb = index.q_blocks();
        let tiles = seq_len.div_ceil(tile_q);
        let mut row_ptr = vec![0u32];
        let mut entries = Vec::new();
        for p in 0..index.patterns() {
            for t in 0..tiles {
                if tile_q <= block_size {
                    let qb = t * tile_q / block_size;
                    entries.extend(
                        index.row(p, qb).iter().map(|&kv_block| KvEntry { kv_block, rows: RowMask::Prefix(tile_q) }),
                    );
                } else {
                    let per = tile_q / block_size;
                    let first = t * per;
                    let blocks: Vec<u32> = (first..(first + per).min(nb)).collect();
                    let mut union: Vec<u32> = blocks.iter().flat_map(|&qb| index.row(p, qb).iter().copied()).collect();
                    union.sort_unstable();
                    union.dedup();
                    for kv_block in union {
                        let mut bits = 0u32;
                        let mut dont_care = 0u32;
                        for (b, &qb) in blocks.iter().enumerate() {
                            if index.row(p, qb).binary_search(&kv_block).is_ok() {
                                bits |= 1 << b;
                            } else if causal && qb < kv_block {
                                dont_care |= 1 << b;
                            }
                        }
                        for b in blocks.len() as u32..per {
                            dont_care |= 1 << b;
                        }
                        // The smallest prefix covering every attending block must not include a block
                        // that is forbidden (neither attending nor fully masked by causality).
                        let covered = 32 - bits.leading_zeros();
                        let prefix = (1u32 << covered) - 1;
                        let rows = if prefix & !(bits | dont_care) == 0 {
                            RowMask::Prefix(covered * block_size)
                        } else {
                            RowMask::Blocks(bits)
                        };
                        entries.push(KvEntry { kv_block, rows });
                    }
                }
                row_ptr.push(entries.len() as u32);
            }
        }
        Self { tile_q, block_size, seq_len, tiles, patterns: index.patterns(), row_ptr, entries }
    }

    /// Query rows per tile.
    pub fn tile_q(&self) -> u32 {
        self.tile_q
    }
    /// Tokens per layout block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Tokens this plan covers.
    pub fn seq_len(&self) -> u32 {
        self.seq_len
    }
    /// Query tiles per pattern.
    pub fn tiles(&self) -> u32 {
        self.tiles
    }
    /// Pattern heads.
    pub fn patterns(&self) -> u32 {
        self.patterns
    }
    /// The KV entries of tile `tile` of pattern `pattern`.
    pub fn tile(&self, pattern: u32, tile: u32) -> &[KvEntry] {
        let r = (pattern * self.tiles + tile) as usize;
        &self.entries[self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize]
    }
    /// All entries (pattern-major, tile-major).
    pub fn entries(&self) -> &[KvEntry] {
        &self.entries
    }
    /// Offsets into [`MergeQPlan::entries`] (`patterns * tiles + 1`).
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }
    /// Whether every entry uses the one-comparison prefix mask.
    pub fn all_prefix(&self) -> bool {
        self.entries.iter().all(|e| matches!(e.rows, RowMask::Prefix(_)))
    }
    /// The longest tile list (KV blocks one workgroup walks).
    pub fn max_tile_len(&self) -> u32 {
        self.row_ptr.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
    /// The entries as GPU words: `[kv_block, RowMask::encode()]` pairs.
    pub fn gpu_entries(&self) -> Vec<[u32; 2]> {
        self.entries.iter().map(|e| [e.kv_block, e.rows.encode()]).collect()
    }
}
