//! `Context`: the device an op runs on, on whichever backend the machine offers, and how it is chosen.
//!
//! [`Backend::Auto`] takes the CUDA backend when the crate is built with the `cuda` feature and a CUDA
//! device answers, and wgpu otherwise (falling back silently when CUDA fails to open: no driver, no
//! NVRTC, unsupported architecture).

use crate::error::{Error, Result};
use crate::gpu::{parse_backend, Capabilities, WgpuContext};
use crate::plan::DeviceCaps;
use std::fmt;

/// Which backend runs the kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Backend {
    /// CUDA if built in and present, else wgpu.
    #[default]
    Auto,
    /// WGSL through wgpu (Vulkan, Metal, DX12, GL).
    Wgpu,
    /// CUDA C through NVRTC (feature `cuda`).
    Cuda,
}

/// How to pick a device. [`ContextOptions::from_env`] reads `S2ATTN_BACKEND` (`auto`, `cuda`, `wgpu`, or a
/// wgpu API: `vulkan`, `gl`, `metal`, `dx12`), `S2ATTN_ADAPTER` (a case-insensitive substring of the
/// adapter name) and `S2ATTN_WAIT_TIMEOUT` (seconds, see [`ContextOptions::wait_timeout`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContextOptions {
    /// Backend family.
    pub backend: Backend,
    /// wgpu API to require (`vulkan`, `gl`, `metal`, `dx12`).
    pub wgpu_backend: Option<String>,
    /// Substring of the adapter name to require.
    pub adapter: Option<String>,
    /// CUDA device ordinal.
    pub cuda_device: usize,
    /// The longest a context (wgpu or CUDA) waits for the GPU to finish submitted work before a call fails
    /// with [`Error::Timeout`] instead of blocking on, e.g. on a hung device (none: wait as long as it
    /// takes). Changeable later with [`Context::set_wait_timeout`].
    pub wait_timeout: Option<std::time::Duration>,
}

impl ContextOptions {
    /// Options from `S2ATTN_BACKEND` and `S2ATTN_ADAPTER`.
    pub fn from_env() -> Result<Self> {
        let mut o = Self { adapter: std::env::var("S2ATTN_ADAPTER").ok(), ..Self::default() };
        if let Ok(t) = std::env::var("S2ATTN_WAIT_TIMEOUT") {
            o.wait_timeout = Some(parse_wait_timeout(&t)?);
        }
        if let Ok(b) = std::env::var("S2ATTN_BACKEND") {
            match b.to_ascii_lowercase().as_str() {
                "" | "auto" => {}
                "cuda" => o.backend = Backend::Cuda,
                "wgpu" => o.backend = Backend::Wgpu,
                api => {
                    parse_backend(api)?;
                    o.backend = Backend::Wgpu;
                    o.wgpu_backend = Some(api.to_string());
                }
            }
        }
        Ok(o)
    }
    /// Options for one wgpu adapter: `api` (`vulkan`, `gl`, ...) and a name substring, either optional.
    pub fn wgpu(api: Option<&str>, adapter: Option<&str>) -> Self {
        Self {
            backend: Backend::Wgpu,
            wgpu_backend: api.map(str::to_string),
            adapter: adapter.map(str::to_string),
            ..Self::default()
        }
    }
}

/// `S2ATTN_WAIT_TIMEOUT`'s value: a positive, finite number of seconds.
fn parse_wait_timeout(value: &str) -> Result<std::time::Duration> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| {
            Error::Unsupported(format!("S2ATTN_WAIT_TIMEOUT must be a positive number of seconds, got `{value}`"))
        })
}

/// A context's wait timeout, shared by its clones: nanoseconds, 0 for none.
#[derive(Debug, Default)]
pub(crate) struct WaitTimeout(std::sync::atomic::AtomicU64);

impl WaitTimeout {
    /// Sets it (`None`: wait as long as it takes).
    pub(crate) fn set(&self, timeout: Option<std::time::Duration>) {
        let ns = timeout.map_or(0, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX).max(1));
        self.0.store(ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// The timeout, if any.
    pub(crate) fn get(&self) -> Option<std::time::Duration> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ns => Some(std::time::Duration::from_nanos(ns)),
        }
    }
}

#[derive(Clone)]
enum Device {
    Wgpu(WgpuContext),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaContext),
}

/// A device to run attention on. `Clone` shares it.
#[derive(Clone)]
pub struct Context(Device);

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({} on {})", self.adapter_name(), self.backend_name())
    }
}

impl Context {
    /// Opens the device chosen by the environment ([`ContextOptions::from_env`]).
    pub fn new() -> Result<Self> {
        Self::with_options(&ContextOptions::from_env()?)
    }

