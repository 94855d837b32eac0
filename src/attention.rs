//! The public op: [`Attention`] binds a layout and a problem shape to a device, plans once, and runs the
//! forward pass on host slices or on GPU buffers the caller owns.
//!
//! The data path reads top-down: [`Layout`] (config) → [`Layout::index`] (compressed index) →
//! [`crate::plan`] (variant, tiles, [`MergeQPlan`]) → kernel → [`Output`].

use crate::context::Context;
use crate::error::{Error, Result};
use crate::gpu::{GpuForward, TensorView, Timing, WgpuContext};
use crate::layout::Layout;
use crate::plan::{self, DType, DispatchPlan, MergeQPlan, Shape};

use std::sync::Arc;

/// Element types host slices may hold. Sealed: `f32`, `half::f16` and `half::bf16` (CUDA only).
pub trait Element: bytemuck::Pod + private::Sealed {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens to f32.
    fn to_f32(self) -> f32;
    /// Rounds from f32.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// What a forward call returns on the host.
#[derive(Clone, Debug)]
pub struct Output<T> {
    /// `[batch, seq, heads, head_dim]`.
    pub out: Vec<T>,
    /// Natural-log log-sum-exp of each row's scaled scores, `[batch, heads, seq]` (`-inf` for a row with
    /// no active key, possible only with custom masks).
    pub lse: Vec<f32>,
}

/// The backend-specific half of an op.
enum Engine {
    Wgpu(GpuForward),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaForward),
}

/// An S2 attention op: one layout, one shape, one device, planned once.
pub struct Attention {
    layout: Layout,
    shape: Shape,
    mergeq: Arc<MergeQPlan>,
    plan: DispatchPlan,
    engine: Engine,
}

impl std::fmt::Debug for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attention").field("shape", &self.shape).field("plan", &self.plan).finish()
    }
}

