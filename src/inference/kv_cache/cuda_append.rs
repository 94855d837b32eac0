//! `KvCache::append_cuda`: appends from CUDA device buffers into a cache whose pools live in CUDA memory
//! (`shaders/cuda/kv_append.cu`), so that a decode loop whose K/V projections run on a CUDA device never
//! leaves it. The page planning is the cache's own (`KvCache::claim_batch`, as for the wgpu appends); this
//! file checks the sources and launches one batch per pool segment.

use super::{KvCache, SeqId};
use crate::cuda::{AppendRows, CudaAppender, RowShape};
use crate::error::{Error, Result};
use cudarc::driver::DevicePtr;

/// Where the K and V rows of a [`KvCache::append_cuda`] batch sit in their device buffers, in elements:
/// the batch's tokens are numbered one after the other (the first append's, then the next one's), and
/// token `t`'s K row (`[kv_heads, head_dim]`) starts at `k_offset + t * token_stride`, its V row at
/// `v_offset + t * token_stride`. `token_stride` `None` means packed rows (`kv_heads * head_dim`); a wider
/// stride reads the K and V columns of an interleaved QKV buffer. Offsets and stride must be whole 32-bit
/// words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaRows {
    /// Element offset of token 0's K row.
    pub k_offset: u64,
    /// Element offset of token 0's V row.
    pub v_offset: u64,
    /// Elements from one token's rows to the next; `None`: `kv_heads * head_dim`.
    pub token_stride: Option<u64>,
}

impl KvCache {
    /// Appends a batch of distinct sequences, `(seq, tokens)` each, from CUDA device buffers (`k` and `v`
    /// of any element type of the cache's dtype's size, or bytes; they may be the same buffer) laid out as
    /// `rows` says, enqueued on the cache's CUDA stream without waiting (cudarc orders later work on the
    /// buffers after it). The page tables change now, as with [`KvCache::append`]; the rows land when the
    /// stream reaches the launch, ahead of any decode enqueued after this call. All or nothing: the
    /// sources, every sequence's claim and the pool's room are checked before any page table changes.
    /// Fails with [`Error::Unsupported`] on a cache in wgpu memory.
    pub fn append_cuda<T>(
        &mut self,
        appends: &[(SeqId, u32)],
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        rows: CudaRows,
    ) -> Result<()> {
        let ctx = self.cuda_ctx()?;
        if appends.is_empty() {
            return Ok(());
        }
        let dtype = self.config.dtype;
        let es = dtype.size();
        let elem = std::mem::size_of::<T>() as u64;
        if elem != es && elem != 1 {
            return Err(Error::DType { tensor: "k", expected: dtype.name(), got: "an element of another size" });
        }
        let row = self.layout.num_kv_heads() as u64 * self.config.head_dim as u64;
        let stride = rows.token_stride.unwrap_or(row);
        if (rows.k_offset * es) % 4 != 0 || (rows.v_offset * es) % 4 != 0 {
            return Err(Error::Shape(format!(
                "append_cuda: k_offset {} and v_offset {} must be whole 32-bit words ({dtype})",
                rows.k_offset, rows.v_offset
            )));
        }
        let tokens: u64 = appends.iter().map(|&(_, n)| n as u64).sum();
        for (name, bytes, offset) in [("k", k.num_bytes(), rows.k_offset), ("v", v.num_bytes(), rows.v_offset)] {
            let needed = (offset + tokens.max(1).saturating_sub(1) * stride.max(row) + row) * es;
            if (bytes as u64) < needed {
                return Err(Error::BufferTooSmall { tensor: name, got: bytes as u64, needed });
            }
        }
        let stream = ctx.stream().clone();
        let (k_ptr, _k) = k.device_ptr(&stream);
        let (v_ptr, _v) = v.device_ptr(&stream);
        // SAFETY: both buffers were checked to hold every row the batch reads and stay borrowed (their
        // guards record the launch for cudarc's ordering when they drop, after it).
        unsafe {
            self.append_cuda_raw(appends, k_ptr + rows.k_offset * es, v_ptr + rows.v_offset * es, rows.token_stride)
        }
    }

