//! Sparsity layouts: which KV blocks each head attends to.
//!
//! A [`Layout`] is the whole description of an attention pattern at block granularity: the S2 pattern
//! (local window + per-head-offset vertical stripes, [`S2Config`]) or a user-supplied [`BlockMask`]. It
//! answers the block-level question ([`Layout::block_active`]), the element-level one
//! ([`Layout::element_active`], what the oracle uses), density and union-completeness, and builds (and
//! caches) the compressed [`BlockIndex`] per sequence length that planning and kernels read.
//!
//! Heads are grouped into *pattern heads*: query heads that share one pattern. For S2 layouts a pattern
//! head is a KV head (GQA: the query heads of a group share their KV head's shard), or a single shared
//! pattern when `homo_head` is set and no head is dense.

mod index;
mod mask;

pub use index::{BlockIndex, ColumnIndex};
pub use mask::BlockMask;

use crate::error::{Error, Result};
use crate::plan::MergeQPlan;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Block sizes the kernels support.
pub const BLOCK_SIZES: [u32; 4] = [16, 32, 64, 128];

/// Causal (decoder) or bidirectional (encoder) attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Query `i` sees keys `j <= i`. The local window is the last `local_blocks` blocks, own block included.
    Causal,
    /// Every query sees a window of `left` blocks back (own block included) and `right` blocks ahead;
    /// blocks beyond the window are stripes when their distance past the window's edge `d >= 1` satisfies
    /// `(d + h*step + head_sliding_offset) % vert_stride == 0`.
    Bidirectional {
        /// Window blocks to the left, counting the query's own block (>= 1).
        left: u32,
        /// Window blocks to the right.
        right: u32,
    },
}

/// Parameters of the S2 (local + vertical-stride) pattern, as the paper's library exposes them.
///
/// Build with [`S2Config::new`] and the chained setters, then turn into a [`Layout`] with [`Layout::s2`],
/// which validates every field.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct S2Config {
    /// Tokens per block: 16, 32, 64 or 128.
    pub block_size: u32,
    /// Local window in blocks, counting the query's own block (>= 1). Causal layouts only; bidirectional
    /// layouts take their window from [`Direction::Bidirectional`].
    pub local_blocks: u32,
    /// Every `vert_stride`-th block outside the window is attended (1 = dense).
    pub vert_stride: u32,
    /// All sparse heads share head 0's stripes.
    pub homo_head: bool,
    /// Added to every head's stripe phase (Phi-3-small in vLLM uses 1).
    pub head_sliding_offset: u32,
    /// The last `num_dense_heads` KV heads attend densely.
    pub num_dense_heads: u32,
    /// Query heads.
    pub num_heads: u32,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: u32,
    /// Causal or bidirectional.
    pub direction: Direction,
}

impl S2Config {
    /// A causal S2 pattern with heterogeneous heads, no dense heads, no GQA, offset 0.
    pub fn new(num_heads: u32, block_size: u32, local_blocks: u32, vert_stride: u32) -> Self {
        Self {
            block_size,
            local_blocks,
            vert_stride,
            homo_head: false,
            head_sliding_offset: 0,
            num_dense_heads: 0,
            num_heads,
            num_kv_heads: num_heads,
            direction: Direction::Causal,
        }
    }
    /// Sets the number of KV heads (GQA).
    pub fn kv_heads(mut self, n: u32) -> Self {
        self.num_kv_heads = n;
        self
    }
    /// Makes every sparse head use the same stripes.
    pub fn homo_head(mut self, yes: bool) -> Self {
        self.homo_head = yes;
        self
    }
    /// Sets `head_sliding_offset`.
    pub fn offset(mut self, offset: u32) -> Self {
        self.head_sliding_offset = offset;
        self
    }
    /// Makes the last `n` KV heads dense.
    pub fn dense_heads(mut self, n: u32) -> Self {
        self.num_dense_heads = n;
        self
    }
    /// Switches to bidirectional attention with a `(left, right)` block window.
    pub fn bidirectional(mut self, left: u32, right: u32) -> Self {
        self.direction = Direction::Bidirectional { left, right };
        self
    }

    /// `step = max(1, vert_stride / num_heads)`: how far each head's stripes are shifted.
    pub fn step(&self) -> u32 {
        (self.vert_stride / self.num_heads.max(1)).max(1)
    }

