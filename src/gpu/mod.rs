//! The wgpu backend: device context, shader composition and the forward kernels' host side.

mod context;
mod forward;
pub mod shaders;

pub use context::{AdapterSummary, Capabilities, Context, ContextOptions};
pub(crate) use forward::GpuForward;
pub use forward::TensorView;
