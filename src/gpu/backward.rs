//! Host side of the WGSL backward: the dQ pass (`backward_dq.wgsl`, or `backward_coop_dq.wgsl` on
//! cooperative matrices; both also write `D = rowsum(dO * O)`) over the forward's MergeQ row lists, then
//! the dK/dV pass (`backward_dkdv.wgsl` / `backward_coop_dkdv.wgsl`) over the column plan. The two kernel
//! families share bindings, params and lists, so only the kernels differ. Index buffers, params and the D
//! scratch buffer are built once per op; bind groups are cached per set of caller buffers; the host-slice
//! path owns its own tensors. An op on the coop kernels also holds the portable backward that redoes both
//! passes when a coop kernel met a non-finite value (`redo.rs`), recorded after the coop passes.

use super::forward::read_buffer;
use super::redo::{Launch, RedoArgs, REDO_BINDING};
use super::shaders::{overrides, Kernel};
use super::timing::{time_encoded, Stamps};
use super::{Timing, WgpuContext as Context};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::plan::{
    backward_dkdv_cost, backward_dq_cost, check_combine, plan_backward_portable, BackwardPlan, ColumnPlan,
    KernelVariant, ListSplit, MergeQPlan, Shape,
};
use std::sync::Mutex;
use wgpu::util::DeviceExt;

/// The GPU buffers of one backward call, each a contiguous tensor from offset 0: inputs `q`, `k`, `v`,
/// `out` (the forward's O), `d_out` in the op's dtype as `[batch, seq, heads (kv heads for k, v),
/// head_dim]`, `lse` as the forward's `[batch, heads, seq]` f32; outputs `dq`, `dk`, `dv` shaped like
/// `q`, `k`, `v`. Every buffer needs `STORAGE` usage; the outputs must not alias any other buffer.
#[derive(Clone, Copy, Debug)]
pub struct GradBuffers<'a> {
    /// Queries.
    pub q: &'a wgpu::Buffer,
    /// Keys.
    pub k: &'a wgpu::Buffer,
    /// Values.
    pub v: &'a wgpu::Buffer,
    /// The forward's output O.
    pub out: &'a wgpu::Buffer,
    /// The forward's log-sum-exp (f32).
    pub lse: &'a wgpu::Buffer,
    /// Gradient of the loss with respect to O.
    pub d_out: &'a wgpu::Buffer,
    /// Receives dQ.
    pub dq: &'a wgpu::Buffer,
    /// Receives dK (summed over each KV head's query heads).
    pub dk: &'a wgpu::Buffer,
    /// Receives dV (summed over each KV head's query heads).
    pub dv: &'a wgpu::Buffer,
}

impl<'a> GradBuffers<'a> {
    /// The inputs `q, k, v, out, lse, d_out` in that order, and the outputs `[dq, dk, dv]`.
    fn of(inputs: &'a [wgpu::Buffer], [dq, dk, dv]: [&'a wgpu::Buffer; 3]) -> Self {
        let [q, k, v, out, lse, d_out] = [0, 1, 2, 3, 4, 5].map(|i| &inputs[i]);
        Self { q, k, v, out, lse, d_out, dq, dk, dv }
    }

    /// `(name, buffer, binding)` of every caller tensor, as the kernels bind them.
    fn tensors(&self) -> [(&'static str, &wgpu::Buffer, u32); 9] {
        [
            ("q", self.q, 1),
            ("k", self.k, 2),
            ("v", self.v, 3),
            ("out", self.out, 4),
            ("lse", self.lse, 5),
            ("d_out", self.d_out, 9),
            ("dk", self.dk, 10),
            ("dv", self.dv, 11),
            ("dq", self.dq, 12),
        ]
    }
}

/// One kernel: its pipeline, params, index lists, dispatch size and the bindings it uses, then the sums
/// of its split partials where its lists are split.
struct Pass {
    pipeline: wgpu::ComputePipeline,
    params: wgpu::Buffer,
    ptr: wgpu::Buffer,
    entries: wgpu::Buffer,
    dispatch: [u32; 3],
    bindings: Vec<u32>,
    label: &'static str,
    sums: Vec<SumPass>,
}

