//! The C API (`include/s2attn.h`): opaque handles for a context, a layout and an op, the forward pass on
//! host memory, status codes (one per [`Error`] variant) and a thread-local last-error message.
//!
//! Every entry point checks its pointers and sizes and runs inside `catch_unwind`, so a null pointer or a
//! wrong length is an error code and no Rust panic crosses the FFI boundary. Handles own clones of what
//! they need (a context and a layout are shared `Arc`s), so they may be freed in any order.
//!
//! The header is hand-written; keep the two in step (`tests/c/smoke.c` and `tests/c/buffers.c` call every
//! function). The KV cache and decode entry points are in [`inference`], device-resident buffers and the
//! entry points that run on them (and on caller CUDA memory) in [`buffers`].
//!
//! The crate's library is `libs2attn_capi.so` / `libs2attn_capi.a` (C programs link with `-ls2attn_capi`);
//! it calls the core crate `s2attn` through its public API.
#![warn(missing_docs)]

use s2attn::{Attention, Backend, BlockMask, Context, ContextOptions, DType, Element, Error, Layout, S2Config, Shape};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub mod buffers;
pub mod cuda;
pub mod inference;

/// A status code (`s2attn_status` in C): 0 on success, else one of the `S2ATTN_ERR_*` constants.
pub type Status = i32;

/// Success.
pub const S2ATTN_OK: Status = 0;
/// A required pointer argument was null.
pub const S2ATTN_ERR_NULL_POINTER: Status = 1;
/// An argument no Rust call sees was wrong: an unknown dtype, a misaligned pointer, a non-UTF-8 string.
pub const S2ATTN_ERR_INVALID_ARGUMENT: Status = 2;
/// The library panicked (a bug): the message says where. The handles involved stay valid to free.
pub const S2ATTN_ERR_PANIC: Status = 3;
/// [`Error::BlockSize`].
pub const S2ATTN_ERR_BLOCK_SIZE: Status = 10;
/// [`Error::LocalBlocks`].
pub const S2ATTN_ERR_LOCAL_BLOCKS: Status = 11;
/// [`Error::VertStride`].
pub const S2ATTN_ERR_VERT_STRIDE: Status = 12;
/// [`Error::HeadGroups`].
pub const S2ATTN_ERR_HEAD_GROUPS: Status = 13;
/// [`Error::DenseHeads`].
pub const S2ATTN_ERR_DENSE_HEADS: Status = 14;
/// [`Error::Mask`].
pub const S2ATTN_ERR_MASK: Status = 15;
/// [`Error::HeadDim`].
pub const S2ATTN_ERR_HEAD_DIM: Status = 16;
/// [`Error::Shape`].
pub const S2ATTN_ERR_SHAPE: Status = 17;
/// [`Error::Length`].
pub const S2ATTN_ERR_LENGTH: Status = 18;
/// [`Error::BufferTooSmall`].
pub const S2ATTN_ERR_BUFFER_TOO_SMALL: Status = 19;
/// [`Error::DType`].
pub const S2ATTN_ERR_DTYPE: Status = 20;
/// [`Error::DeviceLimit`].
pub const S2ATTN_ERR_DEVICE_LIMIT: Status = 21;
/// [`Error::NoAdapter`].
pub const S2ATTN_ERR_NO_ADAPTER: Status = 22;
/// [`Error::Device`].
pub const S2ATTN_ERR_DEVICE: Status = 23;
/// [`Error::DeviceFailed`].
pub const S2ATTN_ERR_DEVICE_FAILED: Status = 24;
/// [`Error::Shader`].
pub const S2ATTN_ERR_SHADER: Status = 25;
/// [`Error::Unsupported`].
pub const S2ATTN_ERR_UNSUPPORTED: Status = 26;
/// [`Error::Cuda`].
pub const S2ATTN_ERR_CUDA: Status = 27;
/// [`Error::UnknownSequence`].
pub const S2ATTN_ERR_UNKNOWN_SEQUENCE: Status = 28;
/// [`Error::PageTableOverflow`].
pub const S2ATTN_ERR_PAGE_TABLE_OVERFLOW: Status = 29;
/// [`Error::CacheFull`].
pub const S2ATTN_ERR_CACHE_FULL: Status = 30;
/// [`Error::Timeout`].
pub const S2ATTN_ERR_TIMEOUT: Status = 31;
/// An [`Error`] variant newer than this list (the message still says what went wrong).
pub const S2ATTN_ERR_OTHER: Status = 99;