    fn validate(&self) -> Result<()> {
        if !BLOCK_SIZES.contains(&self.block_size) {
            return Err(Error::BlockSize(self.block_size));
        }
        validate_heads(self.num_heads, self.num_kv_heads)?;
        if self.vert_stride == 0 {
            return Err(Error::VertStride(0));
        }
        match self.direction {
            Direction::Causal if self.local_blocks == 0 => return Err(Error::LocalBlocks(0)),
            Direction::Bidirectional { left: 0, .. } => return Err(Error::LocalBlocks(0)),
            _ => {}
        }
        if self.num_dense_heads > self.num_kv_heads {
            return Err(Error::DenseHeads { dense: self.num_dense_heads, num_kv_heads: self.num_kv_heads });
        }
        Ok(())
    }

    /// Whether KV head `kv_head` attends KV block `kb` from query block `qb` (block level).
    fn active(&self, kv_head: u32, qb: u32, kb: u32) -> bool {
        let dense = kv_head >= self.num_kv_heads - self.num_dense_heads;
        let phase_head = if self.homo_head { 0 } else { kv_head };
        // In u64: any u32 offset, stride or head count is valid and must not wrap.
        let phase = phase_head as u64 * self.step() as u64 + self.head_sliding_offset as u64;
        let stripe = |d: u32| (d as u64 + phase) % self.vert_stride as u64 == 0;
        match self.direction {
            Direction::Causal => kb <= qb && (dense || qb - kb < self.local_blocks || stripe(kb)),
            Direction::Bidirectional { left, right } => {
                if dense {
                    return true;
                }
                if kb <= qb {
                    let back = qb - kb;
                    back < left || stripe(back - left + 1)
                } else {
                    let ahead = kb - qb;
                    ahead <= right || stripe(ahead - right)
                }
            }
        }
    }
}

pub(crate) fn validate_heads(num_heads: u32, num_kv_heads: u32) -> Result<()> {
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(Error::HeadGroups { num_heads, num_kv_heads });
    }
    Ok(())
}

#[derive(Debug)]
enum Pattern {
    S2(S2Config),
    Custom(BlockMask),
    /// A contiguous range of another layout's heads, its patterns starting at `first_pattern`.
    Heads {
        parent: Layout,
        first_pattern: u32,
    },
}

#[derive(Debug)]
struct Inner {
    pattern: Pattern,
    num_heads: u32,
    num_kv_heads: u32,
    block_size: u32,
    causal: bool,
    num_patterns: u32,
    index_cache: Mutex<HashMap<u32, Arc<BlockIndex>>>,
    mergeq_cache: Mutex<HashMap<(u32, u32), Arc<MergeQPlan>>>,
}

/// A validated attention pattern at block granularity, shared cheaply (`Clone` is an `Arc` clone).
#[derive(Clone, Debug)]
pub struct Layout(Arc<Inner>);

impl Layout {
    /// The S2 pattern described by `config`, after validating it.
    pub fn s2(config: S2Config) -> Result<Self> {
        config.validate()?;
        let num_patterns = if config.homo_head && config.num_dense_heads == 0 { 1 } else { config.num_kv_heads };
        Ok(Self::from_inner(Inner {
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            block_size: config.block_size,
            causal: config.direction == Direction::Causal,
            num_patterns,
            pattern: Pattern::S2(config),
            index_cache: Mutex::default(),
            mergeq_cache: Mutex::default(),
        }))
    }

    /// Dense attention (causal or not) expressed as a layout: `vert_stride = 1`.
    pub fn dense(num_heads: u32, num_kv_heads: u32, block_size: u32, causal: bool) -> Result<Self> {
        let mut cfg = S2Config::new(num_heads, block_size, 1, 1).kv_heads(num_kv_heads).homo_head(true);
        if !causal {
            cfg = cfg.bidirectional(1, u32::MAX / 2);
        }
        Self::s2(cfg)
    }

    /// A user-supplied block mask. `mask.heads()` must divide `num_heads` (use 1 to share one mask, or
    /// `num_kv_heads` so that GQA groups share their KV head's mask).
    pub fn custom(mask: BlockMask, num_heads: u32, num_kv_heads: u32) -> Result<Self> {
        validate_heads(num_heads, num_kv_heads)?;
        if !BLOCK_SIZES.contains(&mask.block_size()) {
            return Err(Error::BlockSize(mask.block_size()));
        }
        if num_heads % mask.heads() != 0 {
            return Err(Error::Mask(format!("{} mask heads do not divide num_heads {num_heads}", mask.heads())));
        }
        Ok(Self::from_inner(Inner {
            num_heads,
            num_kv_heads,
            block_size: mask.block_size(),
            causal: mask.causal(),
            num_patterns: mask.heads(),
            pattern: Pattern::Custom(mask),
            index_cache: Mutex::default(),
            mergeq_cache: Mutex::default(),
        }))
    }

