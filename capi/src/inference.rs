//! The C API of the paged KV cache and decode ([`KvCache`] and [`Decode`]): create a cache for a
//! layout, add / remove sequences, append K/V rows from host memory, read the memory report, and run decode
//! steps on host memory. Sequences are `uint64_t` ids on the C side. Same conventions as the parent module:
//! pointers and lengths checked, panics caught, a status per call.

use super::{call, check_ptr, clear_out, dtype_of, handle, input, put, Fail, Ffi, S2attnContext, S2attnLayout, Status};
use s2attn::inference::{Decode, KvCache, KvCacheConfig, SeqId};
use s2attn::{DType, Element, Error};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard};

/// `s2attn_kv_cache_params`: the fields of [`KvCacheConfig`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S2attnKvCacheParams {
    /// Features per head.
    pub head_dim: u32,
    /// `S2ATTN_F32` or `S2ATTN_F16`.
    pub dtype: i32,
    /// The most tokens one sequence may hold.
    pub max_seq_len: u32,
    /// Sequences of `max_seq_len` tokens the pool is sized for (when `max_pages` is 0).
    pub sequences: u32,
    /// Pages in the pool; 0 sizes it from `sequences`.
    pub max_pages: u32,
    /// Trailing tokens a decode call may query (1 for plain decoding).
    pub query_window: u32,
}

/// Parameters for one sequence of up to `max_seq_len` tokens, decoded one token at a time.
#[no_mangle]
pub extern "C" fn s2attn_kv_cache_params_init(head_dim: u32, dtype: i32, max_seq_len: u32) -> S2attnKvCacheParams {
    S2attnKvCacheParams { head_dim, dtype, max_seq_len, sequences: 1, max_pages: 0, query_window: 1 }
}

/// `s2attn_memory_report`: [`s2attn::inference::MemoryReport`] with the derived byte counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S2attnMemoryReport {
    /// Sequences in the cache.
    pub sequences: u64,
    /// Tokens over all sequences.
    pub tokens: u64,
    /// Bytes of one page, K and V together.
    pub page_bytes: u64,
    /// Pages in use.
    pub resident_pages: u64,
    /// Pages a dense paged cache would use.
    pub dense_pages: u64,
    /// Pages allocated in the pool.
    pub pool_pages: u64,
    /// Bytes of the pages in use.
    pub resident_bytes: u64,
    /// Bytes a dense cache would hold.
    pub dense_bytes: u64,
    /// Bytes allocated for the pool.
    pub pool_bytes: u64,
}

/// `s2attn_kv_cache`: a [`KvCache`] behind a lock (C callers may share it between threads), with the ids
/// it handed out.
pub struct S2attnKvCache {
    inner: Mutex<CacheState>,
    /// The device the cache was made on.
    pub(super) ctx: s2attn::Context,
}

pub(super) struct CacheState {
    pub(super) cache: KvCache,
    ids: HashMap<u64, SeqId>,
}

impl S2attnKvCache {
    pub(super) fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CacheState {
    pub(super) fn seq(&self, id: u64) -> Ffi<SeqId> {
        self.ids.get(&id).copied().ok_or(Fail::Lib(Error::UnknownSequence(id)))
    }

    /// The sequences of the `n_seqs` caller ids at `seqs`.
    ///
    /// # Safety
    /// `seqs` is null or valid for `n_seqs` ids (`input` checks null, alignment and size).
    pub(super) unsafe fn seq_ids(&self, seqs: *const u64, n_seqs: usize) -> Ffi<Vec<SeqId>> {
        // SAFETY: forwarded caller contract.
        let ids: &[u8] = unsafe { input(seqs.cast(), n_seqs, 8, "seqs") }?;
        cast::<u64>(ids, "seqs")?.iter().map(|&s| self.seq(s)).collect()
    }
}

/// `s2attn_decode`: a [`Decode`] op for one cache.
pub struct S2attnDecode {
    pub(super) decode: Decode,
    /// The LSE of buffer calls that want none.
    pub(super) scratch: super::buffers::Scratch,
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<S2attnKvCache>();
    shared::<S2attnDecode>();
};

/// Creates a paged KV cache for `layout` (causal) on `ctx`'s device, its pool allocated up front.
///
/// # Safety
/// `ctx`, `layout` and `params` are null or valid; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_create(
    ctx: *const S2attnContext,
    layout: *const S2attnLayout,
    params: *const S2attnKvCacheParams,
    out: *mut *mut S2attnKvCache,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded caller contract.
        let (ctx, layout, p) = unsafe { (handle(ctx, "ctx")?, handle(layout, "layout")?, handle(params, "params")?) };
        let mut config = KvCacheConfig::new(p.head_dim, dtype_of(p.dtype)?, p.max_seq_len)
            .sequences(p.sequences)
            .query_window(p.query_window);
        if p.max_pages != 0 {
            config = config.max_pages(p.max_pages);
        }
        let cache = KvCache::new(&ctx.ctx, &layout.layout, config)?;
        let state = CacheState { cache, ids: HashMap::new() };
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, S2attnKvCache { inner: Mutex::new(state), ctx: ctx.ctx.clone() }) };
        Ok(())
    })
}

