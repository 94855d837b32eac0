//! Host side of `shaders/kv_append.wgsl`: recording [`KvCache`](super::KvCache) appends from device
//! buffers into a caller's encoder (`KvCache::append_encoded`, `KvCache::append_encoded_batch`), so that a
//! decode loop whose K/V projections run on the GPU never leaves it. A batch of appends (one per sequence)
//! that read the same source buffers into the same pool segment is one dispatch: the batch header, each
//! append's params and the page offsets of its touched blocks are written with `queue.write_buffer`
//! (applied at the next submit) into an upload set of their own until the recorded work has run
//! (`gpu/upload_sets.rs`), so one encoder may hold several batches; bind groups cached per set of buffers.

use crate::error::{Error, Result};
use crate::gpu::shaders::Kernel;
use crate::gpu::{new_buffer, TensorView, UploadSets, WgpuContext};
use crate::plan::DType;

/// Invocations per workgroup.
const WG: u32 = 64;
/// Bind groups kept per distinct (source K, source V, pool segment).
const BIND_CACHE: usize = 8;

/// `AppendParams` of the kernel: one append of a batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct AppendParams {
    pub tokens: u32,
    pub kv_heads: u32,
    pub row_words: u32,
    pub block_size: u32,
    pub len0: u32,
    pub first_block: u32,
    pub blocks: u32,
    pub k_off: u32,
    pub k_stride: u32,
    pub v_off: u32,
    pub v_stride: u32,
    /// Set by [`Appender::encode`]: where the append's page offsets and words start in the batch.
    pub pages0: u32,
    pub words0: u32,
    pub pad: [u32; 3],
}

impl AppendParams {
    /// The 32-bit words the append copies into each pool.
    pub(super) fn words(&self) -> u64 {
        self.tokens as u64 * self.kv_heads as u64 * self.row_words as u64
    }
}

/// `Batch` of the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
struct BatchHeader {
    appends: u32,
    words: u32,
    pad: [u32; 2],
}

/// Where one append reads: a K or V view checked against `tokens` rows of `row` elements, as (word
/// offset, word stride).
pub(super) fn source_words(
    ctx: &WgpuContext,
    name: &'static str,
    view: &TensorView<'_>,
    tokens: u32,
    row: u64,
    dtype: DType,
) -> Result<(u32, u32)> {
    let es = dtype.size();
    let stride = view.token_stride.unwrap_or(row);
    if stride < row || (view.offset * es) % 4 != 0 || (stride * es) % 4 != 0 {
        return Err(Error::Shape(format!(
            "{name}: offset {} and token_stride {stride} must be whole 32-bit words ({dtype}), the stride at \
             least kv_heads * head_dim = {row}",
            view.offset
        )));
    }
    let needed = (view.offset + (tokens.max(1) as u64 - 1) * stride + row) * es;
    if view.buffer.size() < needed {
        return Err(Error::BufferTooSmall { tensor: name, got: view.buffer.size(), needed });
    }
    let max = ctx.caps().max_storage_binding;
    if view.buffer.size() > max {
        return Err(Error::DeviceLimit {
            what: format!("binding the {name} buffer ({} bytes)", view.buffer.size()),
            limit: "max_storage_buffer_binding_size",
            needed: view.buffer.size(),
            max,
        });
    }
    let words =
        |x: u64| u32::try_from(x * es / 4).map_err(|_| Error::Shape(format!("{name}: offset exceeds 2^32 words")));
    Ok((words(view.offset)?, words(stride)?))
}

/// One batch's uploads: header, params and page offsets, and what they hold.
struct AppendUploads {
    header: wgpu::Buffer,
    params: wgpu::Buffer,
    pages: wgpu::Buffer,
    held: Option<(Vec<AppendParams>, Vec<u32>)>,
}

fn buffer(ctx: &WgpuContext, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    new_buffer(ctx.device(), label, size, usage | wgpu::BufferUsages::COPY_DST)
}

/// A fresh upload set with room for one append of `max_pages` page offsets.
fn new_uploads(ctx: &WgpuContext, max_pages: u64) -> AppendUploads {
    let storage = wgpu::BufferUsages::STORAGE;
    AppendUploads {
        header: buffer(ctx, "s2attn kv append batch", 16, wgpu::BufferUsages::UNIFORM),
        params: buffer(ctx, "s2attn kv append params", 64, storage),
        pages: buffer(ctx, "s2attn kv append pages", (max_pages * 4).max(16), storage),
        held: None,
    }
}

/// The append kernel with its reused buffers.
pub(super) struct Appender {
    ctx: WgpuContext,
    pipeline: wgpu::ComputePipeline,
    /// The most page offsets one append writes.
    max_pages: u64,
    uploads: UploadSets<AppendUploads>,
    /// (upload set, [source K, source V, pool K, pool V], bind group), least recently used first.
    binds: Vec<(usize, [wgpu::Buffer; 4], wgpu::BindGroup)>,
}

impl Appender {
    /// Compiles the kernel; `max_pages` is the most page offsets one append writes.
    pub(super) fn new(ctx: &WgpuContext, max_pages: u64) -> Result<Self> {
        let pipeline = ctx.pipeline(Kernel::KvAppend, DType::F32, &[("WG", WG)])?;
        Ok(Self { ctx: ctx.clone(), pipeline, max_pages, uploads: UploadSets::new(), binds: Vec::new() })
    }

