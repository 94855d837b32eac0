//! `BlockMask`: a user-supplied pattern, one `[q_blocks x kv_blocks]` boolean matrix per pattern head.

use crate::error::{Error, Result};

/// A custom block-sparse pattern. `heads` matrices of `q_blocks x kv_blocks` booleans, row-major.
///
/// With `causal`, keys after the query are also masked at element level (and blocks above the diagonal
/// are ignored). Rows with no active key produce zeros and a log-sum-exp of `-inf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMask {
    heads: u32,
    q_blocks: u32,
    kv_blocks: u32,
    block_size: u32,
    causal: bool,
    bits: Vec<bool>,
}

impl BlockMask {
    /// Builds a mask from `heads * q_blocks * kv_blocks` booleans (head-major, then row-major).
    pub fn new(
        heads: u32,
        q_blocks: u32,
        kv_blocks: u32,
        block_size: u32,
        causal: bool,
        bits: Vec<bool>,
    ) -> Result<Self> {
        if heads == 0 || q_blocks == 0 || kv_blocks == 0 {
            return Err(Error::Mask(format!("dimensions must be positive, got {heads} x {q_blocks} x {kv_blocks}")));
        }
        let expected = heads as usize * q_blocks as usize * kv_blocks as usize;
        if bits.len() != expected {
            return Err(Error::Mask(format!(
                "{} booleans given for {heads} heads x {q_blocks} x {kv_blocks} blocks = {expected}",
                bits.len()
            )));
        }
        Ok(Self { heads, q_blocks, kv_blocks, block_size, causal, bits })
    }

    /// Builds a mask from a predicate `f(head, q_block, kv_block)`.
    pub fn from_fn(
        heads: u32,
        q_blocks: u32,
        kv_blocks: u32,
        block_size: u32,
        causal: bool,
        f: impl Fn(u32, u32, u32) -> bool,
    ) -> Result<Self> {
        let mut bits = Vec::with_capacity(heads as usize * q_blocks as usize * kv_blocks as usize);
        for h in 0..heads {
            for q in 0..q_blocks {
                for k in 0..kv_blocks {
                    bits.push(f(h, q, k));
                }
            }
        }
        Self::new(heads, q_blocks, kv_blocks, block_size, causal, bits)
    }

    /// Pattern heads.
    pub fn heads(&self) -> u32 {
        self.heads
    }
    /// Query blocks.
    pub fn q_blocks(&self) -> u32 {
        self.q_blocks
    }
    /// KV blocks.
    pub fn kv_blocks(&self) -> u32 {
        self.kv_blocks
    }
    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Whether element-level causal masking applies too.
    pub fn causal(&self) -> bool {
        self.causal
    }
    /// The mask bit (false outside the matrix).
    pub fn get(&self, head: u32, qb: u32, kb: u32) -> bool {
        if head >= self.heads || qb >= self.q_blocks || kb >= self.kv_blocks {
            return false;
        }
        self.bits[((head * self.q_blocks + qb) * self.kv_blocks + kb) as usize]
    }
}
