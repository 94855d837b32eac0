//! `KvCache`: the library-owned paged KV cache of an S2 (or any causal) layout on a wgpu device.
//!
//! Pools of fixed-size pages live on the GPU (K and V, one page = one layout block of one KV head), in one
//! or more *segments* of at most one storage binding each (a dense cache of long sequences outgrows one
//! binding); each sequence lives in one segment. Each sequence has a [`PageTable`] per KV head mapping its
//! logical blocks to pages of its segment. Appending tokens
//! writes their K and V rows into pages; before that the cache frees every page no future query of the
//! page's KV head can attend ([`Retention`](super::retention)): for S2 layouts a KV head keeps its local
//! window and its vertical stripes, dense heads keep everything. Future queries are the last
//! `query_window` tokens of a sequence (1 for plain decoding, more for speculative decoding), so a block
//! that leaves every future query's reach is never read again and its page is reused. Blocks no future
//! query needs are not even written: a long prompt appended at once only ever occupies its resident pages.
//!
//! Every mutation checks all its arguments and the pool's room first and changes nothing when it fails.

use super::kv_append;
use super::page_table::{KvPage, PagePool, PageTable};
use super::pool_storage::{PoolDevice, PoolPair};
use super::retention::Retention;
use crate::attention::Element;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::gpu::{TensorView, WgpuContext};
use crate::layout::Layout;
use crate::plan::{DType, PORTABLE_HEAD_DIMS};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "cuda")]
mod cuda_append;
#[cfg(feature = "cuda")]
pub use cuda_append::CudaRows;

/// One append of [`KvCache::append_encoded_batch`]: `tokens` rows of `[kv_heads, head_dim]` for `seq`,
/// K and V read from device buffers (views as [`KvCache::append_encoded`] takes them).
#[derive(Clone, Copy, Debug)]
pub struct EncodedAppend<'a> {
    /// The sequence appended to.
    pub seq: SeqId,
    /// Its K rows.
    pub k: TensorView<'a>,
    /// Its V rows.
    pub v: TensorView<'a>,
    /// Tokens appended (at least 1).
    pub tokens: u32,
}

/// What an append changes in one sequence's page tables: pages to free, blocks that get a page, lengths.
struct Claim {
    seq: SeqId,
    segment: usize,
    len0: u32,
    len1: u32,
    evict: Vec<(u32, u32)>,
    fresh: Vec<(u32, u32)>,
}

/// A sequence in a [`KvCache`], handed out by [`KvCache::add_sequence`]. Ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    /// The id as a number (for logs and error messages).
    pub fn get(self) -> u64 {
        self.0
    }
    #[cfg(test)]
    pub(crate) fn for_tests(id: u64) -> Self {
        Self(id)
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq#{}", self.0)
    }
}

/// How a [`KvCache`] is shaped and sized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Features per head (as the attention op's).
    pub head_dim: u32,
    /// Storage type of K and V: f32 or f16.
    pub dtype: DType,
    /// The page table's capacity: the most tokens one sequence may hold.
    pub max_seq_len: u32,
    /// Sequences of `max_seq_len` tokens the pool is sized for, when `max_pages` is not set.
    pub sequences: u32,
    /// Pages in the pool; `None` sizes it for `sequences` sequences at their peak residency.
    pub max_pages: Option<u32>,
    /// Trailing tokens of a sequence that a later decode call may query (>= 1; more than 1 for
    /// speculative decoding). Pages that only earlier queries could attend are freed.
    pub query_window: u32,
    /// The most pages one segment (one K and one V buffer) holds; `None`: as many as one storage
    /// binding takes.
    pub segment_pages: Option<u32>,
}

impl KvCacheConfig {
    /// A cache for one sequence of up to `max_seq_len` tokens, queried one token at a time.
    pub fn new(head_dim: u32, dtype: DType, max_seq_len: u32) -> Self {
        Self { head_dim, dtype, max_seq_len, sequences: 1, max_pages: None, query_window: 1, segment_pages: None }
    }
    /// Sizes the pool for `n` sequences of `max_seq_len` tokens.
    pub fn sequences(mut self, n: u32) -> Self {
        self.sequences = n;
        self
    }
    /// Sets the pool's size in pages explicitly.
    pub fn max_pages(mut self, pages: u32) -> Self {
        self.max_pages = Some(pages);
        self
    }
    /// Lets decode calls query the last `tokens` tokens of a sequence (speculative decoding).
    pub fn query_window(mut self, tokens: u32) -> Self {
        self.query_window = tokens;
        self
    }
    /// Caps the pages of one segment (below what one storage binding takes).
    pub fn segment_pages(mut self, pages: u32) -> Self {
        self.segment_pages = Some(pages);
        self
    }
}

