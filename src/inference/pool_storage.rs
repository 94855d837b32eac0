//! Where the KV cache's page pools live: wgpu buffers, or (feature `cuda`) CUDA device memory. The page
//! planning, retention and page tables of [`super::KvCache`] are the same for both; only allocating a
//! segment's K and V pools and writing rows into them differ, which is all this file holds.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::gpu::WgpuContext;
use crate::plan::DeviceCaps;

/// The device a cache's pools are allocated on.
#[derive(Clone)]
pub(crate) enum PoolDevice {
    /// A wgpu device: pools are storage buffers the WGSL kernels bind.
    Wgpu(WgpuContext),
    /// A CUDA device: pools are device allocations the CUDA decode kernel reads.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaContext),
}

/// One segment's K and V pools.
pub(crate) enum PoolPair {
    /// wgpu storage buffers.
    Wgpu { k: wgpu::Buffer, v: wgpu::Buffer },
    /// CUDA allocations.
    #[cfg(feature = "cuda")]
    Cuda { k: cudarc::driver::CudaSlice<u8>, v: cudarc::driver::CudaSlice<u8> },
}

#[cfg(feature = "cuda")]
fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

impl PoolDevice {
    /// The device of `ctx`.
    pub(crate) fn of(ctx: &Context) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Some(c) = ctx.cuda() {
            return Ok(Self::Cuda(c.clone()));
        }
        Ok(Self::Wgpu(ctx.require_wgpu("KvCache::new")?.clone()))
    }

    /// What the device offers (binding and buffer limits size the segments).
    pub(crate) fn caps(&self) -> &DeviceCaps {
        match self {
            Self::Wgpu(c) => c.caps(),
            #[cfg(feature = "cuda")]
            Self::Cuda(c) => c.caps(),
        }
    }

    /// The wgpu device, if the pools live there.
    pub(crate) fn wgpu(&self) -> Option<&WgpuContext> {
        match self {
            Self::Wgpu(c) => Some(c),
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => None,
        }
    }

    /// The CUDA device, if the pools live there.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Option<&crate::cuda::CudaContext> {
        match self {
            Self::Cuda(c) => Some(c),
            Self::Wgpu(_) => None,
        }
    }

    /// K and V pools of `bytes` each for every segment; a failed allocation is a [`Error::Device`].
    pub(crate) fn alloc(&self, sizes: impl Iterator<Item = u64>) -> Result<Vec<PoolPair>> {
        match self {
            Self::Wgpu(ctx) => {
                let device = ctx.device();
                let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let mut total = 0;
                let pairs: Vec<PoolPair> = sizes
                    .map(|size| {
                        total += 2 * size;
                        let pool = |label| {
                            device.create_buffer(&wgpu::BufferDescriptor {
                                label: Some(label),
                                size,
                                usage: wgpu::BufferUsages::STORAGE
                                    | wgpu::BufferUsages::COPY_DST
                                    | wgpu::BufferUsages::COPY_SRC,
                                mapped_at_creation: false,
                            })
                        };
                        PoolPair::Wgpu { k: pool("s2attn kv cache K"), v: pool("s2attn kv cache V") }
                    })
                    .collect();
                if let Some(e) = pollster::block_on(scope.pop()) {
                    return Err(Error::Device(format!("allocating a KV cache of {total} bytes: {e}")));
                }
                Ok(pairs)
            }
            #[cfg(feature = "cuda")]
            Self::Cuda(ctx) => {
                let stream = ctx.stream();
                sizes
                    .map(|size| {
                        let n = size.max(16) as usize;
                        let alloc = || stream.alloc_zeros::<u8>(n).map_err(cuda_err("allocating a KV cache pool"));
                        Ok(PoolPair::Cuda { k: alloc()?, v: alloc()? })
                    })
                    .collect()
            }
        }
    }

    /// Writes `k` and `v` bytes at byte `at` of the pair's K and V pools.
    pub(crate) fn write(&self, pair: &mut PoolPair, at: u64, k: &[u8], v: &[u8]) -> Result<()> {
        match (self, pair) {
            (Self::Wgpu(ctx), PoolPair::Wgpu { k: kb, v: vb }) => {
                ctx.queue().write_buffer(kb, at, k);
                ctx.queue().write_buffer(vb, at, v);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Self::Cuda(ctx), PoolPair::Cuda { k: kb, v: vb }) => {
                let stream = ctx.stream();
                let at = at as usize;
                for (dst, src) in [(kb, k), (vb, v)] {
                    let mut view = dst.slice_mut(at..at + src.len());
                    stream.memcpy_htod(src, &mut view).map_err(cuda_err("writing KV rows to the device"))?;
                }
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::Device("KV pool on another device than its cache".into())),
        }
    }

    /// Hands staged writes to the device and waits (bounds the staging memory of long appends).
    pub(crate) fn flush(&self) -> Result<()> {
        match self {
            Self::Wgpu(ctx) => {
                ctx.queue().submit([]);
                ctx.wait()
            }
            #[cfg(feature = "cuda")]
            Self::Cuda(ctx) => ctx.wait(),
        }
    }
}

impl PoolPair {
    /// The wgpu buffers (K, V), if the pools live there.
    pub(crate) fn wgpu(&self) -> Option<(&wgpu::Buffer, &wgpu::Buffer)> {
        match self {
            Self::Wgpu { k, v } => Some((k, v)),
            #[cfg(feature = "cuda")]
            Self::Cuda { .. } => None,
        }
    }

    /// The CUDA allocations (K, V), if the pools live there.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Option<(&cudarc::driver::CudaSlice<u8>, &cudarc::driver::CudaSlice<u8>)> {
        match self {
            Self::Cuda { k, v } => Some((k, v)),
            Self::Wgpu { .. } => None,
        }
    }

    /// The CUDA allocations (K, V) for writing, if the pools live there.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_mut(
        &mut self,
    ) -> Option<(&mut cudarc::driver::CudaSlice<u8>, &mut cudarc::driver::CudaSlice<u8>)> {
        match self {
            Self::Cuda { k, v } => Some((k, v)),
            Self::Wgpu { .. } => None,
        }
    }

    /// Bytes of the K pool.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Self::Wgpu { k, .. } => k.size(),
            #[cfg(feature = "cuda")]
            Self::Cuda { k, .. } => k.len() as u64,
        }
    }
}
