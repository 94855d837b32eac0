//! Inference: the paged, S2-aware KV cache ([`KvCache`]), decode over it ([`Decode`], flash-decoding with
//! GQA) and variable-length / chunked prefill on packed sequences ([`VarlenAttention`]).
//!
//! Both attention paths run the same WGSL kernels (`shaders/decode_*.wgsl`) over a host-built
//! [`WorkList`], which says for each workgroup which query rows it computes and where the KV blocks they
//! attend lie; a CUDA or tensor-core decode kernel can consume the same list and the cache's
//! [`KvCache::pools`] and [`PageTable`]s.

mod decode;
mod kv_append;
mod kv_cache;
mod page_table;
mod pool_storage;
mod retention;
mod varlen;
mod worklist;

pub use decode::Decode;
pub use kv_cache::{KvCache, KvCacheConfig, MemoryReport, SeqId};
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
