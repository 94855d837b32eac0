//! Host side of the WGSL forward kernels: index buffers built once per op, bind groups cached per set of
//! tensor views, encoding into a caller's command encoder, and the host-slice convenience path. An op on
//! the cooperative-matrix kernel also holds the portable forward that redoes it when the coop kernel met a
//! non-finite value (`redo.rs`), recorded after the coop kernel in every encode.

use super::redo::{Launch, RedoArgs, REDO_BINDING};
use super::shaders::{overrides, Kernel};
use super::WgpuContext as Context;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::plan::{
    check_combine, forward_portable_cost, plan_portable, DispatchPlan, KernelVariant, ListSplit, MergeQPlan, Shape,
};
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// Per-pass times of a timed run.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// One sample per timed pass, in milliseconds.
    pub samples_ms: Vec<f64>,
    /// Whether the samples are GPU timestamps (else wall clock around a waited submit).
    pub gpu_timestamps: bool,
}

impl Timing {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples_ms.clone();
        s.sort_by(f64::total_cmp);
        s
    }
    /// Median sample (NaN when there is none).
    pub fn median_ms(&self) -> f64 {
        let s = self.sorted();
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }
    /// Fastest sample.
    pub fn min_ms(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    /// Slowest sample.
    pub fn max_ms(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// A tensor in a GPU buffer: `[batch, seq, heads, head_dim]` rows starting `offset` elements into
/// `buffer`, consecutive tokens `token_stride` elements apart (heads * head_dim when contiguous; larger for
/// views into an interleaved QKV buffer). Offsets and strides must be multiples of 4 elements.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// The buffer (needs `STORAGE` usage).
    pub buffer: &'a wgpu::Buffer,
    /// First element, in elements.
    pub offset: u64,
    /// Elements from one token to the next; `None` means contiguous.
    pub token_stride: Option<u64>,
}

impl<'a> TensorView<'a> {
    /// A contiguous tensor at the start of `buffer`.
    pub fn new(buffer: &'a wgpu::Buffer) -> Self {
        Self { buffer, offset: 0, token_stride: None }
    }
    /// A view `offset` elements in, tokens `token_stride` elements apart.
    pub fn strided(buffer: &'a wgpu::Buffer, offset: u64, token_stride: u64) -> Self {
        Self { buffer, offset, token_stride: Some(token_stride) }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    seq_len: u32,
    num_heads: u32,
    num_kv_heads: u32,
    tiles: u32,
    heads_per_pattern: u32,
    block_size: u32,
    causal: u32,
    scale_log2: f32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    q_stride: u32,
    kv_stride: u32,
    o_stride: u32,
    lse_off: u32,
    neg_inf: f32,
    splits: u32,
    split_len: u32,
    first_row: u32,
}

#[derive(Clone, PartialEq, Eq)]
struct BindKey {
    buffers: [wgpu::Buffer; 5],
    words: [u32; 8],
}

struct HostBuffers {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    o: wgpu::Buffer,
    lse: wgpu::Buffer,
    readback: wgpu::Buffer,
}

/// The kernel's bind group for one set of views, and the split merge's where lists are split.
type ViewGroups = (wgpu::BindGroup, Option<wgpu::BindGroup>);

/// Bind groups kept per distinct set of views (an app usually alternates between a few).
const BIND_CACHE: usize = 8;

pub(crate) struct GpuForward {
    ctx: Context,
    shape: Shape,
    num_heads: u32,
    num_kv_heads: u32,
    base: Params,
    /// Query tiles dispatched: the last `dispatched` of the plan's tiles (all of them unless the op was
    /// restricted to the rows from some tile on, for a sequence-parallel split).
    dispatched: u32,
    pipeline: wgpu::ComputePipeline,
    /// Where the device caps loop iterations and the row lists are too long for it: the merge of the
    /// split partials and the buffer holding them.
    split: Option<SplitMerge>,
    /// The partials buffer the portable kernel binds: the split partials, or a one-vec4 stand-in.
    partials: Option<wgpu::Buffer>,
    tile_q: u32,
    tile_ptr: wgpu::Buffer,
    entries: wgpu::Buffer,
    binds: Mutex<Vec<(BindKey, ViewGroups)>>,
    host: Mutex<Option<HostBuffers>>,
    buffers_created: std::sync::atomic::AtomicUsize,
    /// On the coop kernel: the portable redo (see `redo.rs`).
    redo: Option<Redo>,
}

/// The portable forward that redoes a coop op whose kernel met a non-finite value, and its indirect
/// dispatch sizes (zero unless the coop kernel armed them).
struct Redo {
    op: Box<GpuForward>,
    args: RedoArgs,
}

/// The portable forward's split partials and the kernel that merges them (`split_merge.wgsl`).
struct SplitMerge {
    splits: u32,
    pipeline: wgpu::ComputePipeline,
}

/// Workgroup size of the merge kernel.
const MERGE_WG: u32 = 64;

impl GpuForward {
    pub(crate) fn new(
        ctx: &Context,
        layout: &Layout,
        shape: Shape,
        plan: DispatchPlan,
        mergeq: Arc<MergeQPlan>,
    ) -> Result<Self> {
        let kernel = forward_kernel(&plan)?;
        let pipeline = ctx.pipeline(kernel, shape.dtype, &overrides(&plan, shape.head_dim))?;
        let redo = match kernel {
            Kernel::ForwardCoop => Some(Self::portable_redo(ctx, layout, shape, plan.tile_q)?),
            _ => None,
        };
        let device = ctx.device();
        let list_split = match kernel {
            Kernel::ForwardPortable => {
                let cap = ctx.caps().loop_iteration_cap;
                let cost = forward_portable_cost(&plan, shape.head_dim, layout.block_size());
                cost.split(mergeq.max_tile_len(), cap, "the portable forward")?
            }
            _ => ListSplit::WHOLE,
        };
        let (split, partials) = match kernel {
            Kernel::ForwardPortable => Self::split_merge(ctx, layout, &shape, list_split)?,
            _ => (None, None),
        };
        let entries_words = mergeq.gpu_entries();
        // wgpu refuses empty bindings; an empty plan (impossible for valid layouts) still gets one word.
        let entries_bytes: &[u8] = if entries_words.is_empty() {
            bytemuck::bytes_of(&[0u32; 2])
        } else {
            bytemuck::cast_slice(&entries_words)
        };
        let tile_ptr = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("s2attn tile_ptr"),
            contents: bytemuck::cast_slice(mergeq.row_ptr()),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let entries = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("s2attn entries"),
            contents: entries_bytes,
            usage: wgpu::BufferUsages::STORAGE,
        });
        let base = Params {
            seq_len: shape.seq_len,
            num_heads: layout.num_heads(),
            num_kv_heads: layout.num_kv_heads(),
            tiles: mergeq.tiles(),
            heads_per_pattern: layout.num_heads() / layout.num_patterns(),
            block_size: layout.block_size(),
            causal: layout.causal() as u32,
            scale_log2: shape.softmax_scale() * std::f32::consts::LOG2_E,
            q_off: 0,
            k_off: 0,
            v_off: 0,
            o_off: 0,
            q_stride: 0,
            kv_stride: 0,
            o_stride: 0,
            lse_off: 0,
            neg_inf: f32::NEG_INFINITY,
            splits: list_split.params()[0],
            split_len: list_split.params()[1],
            first_row: 0,
        };
        Ok(Self {
            ctx: ctx.clone(),
            shape,
            num_heads: layout.num_heads(),
            num_kv_heads: layout.num_kv_heads(),
            base,
            dispatched: mergeq.tiles(),
            pipeline,
            tile_q: mergeq.tile_q(),
            buffers_created: (2 + partials.is_some() as usize + redo.is_some() as usize).into(),
            split,
            partials,
            tile_ptr,
            entries,
            binds: Mutex::default(),
            host: Mutex::default(),
            redo,
        })
    }

    /// The portable forward a coop op of query tile `tile_q` falls back to, planned as the planner plans
    /// the portable kernel, with its own tile lists. Its tile divides the coop tile (both powers of two,
    /// the portable one at most 64 rows, the coop one at least 64), so that a restriction to the rows from
    /// some coop tile on restricts it exactly.
    fn portable_redo(ctx: &Context, layout: &Layout, shape: Shape, tile_q: u32) -> Result<Redo> {
        let plan = plan_portable(&shape, layout, ctx.caps())?;
        if tile_q % plan.tile_q != 0 {
            return Err(Error::Unsupported(format!(
                "the coop forward's {tile_q}-row tiles are not a multiple of its portable redo's {}",
                plan.tile_q
            )));
        }
        let mergeq = layout.mergeq(shape.seq_len, plan.tile_q);
        let op = GpuForward::new(ctx, layout, shape, plan, mergeq)?;
        let sizes = op.dispatch_sizes();
        let args = RedoArgs::new(ctx.device(), sizes.len());
        args.arm_with(ctx.queue(), &sizes);
        Ok(Redo { op: Box::new(op), args })
    }

    /// The workgroups of each dispatch the op records, in order: the kernel's, then the split merge's.
    fn dispatch_sizes(&self) -> Vec<[u32; 3]> {
        let splits = self.split.as_ref().map_or(1, |s| s.splits);
        let mut sizes = vec![[self.dispatched, self.num_heads * splits, self.shape.batch]];
        if self.split.is_some() {
            let rows = self.shape.seq_len - self.base.first_row;
            sizes.push([rows.div_ceil(MERGE_WG), self.num_heads, self.shape.batch]);
        }
        sizes
    }

    /// The merge pipeline for `split` (none when the lists are walked whole) and the partials buffer the
    /// portable kernel binds (a one-vec4 stand-in when they are).
    fn split_merge(
        ctx: &Context,
        layout: &Layout,
        shape: &Shape,
        split: ListSplit,
    ) -> Result<(Option<SplitMerge>, Option<wgpu::Buffer>)> {
        if !split.is_split() {
            let stand_in = new_buffer(ctx.device(), "s2attn forward no partials", 16, wgpu::BufferUsages::STORAGE);
            return Ok((None, Some(stand_in)));
        }
        let d = shape.head_dim;
        check_combine(split.splits, d, ctx.caps().loop_iteration_cap, "the portable forward")?;
        let heads = layout.num_heads() as u64;
        if heads * split.splits as u64 > ctx.caps().max_dispatch as u64 {
            return Err(Error::DeviceLimit {
                what: format!("{} heads x {} list splits of the portable forward", heads, split.splits),
                limit: "max_compute_workgroups_per_dimension",
                needed: heads * split.splits as u64,
                max: ctx.caps().max_dispatch as u64,
            });
        }
        // Per split and row: D / 4 vec4s of O and one of (m, l).
        let rows = shape.batch as u64 * split.splits as u64 * heads * shape.seq_len as u64;
        let bytes = rows * (d as u64 / 4 + 1) * 16;
        let max = ctx.caps().max_storage_binding.min(ctx.caps().max_buffer);
        if bytes > max {
            return Err(Error::DeviceLimit {
                what: format!("the portable forward's {} list-split partials", split.splits),
                limit: "max_storage_buffer_binding_size",
                needed: bytes,
                max,
            });
        }
        let pipeline = ctx.pipeline(Kernel::SplitMerge, shape.dtype, &[("D", d), ("WG", MERGE_WG)])?;
        let partials = new_buffer(ctx.device(), "s2attn forward split partials", bytes, wgpu::BufferUsages::STORAGE);
        Ok((Some(SplitMerge { splits: split.splits, pipeline }), Some(partials)))
    }

    /// Computes only the query tiles from `first_tile` on (the kernels walk tiles from the last one back,
    /// so a suffix of tiles is a prefix of the dispatch). Rows before the first tile's are left unwritten.
    pub(crate) fn restrict_to_tiles_from(&mut self, first_tile: u32) {
        self.dispatched = self.base.tiles - first_tile.min(self.base.tiles);
        self.base.first_row = (first_tile * self.tile_q).min(self.shape.seq_len);
        if let Some(redo) = &mut self.redo {
            // The redo's tile divides this one (`portable_redo`): the same rows.
            redo.op.restrict_to_tiles_from(first_tile * (self.tile_q / redo.op.tile_q));
            redo.args.arm_with(self.ctx.queue(), &redo.op.dispatch_sizes());
        }
    }

    /// Buffers this op (and its portable redo) has created so far (index, params and host staging
    /// buffers).
    pub(crate) fn buffers_created(&self) -> usize {
        let redo = self.redo.as_ref().map_or(0, |r| r.op.buffers_created());
        self.buffers_created.load(std::sync::atomic::Ordering::Relaxed) + redo
    }

    fn tokens(&self) -> u64 {
        self.shape.batch as u64 * self.shape.seq_len as u64
    }

    /// Checks a view and returns (offset, stride) in vec4 units.
    fn check_view(&self, name: &'static str, view: &TensorView<'_>, heads: u32) -> Result<(u32, u32)> {
        let row = heads as u64 * self.shape.head_dim as u64;
        let stride = view.token_stride.unwrap_or(row);
        if stride < row {
            return Err(Error::Shape(format!(
                "{name}: token_stride {stride} is smaller than heads * head_dim = {row}"
            )));
        }
        if view.offset % 4 != 0 || stride % 4 != 0 {
            return Err(Error::Shape(format!(
                "{name}: offset {} and token_stride {stride} must be multiples of 4 elements",
                view.offset
            )));
        }
        let elems = view.offset + (self.tokens() - 1) * stride + row;
        let needed = elems * self.shape.dtype.size();
        self.check_buffer(name, view.buffer, needed)?;
        let to_u32 = |x: u64| {
            u32::try_from(x / 4).map_err(|_| Error::Shape(format!("{name}: offset/stride {x} exceed 2^34 elements")))
        };
        Ok((to_u32(view.offset)?, to_u32(stride)?))
    }

    fn check_buffer(&self, name: &'static str, buffer: &wgpu::Buffer, needed: u64) -> Result<()> {
        check_binding(&self.ctx, name, buffer, needed)
    }

    /// Records the forward pass into `encoder`. `lse` receives `[batch, heads, seq]` f32 starting at
    /// element `lse_offset`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        o: &TensorView<'_>,
        lse: (&wgpu::Buffer, u64),
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let (q_off, q_stride) = self.check_view("q", q, self.num_heads)?;
        let (k_off, kv_stride) = self.check_view("k", k, self.num_kv_heads)?;
        let (v_off, v_stride) = self.check_view("v", v, self.num_kv_heads)?;
        let (o_off, o_stride) = self.check_view("out", o, self.num_heads)?;
        if v_stride != kv_stride {
            return Err(Error::Shape(format!(
                "k and v token strides differ ({} vs {} elements)",
                kv_stride * 4,
                v_stride * 4
            )));
        }
        let lse_elems = self.tokens() * self.num_heads as u64;
        self.check_buffer("lse", lse.0, (lse.1 + lse_elems) * 4)?;
        let lse_off = u32::try_from(lse.1).map_err(|_| Error::Shape("lse offset exceeds u32".into()))?;
        let key = BindKey {
            buffers: [q.buffer.clone(), k.buffer.clone(), v.buffer.clone(), o.buffer.clone(), lse.0.clone()],
            words: [q_off, k_off, v_off, o_off, q_stride, kv_stride, o_stride, lse_off],
        };
        let groups = self.bind_group(key.clone())?;
        let redo = match &self.redo {
            Some(redo) => {
                // Before the coop kernel, which may arm them: each op recorded starts unarmed.
                redo.args.clear(encoder);
                Some((redo, redo.op.bind_group(key)?))
            }
            None => None,
        };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("s2attn forward"),
            timestamp_writes: timestamps,
        });
        self.record(&mut pass, &groups, Launch::Direct);
        if let Some((redo, groups)) = redo {
            // Ordered after the coop kernel (one pass); empty unless it armed the sizes.
            redo.op.record(&mut pass, &groups, Launch::Redo(&redo.args, 0));
        }
        Ok(())
    }

    /// Records the op's dispatches (the kernel's, then the split merge's) into `pass`.
    fn record(&self, pass: &mut wgpu::ComputePass<'_>, (bind, merge_bind): &ViewGroups, launch: Launch<'_>) {
        let sizes = self.dispatch_sizes();
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, bind, &[]);
        launch.dispatch(pass, 0, sizes[0]);
        if let (Some(split), Some(merge_bind)) = (&self.split, merge_bind) {
            // Dispatches of one compute pass are ordered: the merge sees every split's partials.
            pass.set_pipeline(&split.pipeline);
            pass.set_bind_group(0, merge_bind, &[]);
            launch.dispatch(pass, 1, sizes[1]);
        }
    }

    /// The kernel's bind group for `key`'s views, and the merge's where the lists are split.
    fn bind_group(&self, key: BindKey) -> Result<ViewGroups> {
        let mut binds = self.binds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = binds.iter().position(|(k, _)| *k == key) {
            let hit = binds.remove(pos);
            let group = hit.1.clone();
            binds.push(hit);
            return Ok(group);
        }
        let w = key.words;
        let params = Params {
            q_off: w[0],
            k_off: w[1],
            v_off: w[2],
            o_off: w[3],
            q_stride: w[4],
            kv_stride: w[5],
            o_stride: w[6],
            lse_off: w[7],
            ..self.base
        };
        let device = self.ctx.device();
        let params_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("s2attn params"),
            contents: bytemuck::bytes_of(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        self.buffers_created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b = &key.buffers;
        let mut entries = vec![
            entry(0, &params_buf),
            entry(1, &b[0]),
            entry(2, &b[1]),
            entry(3, &b[2]),
            entry(4, &b[3]),
            entry(5, &b[4]),
            entry(6, &self.tile_ptr),
            entry(7, &self.entries),
        ];
        if let Some(partials) = &self.partials {
            entries.push(entry(13, partials));
        }
        if let Some(redo) = &self.redo {
            entries.push(entry(REDO_BINDING, redo.args.buffer()));
        }
        let layout = self.pipeline.get_bind_group_layout(0);
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("s2attn forward"),
            layout: &layout,
            entries: &entries,
        });
        let merge = self.split.as_ref().zip(self.partials.as_ref()).map(|(split, partials)| {
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("s2attn forward split merge"),
                layout: &split.pipeline.get_bind_group_layout(0),
                entries: &[entry(0, &params_buf), entry(4, &b[3]), entry(5, &b[4]), entry(13, partials)],
            })
        });
        if binds.len() == BIND_CACHE {
            binds.remove(0);
        }
        binds.push((key, (group.clone(), merge.clone())));
        Ok((group, merge))
    }

    /// Uploads host tensors (raw bytes of the op's dtype), runs, and reads back `(out bytes, lse)`.
    pub(crate) fn run_host(&self, q: &[u8], k: &[u8], v: &[u8]) -> Result<(Vec<u8>, Vec<f32>)> {
        self.with_host_buffers(q, k, v, |bufs, q_bytes, lse_bytes| {
            let device = self.ctx.device();
            let mut encoder =
                device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("s2attn forward") });
            self.encode_host(&mut encoder, bufs, None)?;
            encoder.copy_buffer_to_buffer(&bufs.o, 0, &bufs.readback, 0, q_bytes);
            encoder.copy_buffer_to_buffer(&bufs.lse, 0, &bufs.readback, q_bytes, lse_bytes);
            self.ctx.queue().submit([encoder.finish()]);
            let bytes = read_buffer(&self.ctx, &bufs.readback, q_bytes + lse_bytes)?;
            let (o, l) = bytes.split_at(q_bytes as usize);
            Ok((o.to_vec(), bytemuck::pod_collect_to_vec(l)))
        })
    }

    fn encode_host(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bufs: &HostBuffers,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        self.encode(
            encoder,
            &TensorView::new(&bufs.q),
            &TensorView::new(&bufs.k),
            &TensorView::new(&bufs.v),
            &TensorView::new(&bufs.o),
            (&bufs.lse, 0),
            timestamps,
        )
    }

    /// Times `iters` forward passes over device-resident copies of the inputs after `warmup` untimed
    /// ones: GPU timestamps around each pass where the device has them, else the wall clock around each
    /// waited submit.
    pub(crate) fn time(&self, q: &[u8], k: &[u8], v: &[u8], warmup: u32, iters: u32) -> Result<Timing> {
        self.with_host_buffers(q, k, v, |bufs, _, _| {
            super::timing::time_encoded(&self.ctx, warmup, iters, |encoder, stamps| {
                let writes = stamps.map(|s| wgpu::ComputePassTimestampWrites {
                    query_set: s.set,
                    beginning_of_pass_write_index: Some(s.begin),
                    end_of_pass_write_index: Some(s.end),
                });
                self.encode_host(encoder, bufs, writes)
            })
        })
    }

    /// Creates the op's own tensors on first use, uploads `q`, `k`, `v` and calls `f` with them and the
    /// output and LSE byte counts.
    fn with_host_buffers<R>(
        &self,
        q: &[u8],
        k: &[u8],
        v: &[u8],
        f: impl FnOnce(&HostBuffers, u64, u64) -> Result<R>,
    ) -> Result<R> {
        let device = self.ctx.device();
        let queue = self.ctx.queue();
        let es = self.shape.dtype.size();
        let row = self.shape.head_dim as u64 * es;
        let q_bytes = self.tokens() * self.num_heads as u64 * row;
        let kv_bytes = self.tokens() * self.num_kv_heads as u64 * row;
        let lse_bytes = self.tokens() * self.num_heads as u64 * 4;
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
        let bufs = match &mut *host {
            Some(b) => b,
            slot => {
                let mk = |label, size, usage| new_buffer(device, label, size, usage);
                let input = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
                let output = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
                self.buffers_created.fetch_add(6, std::sync::atomic::Ordering::Relaxed);
                slot.insert(HostBuffers {
                    q: mk("s2attn q", q_bytes, input),
                    k: mk("s2attn k", kv_bytes, input),
                    v: mk("s2attn v", kv_bytes, input),
                    o: mk("s2attn out", q_bytes, output),
                    lse: mk("s2attn lse", lse_bytes, output),
                    readback: mk(
                        "s2attn readback",
                        q_bytes + lse_bytes,
                        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    ),
                })
            }
        };
        queue.write_buffer(&bufs.q, 0, q);
        queue.write_buffer(&bufs.k, 0, k);
        queue.write_buffer(&bufs.v, 0, v);
        f(bufs, q_bytes, lse_bytes)
    }
}