/// `s2attn_dtype`: f32 storage.
pub const S2ATTN_F32: i32 = 0;
/// `s2attn_dtype`: IEEE half storage (`uint16_t` bit patterns on the C side).
pub const S2ATTN_F16: i32 = 1;
/// `s2attn_dtype`: bfloat16 storage (`uint16_t` bit patterns; CUDA backend only).
pub const S2ATTN_BF16: i32 = 2;

/// The code for an [`Error`].
pub fn status_of(e: &Error) -> Status {
    // A wildcard arm keeps the build green when a variant is added elsewhere; it then maps to OTHER until
    // it gets a code here and in the header.
    #[allow(unreachable_patterns)]
    match e {
        Error::BlockSize(_) => S2ATTN_ERR_BLOCK_SIZE,
        Error::LocalBlocks(_) => S2ATTN_ERR_LOCAL_BLOCKS,
        Error::VertStride(_) => S2ATTN_ERR_VERT_STRIDE,
        Error::HeadGroups { .. } => S2ATTN_ERR_HEAD_GROUPS,
        Error::DenseHeads { .. } => S2ATTN_ERR_DENSE_HEADS,
        Error::Mask(_) => S2ATTN_ERR_MASK,
        Error::HeadDim { .. } => S2ATTN_ERR_HEAD_DIM,
        Error::Shape(_) => S2ATTN_ERR_SHAPE,
        Error::Length { .. } => S2ATTN_ERR_LENGTH,
        Error::BufferTooSmall { .. } => S2ATTN_ERR_BUFFER_TOO_SMALL,
        Error::DType { .. } => S2ATTN_ERR_DTYPE,
        Error::DeviceLimit { .. } => S2ATTN_ERR_DEVICE_LIMIT,
        Error::NoAdapter(_) => S2ATTN_ERR_NO_ADAPTER,
        Error::Device(_) => S2ATTN_ERR_DEVICE,
        Error::DeviceFailed { .. } => S2ATTN_ERR_DEVICE_FAILED,
        Error::Shader { .. } => S2ATTN_ERR_SHADER,
        Error::Unsupported(_) => S2ATTN_ERR_UNSUPPORTED,
        Error::Cuda(_) => S2ATTN_ERR_CUDA,
        Error::UnknownSequence(_) => S2ATTN_ERR_UNKNOWN_SEQUENCE,
        Error::PageTableOverflow { .. } => S2ATTN_ERR_PAGE_TABLE_OVERFLOW,
        Error::CacheFull { .. } => S2ATTN_ERR_CACHE_FULL,
        Error::Timeout(_) => S2ATTN_ERR_TIMEOUT,
        _ => S2ATTN_ERR_OTHER,
    }
}

/// Why an entry point failed, before it becomes a code and a message.
enum Fail {
    Null(&'static str),
    Arg(String),
    Lib(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Lib(e)
    }
}

type Ffi<T> = std::result::Result<T, Fail>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // Never panics: a thread being torn down or a re-entrant borrow just drops the message.
    let _ = LAST_ERROR.try_with(|slot| slot.try_borrow_mut().map(|mut s| *s = c));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}

/// Runs an entry point's body: catches panics, records the message, returns the code.
fn call(body: impl FnOnce() -> Ffi<()>) -> Status {
    let (code, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (S2ATTN_OK, String::new()),
        Ok(Err(Fail::Null(what))) => (S2ATTN_ERR_NULL_POINTER, format!("{what} is a null pointer")),
        Ok(Err(Fail::Arg(m))) => (S2ATTN_ERR_INVALID_ARGUMENT, m),
        Ok(Err(Fail::Lib(e))) => (status_of(&e), e.to_string()),
        Err(payload) => {
            let m = panic_message(payload.as_ref());
            // Dropping a payload can itself panic; leak it rather than unwind out of here.
            std::mem::forget(payload);
            (S2ATTN_ERR_PANIC, format!("s2attn panicked (a bug, please report it): {m}"))
        }
    };
    set_last_error(&message);
    code
}

/// Borrows a handle.
///
/// # Safety
/// `p` is null or points to a live `T` created by this module.
unsafe fn handle<'a, T>(p: *const T, what: &'static str) -> Ffi<&'a T> {
    // SAFETY: the caller guarantees `p` is null or valid; `as_ref` checks null.
    unsafe { p.as_ref() }.ok_or(Fail::Null(what))
}