/// One `split_sum.wgsl` dispatch: adds a gradient's split partials into the caller's tensor `out` (a
/// [`GradBuffers::tensors`] binding).
struct SumPass {
    pipeline: wgpu::ComputePipeline,
    params: wgpu::Buffer,
    out: u32,
    dispatch: [u32; 3],
}

/// Per pass: the kernel's bind group, then one per sum of split partials.
type PassGroups = Vec<Vec<wgpu::BindGroup>>;

/// Binding of the split partials (the portable kernels only).
const PARTIALS: u32 = 13;
/// Workgroup size of the sum kernel.
const SUM_WG: u32 = 64;

/// Bindings of the params uniform, the index lists and the D scratch buffer (the rest are caller tensors).
const PARAMS: u32 = 0;
const LIST_PTR: u32 = 6;
const LIST_ENTRIES: u32 = 7;
const DELTA: u32 = 8;
/// Bindings of the dQ pass: params, q, k, v, out, lse, the row lists, D, d_out, dq.
const DQ_BINDINGS: &[u32] = &[PARAMS, 1, 2, 3, 4, 5, LIST_PTR, LIST_ENTRIES, DELTA, 9, 12];
/// Bindings of the dK/dV pass: params, q, k, v, lse, the column lists, D, d_out, dk, dv.
const DKDV_BINDINGS: &[u32] = &[PARAMS, 1, 2, 3, 5, LIST_PTR, LIST_ENTRIES, DELTA, 9, 10, 11];

struct HostBuffers {
    tensors: [wgpu::Buffer; 9],
    readback: wgpu::Buffer,
}

/// Bind-group pairs kept per distinct set of caller buffers.
const BIND_CACHE: usize = 4;

pub(crate) struct GpuBackward {
    ctx: Context,
    shape: Shape,
    num_heads: u32,
    num_kv_heads: u32,
    passes: [Pass; 2],
    delta: wgpu::Buffer,
    /// The portable kernels' split partials (a one-vec4 stand-in when no list is split).
    partials: wgpu::Buffer,
    binds: Mutex<Vec<(Vec<wgpu::Buffer>, PassGroups)>>,
    host: Mutex<Option<HostBuffers>>,
    /// On the coop kernels: the portable redo (see `redo.rs`).
    redo: Option<Redo>,
}

/// The portable backward that redoes a coop op whose kernels met a non-finite value, and its indirect
/// dispatch sizes (zero unless a coop kernel armed them).
struct Redo {
    op: Box<GpuBackward>,
    args: RedoArgs,
}

/// The dQ and dK/dV kernels a wgpu backward plan runs (both portable or both coop).
pub(crate) fn backward_kernels(plan: &BackwardPlan) -> Result<(Kernel, Kernel)> {
    match (plan.dq.variant, plan.dkdv.variant) {
        (KernelVariant::Portable, KernelVariant::Portable) => Ok((Kernel::BackwardDq, Kernel::BackwardDkDv)),
        (KernelVariant::Coop, KernelVariant::Coop) => Ok((Kernel::BackwardCoopDq, Kernel::BackwardCoopDkDv)),
        (a, b) => Err(Error::Unsupported(format!("no wgpu backward for {} + {} kernels", a.name(), b.name()))),
    }
}

