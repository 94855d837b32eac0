//! Inference: the paged, S2-aware KV cache ([`KvCache`]), decode over it ([`Decode`], flash-decoding with
//! GQA) and variable-length / chunked prefill on packed sequences ([`VarlenAttention`]).
//!
//! Both attention paths run the same WGSL kernels (`shaders/decode_*.wgsl`: a narrow split kernel for
//! items of up to 4 query rows with Q/K/V/O in registers, a general one above, and the LSE combine) over
//! a host-built [`WorkList`], which says for each workgroup which query rows it computes and where the KV
//! blocks they attend lie. On a CUDA context the cache's pools live in CUDA memory (`pool_storage.rs`:
//! the page planning, retention and page tables are the same) and [`Decode`] runs the CUDA twins of those
//! kernels (`shaders/cuda/s2_decode.cu`) over the same work lists, on host data or (`Decode::run_cuda`,
//! `KvCache::append_cuda`) on the caller's device buffers.

mod decode;
mod kv_append;
mod kv_cache;
mod page_table;
mod pool_storage;
mod retention;
mod step_plan;
mod varlen;
mod worklist;

pub use decode::Decode;
#[cfg(feature = "cuda")]
pub use kv_cache::CudaRows;
pub use kv_cache::{EncodedAppend, KvCache, KvCacheConfig, MemoryReport, SeqId};
pub use page_table::{KvPage, PageTable};
pub use varlen::{varlen_forward, SeqLens, VarlenAttention};
pub use worklist::{RowShape, SplitPolicy, WorkEntry, WorkItem, WorkList};

/// `scale` if it can be a softmax scale (finite and positive).
fn checked_scale(scale: f32) -> crate::Result<f32> {
    if !scale.is_finite() || scale <= 0.0 {
        return Err(crate::Error::Shape(format!("softmax scale must be finite and positive, got {scale}")));
    }
    Ok(scale)
}