/// Checks an out-parameter and clears it, so that it reads null if the call then fails.
///
/// # Safety
/// `out` is null or points to writable storage for one pointer.
unsafe fn clear_out<T>(out: *mut *mut T, what: &'static str) -> Ffi<()> {
    if out.is_null() {
        return Err(Fail::Null(what));
    }
    // SAFETY: `out` is non-null and the caller guarantees it is writable.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(())
}

/// Boxes `value` into `out` (already checked by [`clear_out`]).
///
/// # Safety
/// As [`clear_out`], and `out` is non-null.
unsafe fn put<T>(out: *mut *mut T, value: T) {
    // SAFETY: checked non-null and writable by `clear_out` at the start of the entry point.
    unsafe { out.write(Box::into_raw(Box::new(value))) };
}

/// An optional UTF-8 C string.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn opt_str(p: *const c_char, what: &str) -> Ffi<Option<String>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(|s| Some(s.to_string())).map_err(|_| Fail::Arg(format!("{what} is not valid UTF-8")))
}

/// Checks a pointer to `len` elements of `size` bytes (aligned to `size`): non-null, aligned, and a size
/// Rust can address. Returns the length in bytes.
fn check_ptr(p: *const c_void, len: usize, size: usize, what: &'static str) -> Ffi<usize> {
    if p.is_null() {
        return Err(Fail::Null(what));
    }
    if (p as usize) % size != 0 {
        return Err(Fail::Arg(format!("{what} is not aligned to {size} bytes")));
    }
    match len.checked_mul(size) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(bytes),
        _ => Err(Fail::Arg(format!("{what}: {len} elements do not fit in memory"))),
    }
}

/// A read-only host array of `len` elements of `size` bytes, as bytes.
///
/// # Safety
/// When non-null, `p` points to `len * size` readable bytes that stay unchanged while the slice lives.
unsafe fn input<'a>(p: *const c_void, len: usize, size: usize, what: &'static str) -> Ffi<&'a [u8]> {
    let bytes = check_ptr(p, len, size, what)?;
    // SAFETY: non-null and addressable (checked above); readable for `bytes` bytes by contract.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), bytes) })
}

fn usize_of(x: u64, what: &str) -> Ffi<usize> {
    usize::try_from(x).map_err(|_| Fail::Arg(format!("{what}: {x} elements exceed the address space")))
}

fn dtype_of(code: i32) -> Ffi<DType> {
    match code {
        S2ATTN_F32 => Ok(DType::F32),
        S2ATTN_F16 => Ok(DType::F16),
        S2ATTN_BF16 => Ok(DType::BF16),
        other => Err(Fail::Arg(format!("unknown dtype {other}: use S2ATTN_F32, S2ATTN_F16 or S2ATTN_BF16"))),
    }
}

fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------------
// Errors and version
// ---------------------------------------------------------------------------------------------------------

/// The message of the last call on this thread that returned a status: empty after a success. The pointer
/// stays valid until the next s2attn call on this thread; never null.
#[no_mangle]
pub extern "C" fn s2attn_last_error() -> *const c_char {
    const EMPTY: &CStr = c"";
    LAST_ERROR.try_with(|s| s.try_borrow().map(|s| s.as_ptr()).unwrap_or(EMPTY.as_ptr())).unwrap_or(EMPTY.as_ptr())
}

