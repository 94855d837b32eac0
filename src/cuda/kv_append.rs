//! [`CudaAppender`]: the CUDA KV append kernel (`shaders/cuda/kv_append.cu`, the twin of
//! `shaders/kv_append.wgsl`) behind `KvCache::append_cuda`: the appends of a batch into one pool segment in
//! one launch. A small batch (a decode step's) carries its appends and page indices in the launch's
//! parameters; a larger one uploads them for the launch (freed in stream order).

use super::compile::KernelKey;
use super::context::{cuda_err, CudaContext};
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

const KV_APPEND_SRC: &str = include_str!("../../shaders/cuda/kv_append.cu");
/// Threads per CTA.
const THREADS: u32 = 256;
/// CTAs per SM the grid-strided launch asks for at most.
const CTAS_PER_SM: u32 = 8;
/// Appends and page indices a batch may carry in its parameters (`INLINE_APPENDS`, `INLINE_PAGES` of the
/// kernel).
const INLINE_APPENDS: usize = 4;
const INLINE_PAGES: usize = 64;

/// One append of a batch: `tokens` source rows from `src_token0` on, into a sequence of `len0` tokens whose
/// touched blocks `first_block..first_block + blocks` have the page indices `pages` (`[kv_heads, blocks]`,
/// `u32::MAX` where no future query needs the block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AppendRows {
    pub tokens: u32,
    pub len0: u32,
    pub first_block: u32,
    pub blocks: u32,
    pub src_token0: u32,
    pub pages: Vec<u32>,
}

/// Mirrors `struct Append` in `shaders/cuda/kv_append.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct AppendItem {
    tokens: u32,
    len0: u32,
    first_block: u32,
    blocks: u32,
    pages0: u32,
    src_token0: u32,
    words0: u64,
}

/// Mirrors `struct Batch` in `shaders/cuda/kv_append.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BatchParams {
    src_k: u64,
    src_v: u64,
    pool_k: u64,
    pool_v: u64,
    appends: u64,
    pages: u64,
    words: u64,
    n_appends: u32,
    kv_heads: u32,
    row_words: u32,
    block_size: u32,
    token_stride: u32,
    pad: u32,
    inline_appends: [AppendItem; INLINE_APPENDS],
    inline_pages: [u32; INLINE_PAGES],
}

// SAFETY: plain-old-data with the C layout the kernel declares.
unsafe impl DeviceRepr for BatchParams {}

/// The shape every append of a batch shares: KV heads, words of one KV head's row, tokens per page, and
/// words from one source token's rows to the next.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowShape {
    pub kv_heads: u32,
    pub row_words: u32,
    pub block_size: u32,
    pub token_stride: u32,
}

/// The compiled append kernel.
pub(crate) struct CudaAppender {
    ctx: CudaContext,
    kernel: CudaFunction,
}

impl CudaAppender {
    /// Compiles (or fetches) the kernel.
    pub(crate) fn new(ctx: &CudaContext) -> Result<Self> {
        let key = KernelKey::new("kv_append.cu", ctx.arch(), &[]);
        Ok(Self { ctx: ctx.clone(), kernel: ctx.kernel(&key, KV_APPEND_SRC, "kv_append", 0)? })
    }

    /// Enqueues one batch on `stream`: the appends read K and V words from `src` (token 0's K and V rows)
    /// into the segment pools `pool` (K, V); returns without waiting.
    ///
    /// # Safety
    /// `src` must address live device memory holding every source row the appends read (`shape`'s stride
    /// from token 0), and `pool` the live pools of the segment whose page indices the appends carry.
    pub(crate) unsafe fn launch(
        &self,
        stream: &Arc<CudaStream>,
        appends: &[AppendRows],
        shape: RowShape,
        src: (u64, u64),
        pool: (u64, u64),
    ) -> Result<()> {
        if appends.is_empty() {
            return Ok(());
        }
        let per_token = shape.kv_heads as u64 * shape.row_words as u64;
        let mut items = Vec::with_capacity(appends.len());
        let mut pages: Vec<u32> = Vec::new();
        let mut words = 0u64;
        for a in appends {
            if a.pages.len() as u64 != a.blocks as u64 * shape.kv_heads as u64 {
                return Err(Error::Shape(format!(
                    "an append of {} blocks carries {} page indices for {} KV heads",
                    a.blocks,
                    a.pages.len(),
                    shape.kv_heads
                )));
            }
            let pages0 = u32::try_from(pages.len())
                .map_err(|_| Error::Shape(format!("a batch of appends of {} pages", pages.len())))?;
            items.push(AppendItem {
                tokens: a.tokens,
                len0: a.len0,
                first_block: a.first_block,
                blocks: a.blocks,
                pages0,
                src_token0: a.src_token0,
                words0: words,
            });
            pages.extend_from_slice(&a.pages);
            words += a.tokens as u64 * per_token;
        }
        let mut params = BatchParams {
            src_k: src.0,
            src_v: src.1,
            pool_k: pool.0,
            pool_v: pool.1,
            appends: 0,
            pages: 0,
            words,
            n_appends: items.len() as u32,
            kv_heads: shape.kv_heads,
            row_words: shape.row_words,
            block_size: shape.block_size,
            token_stride: shape.token_stride,
            pad: 0,
            inline_appends: [AppendItem::default(); INLINE_APPENDS],
            inline_pages: [0; INLINE_PAGES],
        };
        // A small batch travels in the parameters; a larger one in buffers uploaded for this launch.
        let mut uploaded = None;
        if items.len() <= INLINE_APPENDS && pages.len() <= INLINE_PAGES {
            params.inline_appends[..items.len()].copy_from_slice(&items);
            params.inline_pages[..pages.len()].copy_from_slice(&pages);
        } else {
            let items_dev = stream
                .clone_htod(bytemuck::cast_slice::<AppendItem, u32>(&items))
                .map_err(cuda_err("uploading the KV append params"))?;
            let pages_dev = stream.clone_htod(&pages).map_err(cuda_err("uploading the KV append pages"))?;
            params.appends = items_dev.device_ptr(stream).0;
            params.pages = pages_dev.device_ptr(stream).0;
            uploaded = Some((items_dev, pages_dev));
        }
        let ctas = words.div_ceil(THREADS as u64).clamp(1, (self.ctx.multiprocessors() * CTAS_PER_SM) as u64) as u32;
        let cfg = LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut args = stream.launch_builder(&self.kernel);
        args.arg(&params);
        // SAFETY: forwarded to the caller for the sources and pools; the params and pages uploaded above
        // live until their stream-ordered frees, after the launch.
        unsafe { args.launch(cfg) }.map_err(cuda_err("launching the CUDA KV append"))?;
        drop(uploaded);
        Ok(())
    }
}
