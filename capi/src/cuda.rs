//! The C API's entry points on caller CUDA memory (`CUdeviceptr`s of a CUDA context): the forward pass, KV
//! cache appends and decode steps, each enqueued on the context's stream without waiting
//! (`s2attn_context_synchronize` waits). A build without the `cuda` feature, or an object made on a wgpu
//! context, answers `S2ATTN_ERR_UNSUPPORTED`. Same conventions as the parent module: pointers and sizes
//! checked where they can be, panics caught, a status per call.

use super::inference::{S2attnDecode, S2attnKvCache};
use super::{call, handle, Fail, Ffi, S2attnOp, Status};
use s2attn::inference::SeqId;
use s2attn::Error;

/// `s2attn_cuda_tensor`: a tensor in caller CUDA memory (a `CUdeviceptr`), consecutive tokens
/// `token_stride` elements apart (0: contiguous).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct S2attnCudaTensor {
    /// Device address of the first element (16-byte aligned).
    pub ptr: u64,
    /// Elements from one token to the next (a multiple of 8); 0 means contiguous.
    pub token_stride: u64,
}

/// Runs the op on caller CUDA memory (`CUdeviceptr`s of the op's CUDA context) on the op's stream:
/// `q`, `k`, `v`, `out` in the op's dtype, the f32 LSE `[batch, heads, seq]` at `lse`. Returns without
/// waiting (`s2attn_context_synchronize` waits). `S2ATTN_ERR_UNSUPPORTED` when the library was built
/// without the `cuda` feature or the op runs on wgpu.
///
/// # Safety
/// `op` is null or live; each tensor is null or readable; the pointers address live device memory of the
/// op's context holding the whole tensors, valid until the work has finished.
#[no_mangle]
pub unsafe extern "C" fn s2attn_forward_cuda(
    op: *const S2attnOp,
    q: *const S2attnCudaTensor,
    k: *const S2attnCudaTensor,
    v: *const S2attnCudaTensor,
    out: *const S2attnCudaTensor,
    lse: u64,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let op = unsafe { handle(op, "op") }?;
        // SAFETY: forwarded caller contract.
        let t = unsafe { [handle(q, "q")?, handle(k, "k")?, handle(v, "v")?, handle(out, "out")?] };
        if lse == 0 {
            return Err(Fail::Null("lse"));
        }
        forward_cuda(op, t.map(|x| *x), lse)
    })
}

#[cfg(feature = "cuda")]
fn forward_cuda(op: &S2attnOp, [q, k, v, out]: [S2attnCudaTensor; 4], lse: u64) -> Ffi<()> {
    use s2attn::cuda::CudaTensor;
    let tensor = |t: S2attnCudaTensor| -> Ffi<CudaTensor> {
        if t.ptr == 0 {
            return Err(Fail::Null("a CUDA tensor's ptr"));
        }
        Ok(if t.token_stride == 0 { CudaTensor::new(t.ptr) } else { CudaTensor::strided(t.ptr, t.token_stride) })
    };
    let (q, k, v, out) = (tensor(q)?, tensor(k)?, tensor(v)?, tensor(out)?);
    // SAFETY: the entry point's contract: live device memory of the op's context holding whole tensors.
    unsafe { op.op.forward_cuda_raw(None, &q, &k, &v, &out, lse) }?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn forward_cuda(_: &S2attnOp, _: [S2attnCudaTensor; 4], _: u64) -> Ffi<()> {
    Err(unsupported("s2attn_forward_cuda"))
}

/// Appends `tokens` tokens to `seq` from caller CUDA memory: `k` and `v` address token 0's `[kv_heads,
/// head_dim]` rows in the cache's dtype, consecutive tokens `token_stride` elements apart (0: packed rows;
/// e.g. the K and V columns of an interleaved QKV buffer; addresses on 32-bit words, strides whole words).
/// Enqueued on the cache's stream without waiting; changes nothing when it fails.
///
/// # Safety
/// `cache` is null or live; `k` and `v` are null or readable; their pointers address live device memory of
/// the cache's context holding every row read, valid until the work has finished.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_append_cuda(
    cache: *const S2attnKvCache,
    seq: u64,
    k: *const S2attnCudaTensor,
    v: *const S2attnCudaTensor,
    tokens: u32,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        // SAFETY: forwarded caller contract.
        let (k, v) = unsafe { (*handle(k, "k")?, *handle(v, "v")?) };
        if k.ptr == 0 || v.ptr == 0 {
            return Err(Fail::Null("a CUDA tensor's ptr"));
        }
        if k.token_stride != v.token_stride {
            return Err(
                Error::Shape("s2attn_kv_cache_append_cuda: k and v must share their token_stride".into()).into()
            );
        }
        let mut state = cache.lock();
        let id = state.seq(seq)?;
        // SAFETY: the entry point's contract.
        unsafe { append_cuda(&mut state.cache, id, k, v, tokens) }
    })
}