/// The constant's name for a status code (`"S2ATTN_ERR_LENGTH"`); `"S2ATTN_ERR_UNKNOWN"` for other values.
/// Static storage; never null.
#[no_mangle]
pub extern "C" fn s2attn_status_name(status: Status) -> *const c_char {
    let name: &'static CStr = match status {
        S2ATTN_OK => c"S2ATTN_OK",
        S2ATTN_ERR_NULL_POINTER => c"S2ATTN_ERR_NULL_POINTER",
        S2ATTN_ERR_INVALID_ARGUMENT => c"S2ATTN_ERR_INVALID_ARGUMENT",
        S2ATTN_ERR_PANIC => c"S2ATTN_ERR_PANIC",
        S2ATTN_ERR_BLOCK_SIZE => c"S2ATTN_ERR_BLOCK_SIZE",
        S2ATTN_ERR_LOCAL_BLOCKS => c"S2ATTN_ERR_LOCAL_BLOCKS",
        S2ATTN_ERR_VERT_STRIDE => c"S2ATTN_ERR_VERT_STRIDE",
        S2ATTN_ERR_HEAD_GROUPS => c"S2ATTN_ERR_HEAD_GROUPS",
        S2ATTN_ERR_DENSE_HEADS => c"S2ATTN_ERR_DENSE_HEADS",
        S2ATTN_ERR_MASK => c"S2ATTN_ERR_MASK",
        S2ATTN_ERR_HEAD_DIM => c"S2ATTN_ERR_HEAD_DIM",
        S2ATTN_ERR_SHAPE => c"S2ATTN_ERR_SHAPE",
        S2ATTN_ERR_LENGTH => c"S2ATTN_ERR_LENGTH",
        S2ATTN_ERR_BUFFER_TOO_SMALL => c"S2ATTN_ERR_BUFFER_TOO_SMALL",
        S2ATTN_ERR_DTYPE => c"S2ATTN_ERR_DTYPE",
        S2ATTN_ERR_DEVICE_LIMIT => c"S2ATTN_ERR_DEVICE_LIMIT",
        S2ATTN_ERR_NO_ADAPTER => c"S2ATTN_ERR_NO_ADAPTER",
        S2ATTN_ERR_DEVICE => c"S2ATTN_ERR_DEVICE",
        S2ATTN_ERR_DEVICE_FAILED => c"S2ATTN_ERR_DEVICE_FAILED",
        S2ATTN_ERR_SHADER => c"S2ATTN_ERR_SHADER",
        S2ATTN_ERR_UNSUPPORTED => c"S2ATTN_ERR_UNSUPPORTED",
        S2ATTN_ERR_CUDA => c"S2ATTN_ERR_CUDA",
        S2ATTN_ERR_UNKNOWN_SEQUENCE => c"S2ATTN_ERR_UNKNOWN_SEQUENCE",
        S2ATTN_ERR_PAGE_TABLE_OVERFLOW => c"S2ATTN_ERR_PAGE_TABLE_OVERFLOW",
        S2ATTN_ERR_CACHE_FULL => c"S2ATTN_ERR_CACHE_FULL",
        S2ATTN_ERR_TIMEOUT => c"S2ATTN_ERR_TIMEOUT",
        S2ATTN_ERR_OTHER => c"S2ATTN_ERR_OTHER",
        _ => c"S2ATTN_ERR_UNKNOWN",
    };
    name.as_ptr()
}

/// The library version (`"0.1.0"`). Static storage.
#[no_mangle]
pub extern "C" fn s2attn_version() -> *const c_char {
    const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };
    VERSION.as_ptr()
}

// ---------------------------------------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------------------------------------

/// `s2attn_context`: a device, with its names kept as C strings.
pub struct S2attnContext {
    ctx: Context,
    adapter: CString,
    backend: CString,
}

fn new_context(ctx: Context) -> S2attnContext {
    let adapter = c_string(ctx.adapter_name());
    let backend = c_string(ctx.backend_name());
    S2attnContext { ctx, adapter, backend }
}

/// Opens the device the environment chooses (`S2ATTN_BACKEND`, `S2ATTN_ADAPTER`; else the best adapter).
///
/// # Safety
/// `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_create(out: *mut *mut S2attnContext) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        let ctx = new_context(Context::new()?);
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, ctx) };
        Ok(())
    })
}

/// Opens a device by backend and adapter name, ignoring the environment. `backend`: NULL or `"auto"`,
/// `"wgpu"`, `"cuda"`, or a wgpu API (`"vulkan"`, `"gl"`, `"metal"`, `"dx12"`); `adapter`: NULL or a
/// case-insensitive substring of the adapter name.
///
/// # Safety
/// `backend` and `adapter` are null or NUL-terminated; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_create_with(
    backend: *const c_char,
    adapter: *const c_char,
    out: *mut *mut S2attnContext,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded caller contract.
        let (backend, adapter) = unsafe { (opt_str(backend, "backend")?, opt_str(adapter, "adapter")?) };
        let mut options = ContextOptions { adapter, ..ContextOptions::default() };
        match backend.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("auto") => {}
            Some("wgpu") => options.backend = Backend::Wgpu,
            Some("cuda") => options.backend = Backend::Cuda,
            Some(api) => {
                s2attn::gpu::parse_backend(api)?;
                options.backend = Backend::Wgpu;
                options.wgpu_backend = Some(api.to_string());
            }
        }
        let ctx = new_context(Context::with_options(&options)?);
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, ctx) };
        Ok(())
    })
}