/// What a [`KvCache`] holds against what a dense cache would, from [`KvCache::memory_report`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryReport {
    /// Sequences in the cache.
    pub sequences: usize,
    /// Tokens over all sequences.
    pub tokens: u64,
    /// Bytes of one page, K and V together.
    pub page_bytes: u64,
    /// Pages in use.
    pub resident_pages: u64,
    /// Pages a dense paged cache with the same page size would use.
    pub dense_pages: u64,
    /// Pages in the pool (allocated on the device).
    pub pool_pages: u64,
    /// Bytes a dense cache would hold: every token's K and V rows of every KV head.
    pub dense_bytes: u64,
}

impl MemoryReport {
    /// Bytes of the pages in use.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_pages * self.page_bytes
    }
    /// Bytes allocated on the device for the pool.
    pub fn pool_bytes(&self) -> u64 {
        self.pool_pages * self.page_bytes
    }
    /// Resident bytes over dense bytes (0 for an empty cache).
    pub fn fraction(&self) -> f64 {
        if self.dense_bytes == 0 {
            return 0.0;
        }
        self.resident_bytes() as f64 / self.dense_bytes as f64
    }
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "{} sequences, {} tokens: {} pages resident = {:.2} MiB, dense {:.2} MiB ({:.3} of dense); pool {} pages = {:.2} MiB",
            self.sequences,
            self.tokens,
            self.resident_pages,
            mib(self.resident_bytes()),
            mib(self.dense_bytes),
            self.fraction(),
            self.pool_pages,
            mib(self.pool_bytes())
        )
    }
}

#[derive(Debug)]
struct Sequence {
    len: u32,
    /// The segment holding its pages.
    segment: usize,
    /// One page table per KV head.
    tables: Vec<PageTable>,
    /// Changes whenever a page of the sequence is allocated or freed (work lists built from its page
    /// tables stay valid while it does not).
    epoch: u64,
}

/// One K pool and one V pool of pages, with their free list.
struct Segment {
    pools: PoolPair,
    pool: PagePool,
    sequences: usize,
}

/// A paged KV cache on the GPU for one layout. See the module docs for the eviction rule.
pub struct KvCache {
    ctx: PoolDevice,
    layout: Layout,
    config: KvCacheConfig,
    id: u64,
    retention: Retention,
    /// Pages one sequence of `max_seq_len` tokens holds at its peak.
    peak: u32,
    segments: Vec<Segment>,
    seqs: HashMap<u64, Sequence>,
    next_seq: u64,
    /// The kernel of [`KvCache::append_encoded`], compiled on first use.
    appender: Option<kv_append::Appender>,
    /// The kernel of `KvCache::append_cuda`, compiled on first use.
    #[cfg(feature = "cuda")]
    cuda_appender: Option<crate::cuda::CudaAppender>,
}

impl fmt::Debug for KvCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvCache").field("config", &self.config).field("report", &self.memory_report()).finish()
    }
}

static NEXT_CACHE: AtomicU64 = AtomicU64::new(1);

/// Bytes of K/V rows an append stages before handing them to the device.
const FLUSH_BYTES: u64 = 256 << 20;

impl KvCache {
    /// A cache for `layout` (causal) on the device of `ctx` (wgpu buffers, or CUDA memory on a CUDA
    /// context), its pool allocated up front.
    pub fn new(ctx: &Context, layout: &Layout, config: KvCacheConfig) -> Result<Self> {
        let ctx = PoolDevice::of(ctx)?;
        Self::validate(layout, &config)?;
        if config.dtype == DType::BF16 && ctx.wgpu().is_some() {
            return Err(Error::Unsupported("bf16 KV cache: the WGSL decode kernels take f32 or f16".into()));
        }
        let retention = Retention::new(layout, layout.blocks(config.max_seq_len));
        let sizes = Self::segment_sizes(layout, &config, &retention, ctx.caps())?;
        let page_bytes = layout.block_size() as u64 * config.head_dim as u64 * config.dtype.size();
        let pairs = ctx.alloc(sizes.iter().map(|&pages| pages as u64 * page_bytes))?;
        let segments: Vec<Segment> = pairs
            .into_iter()
            .zip(&sizes)
            .map(|(pools, &pages)| Segment { pools, pool: PagePool::new(pages), sequences: 0 })
            .collect();
        let peak = Self::peak_pages(layout, &config, &retention);
        Ok(Self {
            ctx,
            layout: layout.clone(),
            config,
            id: NEXT_CACHE.fetch_add(1, Ordering::Relaxed),
            peak,
            retention,
            segments,
            seqs: HashMap::new(),
            next_seq: 0,
            appender: None,
            #[cfg(feature = "cuda")]
            cuda_appender: None,
        })
    }

