//! A small decoder-only transformer on the GPU, the model of the decode example: token embedding, per
//! layer a pre-norm block (RMSNorm, fused QKV projection, RoPE, attention over a paged [`KvCache`],
//! output projection and residual add, RMSNorm, SiLU-gated MLP and residual add), then the final norm,
//! the LM head and greedy argmax, all on the GPU (this crate's `shaders/*.wgsl` plus the library's KV append
//! and decode kernels). Each layer's attention is dense or S2 ([`LayerAttention`]); the paper's hybrid
//! (layer 0 dense, the rest S2) is [`ModelConfig::new`]'s default.
//!
//! ```no_run
//! use s2attn_model::{Model, ModelConfig, State};
//! let ctx = s2attn::Context::new()?;
//! let model = Model::random(&ctx, ModelConfig::new(1000, 256, 8, 2, 32, 4), 7)?;
//! let mut state = State::new(&model, 4096)?;
//! let first = model.prefill(&mut state, &[1, 2, 3, 4])?;
//! let rest = model.generate(&mut state, 16)?; // one submit per token
//! println!("{first} {rest:?}");
//! # Ok::<(), s2attn::Error>(())
//! ```
//!
//! [`reference::logits`] is the CPU f64 oracle of the same model.
//!
//! With the `cuda` feature, `CudaModel` and `CudaState` run the same model on a CUDA device (cuBLAS
//! matmuls, the library's CUDA attention, decode and KV append on device buffers).
//!
//! [`Checkpoint`] reads a Hugging Face checkpoint of the Llama or Phi-3 family (`config.json` and
//! safetensors shards) into a [`ModelConfig`] and [`Weights`] for [`Model::from_weights`].
//!
//! [`KvCache`]: s2attn::KvCache
#![warn(missing_docs)]

mod checkpoint;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod generate;
mod ops;
mod prefill;
pub mod reference;
pub mod shaders;
mod state;
mod transformer;
mod weights;

pub use checkpoint::{Checkpoint, HfConfig};
pub use config::{DenseLayers, LayerAttention, ModelConfig};
#[cfg(feature = "cuda")]
pub use cuda::{CudaModel, CudaState};
pub use state::State;
pub use transformer::Model;
pub use weights::{LayerWeights, Weights};