    /// Opens the device `options` describe.
    pub fn with_options(options: &ContextOptions) -> Result<Self> {
        match options.backend {
            Backend::Wgpu => Ok(Self(Device::Wgpu(WgpuContext::with_options(options)?))),
            Backend::Cuda => Self::open_cuda(options),
            Backend::Auto => {
                if cfg!(feature = "cuda") && options.wgpu_backend.is_none() && options.adapter.is_none() {
                    if let Ok(ctx) = Self::open_cuda(options) {
                        return Ok(ctx);
                    }
                }
                Ok(Self(Device::Wgpu(WgpuContext::with_options(options)?)))
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn open_cuda(options: &ContextOptions) -> Result<Self> {
        let ctx = crate::cuda::CudaContext::open(options.cuda_device)?;
        ctx.set_wait_timeout(options.wait_timeout);
        Ok(Self(Device::Cuda(ctx)))
    }

    #[cfg(not(feature = "cuda"))]
    fn open_cuda(_: &ContextOptions) -> Result<Self> {
        Err(Error::Unsupported("the CUDA backend is not built in: rebuild with `--features cuda`".into()))
    }

    /// Wraps an open wgpu context.
    pub fn from_wgpu(ctx: WgpuContext) -> Self {
        Self(Device::Wgpu(ctx))
    }

    /// Adopts a wgpu device the embedding application already owns (see [`WgpuContext::from_device`]).
    pub fn from_wgpu_device(
        info: wgpu::AdapterInfo,
        device: wgpu::Device,
        queue: wgpu::Queue,
        coop: &[wgpu::CooperativeMatrixProperties],
    ) -> Self {
        Self::from_wgpu(WgpuContext::from_device(info, device, queue, coop))
    }

    /// The wgpu context, when this is a wgpu device.
    pub fn wgpu(&self) -> Option<&WgpuContext> {
        match &self.0 {
            Device::Wgpu(c) => Some(c),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => None,
        }
    }

    /// The wgpu context, or [`Error::Unsupported`] naming `what`, the operation that needs one.
    pub fn require_wgpu(&self, what: &str) -> Result<&WgpuContext> {
        self.wgpu().ok_or_else(|| {
            Error::Unsupported(format!("{what} needs a wgpu context, this one is {}", self.backend_name()))
        })
    }

    /// The CUDA context, when this is a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&crate::cuda::CudaContext> {
        match &self.0 {
            Device::Cuda(c) => Some(c),
            Device::Wgpu(_) => None,
        }
    }

    /// The backend family.
    pub fn backend(&self) -> Backend {
        match &self.0 {
            Device::Wgpu(_) => Backend::Wgpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Backend::Cuda,
        }
    }

    /// Backend name: `cuda`, or the wgpu API (`vulkan`, `gl`, `metal`, `dx12`).
    pub fn backend_name(&self) -> &'static str {
        match &self.0 {
            Device::Wgpu(c) => c.backend_name(),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => "cuda",
        }
    }

    /// Adapter or device name.
    pub fn adapter_name(&self) -> &str {
        &self.caps().name
    }

    /// The planner's view of the device.
    pub fn caps(&self) -> &DeviceCaps {
        match &self.0 {
            Device::Wgpu(c) => c.caps(),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => c.caps(),
        }
    }

    /// Whether this device has kernels for `dtype` storage: wgpu adapters run f32 and f16 everywhere (the
    /// portable kernels pack halves in 32-bit words, so no `SHADER_F16` is needed) and have no bf16 (no WGSL
    /// type); CUDA runs f16 and bf16 on tensor cores only.
    pub fn supports_dtype(&self, dtype: crate::DType) -> bool {
        match (&self.0, dtype) {
            (Device::Wgpu(_), d) => d != crate::DType::BF16,
            #[cfg(feature = "cuda")]
            (Device::Cuda(_), d) => d != crate::DType::F32,
        }
    }

    /// The full wgpu capability report, for wgpu devices.
    pub fn capabilities(&self) -> Option<&Capabilities> {
        self.wgpu().map(WgpuContext::capabilities)
    }

    /// A multi-line description of the device (name, backend, driver, features, limits).
    pub fn describe(&self) -> String {
        match &self.0 {
            Device::Wgpu(c) => c.capabilities().to_string(),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => c.describe(),
        }
    }

    /// Sets the longest a call waits for the GPU before failing with [`Error::Timeout`] (`None`: as long as
    /// it takes; see [`ContextOptions::wait_timeout`]). Shared by every clone of this context.
    pub fn set_wait_timeout(&self, timeout: Option<std::time::Duration>) {
        match &self.0 {
            Device::Wgpu(c) => c.set_wait_timeout(timeout),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => c.set_wait_timeout(timeout),
        }
    }

    /// The wait timeout (see [`Context::set_wait_timeout`]).
    pub fn wait_timeout(&self) -> Option<std::time::Duration> {
        match &self.0 {
            Device::Wgpu(c) => c.wait_timeout(),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => c.wait_timeout(),
        }
    }

    /// Blocks until all submitted work has finished ([`Error::Timeout`] past the wait timeout).
    pub fn wait(&self) -> Result<()> {
        match &self.0 {
            Device::Wgpu(c) => c.wait(),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => c.wait(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_wait_timeout;
    use std::time::Duration;

    #[test]
    fn wait_timeouts_parse_as_positive_seconds_and_anything_else_is_named() {
        assert_eq!(parse_wait_timeout("120"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_wait_timeout(" 0.5 "), Ok(Duration::from_millis(500)));
        for bad in ["", "0", "-3", "nan", "inf", "2m", "1e12"] {
            let e = parse_wait_timeout(bad).expect_err(bad).to_string();
            assert!(e.contains("S2ATTN_WAIT_TIMEOUT") && e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }
}
