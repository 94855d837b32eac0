//! Planning: turn (problem shape, layout, device capabilities) into a [`DispatchPlan`]: which kernel
//! variant runs, its tile sizes and workgroup size, and the [`MergeQPlan`] it reads.
//!
//! The planner is pure Rust and knows devices only through [`DeviceCaps`], so it is tested without a GPU.
//! Each backend fills `DeviceCaps` from what its device reports.

mod column;
mod coop;
mod coop_backward;
mod loop_budget;
mod mergeq;

pub use column::{backward_workgroup_bytes, plan_backward_portable, BackwardPlan, ColumnPlan, QueryEntry};
pub use coop::{
    coop_candidates, coop_workgroup_bytes, plan_coop, CoopTile, TuneTarget, COOP_HEAD_DIMS, COOP_TAU, TUNE_MAX_SEQ,
};
#[cfg(test)]
pub(crate) use coop::{coop_workgroup_size, COOP_SUBGROUP_SIZE};
pub use coop_backward::{
    coop_dkdv_candidates, coop_dkdv_subgroups, coop_dkdv_workgroup_bytes, coop_dq_candidates, coop_dq_workgroup_bytes,
    longest_first_order, plan_backward_coop, plan_backward_wgpu, SubgroupInfo,
};
pub use loop_budget::{
    backward_dkdv_cost, backward_dq_cost, budget, check_combine, forward_portable_cost, ListSplit, LoopCost,
    LLVMPIPE_LOOP_CAP,
};
pub use mergeq::{KvEntry, MergeQPlan, RowMask, ROWMASK_BITS_FLAG};

use crate::error::{Error, Result};
use crate::layout::Layout;
use std::fmt;

/// Element type of Q, K, V and O in memory. Accumulation is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16 (CUDA backend only).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Short name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The size of one attention call. Head counts come from the [`Layout`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    /// Sequences in the batch.
    pub batch: u32,
    /// Tokens per sequence (queries and keys).
    pub seq_len: u32,
    /// Features per head.
    pub head_dim: u32,
    /// Storage type of Q, K, V, O.
    pub dtype: DType,
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
}

impl Shape {
    /// A shape with the default scale.
    pub fn new(batch: u32, seq_len: u32, head_dim: u32, dtype: DType) -> Self {
        Self { batch, seq_len, head_dim, dtype, scale: None }
    }
    /// Overrides the softmax scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    /// The softmax scale in effect.
    pub fn softmax_scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
    /// Checks sizes that no kernel can take.
    pub fn validate(&self, layout: &Layout) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::Shape("batch must be >= 1".into()));
        }
        if self.head_dim == 0 {
            return Err(Error::Shape("head_dim must be >= 1".into()));
        }
        if let Some(s) = self.scale {
            if !s.is_finite() || s <= 0.0 {
                return Err(Error::Shape(format!("softmax scale must be finite and positive, got {s}")));
            }
        }
        layout.check_seq_len(self.seq_len)
    }
}

/// What a device offers the planner.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceCaps {
    /// Adapter name.
    pub name: String,
    /// Backend name (`vulkan`, `gl`, `metal`, `dx12`, `cuda`).
    pub backend: String,
    /// Bytes of workgroup (shared) memory per workgroup.
    pub max_workgroup_storage: u32,
    /// Invocations per workgroup.
    pub max_invocations: u32,
    /// Largest storage buffer binding in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer in bytes.
    pub max_buffer: u64,
    /// Largest dispatch in one dimension.
    pub max_dispatch: u32,
    /// 16x16x16 f16 x f16 -> f32 cooperative matrices.
    pub coop_f16_16x16: bool,
    /// f16 arithmetic in shaders (`enable f16`).
    pub shader_f16: bool,
    /// Subgroup operations.
    pub subgroups: bool,
    /// GPU timestamp queries.
    pub timestamps: bool,
    /// Loop iterations one shader invocation may run in total before the driver ends its loops (lavapipe:
    /// [`LLVMPIPE_LOOP_CAP`]); `None` where there is no such cap. The portable kernels split their lists to
    /// stay within it ([`LoopCost::split`]).
    pub loop_iteration_cap: Option<u32>,
}

impl DeviceCaps {
    /// The limits and features the H100's (and H200's) Vulkan adapter reports: 48 KiB of workgroup
    /// memory, 1024 invocations, 16x16x16 f16 cooperative matrices, f16, subgroups, timestamps. For
    /// planning, and checking plans, away from the device (the tests, the coop kernel's CPU twin).
    pub fn h100_vulkan() -> Self {
        Self {
            name: "H100".into(),
            backend: "vulkan".into(),
            max_workgroup_storage: 49152,
            max_invocations: 1024,
            max_storage_binding: u32::MAX as u64,
            max_buffer: u64::MAX,
            max_dispatch: 65535,
            coop_f16_16x16: true,
            shader_f16: true,
            subgroups: true,
            timestamps: true,
            loop_iteration_cap: None,
        }
    }
}

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelVariant {
    /// WGSL on plain f32 arithmetic and workgroup memory: runs on every adapter.
    Portable,
    /// WGSL on cooperative matrices (tensor cores / simdgroup matrices).
    Coop,
    /// CUDA C on `mma.sync` (sm_80+).
    CudaMma,
    /// CUDA C on Hopper's `wgmma`, warp specialised with TMA loads (sm_90, `sm_90a` code).
    CudaWgmma,
}

