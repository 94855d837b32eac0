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
    let forward = crate::plan::plan_wgpu(shape, layout, caps, None)?;
    let backward = crate::plan::plan_backward_wgpu(shape, layout, caps, subgroups)?;
    let (dq, dkdv) = backward::backward_kernels(&backward)?;
    let passes = [(forward::forward_kernel(&forward)?, forward), (dq, backward.dq), (dkdv, backward.dkdv)];
    let mut out = Vec::new();
    for (kernel, plan) in passes {
        // The kernels and constants GpuForward::new and GpuBackward::new build their pipelines with.
        let constants = shaders::overrides(kernel, &plan, shape.head_dim)?;
        out.push((kernel, plan, shaders::compose(kernel, shape.dtype)?, constants));
    }
    Ok(out)
}