/// A buffer of `size` bytes with `usage`, not mapped at creation.
pub(crate) fn new_buffer(device: &wgpu::Device, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false })
}

/// Checks that `buffer` holds `needed` bytes and can be bound as one storage binding on `ctx`'s device.
pub(crate) fn check_binding(ctx: &Context, name: &'static str, buffer: &wgpu::Buffer, needed: u64) -> Result<()> {
    if buffer.size() < needed {
        return Err(Error::BufferTooSmall { tensor: name, got: buffer.size(), needed });
    }
    let max = ctx.caps().max_storage_binding;
    if buffer.size() > max {
        return Err(Error::DeviceLimit {
            what: format!("binding the {name} buffer ({} bytes)", buffer.size()),
            limit: "max_storage_buffer_binding_size",
            needed: buffer.size(),
            max,
        });
    }
    Ok(())
}

/// The forward kernel a wgpu plan runs.
pub(crate) fn forward_kernel(plan: &DispatchPlan) -> Result<Kernel> {
    match plan.variant {
        KernelVariant::Portable => Ok(Kernel::ForwardPortable),
        KernelVariant::Coop => Ok(Kernel::ForwardCoop),
        other => Err(Error::Unsupported(format!("{} is not a wgpu kernel", other.name()))),
    }
}