/// The adapter's name; valid while `ctx` lives; NULL when `ctx` is NULL.
///
/// # Safety
/// `ctx` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_adapter_name(ctx: *const S2attnContext) -> *const c_char {
    // SAFETY: caller contract.
    unsafe { ctx.as_ref() }.map_or(std::ptr::null(), |c| c.adapter.as_ptr())
}

/// The backend's name (`"vulkan"`, `"cuda"`, ...); valid while `ctx` lives; NULL when `ctx` is NULL.
///
/// # Safety
/// `ctx` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_backend_name(ctx: *const S2attnContext) -> *const c_char {
    // SAFETY: caller contract.
    unsafe { ctx.as_ref() }.map_or(std::ptr::null(), |c| c.backend.as_ptr())
}

/// Sets the longest a call on `ctx` (and on the ops and caches made from it) waits for the GPU before
/// failing with [`S2ATTN_ERR_TIMEOUT`] instead of blocking on a hung device; `seconds` <= 0 waits as long as
/// it takes (the default, unless `S2ATTN_WAIT_TIMEOUT` set one for [`s2attn_context_create`]). A NaN or
/// infinite `seconds` is [`S2ATTN_ERR_INVALID_ARGUMENT`].
///
/// # Safety
/// `ctx` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_set_wait_timeout(ctx: *const S2attnContext, seconds: f64) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let c = unsafe { handle(ctx, "ctx") }?;
        if !seconds.is_finite() {
            return Err(Fail::Arg(format!("the wait timeout must be a finite number of seconds, got {seconds}")));
        }
        // Past ~31 years a timeout is none in practice (and Duration's range is not reached).
        c.ctx.set_wait_timeout((seconds > 0.0).then(|| std::time::Duration::from_secs_f64(seconds.min(1e9))));
        Ok(())
    })
}

/// The wait timeout of `ctx` in seconds (see [`s2attn_context_set_wait_timeout`]); 0 for none or a NULL `ctx`.
///
/// # Safety
/// `ctx` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_wait_timeout(ctx: *const S2attnContext) -> f64 {
    // SAFETY: caller contract.
    unsafe { ctx.as_ref() }.and_then(|c| c.ctx.wait_timeout()).map_or(0.0, |t| t.as_secs_f64())
}

/// Releases a context (NULL is a no-op). Ops created from it keep the device alive until they are freed.
///
/// # Safety
/// `ctx` is null or a live context not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn s2attn_context_free(ctx: *mut S2attnContext) {
    free(ctx);
}

// The header promises that handles may be shared between threads.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<S2attnContext>();
    shared::<S2attnLayout>();
    shared::<S2attnOp>();
};

/// Drops a boxed handle, swallowing any panic in its destructor.
fn free<T>(p: *mut T) {
    if p.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the public free functions' contract: `p` came from `Box::into_raw` here and is freed once.
        drop(unsafe { Box::from_raw(p) })
    }));
}

// ---------------------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------------------

/// `s2attn_s2_params`: every parameter of [`S2Config`]. Booleans are 0 or non-zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct S2attnS2Params {
    /// Query heads.
    pub num_heads: u32,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: u32,
    /// Tokens per block: 16, 32, 64 or 128.
    pub block_size: u32,
    /// Causal window in blocks, counting the query's own block (>= 1).
    pub local_blocks: u32,
    /// Every `vert_stride`-th block outside the window is attended (1 = dense).
    pub vert_stride: u32,
    /// Non-zero: all sparse heads share head 0's stripes.
    pub homo_head: u32,
    /// Added to every head's stripe phase.
    pub head_sliding_offset: u32,
    /// The last `num_dense_heads` KV heads attend densely.
    pub num_dense_heads: u32,
    /// Non-zero: bidirectional with a `window_left`/`window_right` block window (`local_blocks` unused).
    pub bidirectional: u32,
    /// Bidirectional window blocks to the left, counting the query's own block.
    pub window_left: u32,
    /// Bidirectional window blocks to the right.
    pub window_right: u32,
}