    /// Pages per segment: whole sequences at their peak per segment when sized by `sequences`, else
    /// `max_pages` cut at what one binding (and the kernel's u32 vec4 addressing) takes.
    fn segment_sizes(
        layout: &Layout,
        config: &KvCacheConfig,
        retention: &Retention,
        caps: &crate::plan::DeviceCaps,
    ) -> Result<Vec<u32>> {
        let page_elems = layout.block_size() as u64 * config.head_dim as u64;
        let page_bytes = page_elems * config.dtype.size();
        let binding = caps.max_storage_binding.min(caps.max_buffer);
        let cap =
            (binding / page_bytes).min((1u64 << 34) / page_elems).min(config.segment_pages.map_or(u64::MAX, u64::from));
        let limit = if caps.max_storage_binding <= caps.max_buffer {
            "max_storage_buffer_binding_size"
        } else {
            "max_buffer_size"
        };
        if cap == 0 {
            return Err(Error::DeviceLimit { what: "one KV page".into(), limit, needed: page_bytes, max: binding });
        }
        let chunks = |total: u64, per: u64| -> Vec<u32> {
            (0..total.div_ceil(per)).map(|i| (total - i * per).min(per) as u32).collect()
        };
        match config.max_pages {
            Some(p) => Ok(chunks(p as u64, cap)),
            None => {
                let peak = Self::peak_pages(layout, config, retention) as u64;
                if peak > cap {
                    if config.segment_pages.is_some_and(|s| (s as u64) < peak) {
                        return Err(Error::Shape(format!(
                            "segment_pages {} is below one sequence's peak of {peak} pages",
                            cap
                        )));
                    }
                    return Err(Error::DeviceLimit {
                        what: format!("one sequence's peak of {peak} KV pages in one pool buffer"),
                        limit,
                        needed: peak * page_bytes,
                        max: binding,
                    });
                }
                let per_segment = cap / peak.max(1);
                Ok(chunks(config.sequences as u64, per_segment).into_iter().map(|n| (n as u64 * peak) as u32).collect())
            }
        }
    }

    /// Pages one sequence of `config.max_seq_len` tokens holds at its peak under `layout`'s eviction rule
    /// (what the pool reserves per sequence when `max_pages` is not set).
    pub fn pages_per_sequence(layout: &Layout, config: &KvCacheConfig) -> Result<u32> {
        Self::validate(layout, config)?;
        Ok(Self::peak_pages(layout, config, &Retention::new(layout, layout.blocks(config.max_seq_len))))
    }

    fn validate(layout: &Layout, config: &KvCacheConfig) -> Result<()> {
        if !layout.causal() {
            return Err(Error::Unsupported("a KV cache needs a causal layout (decoding is causal)".into()));
        }
        if !PORTABLE_HEAD_DIMS.contains(&config.head_dim) {
            return Err(Error::HeadDim { got: config.head_dim, what: "the KV cache", supported: PORTABLE_HEAD_DIMS });
        }
        layout.check_seq_len(config.max_seq_len)?;
        if config.query_window == 0 || config.query_window > config.max_seq_len {
            return Err(Error::Shape(format!(
                "query_window must be in 1..={} (max_seq_len), got {}",
                config.max_seq_len, config.query_window
            )));
        }
        if config.max_pages == Some(0) || (config.max_pages.is_none() && config.sequences == 0) {
            return Err(Error::Shape("a KV cache needs max_pages >= 1 (or sequences >= 1)".into()));
        }
        Ok(())
    }

    fn peak_pages(layout: &Layout, config: &KvCacheConfig, retention: &Retention) -> u32 {
        let bs = layout.block_size();
        // With its last token at the start of block b, a sequence's future queries start earliest.
        let qb_min_at = |b: u32| (b * bs + 1).saturating_sub(config.query_window) / bs;
        (0..layout.num_kv_heads()).map(|kvh| retention.peak_resident(kvh, qb_min_at)).sum()
    }

