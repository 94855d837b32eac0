//! The C API's device-resident buffers (`s2attn_buffer`: a wgpu buffer on a context's device, written and
//! read from host memory) and the entry points that run on them without a host round trip: the forward
//! pass, KV-cache appends and decode steps reading and writing buffer views at element offsets and token
//! strides (Q/K/V interleaved in one QKV buffer work as they are). Each call records its passes, submits
//! and returns; `s2attn_buffer_read` and `s2attn_context_synchronize` wait for the device (`cuda.rs` has
//! the same on caller CUDA memory). Same conventions as the parent module: pointers, sizes and devices
//! checked, panics caught, a status per call.

use super::inference::{S2attnDecode, S2attnKvCache};
use super::{call, check_ptr, clear_out, handle, put, Fail, Ffi, S2attnContext, S2attnOp, Status};
use s2attn::gpu::{TensorView, WgpuContext};
use s2attn::Error;
use std::ffi::c_void;
use std::sync::Mutex;

/// `s2attn_buffer`: a storage buffer on one wgpu device.
pub struct S2attnBuffer {
    gpu: WgpuContext,
    buffer: wgpu::Buffer,
}

/// `s2attn_tensor_view`: a tensor in a buffer, `offset` elements in, consecutive tokens `token_stride`
/// elements apart (0: contiguous). Offsets and strides are multiples of 4 elements.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct S2attnTensorView {
    /// The buffer holding the tensor.
    pub buffer: *const S2attnBuffer,
    /// First element, in elements of the op's dtype.
    pub offset: u64,
    /// Elements from one token to the next; 0 means contiguous.
    pub token_stride: u64,
}

/// A lazily made scratch buffer for an LSE the caller does not want, grown as needed and reused.
#[derive(Default)]
pub(super) struct Scratch(Mutex<Option<wgpu::Buffer>>);

impl Scratch {
    fn get(&self, gpu: &WgpuContext, bytes: u64) -> wgpu::Buffer {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                let b = gpu.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some("s2attn C API lse scratch"),
                    size: bytes.next_multiple_of(4).max(16),
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                });
                *slot = Some(b.clone());
                b
            }
        }
    }
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<S2attnBuffer>();
};

/// Creates a buffer of `bytes` bytes (a positive multiple of 4) on `ctx`'s device, zero-filled.
///
/// # Safety
/// `ctx` is null or live; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_buffer_create(
    ctx: *const S2attnContext,
    bytes: u64,
    out: *mut *mut S2attnBuffer,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded caller contract.
        let ctx = unsafe { handle(ctx, "ctx") }?;
        let gpu = ctx.ctx.require_wgpu("s2attn_buffer_create (use s2attn_forward_cuda on a CUDA context)")?;
        if bytes == 0 || bytes % 4 != 0 {
            return Err(Fail::Arg(format!("buffer size {bytes}: a positive multiple of 4 bytes")));
        }
        let max = gpu.caps().max_buffer;
        if bytes > max {
            let what = format!("a buffer of {bytes} bytes");
            return Err(Error::DeviceLimit { what, limit: "max_buffer_size", needed: bytes, max }.into());
        }
        let buffer = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("s2attn C API buffer"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, S2attnBuffer { gpu: gpu.clone(), buffer }) };
        Ok(())
    })
}

/// The buffer's size in bytes; 0 when `buffer` is NULL.
///
/// # Safety
/// `buffer` is null or live.
#[no_mangle]
pub unsafe extern "C" fn s2attn_buffer_size(buffer: *const S2attnBuffer) -> u64 {
    // SAFETY: caller contract.
    unsafe { buffer.as_ref() }.map_or(0, |b| b.buffer.size())
}

/// Checks `[offset, offset + bytes)` lies in the buffer and both are multiples of 4.
fn check_range(b: &S2attnBuffer, offset: u64, bytes: usize) -> Ffi<()> {
    let size = b.buffer.size();
    if offset % 4 != 0 || bytes % 4 != 0 {
        return Err(Fail::Arg(format!("offset {offset} and size {bytes}: buffer copies move multiples of 4 bytes")));
    }
    match offset.checked_add(bytes as u64) {
        Some(end) if end <= size => Ok(()),
        _ => {
            Err(Error::BufferTooSmall { tensor: "buffer", got: size, needed: offset.saturating_add(bytes as u64) }
                .into())
        }
    }
}

