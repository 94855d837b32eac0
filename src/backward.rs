//! The public backward op: [`AttentionGrad`] binds a layout and a shape to a device, plans the two
//! backward passes once, and turns what [`Attention::forward`](crate::Attention::forward) returns (O and
//! the LSE) plus the output gradient dO into [`Grads`] (dQ, dK, dV).
//!
//! The data path: [`Layout::index`] → [`plan::plan_backward_wgpu`] (kernels and tiles: the
//! cooperative-matrix backward where the adapter has matrix units and the shape suits it, else the
//! portable one) → the forward's [`MergeQPlan`] (dQ pass) and the [`ColumnPlan`] built from
//! [`BlockIndex::transpose`](crate::BlockIndex::transpose) (dK/dV pass) → the WGSL kernels → [`Grads`].

use crate::attention::Element;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::gpu::{GpuBackward, GradBuffers, Stamps, Timing};
use crate::layout::Layout;
use crate::plan::{self, BackwardPlan, ColumnPlan, DType, MergeQPlan, Shape};
use std::sync::Arc;

/// Gradients of a loss with respect to Q, K and V, in their layouts (`[batch, seq, heads, head_dim]`;
/// dK and dV with `num_kv_heads`, each summed over the query heads of its GQA group).
#[derive(Clone, Debug, PartialEq)]
pub struct Grads<T> {
    /// dL/dQ.
    pub dq: Vec<T>,
    /// dL/dK.
    pub dk: Vec<T>,
    /// dL/dV.
    pub dv: Vec<T>,
}

/// The backward of an S2 attention op: one layout, one shape, one device, planned once.
///
/// Deterministic by construction: no atomics anywhere. The dQ pass writes each dQ row from one
/// workgroup walking its query tile's KV list in a fixed order; the dK/dV pass writes each dK, dV row from
/// one workgroup that sums the query heads of its GQA group and their query tiles in a fixed order. Two
/// calls with the same inputs on the same device give bitwise-identical gradients.
///
/// Runs on wgpu devices (the cooperative-matrix WGSL kernels for f16 storage at head dims 64 and 128 on
/// adapters with 16x16 f16 matrices, 32-wide subgroups and subgroup barriers; elsewhere the portable WGSL
/// kernels, f32 and f16 storage; f32 accumulation throughout) and, with the
/// `cuda` feature, on CUDA contexts (`shaders/cuda/s2_backward.cu`: tensor cores, f16 and bf16, the same
/// two passes, equally deterministic).
pub struct AttentionGrad {
    layout: Layout,
    shape: Shape,
    plan: BackwardPlan,
    mergeq: Arc<MergeQPlan>,
    columns: ColumnPlan,
    engine: Engine,
}

/// The backend-specific half of the op (one per op: the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Engine {
    Wgpu(GpuBackward),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaBackward),
}

impl std::fmt::Debug for AttentionGrad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionGrad").field("shape", &self.shape).field("plan", &self.plan).finish()
    }
}

impl AttentionGrad {
    /// Plans the backward of `layout` at `shape` for the device of `ctx` and compiles (or fetches) its
    /// pipelines.
    pub fn new(ctx: &Context, layout: &Layout, shape: Shape) -> Result<Self> {
        shape.validate(layout)?;
        let index = layout.index(shape.seq_len);
        #[cfg(feature = "cuda")]
        if let Some(cuda) = ctx.cuda() {
            let plan = crate::cuda::plan_backward_cuda(&shape, layout, cuda.caps())?;
            let mergeq = layout.mergeq(shape.seq_len, plan.dq.tile_q);
            let columns = ColumnPlan::build(&index, layout.block_size(), layout.causal(), plan.dkdv.tile_q);
            let engine = Engine::Cuda(crate::cuda::CudaBackward::new(cuda, layout, shape, &plan, &mergeq, &columns)?);
            return Ok(Self { layout: layout.clone(), shape, plan, mergeq, columns, engine });
        }
        if shape.dtype == DType::BF16 {
            return Err(Error::Unsupported("bf16 has no WGSL backward; use f16 or f32 (or the CUDA backend)".into()));
        }
        let ctx = ctx.require_wgpu("AttentionGrad::new")?;
        let info = &ctx.capabilities().info;
        let subgroups = plan::SubgroupInfo {
            min_size: info.subgroup_min_size,
            max_size: info.subgroup_max_size,
            barriers: ctx.capabilities().features.contains(wgpu::Features::SUBGROUP_BARRIER),
        };
        let plan = plan::plan_backward_wgpu(&shape, layout, ctx.caps(), Some(subgroups))?;
        let mergeq = layout.mergeq(shape.seq_len, plan.dq.tile_q);
        let columns = ColumnPlan::build(&index, layout.block_size(), layout.causal(), plan.dkdv.tile_q);
        let engine = Engine::Wgpu(GpuBackward::new(ctx, layout, shape, &plan, &mergeq, &columns)?);
        Ok(Self { layout: layout.clone(), shape, plan, mergeq, columns, engine })
    }

