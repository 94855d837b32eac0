//! The wgpu backend: device context, shader composition and the forward and backward kernels' host side.

mod backward;
mod context;
pub(crate) mod decode;
mod forward;
mod redo;
pub mod shaders;
mod timing;
mod tune;
mod upload_sets;

pub(crate) use backward::GpuBackward;
pub use backward::GradBuffers;
pub use context::{parse_backend, AdapterSummary, Capabilities, WgpuContext};
pub use decode::{plan_attend, plan_attend_for, AttendPlan};
pub(crate) use forward::{new_buffer, read_buffer, GpuForward};
pub use forward::{TensorView, Timing};
pub(crate) use timing::Stamps;
pub use timing::TimestampQueries;
pub(crate) use tune::ForwardTuner;
pub(crate) use upload_sets::UploadSets;