/// Copies `bytes` bytes from host `data` into the buffer at byte `offset` (both multiples of 4). The data
/// is taken at once (`data` may be reused on return) and lands before the next submitted call.
///
/// # Safety
/// `buffer` is null or live; `data` is null or readable for `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn s2attn_buffer_write(
    buffer: *const S2attnBuffer,
    offset: u64,
    data: *const c_void,
    bytes: usize,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let b = unsafe { handle(buffer, "buffer") }?;
        check_range(b, offset, bytes)?;
        // SAFETY: forwarded caller contract; `input` checks null and size.
        let src = unsafe { super::input(data, bytes, 1, "data") }?;
        if !src.is_empty() {
            b.gpu.queue().write_buffer(&b.buffer, offset, src);
        }
        Ok(())
    })
}

/// Copies `bytes` bytes of the buffer from byte `offset` (both multiples of 4) into host `data`, after
/// all work submitted so far has finished (blocks).
///
/// # Safety
/// `buffer` is null or live; `data` is null or writable for `bytes` bytes.
#[no_mangle]
pub unsafe extern "C" fn s2attn_buffer_read(
    buffer: *const S2attnBuffer,
    offset: u64,
    data: *mut c_void,
    bytes: usize,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let b = unsafe { handle(buffer, "buffer") }?;
        check_range(b, offset, bytes)?;
        check_ptr(data, bytes, 1, "data")?;
        if bytes == 0 {
            return Ok(());
        }
        let staging = b.gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("s2attn C API readback"),
            size: bytes as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = b.gpu.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&b.buffer, offset, &staging, 0, bytes as u64);
        b.gpu.queue().submit([encoder.finish()]);
        let host = b.gpu.read_buffer(&staging, bytes as u64)?;
        // SAFETY: `data` is non-null (checked) and writable for `bytes` bytes by contract; `host` has that many.
        unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), data.cast::<u8>(), bytes.min(host.len())) };
        Ok(())
    })
}

/// Releases a buffer (NULL is a no-op). Work already submitted on it completes first.
///
/// # Safety
/// `buffer` is null or a live buffer not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn s2attn_buffer_free(buffer: *mut S2attnBuffer) {
    super::free(buffer);
}

/// Blocks until all work submitted on `ctx`'s device (wgpu or CUDA) has finished.
///
/// # Safety
/// `ctx` is null or live.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_synchronize(ctx: *const S2attnContext) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let ctx = unsafe { handle(ctx, "ctx") }?;
        Ok(ctx.ctx.wait()?)
    })
}

/// Borrows a view's buffer, checking it lives on `device`.
///
/// # Safety
/// `view` is null or readable; its buffer is null or live.
unsafe fn view<'a>(view: *const S2attnTensorView, device: &wgpu::Device, what: &'static str) -> Ffi<TensorView<'a>> {
    // SAFETY: forwarded caller contract.
    let v = unsafe { handle(view, what) }?;
    // SAFETY: forwarded caller contract.
    let b = unsafe { handle(v.buffer, what) }?;
    same_device(b, device, what)?;
    let stride = (v.token_stride != 0).then_some(v.token_stride);
    Ok(TensorView { buffer: &b.buffer, offset: v.offset, token_stride: stride })
}

fn same_device(b: &S2attnBuffer, device: &wgpu::Device, what: &str) -> Ffi<()> {
    if b.gpu.device() != device {
        return Err(Fail::Arg(format!("{what}: the buffer lives on another device than the op")));
    }
    Ok(())
}

/// The LSE destination: the caller's buffer at element `offset` (holding `elems` floats from there), or
/// the scratch.
///
/// # Safety
/// `lse` is null or live.
unsafe fn lse_target(
    lse: *const S2attnBuffer,
    offset: u64,
    gpu: &WgpuContext,
    scratch: &Scratch,
    elems: u64,
) -> Ffi<(wgpu::Buffer, u64)> {
    // SAFETY: forwarded caller contract.
    match unsafe { lse.as_ref() } {
        Some(b) => {
            same_device(b, gpu.device(), "lse")?;
            let needed = offset.saturating_add(elems).saturating_mul(4);
            if b.buffer.size() < needed {
                return Err(Error::BufferTooSmall { tensor: "lse", got: b.buffer.size(), needed }.into());
            }
            Ok((b.buffer.clone(), offset))
        }
        None => Ok((scratch.get(gpu, elems * 4), 0)),
    }
}