impl GpuBackward {
    pub(crate) fn new(
        ctx: &Context,
        layout: &Layout,
        shape: Shape,
        plan: &BackwardPlan,
        mergeq: &MergeQPlan,
        columns: &ColumnPlan,
    ) -> Result<Self> {
        check_limits(ctx, layout, &shape)?;
        let device = ctx.device();
        let d = shape.head_dim;
        let (heads, kv_heads) = (layout.num_heads(), layout.num_kv_heads());
        // The `Params` uniform of shaders/shared/params.wgsl, field by field: seq_len, num_heads,
        // num_kv_heads, tiles, heads_per_pattern, block_size, causal, scale_log2, q/k/v/o offsets (0),
        // q/kv/o token strides (vec4s), lse_off (0), neg_inf, 3 words of padding.
        let params = |tiles: u32, split: ListSplit| -> [u32; 20] {
            let (q_stride, kv_stride) = (heads * d / 4, kv_heads * d / 4);
            let scale_log2 = shape.softmax_scale() * std::f32::consts::LOG2_E;
            let (heads_per_pattern, causal) = (heads / layout.num_patterns(), layout.causal() as u32);
            #[rustfmt::skip]
            let words = [
                shape.seq_len, heads, kv_heads, tiles, heads_per_pattern, layout.block_size(), causal,
                scale_log2.to_bits(), 0, 0, 0, 0, q_stride, kv_stride, q_stride, 0,
                f32::NEG_INFINITY.to_bits(), split.params()[0], split.params()[1], 0,
            ];
            words
        };
        let storage = |label, words: &[u8]| {
            // wgpu refuses empty bindings; an empty list (impossible for valid layouts) still gets a word.
            let contents = if words.is_empty() { &[0u8; 8][..] } else { words };
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let uniform = |words: [u32; 20]| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("s2attn backward params"),
                contents: bytemuck::cast_slice(&words),
                usage: wgpu::BufferUsages::UNIFORM,
            })
        };
        let pipeline = |kernel, p: &crate::plan::DispatchPlan| ctx.pipeline(kernel, shape.dtype, &overrides(p, d));
        let (dq_kernel, dkdv_kernel) = backward_kernels(plan)?;
        let portable = dq_kernel == Kernel::BackwardDq;
        // Where the device caps loop iterations, long lists are split (plan/loop_budget.rs).
        let cap = ctx.caps().loop_iteration_cap;
        let group = heads / kv_heads;
        let (dq_split, dkdv_split) = if portable {
            let dq = backward_dq_cost(&plan.dq, d, layout.block_size());
            let dkdv = backward_dkdv_cost(&plan.dkdv, d, group);
            (
                dq.split(mergeq.max_tile_len(), cap, "the portable backward's dQ pass")?,
                dkdv.split(group * columns.max_column_len(), cap, "the portable backward's dK/dV pass")?,
            )
        } else {
            (ListSplit::WHOLE, ListSplit::WHOLE)
        };
        let (q_vec4s, kv_vec4s) = {
            let tokens = shape.batch as u64 * shape.seq_len as u64;
            (tokens * heads as u64 * d as u64 / 4, tokens * kv_heads as u64 * d as u64 / 4)
        };
        let partial_vec4s = (dq_split.is_split() as u64 * dq_split.splits as u64 * q_vec4s)
            .max(dkdv_split.is_split() as u64 * 2 * dkdv_split.splits as u64 * kv_vec4s)
            .max(1);
        let sum_pass = |out: u32, vec4s: u64, split: ListSplit, part_off: u64| -> Result<SumPass> {
            check_combine(split.splits, 4, cap, "the portable backward")?;
            let groups = vec4s.div_ceil(SUM_WG as u64);
            let x = groups.min(ctx.caps().max_dispatch as u64) as u32;
            let words = [vec4s as u32, split.splits, part_off as u32, 0];
            Ok(SumPass {
                pipeline: ctx.pipeline(Kernel::SplitSum, shape.dtype, &[("WG", SUM_WG)])?,
                params: device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("s2attn backward split sum params"),
                    contents: bytemuck::cast_slice(&words),
                    usage: wgpu::BufferUsages::UNIFORM,
                }),
                out,
                dispatch: [x, groups.div_ceil(x as u64) as u32, 1],
            })
        };
        // The portable kernels bind their split partials, the coop ones the redo's dispatch sizes.
        let with_partials = |base: &[u32]| {
            let mut b = base.to_vec();
            b.push(if portable { PARTIALS } else { REDO_BINDING });
            b
        };
        let redo = match portable {
            true => None,
            false => Some(Self::portable_redo(ctx, layout, shape)?),
        };
        for (split, rows, what) in [(dq_split, heads, "dQ"), (dkdv_split, kv_heads, "dK/dV")] {
            let y = rows as u64 * split.splits as u64;
            if y > ctx.caps().max_dispatch as u64 {
                return Err(Error::DeviceLimit {
                    what: format!("{rows} heads x {} list splits of the portable backward's {what} pass", split.splits),
                    limit: "max_compute_workgroups_per_dimension",
                    needed: y,
                    max: ctx.caps().max_dispatch as u64,
                });
            }
        }
        let partial_bytes = partial_vec4s * 16;
        let max = ctx.caps().max_storage_binding.min(ctx.caps().max_buffer);
        if partial_bytes > max || partial_vec4s > u32::MAX as u64 {
            return Err(Error::DeviceLimit {
                what: "the portable backward's list-split partials".into(),
                limit: "max_storage_buffer_binding_size",
                needed: partial_bytes,
                max,
            });
        }
        let dq = Pass {
            pipeline: pipeline(dq_kernel, &plan.dq)?,
            params: uniform(params(mergeq.tiles(), dq_split)),
            ptr: storage("s2attn backward row_ptr", bytemuck::cast_slice(mergeq.row_ptr())),
            entries: storage("s2attn backward row entries", bytemuck::cast_slice(&mergeq.gpu_entries())),
            dispatch: [mergeq.tiles(), heads * dq_split.splits, shape.batch],
            bindings: with_partials(DQ_BINDINGS),
            label: "s2attn backward dQ",
            sums: match dq_split.is_split() {
                true => vec![sum_pass(12, q_vec4s, dq_split, 0)?],
                false => Vec::new(),
            },
        };
        // The coop dK/dV kernel reads its launch order after the column pointers.
        let mut col_ptr = columns.col_ptr().to_vec();
        if dkdv_kernel == Kernel::BackwardCoopDkDv {
            if col_ptr.len() != (columns.patterns() * columns.kv_blocks() + 1) as usize {
                return Err(Error::Shape(format!(
                    "column plan of {} pointers for {} patterns",
                    col_ptr.len(),
                    columns.patterns()
                )));
            }
            col_ptr.extend(crate::plan::longest_first_order(columns, layout, shape.seq_len, plan.dkdv.tile_kv));
        }
        let dkdv = Pass {
            pipeline: pipeline(dkdv_kernel, &plan.dkdv)?,
            params: uniform(params(columns.kv_blocks(), dkdv_split)),
            ptr: storage("s2attn backward col_ptr", bytemuck::cast_slice(&col_ptr)),
            entries: storage("s2attn backward column entries", bytemuck::cast_slice(&columns.gpu_entries())),
            dispatch: [shape.seq_len.div_ceil(plan.dkdv.tile_kv), kv_heads * dkdv_split.splits, shape.batch],
            bindings: with_partials(DKDV_BINDINGS),
            label: "s2attn backward dK/dV",
            sums: match dkdv_split.is_split() {
                true => vec![
                    sum_pass(10, kv_vec4s, dkdv_split, 0)?,
                    sum_pass(11, kv_vec4s, dkdv_split, dkdv_split.splits as u64 * kv_vec4s)?,
                ],
                false => Vec::new(),
            },
        };
        let partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("s2attn backward split partials"),
            size: partial_bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let delta = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("s2attn backward D"),
            size: shape.batch as u64 * heads as u64 * shape.seq_len as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Self {
            ctx: ctx.clone(),
            shape,
            num_heads: heads,
            num_kv_heads: kv_heads,
            passes: [dq, dkdv],
            delta,
            partials,
            binds: Mutex::default(),
            host: Mutex::default(),
            redo,
        })
    }

    /// The portable backward a coop op falls back to, planned as the planner plans the portable kernels,
    /// with its own row and column lists and D scratch buffer.
    fn portable_redo(ctx: &Context, layout: &Layout, shape: Shape) -> Result<Redo> {
        let plan = plan_backward_portable(&shape, layout, ctx.caps())?;
        let mergeq = layout.mergeq(shape.seq_len, plan.dq.tile_q);
        let index = layout.index(shape.seq_len);
        let columns = ColumnPlan::build(&index, layout.block_size(), layout.causal(), plan.dkdv.tile_q);
        let op = GpuBackward::new(ctx, layout, shape, &plan, &mergeq, &columns)?;
        let sizes = op.dispatch_sizes();
        let args = RedoArgs::new(ctx.device(), sizes.len());
        args.arm_with(ctx.queue(), &sizes);
        Ok(Redo { op: Box::new(op), args })
    }

    /// The workgroups of each dispatch the op records, in order: the dQ kernel's and its split sums', then
    /// the dK/dV kernel's and its split sums'.
    fn dispatch_sizes(&self) -> Vec<[u32; 3]> {
        self.passes.iter().flat_map(|p| std::iter::once(p.dispatch).chain(p.sums.iter().map(|s| s.dispatch))).collect()
    }

    /// Records pass `i` (0 dQ, 1 dK/dV) and its split sums into `cp`.
    fn record(&self, cp: &mut wgpu::ComputePass<'_>, i: usize, groups: &PassGroups, launch: Launch<'_>) {
        let (pass, group) = (&self.passes[i], &groups[i]);
        // Index of the pass's first dispatch among the op's.
        let first: usize = self.passes[..i].iter().map(|p| 1 + p.sums.len()).sum();
        cp.set_pipeline(&pass.pipeline);
        cp.set_bind_group(0, &group[0], &[]);
        launch.dispatch(cp, first, pass.dispatch);
        // Dispatches of one compute pass are ordered: each sum sees every split's partials.
        for (n, (sum, group)) in pass.sums.iter().zip(&group[1..]).enumerate() {
            cp.set_pipeline(&sum.pipeline);
            cp.set_bind_group(0, group, &[]);
            launch.dispatch(cp, first + 1 + n, sum.dispatch);
        }
    }

    /// Bytes of each caller tensor, in [`GradBuffers::tensors`] order.
    fn tensor_bytes(&self) -> [u64; 9] {
        let tokens = self.shape.batch as u64 * self.shape.seq_len as u64;
        let row = self.shape.head_dim as u64 * self.shape.dtype.size();
        let (q, kv) = (tokens * self.num_heads as u64 * row, tokens * self.num_kv_heads as u64 * row);
        let lse = tokens * self.num_heads as u64 * 4;
        [q, kv, kv, q, lse, q, kv, kv, q]
    }

    fn check(&self, b: &GradBuffers<'_>) -> Result<()> {
        let tensors = b.tensors();
        let max = self.ctx.caps().max_storage_binding;
        for ((name, buffer, _), needed) in tensors.iter().zip(self.tensor_bytes()) {
            if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::Shape(format!("the {name} buffer lacks STORAGE usage ({:?})", buffer.usage())));
            }
            if buffer.size() < needed {
                return Err(Error::BufferTooSmall { tensor: name, got: buffer.size(), needed });
            }
            if buffer.size() > max {
                return Err(Error::DeviceLimit {
                    what: format!("binding the {name} buffer ({} bytes)", buffer.size()),
                    limit: "max_storage_buffer_binding_size",
                    needed: buffer.size(),
                    max,
                });
            }
        }
        // Buffers the kernels write (and `out`, bound writable by the storage accessors) stand alone.
        for (i, (name, buffer, _)) in tensors.iter().enumerate() {
            if let Some((other, _, _)) = tensors.iter().skip(i + 1).find(|t| t.1 == *buffer) {
                if ["out", "dq", "dk", "dv"].iter().any(|w| w == name || w == other) {
                    return Err(Error::Shape(format!("{name} and {other} are the same buffer: outputs may not alias")));
                }
            }
        }
        Ok(())
    }

    /// Records both backward passes into `encoder`, reading and writing the caller's buffers.
    /// With `stamps`, the dQ pass writes the beginning timestamp and the dK/dV pass the end one.
    pub(crate) fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: &GradBuffers<'_>,
        stamps: Option<Stamps<'_>>,
    ) -> Result<()> {
        self.check(buffers)?;
        let groups = self.bind_groups(buffers);
        let redo = self.redo.as_ref().map(|redo| {
            // Before the coop kernels, which may arm them: each op recorded starts unarmed.
            redo.args.clear(encoder);
            (redo, redo.op.bind_groups(buffers))
        });
        for (i, pass) in self.passes.iter().enumerate() {
            let timestamp_writes = stamps.map(|s| wgpu::ComputePassTimestampWrites {
                query_set: s.set,
                beginning_of_pass_write_index: (i == 0).then_some(s.begin),
                end_of_pass_write_index: (i == 1).then_some(s.end),
            });
            let mut cp =
                encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(pass.label), timestamp_writes });
            self.record(&mut cp, i, &groups, Launch::Direct);
            if let (1, Some((redo, redo_groups))) = (i, &redo) {
                // Both portable passes, ordered after both coop kernels (either may arm them) in the dK/dV
                // pass; empty unless armed.
                for j in 0..redo.op.passes.len() {
                    redo.op.record(&mut cp, j, redo_groups, Launch::Redo(&redo.args, 0));
                }
            }
        }
        Ok(())
    }

    /// Per pass: the kernel's bind group, then one per sum of split partials.
    fn bind_groups(&self, buffers: &GradBuffers<'_>) -> PassGroups {
        let tensors = buffers.tensors();
        let key: Vec<wgpu::Buffer> = tensors.iter().map(|t| t.1.clone()).collect();
        let mut binds = self.binds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = binds.iter().position(|(k, _)| *k == key) {
            let hit = binds.remove(pos);
            let groups = hit.1.clone();
            binds.push(hit);
            return groups;
        }
        let group = |pass: &Pass| {
            let resource = |binding: u32| match binding {
                PARAMS => &pass.params,
                LIST_PTR => &pass.ptr,
                LIST_ENTRIES => &pass.entries,
                DELTA => &self.delta,
                PARTIALS => &self.partials,
                REDO_BINDING => self.redo.as_ref().map_or(&self.partials, |r| r.args.buffer()),
                // Every other binding a pass lists is a caller tensor's.
                other => tensors.iter().find(|t| t.2 == other).map_or(&self.delta, |t| t.1),
            };
            let entries: Vec<wgpu::BindGroupEntry<'_>> = pass
                .bindings
                .iter()
                .map(|&binding| wgpu::BindGroupEntry { binding, resource: resource(binding).as_entire_binding() })
                .collect();
            self.ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(pass.label),
                layout: &pass.pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        };
        let sum_group = |sum: &SumPass| {
            let out = tensors.iter().find(|t| t.2 == sum.out).map_or(&self.partials, |t| t.1);
            self.ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("s2attn backward split sum"),
                layout: &sum.pipeline.get_bind_group_layout(0),
                entries: &[
                    super::forward::entry(0, &sum.params),
                    super::forward::entry(4, out),
                    super::forward::entry(PARTIALS, &self.partials),
                ],
            })
        };
        let groups: PassGroups = self
            .passes
            .iter()
            .map(|pass| std::iter::once(group(pass)).chain(pass.sums.iter().map(sum_group)).collect())
            .collect();
        if binds.len() == BIND_CACHE {
            binds.remove(0);
        }
        binds.push((key, groups.clone()));
        groups
    }

    /// Uploads host tensors (raw bytes of the op's dtype; `lse` f32) in [`GradBuffers`] input order
    /// `q, k, v, out, lse, d_out`, runs both passes and reads back `[dq, dk, dv]` bytes.
    pub(crate) fn run_host(&self, inputs: [&[u8]; 6]) -> Result<[Vec<u8>; 3]> {
        let bytes = self.tensor_bytes();
        self.with_host_buffers(inputs, |grads, readback| {
            let mut encoder = self
                .ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("s2attn backward") });
            self.encode(&mut encoder, grads, None)?;
            let mut at = 0;
            for (buffer, &size) in [grads.dk, grads.dv, grads.dq].into_iter().zip(&bytes[6..]) {
                encoder.copy_buffer_to_buffer(buffer, 0, readback, at, size);
                at += size;
            }
            self.ctx.queue().submit([encoder.finish()]);
            let all = read_buffer(&self.ctx, readback, at)?;
            let (dk, rest) = all.split_at(bytes[6] as usize);
            let (dv, dq) = rest.split_at(bytes[7] as usize);
            Ok([dq.to_vec(), dk.to_vec(), dv.to_vec()])
        })
    }

    /// Times both passes over device-resident copies of the inputs (see [`time_encoded`]).
    pub(crate) fn time(&self, inputs: [&[u8]; 6], warmup: u32, iters: u32) -> Result<Timing> {
        self.with_host_buffers(inputs, |grads, _| {
            time_encoded(&self.ctx, warmup, iters, |encoder, stamps| self.encode(encoder, grads, stamps))
        })
    }

    /// Creates the op's own tensors on first use, uploads the inputs and calls `f` with the tensors and
    /// the readback buffer (room for dK, dV, dQ).
    fn with_host_buffers<R>(
        &self,
        inputs: [&[u8]; 6],
        f: impl FnOnce(&GradBuffers<'_>, &wgpu::Buffer) -> Result<R>,
    ) -> Result<R> {
        let device = self.ctx.device();
        let bytes = self.tensor_bytes();
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
        let bufs = match &mut *host {
            Some(b) => b,
            slot => {
                let mk = |label, size, usage| super::forward::new_buffer(device, label, size, usage);
                let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
                let readback = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
                slot.insert(HostBuffers {
                    tensors: bytes.map(|size| mk("s2attn backward tensor", size, usage)),
                    readback: mk("s2attn backward readback", bytes[6..].iter().sum(), readback),
                })
            }
        };
        for (buffer, data) in bufs.tensors.iter().zip(inputs) {
            self.ctx.queue().write_buffer(buffer, 0, data);
        }
        let t = &bufs.tensors;
        f(&GradBuffers::of(&t[..6], [&t[8], &t[6], &t[7]]), &bufs.readback)
    }
}