    /// The first query block a future query of a sequence of `len` tokens can lie in.
    fn qb_min(&self, len: u32) -> u32 {
        len.saturating_sub(self.config.query_window) / self.layout.block_size()
    }

    /// Starts an empty sequence, in the segment with the most room left once every sequence it holds has
    /// grown to its peak (segments sized by `sequences` hold different numbers of whole sequences), then
    /// the one holding the fewest sequences.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        let peak = self.peak as i64;
        let segment = (0..self.segments.len())
            .min_by_key(|&i| {
                let g = &self.segments[i];
                let room = g.pool.capacity() as i64 - g.sequences as i64 * peak;
                (std::cmp::Reverse(room), g.sequences, std::cmp::Reverse(g.pool.free()))
            })
            .unwrap_or(0);
        self.segments[segment].sequences += 1;
        let tables = vec![PageTable::default(); self.layout.num_kv_heads() as usize];
        self.seqs.insert(id, Sequence { len: 0, segment, tables, epoch: 0 });
        SeqId(id)
    }

    /// Removes a finished sequence and frees its pages.
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        let mut s = self.seqs.remove(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        let segment = &mut self.segments[s.segment];
        segment.sequences -= 1;
        for table in &mut s.tables {
            table.drain().for_each(|p| segment.pool.release(p));
        }
        Ok(())
    }

    fn sequence(&self, seq: SeqId) -> Result<&Sequence> {
        self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))
    }

    /// Tokens appended to `seq` so far.
    pub fn seq_len(&self, seq: SeqId) -> Result<u32> {
        Ok(self.sequence(seq)?.len)
    }

    /// The page table of `seq` for KV head `kv_head`.
    pub fn page_table(&self, seq: SeqId, kv_head: u32) -> Result<&PageTable> {
        let s = self.sequence(seq)?;
        s.tables.get(kv_head as usize).ok_or_else(|| {
            Error::Shape(format!("kv_head {kv_head} is out of range: the layout has {} KV heads", s.tables.len()))
        })
    }

    /// The sequences in the cache, in ascending id order.
    pub fn sequences(&self) -> Vec<SeqId> {
        let mut ids: Vec<SeqId> = self.seqs.keys().map(|&i| SeqId(i)).collect();
        ids.sort();
        ids
    }

    /// Appends `tokens` new tokens to `seq`: `k` and `v` are `[tokens, kv_heads, head_dim]` in the cache's
    /// dtype. Frees the pages no future query needs any more, then writes the new rows (those of blocks
    /// some future query needs). Fails without changing anything on an unknown sequence, wrong lengths,
    /// a page table overflow or a full pool.
    pub fn append<T: Element>(&mut self, seq: SeqId, k: &[T], v: &[T]) -> Result<()> {
        if T::DTYPE != self.config.dtype {
            return Err(Error::DType { tensor: "k", expected: self.config.dtype.name(), got: T::DTYPE.name() });
        }
        let (hk, d) = (self.layout.num_kv_heads() as usize, self.config.head_dim as usize);
        let row = hk * d;
        let layout = format!("[tokens, kv_heads {hk}, head_dim {d}]");
        if k.is_empty() || k.len() % row != 0 {
            let expected = (k.len() / row).max(1) * row;
            return Err(Error::Length { tensor: "k", got: k.len(), expected, layout });
        }
        if v.len() != k.len() {
            return Err(Error::Length { tensor: "v", got: v.len(), expected: k.len(), layout });
        }
        let (len0, len1) = self.claim(seq, (k.len() / row) as u64)?;
        let bs = self.layout.block_size();
        let touched = len0 / bs..=(len1 - 1) / bs;

        let s = &self.seqs[&seq.0];
        let segment = &mut self.segments[s.segment];
        let (k, v): (&[u8], &[u8]) = (bytemuck::cast_slice(k), bytemuck::cast_slice(v));
        let es = self.config.dtype.size() as usize;
        // Rows of consecutive pages go to the device in one write (a fresh sequence's pages are).
        let mut pending: (u64, Vec<u8>, Vec<u8>) = (0, Vec::new(), Vec::new());
        for (kvh, table) in s.tables.iter().enumerate() {
            for kb in touched.clone() {
                let Some(page) = table.get(kb) else { continue };
                let lo = len0.max(kb * bs);
                let hi = len1.min((kb + 1) * bs);
                let at = (page.index() as u64 * bs as u64 + (lo - kb * bs) as u64) * d as u64 * es as u64;
                if pending.0 + pending.1.len() as u64 != at || pending.1.len() as u64 >= FLUSH_BYTES / 2 {
                    if !pending.1.is_empty() {
                        self.ctx.write(&mut segment.pools, pending.0, &pending.1, &pending.2)?;
                    }
                    if pending.1.len() as u64 >= FLUSH_BYTES / 2 {
                        // Hand the staged writes to the device so that a long prompt's staging memory
                        // is reclaimed as it goes instead of piling up until the next submit.
                        self.ctx.flush()?;
                    }
                    pending = (at, Vec::new(), Vec::new());
                }
                for t in lo..hi {
                    let src = (((t - len0) as usize * hk + kvh) * d) * es;
                    pending.1.extend_from_slice(&k[src..][..d * es]);
                    pending.2.extend_from_slice(&v[src..][..d * es]);
                }
            }
        }
        if !pending.1.is_empty() {
            self.ctx.write(&mut segment.pools, pending.0, &pending.1, &pending.2)?;
        }
        Ok(())
    }

    /// Records an append of `tokens` tokens to `seq` from device buffers into the caller's `encoder` (a
    /// small scatter kernel; nothing is submitted): `k` and `v` are `[tokens, kv_heads, head_dim]` rows in
    /// the cache's dtype (strided views allowed, e.g. the K and V columns of an interleaved QKV buffer;
    /// offsets and strides in whole 32-bit words). The page tables change now, as with
    /// [`KvCache::append`]; the rows land when the encoder's work runs. One encoder may hold several
    /// appends (of any sequences) and [`Decode::encode`](crate::Decode::encode) calls between them, each
    /// seeing the cache as it stood when recorded; submit it before host calls read or change this cache
    /// ([`Decode::run`](crate::Decode::run), [`KvCache::append`]: host writes land at the next submit,
    /// ahead of all recorded work). Fails without changing anything as `append` does, and on views too
    /// small or misaligned. A batch's appends are one dispatch with [`KvCache::append_encoded_batch`].
    /// Past 64 recorded appends whose work has not run, the next waits for the submitted work, as
    /// [`Decode::encode`](crate::Decode::encode) does.
    pub fn append_encoded(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        seq: SeqId,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        tokens: u32,
    ) -> Result<()> {
        self.append_encoded_batch(encoder, &[EncodedAppend { seq, k: *k, v: *v, tokens }])
    }

    /// Records the appends of a batch of distinct sequences as [`KvCache::append_encoded`] does, as one
    /// dispatch per pool segment and pair of source buffers (a decode step of a batch whose K and V rows
    /// sit in one buffer appends every sequence in one dispatch). All or nothing: every append is checked,
    /// and the pool's room for all of them, before any page table changes.
    pub fn append_encoded_batch(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        appends: &[EncodedAppend<'_>],
    ) -> Result<()> {
        let (hk, d) = (self.layout.num_kv_heads(), self.config.head_dim);
        let row = hk as u64 * d as u64;
        let dtype = self.config.dtype;
        let ctx = self.wgpu_ctx("append_encoded")?.clone();
        // Check every append: views, lengths, sequences, 32-bit addressing of its segment.
        let mut sources = Vec::with_capacity(appends.len());
        let mut segments = Vec::with_capacity(appends.len());
        for a in appends {
            let (k_off, k_stride) = kv_append::source_words(&ctx, "k", &a.k, a.tokens, row, dtype)?;
            let (v_off, v_stride) = kv_append::source_words(&ctx, "v", &a.v, a.tokens, row, dtype)?;
            let s = self.sequence(a.seq)?;
            let pool_words = self.segments[s.segment].pools.bytes() / 4;
            if pool_words > u32::MAX as u64 {
                return Err(Error::Unsupported(format!(
                    "append_encoded addresses pool segments in 32-bit words; this one has {pool_words} (cap segment_pages)"
                )));
            }
            sources.push((k_off, k_stride, v_off, v_stride));
            segments.push(s.segment);
        }
        if self.appender.is_none() {
            let max_pages = hk as u64 * (self.layout.blocks(self.config.max_seq_len) as u64 + 1);
            self.appender = Some(kv_append::Appender::new(&ctx, max_pages)?);
        }
        let appender = self.appender.as_ref().ok_or_else(|| Error::Device("the append kernel is missing".into()))?;
        // The dispatches' sizes, before anything changes.
        let mut groups: Vec<(usize, &wgpu::Buffer, &wgpu::Buffer, Vec<usize>)> = Vec::new();
        for (i, (a, &segment)) in appends.iter().zip(&segments).enumerate() {
            match groups.iter_mut().find(|g| g.0 == segment && g.1 == a.k.buffer && g.2 == a.v.buffer) {
                Some(g) => g.3.push(i),
                None => groups.push((segment, a.k.buffer, a.v.buffer, vec![i])),
            }
        }
        for (_, _, _, members) in &groups {
            let tokens: u64 = members.iter().map(|&i| appends[i].tokens as u64).sum();
            appender.dispatch_size(tokens * row * dtype.size() / 4, tokens)?;
        }
        appender.check_room(groups.len())?;
        let batch: Vec<(SeqId, u32)> = appends.iter().map(|a| (a.seq, a.tokens)).collect();
        let lens = self.claim_batch("append_encoded_batch", &batch)?;
        let bs = self.layout.block_size();
        let row_words = (d as u64 * dtype.size() / 4) as u32;
        for (segment, k_buf, v_buf, members) in groups {
            let batch: Vec<(kv_append::AppendParams, Vec<u32>)> = members
                .iter()
                .map(|&i| {
                    let (len0, len1) = lens[i];
                    let (first, blocks, pages) = self.touched_pages(appends[i].seq, len0, len1);
                    let (k_off, k_stride, v_off, v_stride) = sources[i];
                    let page_words = pages.into_iter().map(|p| p.map_or(u32::MAX, |p| p * bs * row_words)).collect();
                    let params = kv_append::AppendParams {
                        tokens: appends[i].tokens,
                        kv_heads: hk,
                        row_words,
                        block_size: bs,
                        len0,
                        first_block: first,
                        blocks,
                        k_off,
                        k_stride,
                        v_off,
                        v_stride,
                        ..Default::default()
                    };
                    (params, page_words)
                })
                .collect();
            let (pool_k, pool_v) =
                self.segments[segment].pools.wgpu().ok_or_else(|| Error::Device("no wgpu pools".into()))?;
            let appender =
                self.appender.as_mut().ok_or_else(|| Error::Device("the append kernel is missing".into()))?;
            appender.encode(encoder, &batch, [k_buf, v_buf], [pool_k, pool_v])?;
        }
        Ok(())
    }

    /// Claims room for a batch of appends to distinct sequences (`(seq, tokens)`, tokens >= 1), all or
    /// nothing: every claim is planned and the pool's room for all of them checked before any page table
    /// changes. Returns each append's length before and after.
    fn claim_batch(&mut self, what: &str, appends: &[(SeqId, u32)]) -> Result<Vec<(u32, u32)>> {
        let mut plans = Vec::with_capacity(appends.len());
        for (i, &(seq, tokens)) in appends.iter().enumerate() {
            if tokens == 0 {
                return Err(Error::Shape(format!("{what}: appends[{i}] ({seq}): tokens must be at least 1")));
            }
            if appends[..i].iter().any(|b| b.0 == seq) {
                return Err(Error::Shape(format!("{what}: {seq} appears more than once")));
            }
            plans.push(self.plan_claim(seq, tokens as u64)?);
        }
        self.check_room(&plans)?;
        // Every member's freed pages first (another member's new pages may be those), then the new pages.
        for plan in &plans {
            self.release_claim(plan);
        }
        plans.into_iter().map(|plan| self.fill_claim(plan)).collect()
    }

    /// The blocks an append that took `seq` from `len0` to `len1` tokens touched, as (first block, blocks,
    /// `[kv_heads, blocks]` page indices; `None` where no future query needs the block).
    fn touched_pages(&self, seq: SeqId, len0: u32, len1: u32) -> (u32, u32, Vec<Option<u32>>) {
        let bs = self.layout.block_size();
        let (first, last) = (len0 / bs, (len1 - 1) / bs);
        let pages = match self.seqs.get(&seq.0) {
            Some(s) => s
                .tables
                .iter()
                .flat_map(|table| (first..=last).map(move |kb| table.get(kb).map(|p| p.index())))
                .collect(),
            None => Vec::new(),
        };
        (first, last - first + 1, pages)
    }

    /// Makes room for `new_tokens` more tokens of `seq`: frees the pages no future query needs any more,
    /// gives a page to every touched block some future query needs, and sets the new length. Checks the
    /// page table's capacity and the pool's room first and changes nothing when either fails. Returns the
    /// length before and after.
    fn claim(&mut self, seq: SeqId, new_tokens: u64) -> Result<(u32, u32)> {
        let plan = self.plan_claim(seq, new_tokens)?;
        self.check_room(std::slice::from_ref(&plan))?;
        self.release_claim(&plan);
        self.fill_claim(plan)
    }

    /// Whether the pool has room for all of `plans` (claims of distinct sequences), segment by segment:
    /// the pages they take at most the free pages and those they free; else [`Error::CacheFull`].
    fn check_room(&self, plans: &[Claim]) -> Result<()> {
        for (segment, pool) in self.segments.iter().map(|s| &s.pool).enumerate() {
            let of_segment: Vec<&Claim> = plans.iter().filter(|p| p.segment == segment).collect();
            let fresh: u64 = of_segment.iter().map(|p| p.fresh.len() as u64).sum();
            let evict: u64 = of_segment.iter().map(|p| p.evict.len() as u64).sum();
            let free = pool.free() as u64;
            if fresh > free + evict {
                let what = match of_segment[..] {
                    [p] => format!("appending {} tokens to {}", p.len1 - p.len0, p.seq),
                    _ => format!("appending a batch of {} sequences", plans.len()),
                };
                return Err(Error::CacheFull {
                    what: format!("{what} (segment {segment} of {})", self.segments.len()),
                    needed: fresh - evict,
                    free,
                    capacity: pool.capacity() as u64,
                });
            }
        }
        Ok(())
    }

    /// What [`KvCache::claim`] would change, without changing it (the pool's room is the caller's check).
    fn plan_claim(&self, seq: SeqId, new_tokens: u64) -> Result<Claim> {
        let s = self.sequence(seq)?;
        let len0 = s.len;
        let tokens = len0 as u64 + new_tokens;
        if tokens > self.config.max_seq_len as u64 {
            return Err(Error::PageTableOverflow { seq: seq.0, tokens, capacity: self.config.max_seq_len as u64 });
        }
        let len1 = tokens as u32;
        let bs = self.layout.block_size();
        let qb_min = self.qb_min(len1);
        let touched = len0 / bs..=(len1 - 1) / bs;
        let mut evict = Vec::new();
        let mut fresh = Vec::new();
        // Every resident page was kept for the first future query block of the length before; only when
        // that block moves can a page have become unneeded (so a token loop scans the tables once a block).
        let scan = qb_min != self.qb_min(len0);
        for (kvh, table) in s.tables.iter().enumerate() {
            let kvh = kvh as u32;
            if scan {
                evict.extend(
                    table.resident().filter(|&(kb, _)| !self.retention.keeps(kvh, kb, qb_min)).map(|(kb, _)| (kvh, kb)),
                );
            }
            fresh.extend(
                touched
                    .clone()
                    .filter(|&kb| table.get(kb).is_none() && self.retention.keeps(kvh, kb, qb_min))
                    .map(|kb| (kvh, kb)),
            );
        }
        Ok(Claim { seq, segment: s.segment, len0, len1, evict, fresh })
    }

    /// Frees the pages a planned claim no longer needs (the first half of applying it).
    fn release_claim(&mut self, plan: &Claim) {
        let segment = &mut self.segments[plan.segment];
        let Some(s) = self.seqs.get_mut(&plan.seq.0) else { return };
        for &(kvh, kb) in &plan.evict {
            if let Some(page) = s.tables[kvh as usize].remove(kb) {
                segment.pool.release(page);
            }
        }
    }

    /// Gives the planned claim's blocks their pages and sets the new length (the second half of applying a
    /// claim whose room was checked, after [`KvCache::release_claim`]); returns the length before and after.
    fn fill_claim(&mut self, plan: Claim) -> Result<(u32, u32)> {
        let segment = &mut self.segments[plan.segment];
        let s = self.seqs.get_mut(&plan.seq.0).ok_or(Error::UnknownSequence(plan.seq.0))?;
        if !plan.evict.is_empty() || !plan.fresh.is_empty() {
            s.epoch += 1;
        }
        for (kvh, kb) in plan.fresh {
            let page =
                segment.pool.alloc().ok_or_else(|| Error::Device("KV page pool accounting is inconsistent".into()))?;
            s.tables[kvh as usize].insert(kb, page);
        }
        s.len = plan.len1;
        Ok((plan.len0, plan.len1))
    }

    /// Pages in use and what a dense cache would hold.
    pub fn memory_report(&self) -> MemoryReport {
        let hk = self.layout.num_kv_heads() as u64;
        let d = self.config.head_dim as u64;
        let es = self.config.dtype.size();
        let tokens: u64 = self.seqs.values().map(|s| s.len as u64).sum();
        MemoryReport {
            sequences: self.seqs.len(),
            tokens,
            page_bytes: 2 * self.layout.block_size() as u64 * d * es,
            resident_pages: self.segments.iter().map(|g| (g.pool.capacity() - g.pool.free()) as u64).sum(),
            dense_pages: self.seqs.values().map(|s| self.layout.blocks(s.len) as u64 * hk).sum(),
            pool_pages: self.segments.iter().map(|g| g.pool.capacity() as u64).sum(),
            dense_bytes: tokens * hk * d * 2 * es,
        }
    }

    /// The layout the cache serves.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The configuration it was built with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }
    /// Tokens per page (the layout's block size).
    pub fn page_tokens(&self) -> u32 {
        self.layout.block_size()
    }
    /// Free pages in the pool (all segments).
    pub fn free_pages(&self) -> u32 {
        self.segments.iter().map(|g| g.pool.free()).sum()
    }
    /// Segments (pairs of K and V buffers) of the pool.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }
    /// The segment holding the pages of `seq`.
    pub fn segment_of(&self, seq: SeqId) -> Result<usize> {
        Ok(self.sequence(seq)?.segment)
    }
    /// The K and V buffers of segment `segment`: `[pages, block_size, head_dim]` each, page `p` of a
    /// [`PageTable`] of a sequence in that segment at index `p.index()` (for kernels of other backends, and
    /// for apps that read the cache directly).
    /// Fails with [`Error::Unsupported`] on a cache in CUDA memory (see `cuda_pools`).
    pub fn pools(&self, segment: usize) -> Result<(&wgpu::Buffer, &wgpu::Buffer)> {
        self.segment(segment)?
            .pools
            .wgpu()
            .ok_or_else(|| Error::Unsupported("KvCache::pools: this cache's pools live in CUDA memory".into()))
    }

    /// The K and V pools of segment `segment` of a cache in CUDA memory, laid out as [`KvCache::pools`].
    #[cfg(feature = "cuda")]
    pub fn cuda_pools(
        &self,
        segment: usize,
    ) -> Result<(&cudarc::driver::CudaSlice<u8>, &cudarc::driver::CudaSlice<u8>)> {
        self.segment(segment)?
            .pools
            .cuda()
            .ok_or_else(|| Error::Unsupported("KvCache::cuda_pools: this cache's pools are wgpu buffers".into()))
    }

    fn segment(&self, segment: usize) -> Result<&Segment> {
        self.segments.get(segment).ok_or_else(|| {
            Error::Shape(format!("segment {segment} is out of range: the cache has {}", self.segments.len()))
        })
    }
    /// Pages of the largest segment (the most KV blocks one decode call part can read).
    pub(crate) fn max_segment_pages(&self) -> u32 {
        self.segments.iter().map(|g| g.pool.capacity()).max().unwrap_or(0)
    }
    pub(crate) fn device(&self) -> &PoolDevice {
        &self.ctx
    }
    fn wgpu_ctx(&self, what: &str) -> Result<&WgpuContext> {
        self.ctx.wgpu().ok_or_else(|| Error::Unsupported(format!("KvCache::{what} needs a wgpu device")))
    }
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
    /// The length of `seq` and the epoch of its page tables (changes whenever a page is allocated or freed).
    pub(crate) fn step_state(&self, seq: SeqId) -> Result<(u32, u64)> {
        let s = self.sequence(seq)?;
        Ok((s.len, s.epoch))
    }
    /// Resident pages of `seq` for `kv_head` with the sequence's length (for the decode work list).
    pub(crate) fn resident(&self, seq: SeqId, kv_head: u32) -> Result<(u32, impl Iterator<Item = (u32, KvPage)> + '_)> {
        let s = self.sequence(seq)?;
        Ok((s.len, s.tables[kv_head as usize].resident()))
    }
}
