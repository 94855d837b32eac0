//! The compressed block index (CSR) per pattern head: for every query block the ascending list of KV
//! blocks it attends, and its transpose (for every KV block the query blocks that attend it, which the
//! backward pass walks). Built once per (layout, sequence length); [`crate::plan::MergeQPlan`] regroups
//! it into kernel tiles.

use super::Layout;

/// Row index: pattern-major, then query block, CSR over KV block ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockIndex {
    seq_len: u32,
    q_blocks: u32,
    patterns: u32,
    row_ptr: Vec<u32>,
    cols: Vec<u32>,
}

impl BlockIndex {
    pub(crate) fn build(layout: &Layout, seq_len: u32) -> Self {
        let nb = layout.blocks(seq_len);
        let patterns = layout.num_patterns();
        let mut row_ptr = Vec::with_capacity((patterns * nb + 1) as usize);
        let mut cols = Vec::new();
        row_ptr.push(0);
        for p in 0..patterns {
            for qb in 0..nb {
                let last = if layout.causal() { qb } else { nb - 1 };
                cols.extend((0..=last).filter(|&kb| layout.block_active(p, qb, kb)));
                row_ptr.push(cols.len() as u32);
            }
        }
        Self { seq_len, q_blocks: nb, patterns, row_ptr, cols }
    }

    /// Tokens this index was built for.
    pub fn seq_len(&self) -> u32 {
        self.seq_len
    }
    /// Query (and KV) blocks.
    pub fn q_blocks(&self) -> u32 {
        self.q_blocks
    }
    /// Pattern heads.
    pub fn patterns(&self) -> u32 {
        self.patterns
    }
    /// The KV blocks query block `qb` of pattern `pattern` attends, ascending.
    pub fn row(&self, pattern: u32, qb: u32) -> &[u32] {
        let r = (pattern * self.q_blocks + qb) as usize;
        &self.cols[self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize]
    }
    /// Active blocks of one pattern.
    pub fn pattern_nnz(&self, pattern: u32) -> u64 {
        let lo = (pattern * self.q_blocks) as usize;
        (self.row_ptr[lo + self.q_blocks as usize] - self.row_ptr[lo]) as u64
    }
    /// Active blocks over all patterns.
    pub fn nnz(&self) -> usize {
        self.cols.len()
    }
    /// CSR row offsets (`patterns * q_blocks + 1`).
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }
    /// CSR column ids (KV blocks).
    pub fn cols(&self) -> &[u32] {
        &self.cols
    }
    /// The transposed (column) index: for each KV block, the query blocks that attend it.
    pub fn transpose(&self) -> ColumnIndex {
        let n = self.q_blocks as usize;
        let mut counts = vec![0u32; self.patterns as usize * n + 1];
        for p in 0..self.patterns {
            for qb in 0..self.q_blocks {
                for &kb in self.row(p, qb) {
                    counts[(p * self.q_blocks + kb) as usize + 1] += 1;
                }
            }
        }
        for i in 1..counts.len() {
            counts[i] += counts[i - 1];
        }
        let col_ptr = counts.clone();
        let mut rows = vec![0u32; self.cols.len()];
        let mut fill = counts;
        for p in 0..self.patterns {
            for qb in 0..self.q_blocks {
                for &kb in self.row(p, qb) {
                    let c = (p * self.q_blocks + kb) as usize;
                    rows[fill[c] as usize] = qb;
                    fill[c] += 1;
                }
            }
        }
        ColumnIndex { q_blocks: self.q_blocks, col_ptr, rows }
    }
}

/// Column index: pattern-major, then KV block, CSR over the query blocks that attend it (ascending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnIndex {
    q_blocks: u32,
    col_ptr: Vec<u32>,
    rows: Vec<u32>,
}

impl ColumnIndex {
    /// The query blocks of pattern `pattern` that attend KV block `kb`, ascending.
    pub fn column(&self, pattern: u32, kb: u32) -> &[u32] {
        let c = (pattern * self.q_blocks + kb) as usize;
        &self.rows[self.col_ptr[c] as usize..self.col_ptr[c + 1] as usize]
    }
    /// CSR column offsets.
    pub fn col_ptr(&self) -> &[u32] {
        &self.col_ptr
    }
    /// CSR query block ids.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }
}