impl S2attnS2Params {
    fn config(&self) -> S2Config {
        let mut c = S2Config::new(self.num_heads, self.block_size, self.local_blocks, self.vert_stride)
            .kv_heads(self.num_kv_heads)
            .homo_head(self.homo_head != 0)
            .offset(self.head_sliding_offset)
            .dense_heads(self.num_dense_heads);
        if self.bidirectional != 0 {
            c = c.bidirectional(self.window_left, self.window_right);
        }
        c
    }
}

/// Parameters as [`S2Config::new`] sets them: causal, heterogeneous heads, no GQA, no dense heads, offset 0.
#[no_mangle]
pub extern "C" fn s2attn_s2_params_init(
    num_heads: u32,
    block_size: u32,
    local_blocks: u32,
    vert_stride: u32,
) -> S2attnS2Params {
    S2attnS2Params { num_heads, num_kv_heads: num_heads, block_size, local_blocks, vert_stride, ..Default::default() }
}

/// `s2attn_layout`: a validated pattern.
pub struct S2attnLayout {
    layout: Layout,
}

/// Builds and validates an S2 layout.
///
/// # Safety
/// `params` is null or readable; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_layout_s2(params: *const S2attnS2Params, out: *mut *mut S2attnLayout) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded caller contract.
        let params = unsafe { handle(params, "params") }?;
        let layout = Layout::s2(params.config())?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, S2attnLayout { layout }) };
        Ok(())
    })
}

/// Dense attention (causal when `causal` is non-zero) as a layout.
///
/// # Safety
/// `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_layout_dense(
    num_heads: u32,
    num_kv_heads: u32,
    block_size: u32,
    causal: i32,
    out: *mut *mut S2attnLayout,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        let layout = Layout::dense(num_heads, num_kv_heads, block_size, causal != 0)?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, S2attnLayout { layout }) };
        Ok(())
    })
}

/// A custom block mask: `mask_len = mask_heads * q_blocks * kv_blocks` bytes (head-major, then row-major;
/// non-zero = attended). `mask_heads` must divide `num_heads`.
///
/// # Safety
/// `mask` is null or points to `mask_len` readable bytes; `out` is null or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn s2attn_layout_custom(
    mask: *const u8,
    mask_len: usize,
    mask_heads: u32,
    q_blocks: u32,
    kv_blocks: u32,
    block_size: u32,
    causal: i32,
    num_heads: u32,
    num_kv_heads: u32,
    out: *mut *mut S2attnLayout,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded caller contract.
        let bits = unsafe { input(mask.cast(), mask_len, 1, "mask") }?;
        let mask = BlockMask::new(
            mask_heads,
            q_blocks,
            kv_blocks,
            block_size,
            causal != 0,
            bits.iter().map(|&b| b != 0).collect(),
        )?;
        let layout = Layout::custom(mask, num_heads, num_kv_heads)?;
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, S2attnLayout { layout }) };
        Ok(())
    })
}

/// Releases a layout (NULL is a no-op). Ops built from it keep their own reference.
///
/// # Safety
/// `layout` is null or a live layout not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn s2attn_layout_free(layout: *mut S2attnLayout) {
    free(layout);
}

// ---------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------

/// `s2attn_op`: an [`Attention`] op with its element counts and explanation.
pub struct S2attnOp {
    op: Attention,
    ctx: Context,
    /// The LSE of buffer calls that want none.
    scratch: buffers::Scratch,
    q_elems: usize,
    kv_elems: usize,
    lse_elems: usize,
    explain: CString,
}