    /// Fails, naming why, unless `batches` more batches can be recorded now (upload sets for them; waits
    /// for submitted work to free them if it must).
    pub(super) fn check_room(&self, batches: usize) -> Result<()> {
        self.uploads.make_room(|| self.ctx.wait(), "append_encoded", batches)
    }

    /// The dispatch of `words` words (x, y), or the device limit it exceeds.
    pub(super) fn dispatch_size(&self, words: u64, tokens: u64) -> Result<(u32, u32)> {
        let max = self.ctx.caps().max_dispatch.max(1) as u64;
        let groups = words.div_ceil(WG as u64);
        let x = groups.clamp(1, max);
        let y = groups.div_ceil(x).max(1);
        if y > max {
            return Err(Error::DeviceLimit {
                what: format!("appending {tokens} tokens in one dispatch"),
                limit: "max_compute_workgroups_per_dimension",
                needed: y,
                max,
            });
        }
        Ok((x as u32, y as u32))
    }

    /// Records one batch of appends that read `src` (K, V) into `pool` (K, V): each append's params
    /// (`pages0` and `words0` are set here) with its `[kv_heads, blocks]` page offsets in words
    /// (`u32::MAX`: skip).
    pub(super) fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        appends: &[(AppendParams, Vec<u32>)],
        src: [&wgpu::Buffer; 2],
        pool: [&wgpu::Buffer; 2],
    ) -> Result<()> {
        if appends.is_empty() {
            return Ok(());
        }
        let mut params = Vec::with_capacity(appends.len());
        let mut pages = Vec::new();
        let mut words = 0u64;
        for (p, page_words) in appends {
            if page_words.len() as u64 > self.max_pages {
                return Err(Error::Shape(format!(
                    "an append touching {} pages exceeds the cache's capacity",
                    page_words.len()
                )));
            }
            let at = |x: u64, what| u32::try_from(x).map_err(|_| Error::Shape(format!("a batch of appends of {what}")));
            params.push(AppendParams {
                pages0: at(pages.len() as u64, "too many pages")?,
                words0: at(words, "too many words")?,
                ..*p
            });
            pages.extend_from_slice(page_words);
            words += p.words();
        }
        let tokens = appends.iter().map(|(p, _)| p.tokens as u64).sum();
        let (x, y) = self.dispatch_size(words, tokens)?;
        let total = u32::try_from(words).map_err(|_| Error::Shape(format!("a batch of appends of {words} words")))?;
        let header = BatchHeader { appends: params.len() as u32, words: total, pad: [0; 2] };
        let (ctx, max_pages) = (&self.ctx, self.max_pages);
        let same = |u: &AppendUploads| u.held.as_ref().is_some_and(|(p, w)| *p == params && *w == pages);
        let taken =
            self.uploads.take(|| ctx.wait(), encoder, "append_encoded", same, || new_uploads(ctx, max_pages))?;
        let set = taken.index;
        if !taken.holds {
            let up = taken.value;
            let (params_bytes, pages_bytes) = ((params.len() * 64) as u64, (pages.len() * 4) as u64);
            let mut grown = false;
            if up.params.size() < params_bytes {
                up.params = buffer(
                    ctx,
                    "s2attn kv append params",
                    params_bytes.next_power_of_two(),
                    wgpu::BufferUsages::STORAGE,
                );
                grown = true;
            }
            if up.pages.size() < pages_bytes {
                up.pages =
                    buffer(ctx, "s2attn kv append pages", pages_bytes.next_power_of_two(), wgpu::BufferUsages::STORAGE);
                grown = true;
            }
            if grown {
                self.binds.retain(|(s, _, _)| *s != set);
            }
            let queue = self.ctx.queue();
            queue.write_buffer(&up.header, 0, bytemuck::bytes_of(&header));
            queue.write_buffer(&up.params, 0, bytemuck::cast_slice(&params));
            queue.write_buffer(&up.pages, 0, bytemuck::cast_slice(&pages));
            up.held = Some((params, pages));
        }
        let key = [src[0], src[1], pool[0], pool[1]].map(|b| b.clone());
        let group = match self.binds.iter().position(|(s, k, _)| *s == set && *k == key) {
            Some(pos) => {
                let hit = self.binds.remove(pos);
                let group = hit.2.clone();
                self.binds.push(hit);
                group
            }
            None => {
                let up = self.uploads.get(set);
                let buffers = [&up.header, src[0], src[1], pool[0], pool[1], &up.pages, &up.params];
                let entries: Vec<wgpu::BindGroupEntry> = buffers
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
                    .collect();
                let group = self.ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("s2attn kv append"),
                    layout: &self.pipeline.get_bind_group_layout(0),
                    entries: &entries,
                });
                if self.binds.len() >= BIND_CACHE * self.uploads.len() {
                    self.binds.remove(0);
                }
                self.binds.push((set, key, group.clone()));
                group
            }
        };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("s2attn kv append"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        Ok(())
    }
}