    /// The sub-layout of KV heads `kv_heads` (with their query heads): the same patterns those heads have
    /// here, renumbered from 0. Used to split one call across devices by whole KV groups. The range must
    /// not cut a pattern shared by several KV heads unless it stays inside it.
    pub fn kv_head_range(&self, kv_heads: std::ops::Range<u32>) -> Result<Self> {
        let (h_n, hk_n) = (self.num_heads(), self.num_kv_heads());
        if kv_heads.start >= kv_heads.end || kv_heads.end > hk_n {
            return Err(Error::Shape(format!("KV head range {kv_heads:?} is empty or exceeds {hk_n} KV heads")));
        }
        let group = h_n / hk_n;
        let (h0, n) = (kv_heads.start * group, (kv_heads.end - kv_heads.start) * group);
        let per_pattern = h_n / self.num_patterns();
        let first = self.pattern_of_head(h0);
        let last = self.pattern_of_head(h0 + n - 1);
        let num_patterns = if first == last {
            1
        } else if h0 % per_pattern == 0 && n % per_pattern == 0 {
            last - first + 1
        } else {
            return Err(Error::Shape(format!(
                "KV head range {kv_heads:?} cuts a pattern shared by {per_pattern} query heads; split on multiples of it"
            )));
        };
        Ok(Self::from_inner(Inner {
            num_heads: n,
            num_kv_heads: kv_heads.end - kv_heads.start,
            block_size: self.block_size(),
            causal: self.causal(),
            num_patterns,
            pattern: Pattern::Heads { parent: self.clone(), first_pattern: first },
            index_cache: Mutex::default(),
            mergeq_cache: Mutex::default(),
        }))
    }

    fn from_inner(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    /// Query heads.
    pub fn num_heads(&self) -> u32 {
        self.0.num_heads
    }
    /// Key/value heads.
    pub fn num_kv_heads(&self) -> u32 {
        self.0.num_kv_heads
    }
    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.0.block_size
    }
    /// Whether keys after the query are masked.
    pub fn causal(&self) -> bool {
        self.0.causal
    }
    /// The S2 parameters, when this is an S2 layout.
    pub fn s2_config(&self) -> Option<&S2Config> {
        match &self.0.pattern {
            Pattern::S2(c) => Some(c),
            Pattern::Custom(_) | Pattern::Heads { .. } => None,
        }
    }
    /// Distinct patterns; query head `h` uses pattern [`Layout::pattern_of_head`]`(h)`.
    pub fn num_patterns(&self) -> u32 {
        self.0.num_patterns
    }
    /// The pattern query head `head` uses.
    pub fn pattern_of_head(&self, head: u32) -> u32 {
        head / (self.0.num_heads / self.0.num_patterns)
    }
    /// Blocks needed for `seq_len` tokens.
    pub fn blocks(&self, seq_len: u32) -> u32 {
        seq_len.div_ceil(self.0.block_size)
    }

    /// Whether sequence lengths up to `seq_len` are describable (custom masks have a fixed size).
    pub fn check_seq_len(&self, seq_len: u32) -> Result<()> {
        if seq_len == 0 {
            return Err(Error::Shape("seq_len must be >= 1".into()));
        }
        if let Pattern::Heads { parent, .. } = &self.0.pattern {
            return parent.check_seq_len(seq_len);
        }
        if let Pattern::Custom(m) = &self.0.pattern {
            let nb = self.blocks(seq_len);
            if nb > m.q_blocks() || nb > m.kv_blocks() {
                return Err(Error::Mask(format!(
                    "seq_len {seq_len} needs {nb} blocks of {} but the mask is {} x {} blocks",
                    self.0.block_size,
                    m.q_blocks(),
                    m.kv_blocks()
                )));
            }
        }
        Ok(())
    }

