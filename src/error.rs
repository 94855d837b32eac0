//! The crate's one error type. Every fallible public call returns [`Result`]; each variant names the
//! argument or resource that is wrong so a caller can act on it without reading the source.

use thiserror::Error;

/// Everything that can go wrong in s2attn.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// `block_size` is not one of the supported sizes.
    #[error("block_size {0} is not supported: use 16, 32, 64 or 128 (a power of two)")]
    BlockSize(u32),
    /// `local_blocks` must be at least 1 (it counts the query's own block).
    #[error("local_blocks must be >= 1 (it counts the query's own block), got {0}")]
    LocalBlocks(u32),
    /// `vert_stride` must be at least 1 (1 means dense).
    #[error("vert_stride must be >= 1 (1 = dense), got {0}")]
    VertStride(u32),
    /// Head counts that do not fit together.
    #[error("num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")]
    HeadGroups {
        /// Query heads.
        num_heads: u32,
        /// Key/value heads.
        num_kv_heads: u32,
    },
    /// More dense heads than KV heads.
    #[error("num_dense_heads ({dense}) exceeds num_kv_heads ({num_kv_heads})")]
    DenseHeads {
        /// Requested dense KV heads.
        dense: u32,
        /// Key/value heads.
        num_kv_heads: u32,
    },
    /// A custom block mask whose dimensions do not match what it is used with.
    #[error("block mask: {0}")]
    Mask(String),
    /// The head dimension has no kernel.
    #[error("head_dim {got} is not supported by {what}: supported are {supported:?}")]
    HeadDim {
        /// Requested head dimension.
        got: u32,
        /// The kernel or backend that refused it.
        what: &'static str,
        /// The head dimensions it does support.
        supported: &'static [u32],
    },
    /// Zero or otherwise unusable problem sizes.
    #[error("invalid shape: {0}")]
    Shape(String),
    /// A host slice or device buffer has the wrong number of elements.
    #[error("{tensor} has {got} elements, expected {expected} ({layout})")]
    Length {
        /// Which tensor (`q`, `k`, `v`, `out`, `lse`).
        tensor: &'static str,
        /// Elements supplied.
        got: usize,
        /// Elements required.
        expected: usize,
        /// The layout the expectation comes from.
        layout: String,
    },
    /// A caller-owned GPU buffer is smaller than the tensor it must hold.
    #[error("buffer for {tensor} is {got} bytes, needs at least {needed} bytes")]
    BufferTooSmall {
        /// Which tensor.
        tensor: &'static str,
        /// Buffer size in bytes (from the offset on).
        got: u64,
        /// Bytes required.
        needed: u64,
    },
    /// The tensor's element type does not match the op's.
    #[error("dtype mismatch: op is {expected}, {tensor} is {got}")]
    DType {
        /// Which tensor.
        tensor: &'static str,
        /// The op's dtype.
        expected: &'static str,
        /// The supplied dtype.
        got: &'static str,
    },
    /// A device limit would be exceeded.
    #[error("{what} needs {needed} but the adapter's limit `{limit}` is {max}")]
    DeviceLimit {
        /// What needs the resource.
        what: String,
        /// The wgpu limit's name.
        limit: &'static str,
        /// Required amount.
        needed: u64,
        /// The adapter's maximum.
        max: u64,
    },
    /// No adapter or device matched.
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),
    /// The device could not be created or was lost.
    #[error("device error: {0}")]
    Device(String),
    /// The GPU did not finish submitted work within the context's wait timeout
    /// ([`ContextOptions::wait_timeout`](crate::ContextOptions::wait_timeout)): the device may be hung, or
    /// the work longer than the timeout allows. The work may still finish later.
    #[error("the GPU did not finish the submitted work within the wait timeout of {0:?}; the device may be hung")]
    Timeout(std::time::Duration),
    /// One device of a call split across several devices failed; no partial output is returned.
    #[error("device {index} ({device}) failed: {message}")]
    DeviceFailed {
        /// Position of the device in the multi-device set.
        index: usize,
        /// Adapter name and backend.
        device: String,
        /// What went wrong there.
        message: String,
    },
    /// A shader failed to parse, validate or compile.
    #[error("shader `{name}`: {message}")]
    Shader {
        /// The shader's name.
        name: String,
        /// The compiler's message.
        message: String,
    },
    /// A requested feature or backend is not available on this machine.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A sequence id the KV cache does not hold (never added, or already removed).
    #[error("sequence {0} is not in the KV cache (never added, or removed)")]
    UnknownSequence(u64),
    /// An append would take a sequence past the KV cache's page table capacity.
    #[error("page table overflow: sequence {seq} would hold {tokens} tokens, the page table has room for {capacity}")]
    PageTableOverflow {
        /// The sequence.
        seq: u64,
        /// Tokens it would hold after the append.
        tokens: u64,
        /// `max_seq_len` of the cache.
        capacity: u64,
    },
    /// The KV cache's page pool has too few free pages.
    #[error("KV cache out of pages: {what} needs {needed} more pages, {free} of {capacity} are free")]
    CacheFull {
        /// The operation that needed them.
        what: String,
        /// Pages it needed.
        needed: u64,
        /// Free pages.
        free: u64,
        /// Pages in the pool.
        capacity: u64,
    },
    /// Errors from the CUDA backend (driver, NVRTC, launch).
    #[error("cuda: {0}")]
    Cuda(String),
}

/// `Result` with the crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