impl Attention {
    /// Plans `layout` at `shape` for the device of `ctx` and compiles (or fetches) its pipeline.
    pub fn new(ctx: &Context, layout: &Layout, shape: Shape) -> Result<Self> {
        shape.validate(layout)?;
        #[cfg(feature = "cuda")]
        if let Some(cuda) = ctx.cuda() {
            let plan = crate::cuda::plan_forward(&shape, layout, cuda.caps())?;
            let mergeq = layout.mergeq(shape.seq_len, plan.tile_q);
            let engine = Engine::Cuda(crate::cuda::CudaForward::new(cuda, layout, shape, &plan, mergeq.clone())?);
            return Ok(Self { layout: layout.clone(), shape, mergeq, plan, engine });
        }
        if shape.dtype == DType::BF16 {
            return Err(Error::Unsupported("bf16 has no WGSL kernel; use f16 or f32 (or the CUDA backend)".into()));
        }
        let ctx = ctx.require_wgpu("Attention::new")?;
        check_sizes(ctx, layout, &shape)?;
        let mut tuner = crate::gpu::ForwardTuner::new(ctx, layout, shape);
        let plan = plan::plan_wgpu(&shape, layout, ctx.caps(), Some(&mut tuner))?;
        let mergeq = layout.mergeq(shape.seq_len, plan.tile_q);
        let engine = Engine::Wgpu(GpuForward::new(ctx, layout, shape, plan.clone(), mergeq.clone())?);
        Ok(Self { layout: layout.clone(), shape, mergeq, plan, engine })
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn wgpu(&self, what: &str) -> Result<&GpuForward> {
        match &self.engine {
            Engine::Wgpu(g) => Ok(g),
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => Err(Error::Unsupported(format!("{what} needs a wgpu op; this one runs on CUDA"))),
        }
    }

    /// The CUDA half of the op, for the embedding entry points in `src/cuda/attention_ext.rs`.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_engine(&self) -> Option<&crate::cuda::CudaForward> {
        match &self.engine {
            Engine::Cuda(c) => Some(c),
            Engine::Wgpu(_) => None,
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
    /// The dispatch plan.
    pub fn plan(&self) -> &DispatchPlan {
        &self.plan
    }
    /// The MergeQ tile lists the kernel reads.
    pub fn mergeq(&self) -> &MergeQPlan {
        &self.mergeq
    }
    /// Buffers the op has created so far (to check that steady-state calls allocate nothing).
    pub fn buffers_created(&self) -> usize {
        match &self.engine {
            Engine::Wgpu(g) => g.buffers_created(),
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => 0,
        }
    }

    /// Restricts a causal wgpu op to the query rows from `first_row` on (a multiple of the plan's query
    /// tile): rows before it are left unwritten. Keys after the last row are never needed by a causal
    /// layout, so a sequence-parallel share of rows `[r0, r1)` is an op over the first `r1` tokens
    /// restricted to rows from `r0`.
    pub(crate) fn restrict_to_rows_from(&mut self, first_row: u32) -> Result<()> {
        let tile_q = self.plan.tile_q;
        if !self.layout.causal() || first_row % tile_q != 0 {
            return Err(Error::Shape(format!(
                "a row range must start on a query tile ({tile_q} rows) of a causal layout, got row {first_row}"
            )));
        }
        match &mut self.engine {
            Engine::Wgpu(g) => {
                g.restrict_to_tiles_from(first_row / tile_q);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(_) => Err(Error::Unsupported("row ranges are not implemented on the CUDA backend".into())),
        }
    }

    /// A human-readable account of what will run and why.
    pub fn explain(&self) -> String {
        let s = &self.shape;
        format!(
            "{} x {} tokens, {} heads / {} kv heads, head_dim {}, {}: {}; {} tiles x {} patterns, longest tile list {} KV blocks{}",
            s.batch,
            s.seq_len,
            self.layout.num_heads(),
            self.layout.num_kv_heads(),
            s.head_dim,
            s.dtype,
            self.plan,
            self.mergeq.tiles(),
            self.mergeq.patterns(),
            self.mergeq.max_tile_len(),
            if self.mergeq.all_prefix() { ", prefix row masks" } else { ", per-block row masks" }
        )
    }

    /// Runs on host slices in `[batch, seq, heads, head_dim]` layout (K and V with `num_kv_heads`).
    pub fn forward<T: Element>(&self, q: &[T], k: &[T], v: &[T]) -> Result<Output<T>> {
        self.check_host(q, k, v)?;
        let (q, k, v) = (bytemuck::cast_slice(q), bytemuck::cast_slice(k), bytemuck::cast_slice(v));
        let (out, lse) = match &self.engine {
            Engine::Wgpu(g) => g.run_host(q, k, v)?,
            #[cfg(feature = "cuda")]
            Engine::Cuda(c) => c.run_host(q, k, v)?,
        };
        Ok(Output { out: bytemuck::pod_collect_to_vec(&out), lse })
    }

    /// Times the kernel alone: uploads the inputs once, runs `warmup` untimed passes, then `iters` timed
    /// ones (GPU timestamps or CUDA events where available, else wall clock around a waited submit).
    pub fn time_forward<T: Element>(&self, q: &[T], k: &[T], v: &[T], warmup: u32, iters: u32) -> Result<Timing> {
        self.check_host(q, k, v)?;
        if iters == 0 {
            return Err(Error::Shape("time_forward needs iters >= 1".into()));
        }
        let (q, k, v) = (bytemuck::cast_slice(q), bytemuck::cast_slice(k), bytemuck::cast_slice(v));
        match &self.engine {
            Engine::Wgpu(g) => g.time(q, k, v, warmup, iters),
            #[cfg(feature = "cuda")]
            Engine::Cuda(c) => c.time(q, k, v, warmup, iters),
        }
    }

    fn check_host<T: Element>(&self, q: &[T], k: &[T], v: &[T]) -> Result<()> {
        if T::DTYPE != self.shape.dtype {
            return Err(Error::DType { tensor: "q", expected: self.shape.dtype.name(), got: T::DTYPE.name() });
        }
        let tokens = self.shape.batch as usize * self.shape.seq_len as usize;
        let d = self.shape.head_dim as usize;
        let qn = tokens * self.layout.num_heads() as usize * d;
        let kn = tokens * self.layout.num_kv_heads() as usize * d;
        let layout =
            |h: u32| format!("[batch {}, seq {}, heads {h}, head_dim {d}]", self.shape.batch, self.shape.seq_len);
        for (name, len, want, h) in [
            ("q", q.len(), qn, self.layout.num_heads()),
            ("k", k.len(), kn, self.layout.num_kv_heads()),
            ("v", v.len(), kn, self.layout.num_kv_heads()),
        ] {
            if len != want {
                return Err(Error::Length { tensor: name, got: len, expected: want, layout: layout(h) });
            }
        }
        Ok(())
    }

    /// Records the forward pass into the caller's `encoder`, reading and writing the caller's buffers.
    /// `lse` is `(buffer, first element)` for `[batch, heads, seq]` f32 values. Nothing is submitted.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &TensorView<'_>,
        lse: (&wgpu::Buffer, u64),
    ) -> Result<()> {
        self.wgpu("Attention::encode")?.encode(encoder, q, k, v, out, lse, None)
    }

    /// As [`Attention::encode`], writing GPU timestamps at the start and end of the pass.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &TensorView<'_>,
        lse: (&wgpu::Buffer, u64),
        timestamps: wgpu::ComputePassTimestampWrites<'_>,
    ) -> Result<()> {
        self.wgpu("Attention::encode_timed")?.encode(encoder, q, k, v, out, lse, Some(timestamps))
    }
}

/// Refuses problems whose tensors cannot be bound on this device, naming the limit.
fn check_sizes(ctx: &WgpuContext, layout: &Layout, shape: &Shape) -> Result<()> {
    let caps = ctx.caps();
    let tokens = shape.batch as u64 * shape.seq_len as u64;
    let bytes = tokens * layout.num_heads() as u64 * shape.head_dim as u64 * shape.dtype.size();
    for (what, limit, max) in [
        ("the q/out tensors", "max_storage_buffer_binding_size", caps.max_storage_binding),
        ("the q/out tensors", "max_buffer_size", caps.max_buffer),
    ] {
        if bytes > max {
            return Err(Error::DeviceLimit { what: format!("{what} ({bytes} bytes)"), limit, needed: bytes, max });
        }
    }
    if shape.batch > caps.max_dispatch || layout.num_heads() > caps.max_dispatch {
        return Err(Error::DeviceLimit {
            what: "batch and heads as dispatch dimensions".into(),
            limit: "max_compute_workgroups_per_dimension",
            needed: shape.batch.max(layout.num_heads()) as u64,
            max: caps.max_dispatch as u64,
        });
    }
    // Vec4 offsets are u32 in the kernel.
    if bytes / shape.dtype.size() / 4 > u32::MAX as u64 {
        return Err(Error::Shape(format!("{bytes} bytes per tensor exceeds the kernel's 2^34-element addressing")));
    }
    Ok(())
}