/// Runs the op on device buffers: `q`, `k`, `v`, `out` views in the op's dtype (`[batch, seq, heads,
/// head_dim]` rows; K and V share a token stride), the f32 LSE `[batch, heads, seq]` into `lse` from
/// element `lse_offset` (NULL: not wanted). Records, submits and returns without waiting. Views that do
/// not fit their buffers, misaligned offsets and buffers of another device are status codes.
///
/// # Safety
/// `op` is null or live; each view is null or readable with a null or live buffer; `lse` is null or live.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn s2attn_forward_buffers(
    op: *const S2attnOp,
    q: *const S2attnTensorView,
    k: *const S2attnTensorView,
    v: *const S2attnTensorView,
    out: *const S2attnTensorView,
    lse: *const S2attnBuffer,
    lse_offset: u64,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let op = unsafe { handle(op, "op") }?;
        let gpu = op.ctx.require_wgpu("s2attn_forward_buffers (use s2attn_forward_cuda on a CUDA context)")?;
        let device = gpu.device();
        // SAFETY: forwarded caller contract.
        let (q, k, v, o) =
            unsafe { (view(q, device, "q")?, view(k, device, "k")?, view(v, device, "v")?, view(out, device, "out")?) };
        // SAFETY: forwarded caller contract.
        let (lse, lse_at) = unsafe { lse_target(lse, lse_offset, gpu, &op.scratch, op.lse_elems as u64) }?;
        let mut encoder = device.create_command_encoder(&Default::default());
        op.op.encode(&mut encoder, &q, &k, &v, &o, (&lse, lse_at))?;
        gpu.queue().submit([encoder.finish()]);
        Ok(())
    })
}

/// Appends `tokens` tokens to `seq` from device buffers: `k` and `v` views of `[tokens, kv_heads,
/// head_dim]` rows in the cache's dtype (e.g. the K and V columns of an interleaved QKV buffer; offsets
/// and strides whole 32-bit words). Submits and returns; changes nothing when it fails.
///
/// # Safety
/// `cache` is null or live; each view is null or readable with a null or live buffer.
#[no_mangle]
pub unsafe extern "C" fn s2attn_kv_cache_append_buffers(
    cache: *const S2attnKvCache,
    seq: u64,
    k: *const S2attnTensorView,
    v: *const S2attnTensorView,
    tokens: u32,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let cache = unsafe { handle(cache, "cache") }?;
        let mut state = cache.lock();
        let id = state.seq(seq)?;
        let gpu = cache.ctx.require_wgpu("the buffer entry points")?.clone();
        // SAFETY: forwarded caller contract.
        let (k, v) = unsafe { (view(k, gpu.device(), "k")?, view(v, gpu.device(), "v")?) };
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        state.cache.append_encoded(&mut encoder, id, &k, &v, tokens)?;
        gpu.queue().submit([encoder.finish()]);
        Ok(())
    })
}

/// One decode step on device buffers: the last `q_len` tokens of each of the `n_seqs` sequences `seqs`
/// attend their cached history; `q` and `out` are views of `[n_seqs, q_len, heads, head_dim]` rows in
/// the cache's dtype (a strided `q` may be the Q columns of a QKV buffer), the f32 LSE `[n_seqs, heads,
/// q_len]` goes into `lse` from element `lse_offset` (NULL: not wanted). Submits and returns.
///
/// # Safety
/// Handles are null or live; `seqs` is null or valid for `n_seqs` ids; each view is null or readable with
/// a null or live buffer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn s2attn_decode_run_buffers(
    decode: *const S2attnDecode,
    cache: *const S2attnKvCache,
    seqs: *const u64,
    n_seqs: usize,
    q_len: u32,
    q: *const S2attnTensorView,
    out: *const S2attnTensorView,
    lse: *const S2attnBuffer,
    lse_offset: u64,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let (decode, cache) = unsafe { (handle(decode, "decode")?, handle(cache, "cache")?) };
        let state = cache.lock();
        // SAFETY: forwarded caller contract.
        let ids = unsafe { state.seq_ids(seqs, n_seqs) }?;
        let gpu = cache.ctx.require_wgpu("the buffer entry points")?.clone();
        // SAFETY: forwarded caller contract.
        let (q, o) = unsafe { (view(q, gpu.device(), "q")?, view(out, gpu.device(), "out")?) };
        let heads = state.cache.layout().num_heads() as u64;
        let elems = n_seqs as u64 * q_len as u64 * heads;
        // SAFETY: forwarded caller contract.
        let (lse, lse_at) = unsafe { lse_target(lse, lse_offset, &gpu, &decode.scratch, elems) }?;
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        decode.decode.encode(&mut encoder, &state.cache, &ids, q_len, &q, &o, (&lse, lse_at))?;
        gpu.queue().submit([encoder.finish()]);
        Ok(())
    })
}