/// Maps a `MAP_READ` buffer after the queue drains and copies its first `len` bytes out.
pub(crate) fn read_buffer(ctx: &Context, buffer: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
    let slice = buffer.slice(..len);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|_| Error::Device("buffer mapping was dropped".into()))?
        .map_err(|e| Error::Device(format!("mapping the readback buffer: {e}")))?;
    let out = slice.get_mapped_range().map_err(|e| Error::Device(format!("reading the mapped buffer: {e}")))?.to_vec();
    buffer.unmap();
    Ok(out)
}

/// A bind-group entry binding all of `buffer`.
pub(crate) fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry { binding, resource: buffer.as_entire_binding() }
}

#[cfg(test)]
mod tests {
    //! The redo's plumbing on whatever adapter opens (lavapipe in CI, which has no cooperative matrices): a
    //! probe kernel arms the redo as the coop kernels' epilogues do, and a portable forward is recorded
    //! after it as a coop op records its redo.
    use super::super::redo::probe;
    use super::*;
    use crate::context::ContextOptions;
    use crate::layout::S2Config;
    use crate::plan::DType;

    #[test]
    fn the_redo_runs_only_when_armed_and_each_op_starts_unarmed() {
        let ctx = Context::with_options(&ContextOptions::default()).expect("a wgpu adapter (lavapipe in CI)");
        let device = ctx.device();
        let layout = Layout::s2(S2Config::new(2, 16, 1, 2)).expect("layout");
        let (seq, n, rows) = (48, 48 * 2 * 32, 48 * 2);
        let shape = Shape::new(1, seq, 32, DType::F32);
        let plan = plan_portable(&shape, &layout, ctx.caps()).expect("portable plan");
        let op = GpuForward::new(&ctx, &layout, shape, plan.clone(), layout.mergeq(seq, plan.tile_q)).expect("op");
        let (q, k, v) = (probe::values(n, 1), probe::values(n, 2), probe::values(n, 3));
        let (want_o, want_lse) = op
            .run_host(bytemuck::cast_slice(&q), bytemuck::cast_slice(&k), bytemuck::cast_slice(&v))
            .expect("direct run");
        let want_o: Vec<f32> = bytemuck::pod_collect_to_vec(&want_o);

        let args = RedoArgs::new(device, op.dispatch_sizes().len());
        args.arm_with(ctx.queue(), &op.dispatch_sizes());
        let inputs: Vec<&[f32]> = probe::CASES.iter().map(|(x, _)| &x[..]).collect();
        let probes = probe::probes(&ctx, &args, &inputs);
        let sentinel = 7.0f32;
        let (qb, kb, vb) = (probe::buffer(device, &q), probe::buffer(device, &k), probe::buffer(device, &v));
        // The cases' ops back to back in one encoder.
        let mut encoder = device.create_command_encoder(&Default::default());
        let mut outs = Vec::new();
        for probe in &probes {
            let o = probe::buffer(device, &vec![sentinel; n]);
            let lse = probe::buffer(device, &vec![sentinel; rows]);
            let key = BindKey {
                buffers: [qb.clone(), kb.clone(), vb.clone(), o.clone(), lse.clone()],
                words: [0, 0, 0, 0, 16, 16, 16, 0],
            };
            let groups = op.bind_group(key).expect("bind group");
            args.clear(&mut encoder);
            let mut pass = encoder.begin_compute_pass(&Default::default());
            probe::record(&mut pass, probe);
            op.record(&mut pass, &groups, Launch::Redo(&args, 0));
            drop(pass);
            outs.push((o, lse));
        }
        let bytes = (n + rows) as u64 * 4;
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let readback = new_buffer(device, "readback", bytes * outs.len() as u64, usage);
        for (i, (o, lse)) in outs.iter().enumerate() {
            encoder.copy_buffer_to_buffer(o, 0, &readback, i as u64 * bytes, n as u64 * 4);
            encoder.copy_buffer_to_buffer(lse, 0, &readback, i as u64 * bytes + n as u64 * 4, rows as u64 * 4);
        }
        ctx.queue().submit([encoder.finish()]);
        let words: Vec<f32> =
            bytemuck::pod_collect_to_vec(&read_buffer(&ctx, &readback, readback.size()).expect("read"));
        for (i, (chunk, (_, armed))) in words.chunks(n + rows).zip(probe::CASES).enumerate() {
            let (o, lse) = chunk.split_at(n);
            if armed {
                assert_eq!(o, &want_o[..], "op {i}: the armed redo's O");
                assert_eq!(lse, &want_lse[..], "op {i}: the armed redo's LSE");
            } else {
                assert!(o.iter().chain(lse).all(|&x| x == sentinel), "op {i}: the unarmed redo wrote");
            }
        }
    }
}