/// Starts an empty sequence and writes its id to `seq`.
///
/// # Safety
/// `cache` is null or live; `seq` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_add_sequence(cache: *const S2attnKvCache, seq: *mut u64) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        if seq.is_null() {
            return Err(Fail::Null("seq"));
        }
        let mut state = cache.lock();
        let id = state.cache.add_sequence();
        state.ids.insert(id.get(), id);
        // SAFETY: non-null (checked) and writable by contract.
        unsafe { seq.write(id.get()) };
        Ok(())
    })
}

/// Removes a finished sequence and frees its pages.
///
/// # Safety
/// `cache` is null or live.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_remove_sequence(cache: *const S2attnKvCache, seq: u64) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        let mut state = cache.lock();
        let id = state.seq(seq)?;
        state.cache.remove_sequence(id)?;
        state.ids.remove(&seq);
        Ok(())
    })
}

/// Appends tokens to `seq`: `k` and `v` hold `len` elements each, `[tokens, kv_heads, head_dim]` in the
/// cache's dtype. Changes nothing when it fails.
///
/// # Safety
/// `cache` is null or live; `k` and `v` are null or valid for `len` elements.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_append(
    cache: *const S2attnKvCache,
    seq: u64,
    k: *const c_void,
    v: *const c_void,
    len: usize,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        let mut state = cache.lock();
        let id = state.seq(seq)?;
        let es = state.cache.config().dtype.size() as usize;
        // SAFETY: forwarded caller contract; `input` checks null, alignment and size.
        let (k, v) = unsafe { (input(k, len, es, "k")?, input(v, len, es, "v")?) };
        match state.cache.config().dtype {
            DType::F32 => append::<f32>(&mut state.cache, id, k, v),
            DType::F16 => append::<half::f16>(&mut state.cache, id, k, v),
            DType::BF16 => append::<half::bf16>(&mut state.cache, id, k, v),
        }
    })
}

pub(super) fn cast<'a, T: bytemuck::Pod>(bytes: &'a [u8], what: &str) -> Ffi<&'a [T]> {
    bytemuck::try_cast_slice(bytes).map_err(|e| Fail::Arg(format!("{what}: {e}")))
}

fn append<T: Element>(cache: &mut KvCache, seq: SeqId, k: &[u8], v: &[u8]) -> Ffi<()> {
    Ok(cache.append(seq, cast::<T>(k, "k")?, cast::<T>(v, "v")?)?)
}

/// Writes the number of tokens appended to `seq` so far to `len`.
///
/// # Safety
/// `cache` is null or live; `len` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_seq_len(cache: *const S2attnKvCache, seq: u64, len: *mut u32) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        if len.is_null() {
            return Err(Fail::Null("len"));
        }
        let state = cache.lock();
        let n = state.cache.seq_len(state.seq(seq)?)?;
        // SAFETY: non-null (checked) and writable by contract.
        unsafe { len.write(n) };
        Ok(())
    })
}

/// Fills `report` with what the cache holds against what a dense cache would.
///
/// # Safety
/// `cache` is null or live; `report` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_memory(
    cache: *const S2attnKvCache,
    report: *mut S2attnMemoryReport,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        if report.is_null() {
            return Err(Fail::Null("report"));
        }
        let r = cache.lock().cache.memory_report();
        let c = S2attnMemoryReport {
            sequences: r.sequences as u64,
            tokens: r.tokens,
            page_bytes: r.page_bytes,
            resident_pages: r.resident_pages,
            dense_pages: r.dense_pages,
            pool_pages: r.pool_pages,
            resident_bytes: r.resident_bytes(),
            dense_bytes: r.dense_bytes,
            pool_bytes: r.pool_bytes(),
        };
        // SAFETY: non-null (checked) and writable by contract.
        unsafe { report.write(c) };
        Ok(())
    })
}

