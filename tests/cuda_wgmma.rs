//! The whole CUDA suite (tests/cuda.rs) with `S2ATTN_CUDA_KERNEL=wgmma`: on sm_90 every eligible op (head
//! dim 128, 128 x 64 tiles) runs the warp-specialised wgmma kernel (shaders/cuda/NOTES.md, v6), the others
//! mma.sync; `check_large` asserts which one ran. Skips with a message without a CUDA device.
#![cfg(feature = "cuda")]

#[path = "cuda.rs"]
mod wgmma_suite;