/// Plans an op for `layout` at `[batch, seq_len, heads, head_dim]` in `dtype` (`S2ATTN_F32`, ...).
/// `scale` is the softmax scale; 0 means `1/sqrt(head_dim)`.
///
/// # Safety
/// `ctx` and `layout` are null or live; `out` is null or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn s2attn_op_create(
    ctx: *const S2attnContext,
    layout: *const S2attnLayout,
    batch: u32,
    seq_len: u32,
    head_dim: u32,
    dtype: i32,
    scale: f32,
    out: *mut *mut S2attnOp,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded caller contract.
        let (ctx, layout) = unsafe { (handle(ctx, "ctx")?, handle(layout, "layout")?) };
        let mut shape = Shape::new(batch, seq_len, head_dim, dtype_of(dtype)?);
        if scale != 0.0 {
            shape = shape.with_scale(scale);
        }
        let op = Attention::new(&ctx.ctx, &layout.layout, shape)?;
        let l = &layout.layout;
        let tokens = batch as u64 * seq_len as u64;
        let q_elems = usize_of(tokens * l.num_heads() as u64 * head_dim as u64, "q")?;
        let kv_elems = usize_of(tokens * l.num_kv_heads() as u64 * head_dim as u64, "k")?;
        let lse_elems = usize_of(tokens * l.num_heads() as u64, "lse")?;
        let explain = c_string(&op.explain());
        let ctx = ctx.ctx.clone();
        // SAFETY: `out` checked by `clear_out`.
        unsafe { put(out, S2attnOp { op, ctx, scratch: Default::default(), q_elems, kv_elems, lse_elems, explain }) };
        Ok(())
    })
}

/// Element counts of the op's tensors: Q and O, K and V, LSE. Any out-pointer may be NULL.
///
/// # Safety
/// `op` is null or live; each out-pointer is null or writable.
#[no_mangle]
pub unsafe extern "C" fn s2attn_op_sizes(
    op: *const S2attnOp,
    q_elems: *mut usize,
    kv_elems: *mut usize,
    lse_elems: *mut usize,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let op = unsafe { handle(op, "op") }?;
        for (p, n) in [(q_elems, op.q_elems), (kv_elems, op.kv_elems), (lse_elems, op.lse_elems)] {
            // SAFETY: `p` is null or writable by contract; `as_mut` checks null.
            if let Some(p) = unsafe { p.as_mut() } {
                *p = n;
            }
        }
        Ok(())
    })
}

/// What will run and why (kernel, tiles); valid while `op` lives; NULL when `op` is NULL.
///
/// # Safety
/// `op` is null or live.
#[no_mangle]
pub unsafe extern "C" fn s2attn_op_explain(op: *const S2attnOp) -> *const c_char {
    // SAFETY: caller contract.
    unsafe { op.as_ref() }.map_or(std::ptr::null(), |o| o.explain.as_ptr())
}

/// Runs the op on host memory: `q` `[batch, seq, heads, head_dim]`, `k` and `v` with `num_kv_heads`, in the
/// op's dtype (f16/bf16 as `uint16_t` bits); writes `out` like `q` and, when `lse` is not NULL, the f32
/// natural-log log-sum-exp `[batch, heads, seq]`. Lengths are element counts and must equal the op's
/// (`s2attn_op_sizes`). Outputs are written only after the inputs have been read, and only on success.
///
/// # Safety
/// Each pointer is null or valid for its length (reads for inputs, writes for outputs); `op` is null or
/// live.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn s2attn_forward(
    op: *const S2attnOp,
    q: *const c_void,
    q_len: usize,
    k: *const c_void,
    k_len: usize,
    v: *const c_void,
    v_len: usize,
    out: *mut c_void,
    out_len: usize,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    call(|| {
        // SAFETY: forwarded caller contract.
        let op = unsafe { handle(op, "op") }?;
        let shape = op.op.shape();
        let es = shape.dtype.size() as usize;
        let layout = |t: &str| format!("[batch {}, seq {}, {t}]", shape.batch, shape.seq_len);
        // Lengths first: no slice is formed over a length the op does not expect.
        let lse_len = if lse.is_null() { op.lse_elems } else { lse_len };
        for (tensor, got, expected, rows) in [
            ("q", q_len, op.q_elems, "heads, head_dim"),
            ("k", k_len, op.kv_elems, "kv_heads, head_dim"),
            ("v", v_len, op.kv_elems, "kv_heads, head_dim"),
            ("out", out_len, op.q_elems, "heads, head_dim"),
            ("lse", lse_len, op.lse_elems, "heads, stored [batch, heads, seq]"),
        ] {
            if got != expected {
                return Err(Error::Length { tensor, got, expected, layout: layout(rows) }.into());
            }
        }
        let out_bytes = check_ptr(out, out_len, es, "out")?;
        if !lse.is_null() {
            check_ptr(lse.cast(), lse_len, 4, "lse")?;
        }
        let (o, l) = {
            // SAFETY: the caller guarantees each input is valid for its length; `input` checks null, alignment
            // and size. The slices end with this block, before any output is written.
            let (q, k, v) =
                unsafe { (input(q, q_len, es, "q")?, input(k, k_len, es, "k")?, input(v, v_len, es, "v")?) };
            match shape.dtype {
                DType::F32 => forward_bytes::<f32>(&op.op, q, k, v)?,
                DType::F16 => forward_bytes::<half::f16>(&op.op, q, k, v)?,
                DType::BF16 => forward_bytes::<half::bf16>(&op.op, q, k, v)?,
            }
        };
        // SAFETY: `out` holds `out_bytes` writable bytes (checked length, caller contract) and `o` has exactly
        // that many; `copy` tolerates overlap with the inputs, whose borrows have ended.
        unsafe { std::ptr::copy(o.as_ptr(), out.cast::<u8>(), out_bytes.min(o.len())) };
        if !lse.is_null() {
            // SAFETY: as for `out`, with `lse_len == op.lse_elems` floats.
            unsafe { std::ptr::copy(l.as_ptr(), lse, lse_len.min(l.len())) };
        }
        Ok(())
    })
}

