//! The wgpu backend: device context, shader composition and the forward and backward kernels' host side.

mod backward;
mod context;
pub(crate) mod decode;
mod forward;
pub mod shaders;
mod timing;
mod tune;

pub(crate) use backward::GpuBackward;
pub use backward::GradBuffers;
pub(crate) use context::parse_backend;
pub use context::{AdapterSummary, Capabilities, WgpuContext};
pub(crate) use forward::{read_buffer, GpuForward};
pub use forward::{TensorView, Timing};
pub(crate) use timing::Stamps;
pub use timing::TimestampQueries;
pub(crate) use tune::ForwardTuner;

/// Diagnostics hook, not a stable API (examples/vk_pipeline_stats.rs reads the driver's statistics of
/// the kernels with it): for the forward and the backward the planner would dispatch for `shape` and
/// `layout` on a device with `caps` and `subgroups` (the forward at its default tile, untuned), each pass's
/// kernel, plan, composed WGSL source and override constants, exactly as the forward and backward build
/// their pipelines (`S2ATTN_COOP_FWD`, `S2ATTN_BWD_DKDV` and the tile variables are read as there).
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub fn planned_pipelines(
    shape: &crate::plan::Shape,
    layout: &crate::layout::Layout,
    caps: &crate::plan::DeviceCaps,
    subgroups: Option<crate::plan::SubgroupInfo>,
) -> crate::Result<Vec<(shaders::Kernel, crate::plan::DispatchPlan, String, Vec<(&'static str, u32)>)>> {
    use crate::plan::{CoopDkdv, KernelVariant};
    use shaders::Kernel;
    let d = shape.head_dim;
    let forward = crate::plan::plan_wgpu(shape, layout, caps, None)?;
    let backward = crate::plan::plan_backward_wgpu(shape, layout, caps, subgroups)?;
    let coop = |p: &crate::plan::DispatchPlan| p.variant == KernelVariant::Coop;
    let passes = [
        (if coop(&forward) { Kernel::ForwardCoop } else { Kernel::ForwardPortable }, forward),
        (if coop(&backward.dq) { Kernel::BackwardCoopDq } else { Kernel::BackwardDq }, backward.dq),
        (if coop(&backward.dkdv) { Kernel::BackwardCoopDkDv } else { Kernel::BackwardDkDv }, backward.dkdv),
    ];
    let mut out = Vec::new();
    for (kernel, plan) in passes {
        // As GpuForward::new and GpuBackward::new assemble them.
        let mut constants = vec![("D", d), ("BQ", plan.tile_q), ("BK", plan.tile_kv), ("WG", plan.workgroup_size)];
        match kernel {
            Kernel::ForwardCoop => constants.extend(crate::plan::coop_forward_overrides(&plan, d)?),
            Kernel::BackwardCoopDkDv => constants.extend(CoopDkdv::of_plan(&plan).constants()),
            _ => {}
        }
        out.push((kernel, plan, shaders::compose(kernel, shape.dtype)?, constants));
    }
    Ok(out)
}
