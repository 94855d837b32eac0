//! Host side of `shaders/kv_append.wgsl`: recording a [`KvCache`](super::KvCache) append from device
//! buffers into a caller's encoder (`KvCache::append_encoded`), so that a decode loop whose K/V
//! projections run on the GPU never leaves it. The page offsets of the touched blocks go into a buffer
//! sized once for the longest append the cache allows; the params into a uniform buffer; both written
//! with `queue.write_buffer` (applied at the next submit) into an upload set of their own until the
//! recorded append has run (`gpu/upload_sets.rs`), so one encoder may hold several appends; bind groups
//! cached per set of buffers.

use crate::error::{Error, Result};
use crate::gpu::shaders::Kernel;
use crate::gpu::{TensorView, UploadSets, WgpuContext};
use crate::plan::DType;

/// Invocations per workgroup.
const WG: u32 = 64;
/// Bind groups kept per distinct (source K, source V, pool segment).
const BIND_CACHE: usize = 8;

/// `AppendParams` of the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
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
    pub pad: u32,
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

/// One append's uploads: its params and page offsets, and what they hold.
struct AppendUploads {
    params: wgpu::Buffer,
    pages: wgpu::Buffer,
    held: Option<(AppendParams, Vec<u32>)>,
}

/// A fresh upload set: the params' uniform buffer and room for `max_pages` page offsets.
fn new_uploads(ctx: &WgpuContext, max_pages: u64) -> AppendUploads {
    let mk = |label, size, usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let copy = wgpu::BufferUsages::COPY_DST;
    AppendUploads {
        params: mk("s2attn kv append params", 64, wgpu::BufferUsages::UNIFORM | copy),
        pages: mk("s2attn kv append pages", (max_pages * 4).max(16), wgpu::BufferUsages::STORAGE | copy),
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

    /// Records one append: `page_words` is `[kv_heads, blocks]` page offsets in words (`u32::MAX`: skip).
    pub(super) fn encode(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        params: &AppendParams,
        page_words: &[u32],
        src: [&wgpu::Buffer; 2],
        pool: [&wgpu::Buffer; 2],
    ) -> Result<()> {
        if page_words.len() as u64 > self.max_pages {
            return Err(Error::Shape(format!(
                "an append touching {} pages exceeds the cache's capacity",
                page_words.len()
            )));
        }
        let (ctx, max_pages) = (&self.ctx, self.max_pages);
        let same = |u: &AppendUploads| {
            u.held.as_ref().is_some_and(|(p, w)| bytemuck::bytes_of(p) == bytemuck::bytes_of(params) && w == page_words)
        };
        let taken = self.uploads.take(encoder, "append_encoded", same, || new_uploads(ctx, max_pages))?;
        let set = taken.index;
        if !taken.holds {
            let up = taken.value;
            let queue = self.ctx.queue();
            queue.write_buffer(&up.params, 0, bytemuck::bytes_of(params));
            queue.write_buffer(&up.pages, 0, bytemuck::cast_slice(page_words));
            up.held = Some((*params, page_words.to_vec()));
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
                let buffers = [&up.params, src[0], src[1], pool[0], pool[1], &up.pages];
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
        let words = params.tokens as u64 * params.kv_heads as u64 * params.row_words as u64;
        let groups = words.div_ceil(WG as u64);
        let x = groups.clamp(1, self.ctx.caps().max_dispatch.max(1) as u64);
        let y = groups.div_ceil(x);
        if y > self.ctx.caps().max_dispatch as u64 {
            return Err(Error::DeviceLimit {
                what: format!("appending {} tokens in one dispatch", params.tokens),
                limit: "max_compute_workgroups_per_dimension",
                needed: y,
                max: self.ctx.caps().max_dispatch as u64,
            });
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("s2attn kv append"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(x as u32, y as u32, 1);
        Ok(())
    }
}