/// # Safety
/// As [`s2attn_kv_cache_append_cuda`].
#[cfg(feature = "cuda")]
unsafe fn append_cuda(
    cache: &mut s2attn::KvCache,
    id: SeqId,
    k: S2attnCudaTensor,
    v: S2attnCudaTensor,
    tokens: u32,
) -> Ffi<()> {
    let stride = (k.token_stride != 0).then_some(k.token_stride);
    // SAFETY: forwarded caller contract.
    unsafe { cache.append_cuda_raw(&[(id, tokens)], k.ptr, v.ptr, stride) }?;
    Ok(())
}

/// # Safety
/// Nothing to uphold: it fails.
#[cfg(not(feature = "cuda"))]
unsafe fn append_cuda(_: &mut s2attn::KvCache, _: SeqId, _: S2attnCudaTensor, _: S2attnCudaTensor, _: u32) -> Ffi<()> {
    Err(unsupported("s2attn_kv_cache_append_cuda"))
}

/// One decode step on caller CUDA memory: the last `q_len` tokens of each of the `n_seqs` sequences `seqs`
/// attend their cached history; `q` and `out` address `[n_seqs, q_len, heads, head_dim]` rows in the
/// cache's dtype (contiguous, 16-byte aligned), the f32 LSE `[n_seqs, heads, q_len]` goes to `lse`.
/// Enqueued on the cache's stream without waiting.
///
/// # Safety
/// Handles are null or live; `seqs` is null or valid for `n_seqs` ids; `q`, `out` and `lse` address live
/// device memory of the cache's context holding those tensors, valid until the work has finished.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn s2attn_decode_run_cuda(
    decode: *const S2attnDecode,
    cache: *const S2attnKvCache,
    seqs: *const u64,
    n_seqs: usize,
    q_len: u32,
    q: u64,
    out: u64,
    lse: u64,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let (decode, cache) = unsafe { (handle(decode, "decode")?, handle(cache, "cache")?) };
        for (name, ptr) in [("q", q), ("out", out), ("lse", lse)] {
            if ptr == 0 {
                return Err(Fail::Null(name));
            }
        }
        let state = cache.lock();
        // SAFETY: forwarded caller contract.
        let ids = unsafe { state.seq_ids(seqs, n_seqs) }?;
        // SAFETY: the entry point's contract.
        unsafe { decode_cuda(&decode.decode, &state.cache, &ids, q_len, [q, out, lse]) }
    })
}

/// # Safety
/// As [`s2attn_decode_run_cuda`].
#[cfg(feature = "cuda")]
unsafe fn decode_cuda(
    decode: &s2attn::Decode,
    cache: &s2attn::KvCache,
    ids: &[SeqId],
    q_len: u32,
    [q, out, lse]: [u64; 3],
) -> Ffi<()> {
    // SAFETY: forwarded caller contract.
    unsafe { decode.run_cuda_raw(cache, ids, q_len, q, out, lse) }?;
    Ok(())
}

/// # Safety
/// Nothing to uphold: it fails.
#[cfg(not(feature = "cuda"))]
unsafe fn decode_cuda(_: &s2attn::Decode, _: &s2attn::KvCache, _: &[SeqId], _: u32, _: [u64; 3]) -> Ffi<()> {
    Err(unsupported("s2attn_decode_run_cuda"))
}

#[cfg(not(feature = "cuda"))]
fn unsupported(what: &str) -> Fail {
    Error::Unsupported(format!("{what}: this library was built without the `cuda` feature")).into()
}
