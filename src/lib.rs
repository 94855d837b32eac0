//! # s2attn
//!
//! S2-Attention (arXiv 2407.17678) on GPUs of every vendor: block-sparse attention in which each head
//! attends a *shard* of the context (its local window plus per-head-offset vertical stripes), so that
//! heads read different blocks while their union covers the whole context.
//!
//! The data path, top-down:
//! 1. [`layout`]: [`S2Config`] / [`BlockMask`] → [`Layout`] → compressed [`BlockIndex`] per sequence length;
//! 2. [`plan`]: ([`Shape`], [`Layout`], device caps) → [`DispatchPlan`] + [`MergeQPlan`] tile lists;
//! 3. [`gpu`]: WGSL kernels through wgpu (Vulkan, Metal, DX12, GL);
//! 4. [`Attention`]: the op users call, returning [`Output`] (O and log-sum-exp); [`AttentionGrad`] turns
//!    that and dO into [`Grads`] (dQ, dK, dV) for training, deterministically.
//!
//! [`cpu`] holds the f64 oracle and the CPU twins of the kernels.
//!
//! ```no_run
//! use s2attn::{Attention, Context, DType, Layout, S2Config, Shape};
//! let ctx = Context::new()?;
//! let layout = Layout::s2(S2Config::new(8, 64, 4, 8))?; // 8 heads, block 64, 4 local blocks, stride 8
//! let op = Attention::new(&ctx, &layout, Shape::new(1, 4096, 128, DType::F32))?;
//! let n = 4096 * 8 * 128;
//! let (q, k, v) = (vec![0.1f32; n], vec![0.2f32; n], vec![0.3f32; n]);
//! let out = op.forward(&q, &k, &v)?;
//! println!("{} outputs, plan: {}", out.out.len(), op.explain());
//! # Ok::<(), s2attn::Error>(())
//! ```
#![warn(missing_docs)]

mod attention;
mod backward;
mod context;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod gpu;
pub mod inference;
pub mod layout;
mod multi;
pub mod plan;

pub use attention::{Attention, Element, Output};
pub use backward::{AttentionGrad, Grads};
pub use context::{Backend, Context, ContextOptions};
pub use error::{Error, Result};
pub use gpu::{TensorView, Timing};
#[cfg(feature = "cuda")]
pub use inference::CudaRows;
pub use inference::{
    varlen_forward, Decode, EncodedAppend, KvCache, KvCacheConfig, MemoryReport, SeqId, SeqLens, VarlenAttention,
};
pub use layout::{BlockIndex, BlockMask, Direction, Layout, S2Config};
pub use multi::{Assignment, MultiDevice, MultiPlan, Split};
pub use plan::{DType, DispatchPlan, KernelVariant, MergeQPlan, Shape};