    /// The wgpu half of the op, or an error naming `what` on a CUDA op.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn wgpu(&self, what: &str) -> Result<&GpuBackward> {
        match &self.engine {
            Engine::Wgpu(g) => Ok(g),
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => Err(Error::Unsupported(format!("{what} needs a wgpu op; this one runs on CUDA"))),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    /// The two passes' dispatch plans.
    pub fn plan(&self) -> &BackwardPlan {
        &self.plan
    }
    /// The row lists the dQ pass walks (the forward's MergeQ lists at the dQ tile size).
    pub fn mergeq(&self) -> &MergeQPlan {
        &self.mergeq
    }
    /// The column lists the dK/dV pass walks.
    pub fn columns(&self) -> &ColumnPlan {
        &self.columns
    }

    /// A human-readable account of what will run and why.
    pub fn explain(&self) -> String {
        let s = &self.shape;
        format!(
            "backward {} x {} tokens, {} heads / {} kv heads, head_dim {}, {}: {}; longest row list {} KV blocks, \
             longest column list {} query tiles",
            s.batch,
            s.seq_len,
            self.layout.num_heads(),
            self.layout.num_kv_heads(),
            s.head_dim,
            s.dtype,
            self.plan,
            self.mergeq.max_tile_len(),
            self.columns.max_column_len()
        )
    }

    /// Gradients from host slices: `q`, `k`, `v` as given to the forward, `out` and `lse` as it returned
    /// them ([`Output`](crate::Output)), and `d_out` (dL/dO, shaped like `out`).
    pub fn backward<T: Element>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        out: &[T],
        lse: &[f32],
        d_out: &[T],
    ) -> Result<Grads<T>> {
        let inputs = self.host_inputs(q, k, v, out, lse, d_out)?;
        let [dq, dk, dv] = match &self.engine {
            Engine::Wgpu(g) => g.run_host(inputs)?,
            #[cfg(feature = "cuda")]
            Engine::Cuda(c) => c.run_host(inputs)?,
        };
        Ok(Grads {
            dq: bytemuck::pod_collect_to_vec(&dq),
            dk: bytemuck::pod_collect_to_vec(&dk),
            dv: bytemuck::pod_collect_to_vec(&dv),
        })
    }

    /// Times the backward kernels alone: uploads the inputs (as [`AttentionGrad::backward`] takes them)
    /// once, runs `warmup` untimed passes, then `iters` timed ones (GPU timestamps from the start of the dQ
    /// pass to the end of the dK/dV pass where available (CUDA events on CUDA), else wall clock around a waited
    /// submit).
    #[allow(clippy::too_many_arguments)]
    pub fn time_backward<T: Element>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        out: &[T],
        lse: &[f32],
        d_out: &[T],
        (warmup, iters): (u32, u32),
    ) -> Result<Timing> {
        if iters == 0 {
            return Err(Error::Shape("time_backward needs iters >= 1".into()));
        }
        let inputs = self.host_inputs(q, k, v, out, lse, d_out)?;
        match &self.engine {
            Engine::Wgpu(g) => g.time(inputs, warmup, iters),
            #[cfg(feature = "cuda")]
            Engine::Cuda(c) => c.time(inputs, warmup, iters),
        }
    }

    /// Checks the host slices' element type and lengths, naming the first wrong one, and returns their
    /// bytes in the order the engine uploads them.
    fn host_inputs<'a, T: Element>(
        &self,
        q: &'a [T],
        k: &'a [T],
        v: &'a [T],
        out: &'a [T],
        lse: &'a [f32],
        d_out: &'a [T],
    ) -> Result<[&'a [u8]; 6]> {
        if T::DTYPE != self.shape.dtype {
            return Err(Error::DType { tensor: "q", expected: self.shape.dtype.name(), got: T::DTYPE.name() });
        }
        let (batch, seq, d) = (self.shape.batch as usize, self.shape.seq_len as usize, self.shape.head_dim as usize);
        let (h, hk) = (self.layout.num_heads(), self.layout.num_kv_heads());
        let lens = [
            ("q", q.len(), h),
            ("k", k.len(), hk),
            ("v", v.len(), hk),
            ("out", out.len(), h),
            ("d_out", d_out.len(), h),
        ];
        for (tensor, got, heads) in lens {
            let expected = batch * seq * heads as usize * d;
            if got != expected {
                let layout = format!("[batch {batch}, seq {seq}, heads {heads}, head_dim {d}]");
                return Err(Error::Length { tensor, got, expected, layout });
            }
        }
        let expected = batch * h as usize * seq;
        if lse.len() != expected {
            let layout = format!("[batch {batch}, heads {h}, seq {seq}] f32");
            return Err(Error::Length { tensor: "lse", got: lse.len(), expected, layout });
        }
        use bytemuck::cast_slice as bytes;
        Ok([bytes(q), bytes(k), bytes(v), bytes(out), bytes(lse), bytes(d_out)])
    }

    /// Records both backward passes into the caller's `encoder`, reading and writing the caller's buffers
    /// (see [`GradBuffers`]). Nothing is submitted.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder, buffers: &GradBuffers<'_>) -> Result<()> {
        self.wgpu("AttentionGrad::encode")?.encode(encoder, buffers, None)
    }

    /// As [`AttentionGrad::encode`], writing GPU timestamps `begin` (at the start of the dQ pass) and
    /// `end` (at the end of the dK/dV pass) into `query_set`.
    pub fn encode_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: &GradBuffers<'_>,
        query_set: &wgpu::QuerySet,
        (begin, end): (u32, u32),
    ) -> Result<()> {
        self.wgpu("AttentionGrad::encode_timed")?.encode(encoder, buffers, Some(Stamps { set: query_set, begin, end }))
    }
}
