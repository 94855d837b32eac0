//! The wgpu backend: device context, shader composition and the forward kernels' host side.

mod context;
mod forward;
pub mod shaders;

pub use context::{AdapterSummary, Capabilities, WgpuContext};
pub(crate) use context::parse_backend;
pub(crate) use forward::GpuForward;
pub use forward::{TensorView, Timing};