impl KernelVariant {
    /// The name used in benchmark rows (`portable`, `coop`, `mma`, `wgmma`).
    pub fn name(self) -> &'static str {
        match self {
            KernelVariant::Portable => "portable",
            KernelVariant::Coop => "coop",
            KernelVariant::CudaMma => "mma",
            KernelVariant::CudaWgmma => "wgmma",
        }
    }
}

/// Head dimensions the portable kernel takes.
pub const PORTABLE_HEAD_DIMS: &[u32] = &[32, 64, 96, 128, 256];

/// How one forward call is dispatched.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchPlan {
    /// The kernel.
    pub variant: KernelVariant,
    /// Query rows per workgroup tile (MergeQ when larger than the block size).
    pub tile_q: u32,
    /// Keys staged per inner step (divides the block size).
    pub tile_kv: u32,
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Workgroup memory in bytes.
    pub workgroup_bytes: u32,
    /// Why this choice was made.
    pub reason: String,
}

impl fmt::Display for DispatchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} kernel, tile {}q x {}kv, {} invocations, {} B workgroup memory ({})",
            self.variant.name(),
            self.tile_q,
            self.tile_kv,
            self.workgroup_size,
            self.workgroup_bytes,
            self.reason
        )
    }
}

/// Workgroup bytes the portable kernel uses for a (tile_q, tile_kv, head_dim) choice: the Q tile, the K/V
/// chunk, the scores and four words per query row (max, sum, flags, rescale).
pub fn portable_workgroup_bytes(tile_q: u32, tile_kv: u32, head_dim: u32) -> u32 {
    4 * ((tile_q + tile_kv) * head_dim + tile_q * tile_kv + 4 * tile_q)
}

/// The portable kernel's invocations per workgroup.
pub const PORTABLE_WORKGROUP: u32 = 64;
/// Accumulator vec4s per invocation the portable kernel can hold.
pub const PORTABLE_MAX_ACC: u32 = 16;

/// Plans the portable kernel: the largest query tile (to share K/V loads, MergeQ) and key chunk that fit
/// the device's workgroup memory and the kernel's register budget.
pub fn plan_portable(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Result<DispatchPlan> {
    let d = shape.head_dim;
    if !PORTABLE_HEAD_DIMS.contains(&d) {
        return Err(Error::HeadDim { got: d, what: "the portable WGSL kernel", supported: PORTABLE_HEAD_DIMS });
    }
    let bs = layout.block_size();
    let wg = PORTABLE_WORKGROUP.min(caps.max_invocations.max(1));
    let mut best = None;
    for tile_q in [64u32, 32, 16] {
        // Accumulators per invocation: tile_q * d / 4 vec4s spread over the workgroup.
        if tile_q * d / 4 > wg * PORTABLE_MAX_ACC {
            continue;
        }
        for tile_kv in [32u32, 16, 8] {
            let tile_kv = tile_kv.min(bs);
            let bytes = portable_workgroup_bytes(tile_q, tile_kv, d);
            if bytes <= caps.max_workgroup_storage {
                best = Some((tile_q, tile_kv, bytes));
                break;
            }
        }
        if best.is_some() {
            break;
        }
    }
    let Some((tile_q, tile_kv, bytes)) = best else {
        return Err(Error::DeviceLimit {
            what: format!("the portable kernel at head_dim {d}"),
            limit: "max_compute_workgroup_storage_size",
            needed: portable_workgroup_bytes(16, 8, d) as u64,
            max: caps.max_workgroup_storage as u64,
        });
    };
    let tiles = shape.seq_len.div_ceil(tile_q);
    if tiles > caps.max_dispatch {
        return Err(Error::DeviceLimit {
            what: format!("{tiles} query tiles of {tile_q} rows"),
            limit: "max_compute_workgroups_per_dimension",
            needed: tiles as u64,
            max: caps.max_dispatch as u64,
        });
    }
    Ok(DispatchPlan {
        variant: KernelVariant::Portable,
        tile_q,
        tile_kv,
        workgroup_size: wg,
        workgroup_bytes: bytes,
        reason: format!("largest tiles fitting {} B of workgroup memory", caps.max_workgroup_storage),
    })
}

/// Plans a wgpu forward: the cooperative-matrix kernel where the adapter has 16x16 f16 matrices and the
/// shape suits it (tile autotuned on `target`, see [`plan_coop`]), else the portable kernel, with the
/// reason the coop kernel was passed over in the plan's reason.
pub fn plan_wgpu(
    shape: &Shape,
    layout: &Layout,
    caps: &DeviceCaps,
    target: Option<&mut dyn TuneTarget>,
) -> Result<DispatchPlan> {
    match plan_coop(shape, layout, caps, target) {
        Ok(plan) => Ok(plan),
        Err(why) if caps.coop_f16_16x16 => {
            let mut plan = plan_portable(shape, layout, caps)?;
            plan.reason = format!("{}; not coop: {why}", plan.reason);
            Ok(plan)
        }
        Err(_) => plan_portable(shape, layout, caps),
    }
}
