//! [`Attention`]'s CUDA embedding entry points: run an op on device memory the caller owns, as cudarc
//! buffers or raw device pointers ([`CudaTensor`]), on the caller's stream.

use super::forward::{CudaForward, CudaTensor};
use crate::error::{Error, Result};
use crate::Attention;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

impl Attention {
    /// The op's CUDA engine; an [`Error::Unsupported`] for ops planned on a wgpu context.
    pub fn cuda_forward(&self) -> Result<&CudaForward> {
        self.cuda_engine().ok_or_else(|| {
            Error::Unsupported("this op runs on wgpu, not CUDA: open the Context with Backend::Cuda".into())
        })
    }

    /// Runs on contiguous cudarc buffers the caller owns (any element type of the op's dtype's size for
    /// `q`, `k`, `v`, `out`; f32 for `lse`, `[batch, heads, seq]`), on `q`'s stream. Nothing is waited for;
    /// cudarc orders later uses of the buffers after the kernel.
    pub fn forward_cuda<T, L>(
        &self,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<L>,
    ) -> Result<()> {
        self.cuda_forward()?.forward_slices(q, k, v, out, lse)
    }

    /// Runs on raw device pointers (views into the caller's own allocations, e.g. a packed QKV buffer
    /// through [`CudaTensor::strided`]) on `stream` (`None`: the op's stream). Nothing is waited for.
    ///
    /// # Safety
    /// As [`CudaForward::forward_device`]: every pointer must address live device memory of the op's
    /// context holding the whole tensor its view describes, valid until the stream's work has finished.
    pub unsafe fn forward_cuda_raw(
        &self,
        stream: Option<&CudaStream>,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: &CudaTensor,
        lse: CUdeviceptr,
    ) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.cuda_forward()?.forward_device(stream, q, k, v, out, lse) }
    }
}
