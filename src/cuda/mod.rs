//! The CUDA backend (feature `cuda`): tensor-core S2 kernels written in CUDA C (`shaders/cuda/`),
//! compiled by NVRTC for the device's compute capability at first use and cached in memory and on disk.
//!
//! The driver and NVRTC are loaded at run time (cudarc's dynamic loading), so the crate builds and its
//! tests run on machines without a CUDA toolkit or GPU; [`CudaContext::open`] then fails with a clear
//! [`crate::Error::Cuda`] / [`crate::Error::Unsupported`] and `Backend::Auto` falls back to wgpu.
//!
//! - [`CudaContext`]: the device, its capabilities and the kernel cache;
//! - [`plan_forward`]: the planner for the `mma.sync` kernel (tile sizes, shared memory);
//! - [`CudaForward`]: one planned op, on host slices or on device memory the caller owns
//!   ([`CudaTensor`], cudarc slices); reachable from [`crate::Attention`] through
//!   [`crate::Attention::forward_cuda`] and friends;
//! - `kv_append`: the append kernel behind `KvCache::append_cuda`;
//! - [`CudaBackward`]: the backward (dQ pass, then dK/dV pass), run by [`crate::AttentionGrad`] on a CUDA
//!   context.
//!
//! Non-finite inputs: the tensor-core kernels flag a non-finite output in their epilogues and an exact
//! kernel run after them redoes the op as IEEE arithmetic gives it (`exact`, `shaders/cuda/s2_exact.cu`).

mod attention_ext;
mod backward;
mod compile;
mod context;
mod decode;
mod exact;
mod forward;
mod kv_append;
mod plan;

pub use backward::{plan_backward_cuda, CudaBackward, CUDA_BACKWARD_HEAD_DIMS};
pub use compile::cache_dir;
pub use context::CudaContext;
pub use decode::{CudaDecode, DecodePart};
pub use forward::{CudaForward, CudaTensor};
pub(crate) use kv_append::{AppendRows, CudaAppender, RowShape};
pub use plan::{plan_forward, CUDA_HEAD_DIMS};

/// The cudarc crate this backend is built on, re-exported so that callers name the same versions of
/// `CudaSlice`, `CudaStream` and friends.
pub use cudarc;