    /// [`KvCache::append_cuda`] from raw device addresses (`CUdeviceptr`s of the cache's CUDA context, as a
    /// C caller holds them): token `t` of the batch has its K row at `k + t * token_stride` elements and its
    /// V row at `v + t * token_stride` (`None`: `kv_heads * head_dim`, packed rows).
    ///
    /// # Safety
    /// `k` and `v` must address live device memory of the cache's context holding every row the batch
    /// reads, valid until the stream has run the launch.
    pub unsafe fn append_cuda_raw(
        &mut self,
        appends: &[(SeqId, u32)],
        k: u64,
        v: u64,
        token_stride: Option<u64>,
    ) -> Result<()> {
        let ctx = self.cuda_ctx()?;
        if appends.is_empty() {
            return Ok(());
        }
        let dtype = self.config.dtype;
        let es = dtype.size();
        let (hk, d, bs) = (self.layout.num_kv_heads(), self.config.head_dim, self.layout.block_size());
        let row = hk as u64 * d as u64;
        let stride = token_stride.unwrap_or(row);
        if stride < row || (stride * es) % 4 != 0 {
            return Err(Error::Shape(format!(
                "append_cuda: token_stride {stride} must be whole 32-bit words ({dtype}) and at least a token's K \
                 (or V) row, kv_heads * head_dim = {row}"
            )));
        }
        if k == 0 || v == 0 || k % 4 != 0 || v % 4 != 0 {
            return Err(Error::Shape("append_cuda: k and v must be device addresses on a 32-bit word".into()));
        }
        let token_stride = u32::try_from(stride * es / 4)
            .map_err(|_| Error::Shape(format!("append_cuda: token_stride {stride} exceeds 2^32 words")))?;
        let tokens: u64 = appends.iter().map(|&(_, n)| n as u64).sum();
        if u32::try_from(tokens).is_err() {
            return Err(Error::Shape(format!("append_cuda: a batch of {tokens} tokens exceeds 2^32")));
        }
        let segments = appends.iter().map(|&(seq, _)| self.segment_of(seq)).collect::<Result<Vec<usize>>>()?;
        if self.cuda_appender.is_none() {
            self.cuda_appender = Some(CudaAppender::new(&ctx)?);
        }
        let lens = self.claim_batch("append_cuda", appends)?;
        let mut src_token0 = 0;
        let mut batch = Vec::with_capacity(appends.len());
        for (&(seq, tokens), &(len0, len1)) in appends.iter().zip(&lens) {
            let (first_block, blocks, pages) = self.touched_pages(seq, len0, len1);
            let pages = pages.into_iter().map(|p| p.unwrap_or(u32::MAX)).collect();
            batch.push(AppendRows { tokens, len0, first_block, blocks, src_token0, pages });
            src_token0 += tokens;
        }
        let shape = RowShape { kv_heads: hk, row_words: (d as u64 * es / 4) as u32, block_size: bs, token_stride };
        let stream = ctx.stream().clone();
        let mut used = segments.clone();
        used.sort_unstable();
        used.dedup();
        for segment in used {
            let members: Vec<AppendRows> =
                batch.iter().zip(&segments).filter(|&(_, &s)| s == segment).map(|(r, _)| r.clone()).collect();
            let appender =
                self.cuda_appender.as_ref().ok_or_else(|| Error::Device("the append kernel is missing".into()))?;
            let (pool_k, pool_v) = self.segments[segment]
                .pools
                .cuda_mut()
                .ok_or_else(|| Error::Device("KV pool on another device than its cache".into()))?;
            let (pk, _pk) = cudarc::driver::DevicePtrMut::device_ptr_mut(pool_k, &stream);
            let (pv, _pv) = cudarc::driver::DevicePtrMut::device_ptr_mut(pool_v, &stream);
            // SAFETY: the sources are the caller's promise; the pools are the segment's own, which the page
            // indices address.
            unsafe { appender.launch(&stream, &members, shape, (k, v), (pk, pv))? };
        }
        Ok(())
    }

    fn cuda_ctx(&self) -> Result<crate::cuda::CudaContext> {
        self.ctx
            .cuda()
            .cloned()
            .ok_or_else(|| Error::Unsupported("KvCache::append_cuda: this cache's pools are wgpu buffers".into()))
    }
}