/// Refuses problems whose tensors cannot be bound or addressed on this device, naming the limit.
fn check_limits(ctx: &Context, layout: &Layout, shape: &Shape) -> Result<()> {
    let caps = ctx.caps();
    let elems = shape.batch as u64 * shape.seq_len as u64 * layout.num_heads() as u64 * shape.head_dim as u64;
    let bytes = elems * shape.dtype.size();
    let limits = [
        ("max_storage_buffer_binding_size", caps.max_storage_binding),
        ("max_buffer_size", caps.max_buffer),
        ("max_compute_workgroups_per_dimension", caps.max_dispatch as u64),
    ];
    let needs = [bytes, bytes, shape.batch.max(layout.num_heads()) as u64];
    if let Some(((limit, max), needed)) = limits.into_iter().zip(needs).find(|((_, max), needed)| needed > max) {
        return Err(Error::DeviceLimit { what: "the backward's q/dq tensors and dispatch".into(), limit, needed, max });
    }
    // Vec4 offsets are u32 in the kernels.
    if elems / 4 > u32::MAX as u64 {
        return Err(Error::Shape(format!("{elems} elements per tensor exceed the kernels' 2^34-element addressing")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shaders::compose;
    use crate::plan::DType;

    /// The bindings the entry point of `kernel` (composed for `dtype`) uses, ascending.
    fn used_bindings(kernel: Kernel, dtype: DType) -> Vec<u32> {
        let source = compose(kernel, dtype).expect("composes");
        let module = naga::front::wgsl::parse_str(&source).expect("parses");
        let flags = naga::valid::ValidationFlags::all();
        let info =
            naga::valid::Validator::new(flags, naga::valid::Capabilities::all()).validate(&module).expect("valid");
        let uses = info.get_entry_point(0);
        let mut out: Vec<u32> = module
            .global_variables
            .iter()
            .filter(|&(h, _)| !uses[h].is_empty())
            .filter_map(|(_, g)| g.binding.as_ref().map(|b| b.binding))
            .collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn each_pass_binds_exactly_what_its_kernels_use() {
        // The bind group must list every binding the pipeline's auto layout has, and no other (wgpu
        // refuses the bind group otherwise); both kernel families share the lists, the portable kernels
        // adding their split partials, the coop ones the redo's dispatch sizes.
        let sorted = |b: &[u32]| {
            let mut v = b.to_vec();
            v.sort_unstable();
            v
        };
        let portable = |b: &[u32]| sorted(&[b, &[PARTIALS]].concat());
        let coop = |b: &[u32]| sorted(&[b, &[REDO_BINDING]].concat());
        for (kernel, dtype, want) in [
            (Kernel::BackwardDq, DType::F32, portable(DQ_BINDINGS)),
            (Kernel::BackwardDq, DType::F16, portable(DQ_BINDINGS)),
            (Kernel::BackwardCoopDq, DType::F16, coop(DQ_BINDINGS)),
            (Kernel::BackwardDkDv, DType::F32, portable(DKDV_BINDINGS)),
            (Kernel::BackwardDkDv, DType::F16, portable(DKDV_BINDINGS)),
            (Kernel::BackwardCoopDkDv, DType::F16, coop(DKDV_BINDINGS)),
        ] {
            assert_eq!(used_bindings(kernel, dtype), want, "{} ({dtype})", kernel.name());
        }
    }

    #[test]
    fn the_redo_runs_both_passes_only_when_armed() {
        // As the forward's test (`forward.rs`): a probe arms the redo, the portable backward follows it.
        use crate::gpu::redo::probe;
        use crate::layout::S2Config;
        let ctx = Context::with_options(&crate::context::ContextOptions::default()).expect("a wgpu adapter");
        let device = ctx.device();
        let layout = Layout::s2(S2Config::new(2, 16, 1, 2)).expect("layout");
        let (seq, n, rows) = (48, 48 * 2 * 32, 48 * 2);
        let shape = Shape::new(1, seq, 32, DType::F32);
        let plan = plan_backward_portable(&shape, &layout, ctx.caps()).expect("portable plan");
        let mergeq = layout.mergeq(seq, plan.dq.tile_q);
        let columns = ColumnPlan::build(&layout.index(seq), layout.block_size(), layout.causal(), plan.dkdv.tile_q);
        let op = GpuBackward::new(&ctx, &layout, shape, &plan, &mergeq, &columns).expect("op");
        let lse: Vec<f32> = probe::values(rows, 4).iter().map(|x| x + 2.0).collect();
        let inputs: Vec<Vec<f32>> = vec![
            probe::values(n, 1),
            probe::values(n, 2),
            probe::values(n, 3),
            probe::values(n, 5),
            lse,
            probe::values(n, 6),
        ];
        let host: Vec<&[u8]> = inputs.iter().map(|x| bytemuck::cast_slice(x)).collect();
        let want = op.run_host(host.try_into().expect("six inputs")).expect("direct run");
        let want: Vec<f32> = want.iter().flat_map(|g| bytemuck::pod_collect_to_vec::<u8, f32>(g)).collect();

        let sizes = op.dispatch_sizes();
        let args = RedoArgs::new(device, sizes.len());
        args.arm_with(ctx.queue(), &sizes);
        let cases: Vec<&[f32]> = probe::CASES.iter().map(|(x, _)| &x[..]).collect();
        let probes = probe::probes(&ctx, &args, &cases);
        let t: Vec<wgpu::Buffer> = inputs.iter().map(|x| probe::buffer(device, x)).collect();
        let sentinel = 7.0f32;
        let mut encoder = device.create_command_encoder(&Default::default());
        let mut outs = Vec::new();
        for probe in &probes {
            let g: Vec<wgpu::Buffer> = (0..3).map(|_| probe::buffer(device, &vec![sentinel; n])).collect();
            let buffers = GradBuffers::of(&t, [&g[0], &g[1], &g[2]]);
            let groups = op.bind_groups(&buffers);
            args.clear(&mut encoder);
            let mut cp = encoder.begin_compute_pass(&Default::default());
            probe::record(&mut cp, probe);
            for i in 0..op.passes.len() {
                op.record(&mut cp, i, &groups, Launch::Redo(&args, 0));
            }
            drop(cp);
            outs.push(g);
        }
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let bytes = 3 * n as u64 * 4;
        let readback = super::super::forward::new_buffer(device, "readback", bytes * outs.len() as u64, usage);
        for (i, g) in outs.iter().enumerate() {
            for (j, b) in g.iter().enumerate() {
                encoder.copy_buffer_to_buffer(
                    b,
                    0,
                    &readback,
                    i as u64 * bytes + j as u64 * n as u64 * 4,
                    n as u64 * 4,
                );
            }
        }
        ctx.queue().submit([encoder.finish()]);
        let words: Vec<f32> =
            bytemuck::pod_collect_to_vec(&read_buffer(&ctx, &readback, readback.size()).expect("read"));
        for (i, (got, (_, armed))) in words.chunks(3 * n).zip(probe::CASES).enumerate() {
            if armed {
                assert_eq!(got, &want[..], "op {i}: the armed redo's dQ, dK, dV");
            } else {
                assert!(got.iter().all(|&x| x == sentinel), "op {i}: the unarmed redo wrote");
            }
        }
    }
}
