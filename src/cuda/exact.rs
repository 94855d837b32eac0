//! Non-finite inputs on the CUDA backend: the tensor-core kernels (`s2_forward.cu`, `s2_backward.cu`) set a
//! device flag in their epilogues when anything they write is non-finite, and the exact kernels
//! (`shaders/cuda/s2_exact.cu`, scalar f32) launched after them on every call redo the whole op when the
//! flag is set, giving what IEEE softmax attention gives (as the portable WGSL kernels do). With the flag
//! clear an op costs one 4-byte memset and one launch of a small grid that returns at once.
//!
//! The flag is per stream (allocated on a stream's first call), so that ops of one plan running on
//! different streams cannot clear each other's flag between a tensor-core kernel and its redo.

use super::compile::KernelKey;
use super::context::{cuda_err, CudaContext};
use crate::error::{Error, Result};
use crate::plan::{DType, Shape};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Mutex;

/// The exact kernels' source.
const S2_EXACT_SRC: &str = include_str!("../../shaders/cuda/s2_exact.cu");

/// Warps per CTA of the exact kernels (`EXACT_WARPS` in `s2_exact.cu`).
const EXACT_WARPS: u32 = 8;
/// CTAs per SM of the exact kernels' grid.
const EXACT_CTAS_PER_SM: u32 = 2;

/// The exact kernels' parameter block; mirrors `struct ExactParams` in `shaders/cuda/s2_exact.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ExactParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub d_o: u64,
    pub out: u64,
    pub out_lse: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub lse: u64,
    pub lse2: u64,
    pub delta: u64,
    pub row_ptr: u64,
    pub row_entries: u64,
    pub col_ptr: u64,
    pub col_entries: u64,
    pub flag: u64,
    pub q_tok: i64,
    pub q_batch: i64,
    pub kv_tok: i64,
    pub kv_batch: i64,
    pub o_tok: i64,
    pub o_batch: i64,
    pub lse_batch: i64,
    pub batch: u32,
    pub seq_len: u32,
    pub seq_pad: u32,
    pub num_heads: u32,
    pub kv_group: u32,
    pub heads_per_pattern: u32,
    pub q_tiles: u32,
    pub tile_q: u32,
    pub kv_blocks: u32,
    pub col_tile: u32,
    pub block_size: u32,
    pub causal: u32,
    pub scale_log2: f32,
    pub scale: f32,
}

// SAFETY: plain-old-data with the C layout the kernels declare.
unsafe impl DeviceRepr for ExactParams {}

/// Which exact kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// `s2_exact_forward`: O and LSE.
    Forward,
    /// `s2_exact_backward`: dQ, dK and dV.
    Backward,
}

/// One op's exact kernel and its per-stream flags.
pub(crate) struct Exact {
    func: CudaFunction,
    blocks: u32,
    ctx: CudaContext,
    /// (stream handle, flag address, flag) for every stream the op has run on; the op's own stream's first.
    flags: Mutex<Vec<(usize, CUdeviceptr, CudaSlice<u32>)>>,
}

impl Exact {
    /// Compiles (or fetches) the exact kernel of `pass` for `shape`'s head dim and dtype.
    pub(crate) fn new(ctx: &CudaContext, shape: &Shape, pass: Pass) -> Result<Self> {
        let bf16 = match shape.dtype {
            DType::F16 => 0,
            DType::BF16 => 1,
            DType::F32 => return Err(Error::Unsupported("f32 has no CUDA kernel".into())),
        };
        let (which, entry) = match pass {
            Pass::Forward => (0, "s2_exact_forward"),
            Pass::Backward => (1, "s2_exact_backward"),
        };
        let defines = [("HEAD_DIM", shape.head_dim as i64), ("IS_BF16", bf16), ("EXACT_PASS", which)];
        let key = KernelKey::new("s2_exact.cu", ctx.arch(), &defines);
        let func = ctx.kernel(&key, S2_EXACT_SRC, entry, 0)?;
        let own = ctx.stream();
        let flag = Self::alloc_flag(ctx)?;
        Ok(Self {
            func,
            blocks: EXACT_CTAS_PER_SM * ctx.multiprocessors().max(1),
            ctx: ctx.clone(),
            flags: Mutex::new(vec![(own.cu_stream() as usize, flag.0, flag.1)]),
        })
    }

    /// A zeroed flag, allocated on the op's stream and ready for any stream once this returns.
    fn alloc_flag(ctx: &CudaContext) -> Result<(CUdeviceptr, CudaSlice<u32>)> {
        let own = ctx.stream();
        let f = own.alloc_zeros::<u32>(1).map_err(cuda_err("allocating the non-finite flag"))?;
        own.synchronize().map_err(cuda_err("allocating the non-finite flag"))?;
        let ptr = f.device_ptr(own).0;
        Ok((ptr, f))
    }

    /// Clears `stream`'s flag on the stream, before the op's tensor-core kernels, and returns its address. The
    /// op's own stream's flag exists from the start; another stream's is allocated (and waited for) on its
    /// first call.
    pub(crate) fn clear(&self, stream: &CudaStream) -> Result<CUdeviceptr> {
        let id = stream.cu_stream() as usize;
        let mut flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = match flags.iter().find(|(s, _, _)| *s == id) {
            Some((_, ptr, _)) => *ptr,
            None => {
                let (ptr, f) = Self::alloc_flag(&self.ctx)?;
                flags.push((id, ptr, f));
                ptr
            }
        };
        // SAFETY: `ptr` addresses the 4-byte flag, owned by `self`; the memset is ordered on `stream`.
        let r = unsafe { cudarc::driver::sys::cuMemsetD32Async(ptr, 0, 1, stream.cu_stream()) };
        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Cuda(format!("clearing the non-finite flag: {r:?}")));
        }
        Ok(ptr)
    }

    /// Launches the exact kernel on `stream` after the tensor-core kernels: it returns at once unless their
    /// epilogues set `p.flag`, and otherwise recomputes every output `p` addresses.
    ///
    /// # Safety
    /// `p` must address live device buffers of this context sized for the op's shape, and `p.flag` the
    /// flag [`Exact::clear`] returned for `stream`.
    pub(crate) unsafe fn launch(&self, stream: &CudaStream, p: &ExactParams) -> Result<()> {
        let cfg =
            LaunchConfig { grid_dim: (self.blocks, 1, 1), block_dim: (EXACT_WARPS * 32, 1, 1), shared_mem_bytes: 0 };
        let mut args = stream.launch_builder(&self.func);
        args.arg(p);
        // SAFETY: forwarded to the caller; the launch shape matches the kernel's compile-time configuration.
        unsafe { args.launch(cfg) }.map_err(cuda_err("launching the exact CUDA kernel"))?;
        Ok(())
    }
}