/// Releases a cache (NULL is a no-op). Decode ops built for it must not be run on another cache.
///
/// # Safety
/// `cache` is null or a live cache not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_free(cache: *mut S2attnKvCache) {
    super::free(cache);
}

/// Creates the decode op for `cache`; `scale` is the softmax scale, 0 for `1/sqrt(head_dim)`.
///
/// # Safety
/// `cache` is null or live; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_decode_create(
    cache: *const S2attnKvCache,
    scale: f32,
    out: *mut *mut S2attnDecode,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        let mut decode = Decode::new(&cache.lock().cache)?;
        if scale != 0.0 {
            decode = decode.with_scale(scale)?;
        }
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, S2attnDecode { decode, scratch: Default::default() }) };
        Ok(())
    })
}

/// One decode step on host memory: attention of the last `q_len` tokens of each of the `n_seqs`
/// sequences `seqs` against their cached history. `q` and `out` hold `q_elems` elements,
/// `[n_seqs, q_len, heads, head_dim]` in the cache's dtype (`q_len` follows from `q_elems`, 1 for plain
/// decoding); `lse` (may be NULL) receives `[n_seqs, heads, q_len]` floats, `lse_len` of them. Blocks
/// until the result is back.
///
/// # Safety
/// Handles are null or live; each array is null or valid for its length.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn s2attn_decode_run(
    decode: *const S2attnDecode,
    cache: *const S2attnKvCache,
    seqs: *const u64,
    n_seqs: usize,
    q: *const c_void,
    q_elems: usize,
    out: *mut c_void,
    out_elems: usize,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let (decode, cache) = unsafe { (handle(decode, "decode")?, handle(cache, "cache")?) };
        let state = cache.lock();
        let config = state.cache.config();
        let (es, head_dim) = (config.dtype.size() as usize, config.head_dim as usize);
        // SAFETY: forwarded caller contract.
        let ids = unsafe { state.seq_ids(seqs, n_seqs) }?;
        let rows = |n: usize| format!("[n_seqs {n_seqs}, q_len, heads, {n}]");
        if out_elems != q_elems {
            return Err(
                Error::Length { tensor: "out", got: out_elems, expected: q_elems, layout: rows(head_dim) }.into()
            );
        }
        let lse_elems = q_elems / head_dim.max(1);
        if !lse.is_null() && lse_len != lse_elems {
            return Err(Error::Length { tensor: "lse", got: lse_len, expected: lse_elems, layout: rows(1) }.into());
        }
        let out_bytes = check_ptr(out, out_elems, es, "out")?;
        if !lse.is_null() {
            check_ptr(lse.cast(), lse_len, 4, "lse")?;
        }
        let (o, l) = {
            // SAFETY: forwarded caller contract; the slice ends with this block, before outputs are written.
            let q = unsafe { input(q, q_elems, es, "q") }?;
            let d = &decode.decode;
            match config.dtype {
                DType::F32 => run::<f32>(d, &state.cache, &ids, q)?,
                DType::F16 => run::<half::f16>(d, &state.cache, &ids, q)?,
                DType::BF16 => run::<half::bf16>(d, &state.cache, &ids, q)?,
            }
        };
        // SAFETY: `out` holds `out_bytes` writable bytes (length checked, caller contract); `o` has as many.
        unsafe { std::ptr::copy(o.as_ptr(), out.cast::<u8>(), out_bytes.min(o.len())) };
        if !lse.is_null() {
            // SAFETY: `lse` holds `lse_len` writable floats (checked above, caller contract).
            unsafe { std::ptr::copy(l.as_ptr(), lse, lse_len.min(l.len())) };
        }
        Ok(())
    })
}

fn run<T: Element>(decode: &Decode, cache: &KvCache, seqs: &[SeqId], q: &[u8]) -> Ffi<(Vec<u8>, Vec<f32>)> {
    let o = decode.run(cache, seqs, cast::<T>(q, "q")?)?;
    Ok((bytemuck::cast_slice(&o.out).to_vec(), o.lse))
}

/// Releases a decode op (NULL is a no-op).
///
/// # Safety
/// `decode` is null or a live op not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn s2attn_decode_free(decode: *mut S2attnDecode) {
    super::free(decode);
}