/// Runs `op` on byte slices holding `T`s; returns O's bytes and the LSE.
fn forward_bytes<T: Element>(op: &Attention, q: &[u8], k: &[u8], v: &[u8]) -> Ffi<(Vec<u8>, Vec<f32>)> {
    let cast = |b, what| bytemuck::try_cast_slice::<u8, T>(b).map_err(|e| Fail::Arg(format!("{what}: {e}")));
    let o = op.forward(cast(q, "q")?, cast(k, "k")?, cast(v, "v")?)?;
    Ok((bytemuck::cast_slice(&o.out).to_vec(), o.lse))
}

/// Releases an op (NULL is a no-op).
///
/// # Safety
/// `op` is null or a live op not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn s2attn_op_free(op: *mut S2attnOp) {
    free(op);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_name() {
        let codes = [
            S2ATTN_OK,
            S2ATTN_ERR_NULL_POINTER,
            S2ATTN_ERR_INVALID_ARGUMENT,
            S2ATTN_ERR_PANIC,
            S2ATTN_ERR_BLOCK_SIZE,
            S2ATTN_ERR_LOCAL_BLOCKS,
            S2ATTN_ERR_VERT_STRIDE,
            S2ATTN_ERR_HEAD_GROUPS,
            S2ATTN_ERR_DENSE_HEADS,
            S2ATTN_ERR_MASK,
            S2ATTN_ERR_HEAD_DIM,
            S2ATTN_ERR_SHAPE,
            S2ATTN_ERR_LENGTH,
            S2ATTN_ERR_BUFFER_TOO_SMALL,
            S2ATTN_ERR_DTYPE,
            S2ATTN_ERR_DEVICE_LIMIT,
            S2ATTN_ERR_NO_ADAPTER,
            S2ATTN_ERR_DEVICE,
            S2ATTN_ERR_DEVICE_FAILED,
            S2ATTN_ERR_SHADER,
            S2ATTN_ERR_UNSUPPORTED,
            S2ATTN_ERR_CUDA,
            S2ATTN_ERR_UNKNOWN_SEQUENCE,
            S2ATTN_ERR_PAGE_TABLE_OVERFLOW,
            S2ATTN_ERR_CACHE_FULL,
            S2ATTN_ERR_TIMEOUT,
            S2ATTN_ERR_OTHER,
        ];
        let mut names = std::collections::HashSet::new();
        for c in codes {
            // SAFETY: `s2attn_status_name` returns static NUL-terminated strings.
            let name = unsafe { CStr::from_ptr(s2attn_status_name(c)) }.to_str().expect("ascii");
            assert_ne!(name, "S2ATTN_ERR_UNKNOWN", "code {c} has no name");
            assert!(names.insert(name), "{name} named twice");
        }
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let code = call(|| panic!("boom"));
        assert_eq!(code, S2ATTN_ERR_PANIC);
        // SAFETY: `s2attn_last_error` never returns null and the string is NUL-terminated.
        let msg = unsafe { CStr::from_ptr(s2attn_last_error()) }.to_string_lossy().into_owned();
        assert!(msg.contains("boom"), "{msg}");
        assert_eq!(call(|| Ok(())), S2ATTN_OK);
        // SAFETY: as above.
        assert!(unsafe { CStr::from_ptr(s2attn_last_error()) }.is_empty());
    }
}