    /// Whether pattern `pattern` attends KV block `kb` from query block `qb`.
    pub fn block_active(&self, pattern: u32, qb: u32, kb: u32) -> bool {
        match &self.0.pattern {
            Pattern::S2(c) => {
                // A pattern head of an S2 layout is a KV head, unless all heads share pattern 0.
                c.active(pattern, qb, kb)
            }
            Pattern::Custom(m) => m.get(pattern, qb, kb) && (!m.causal() || kb <= qb),
            Pattern::Heads { parent, first_pattern } => parent.block_active(first_pattern + pattern, qb, kb),
        }
    }

    /// Whether query token `qi` attends key token `kj` under pattern `pattern` (the oracle's mask).
    pub fn element_active(&self, pattern: u32, qi: u32, kj: u32) -> bool {
        (!self.0.causal || kj <= qi) && self.block_active(pattern, qi / self.0.block_size, kj / self.0.block_size)
    }

    /// Blocks the pattern could attend at most: the causal triangle, or the full square.
    fn possible_blocks(&self, nb: u32) -> u64 {
        let nb = nb as u64;
        if self.0.causal {
            nb * (nb + 1) / 2
        } else {
            nb * nb
        }
    }

    /// Active blocks over possible blocks (causal triangle or square) for pattern `pattern`.
    pub fn pattern_density(&self, pattern: u32, seq_len: u32) -> f64 {
        let idx = self.index(seq_len);
        idx.pattern_nnz(pattern) as f64 / self.possible_blocks(idx.q_blocks()) as f64
    }

    /// Density per query head (each head's pattern's density).
    pub fn head_densities(&self, seq_len: u32) -> Vec<f64> {
        (0..self.num_heads()).map(|h| self.pattern_density(self.pattern_of_head(h), seq_len)).collect()
    }

    /// Mean density over query heads: the fraction of possible block work actually done.
    pub fn density(&self, seq_len: u32) -> f64 {
        let d = self.head_densities(seq_len);
        d.iter().sum::<f64>() / d.len() as f64
    }

    /// Whether the union over all heads covers every possible block (the paper's guarantee that the
    /// context is fully covered, though by different heads).
    pub fn union_complete(&self, seq_len: u32) -> bool {
        let nb = self.blocks(seq_len);
        (0..nb).all(|qb| {
            let kbs = if self.0.causal { 0..=qb } else { 0..=nb - 1 };
            kbs.into_iter().all(|kb| (0..self.num_patterns()).any(|p| self.block_active(p, qb, kb)))
        })
    }

    /// The compressed row index for `seq_len` tokens, built once and cached.
    pub fn index(&self, seq_len: u32) -> Arc<BlockIndex> {
        let mut cache = self.0.index_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(seq_len).or_insert_with(|| Arc::new(BlockIndex::build(self, seq_len))).clone()
    }

    /// The MergeQ tile lists for `seq_len` tokens in tiles of `tile_q` rows, built once and cached.
    pub fn mergeq(&self, seq_len: u32, tile_q: u32) -> Arc<MergeQPlan> {
        if let Some(p) = self.0.mergeq_cache.lock().unwrap_or_else(|e| e.into_inner()).get(&(seq_len, tile_q)) {
            return p.clone();
        }
        let plan = Arc::new(MergeQPlan::build(&self.index(seq_len), self.block_size(), self.causal(), tile_q));
        self.0.mergeq_cache.lock().unwrap_or_else(|e| e.into_inner()).insert((seq_len, tile_q), plan.clone());
        plan
    }

    /// Query-key pairs that are computed (active elements, summed over query heads), per batch element.
    pub fn active_pairs(&self, seq_len: u32) -> u64 {
        let bs = self.0.block_size;
        let idx = self.index(seq_len);
        let mut per_pattern = vec![0u64; self.num_patterns() as usize];
        for (p, pairs) in per_pattern.iter_mut().enumerate() {
            for qb in 0..idx.q_blocks() {
                let q_lo = qb * bs;
                let q_hi = (q_lo + bs).min(seq_len);
                for &kb in idx.row(p as u32, qb) {
                    let k_lo = kb * bs;
                    let k_hi = (k_lo + bs).min(seq_len);
                    if !self.0.causal || k_hi <= q_lo + 1 {
                        *pairs += ((q_hi - q_lo) * (k_hi - k_lo)) as u64;
                    } else {
                        for qi in q_lo..q_hi {
                            *pairs += (k_hi.min(qi + 1).saturating_sub(k_lo)) as u64;
                        }
                    }
                }
            }
        }
        (0..self.num_heads()).map(|h| per_pattern[self.pattern_of_head(h) as usize]).sum()
    }
}
