//! [`CudaContext`]: one CUDA device opened through the driver API (loaded at run time), its capabilities
//! for the planner, its stream, and the compiled-kernel cache.

use super::compile::{self, KernelKey};
use crate::error::{Error, Result};
use crate::plan::DeviceCaps;
use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaFunction, CudaStream, PushKernelArg};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const S2_HOLD_SRC: &str = include_str!("../../shaders/cuda/s2_hold.cu");

/// Oldest compute capability the kernels run on: `mma.sync` with bf16, `ldmatrix` and `cp.async`.
pub const MIN_ARCH: (i32, i32) = (8, 0);

struct Inner {
    ctx: Arc<cudarc::driver::CudaContext>,
    stream: Arc<CudaStream>,
    caps: DeviceCaps,
    arch: (i32, i32),
    sms: u32,
    l2_bytes: u32,
    driver: i32,
    nvrtc: (i32, i32),
    total_mem: usize,
    kernels: Mutex<HashMap<KernelKey, CudaFunction>>,
    wait_timeout: crate::context::WaitTimeout,
}

/// A CUDA device: the driver context, the stream kernels run on, and the kernels compiled for it so far.
/// `Clone` shares it.
#[derive(Clone)]
pub struct CudaContext(Arc<Inner>);

impl std::fmt::Debug for CudaContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaContext({}, sm_{}{})", self.0.caps.name, self.0.arch.0, self.0.arch.1)
    }
}

fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

impl CudaContext {
    /// Opens device `ordinal`. Fails with [`Error::Cuda`] when the driver or NVRTC cannot be loaded or no
    /// such device exists, and with [`Error::Unsupported`] when its compute capability is below 8.0.
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: probing loads the shared library and nothing else.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no CUDA driver: libcuda could not be loaded (install the NVIDIA driver, or add the folder \
                 holding libcuda.so.1 to LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no NVRTC: libnvrtc could not be loaded (install CUDA's NVRTC, e.g. the cuda-nvrtc package or \
                 the nvidia-cuda-nvrtc wheel, and add its lib folder to LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        // cudarc panics when a library lacks an entry point it needs (a driver older than its bindings).
        std::panic::catch_unwind(|| Self::open_checked(ordinal)).unwrap_or_else(|_| {
            Err(Error::Cuda("the CUDA driver or NVRTC library lacks an entry point s2attn needs (too old?)".into()))
        })
    }

    fn open_checked(ordinal: usize) -> Result<Self> {
        cudarc::driver::result::init()
            .map_err(driver_err("cuInit (is an NVIDIA GPU present and its driver loaded?)"))?;
        let count = cudarc::driver::result::device::get_count().map_err(driver_err("cuDeviceGetCount"))?;
        if count <= 0 {
            return Err(Error::Cuda("no CUDA device: the driver loaded but reports no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::Cuda(format!("CUDA device {ordinal} requested, but only {count} present")));
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(driver_err("creating the CUDA context"))?;
        let arch = ctx.compute_capability().map_err(driver_err("reading the compute capability"))?;
        let name = ctx.name().map_err(driver_err("reading the device name"))?;
        if arch < MIN_ARCH {
            return Err(Error::Unsupported(format!(
                "{name} has compute capability {}.{}; the CUDA kernels need {}.{} or newer (mma.sync bf16, \
                 cp.async): use the wgpu backend",
                arch.0, arch.1, MIN_ARCH.0, MIN_ARCH.1
            )));
        }
        let attr = |a: Attr| ctx.attribute(a).map_err(driver_err("reading a device attribute"));
        let smem = attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let threads = attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?;
        let grid = attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?;
        let sms = attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let l2 = attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
        let total_mem = ctx.total_mem().map_err(driver_err("reading the memory size"))?;
        let mut driver = 0;
        // SAFETY: plain out-parameter.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) }
            .result()
            .map_err(driver_err("cuDriverGetVersion"))?;
        let nvrtc = compile::nvrtc_version()?;
        let caps = DeviceCaps {
            name,
            backend: "cuda".into(),
            max_workgroup_storage: smem.max(0) as u32,
            max_invocations: threads.max(0) as u32,
            max_storage_binding: total_mem as u64,
            max_buffer: total_mem as u64,
            max_dispatch: grid.max(0) as u32,
            coop_f16_16x16: true,
            shader_f16: true,
            subgroups: true,
            timestamps: true,
            loop_iteration_cap: None,
        };
        super::plan::register_arch(&caps.name, arch);
        let stream = ctx.default_stream();
        Ok(Self(Arc::new(Inner {
            ctx,
            stream,
            caps,
            arch,
            sms: sms.max(1) as u32,
            l2_bytes: l2.max(0) as u32,
            driver,
            nvrtc,
            total_mem,
            kernels: Mutex::default(),
            wait_timeout: Default::default(),
        })))
    }

    /// The planner's view of the device (shared memory per block, threads, grid limits).
    pub fn caps(&self) -> &DeviceCaps {
        &self.0.caps
    }

    /// Compute capability `(major, minor)`.
    pub fn arch(&self) -> (i32, i32) {
        self.0.arch
    }

    /// Streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.0.sms
    }

    /// The cudarc context (to allocate memory the op can read, or to wrap a stream).
    pub fn cudarc(&self) -> &Arc<cudarc::driver::CudaContext> {
        &self.0.ctx
    }

    /// The stream the op's host-slice and timing paths run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.0.stream
    }

    /// Times `iters` calls of `run` on the op stream with CUDA events, after `warmup` untimed ones: the
    /// timing loop every CUDA op shares. `what` names the op in errors.
    pub(crate) fn time_events(
        &self,
        what: &'static str,
        warmup: u32,
        iters: u32,
        mut run: impl FnMut() -> Result<()>,
    ) -> Result<crate::gpu::Timing> {
        if iters == 0 {
            return Err(Error::Shape("timing needs iters >= 1".into()));
        }
        for _ in 0..warmup {
            run()?;
        }
        let stream = self.stream();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = Vec::with_capacity(iters as usize);
        // The GPU waits while the host enqueues the iterations (a generous 100 us each), so that a call
        // shorter than its own submission is timed as the GPU runs it, not as the host feeds it.
        let hold_ns = (1_000_000 + 100_000 * iters as u64).min(200_000_000);
        self.hold(hold_ns)?;
        for _ in 0..iters {
            let start = self.0.ctx.new_event(flags).map_err(cuda_err("creating an event"))?;
            let end = self.0.ctx.new_event(flags).map_err(cuda_err("creating an event"))?;
            start.record(stream).map_err(cuda_err("recording an event"))?;
            run()?;
            end.record(stream).map_err(cuda_err("recording an event"))?;
            events.push((start, end));
        }
        self.finish(stream, what)?;
        let samples_ms = events
            .iter()
            .map(|(s, e)| s.elapsed_ms(e).map(f64::from).map_err(cuda_err("reading an event")))
            .collect::<Result<Vec<_>>>()?;
        Ok(crate::gpu::Timing { samples_ms, gpu_timestamps: true })
    }

    /// Enqueues a kernel that keeps the stream busy for `ns` nanoseconds (`shaders/cuda/s2_hold.cu`).
    pub(crate) fn hold(&self, ns: u64) -> Result<()> {
        let key = KernelKey::new("s2_hold.cu", self.arch(), &[]);
        let func = self.kernel(&key, S2_HOLD_SRC, "s2_hold", 0)?;
        let cfg = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        let mut args = self.stream().launch_builder(&func);
        args.arg(&ns);
        // SAFETY: the kernel takes one u64 by value and touches no memory.
        unsafe { args.launch(cfg) }.map_err(driver_err("launching the stream hold"))?;
        Ok(())
    }

    /// A multi-line description: device, compute capability, memory, driver, NVRTC and kernel cache.
    pub fn describe(&self) -> String {
        let i = &self.0;
        format!(
            "{} (CUDA device {}, compute capability {}.{}, {} SMs, {:.1} GiB, L2 {} MiB)\n\
             driver {}.{}, NVRTC {}.{}\n\
             shared memory per block (opt-in) {} B, threads per block {}\n\
             kernel disk cache: {}\n\
             kernels compiled by this process: {}",
            i.caps.name,
            i.ctx.ordinal(),
            i.arch.0,
            i.arch.1,
            i.sms,
            i.total_mem as f64 / (1u64 << 30) as f64,
            i.l2_bytes >> 20,
            i.driver / 1000,
            (i.driver % 1000) / 10,
            i.nvrtc.0,
            i.nvrtc.1,
            i.caps.max_workgroup_storage,
            i.caps.max_invocations,
            compile::disk_cache_status(),
            i.kernels.lock().map(|k| k.len()).unwrap_or(0),
        )
    }

    /// Blocks until all work on the op stream has finished, reporting any asynchronous error; fails with
    /// [`Error::Timeout`] past the wait timeout ([`CudaContext::set_wait_timeout`]).
    pub fn wait(&self) -> Result<()> {
        self.finish(&self.0.stream, "synchronizing the stream")
    }

    /// Sets the longest [`CudaContext::wait`] (and every call that waits for results) blocks before failing
    /// with [`Error::Timeout`]; `None` (the default unless
    /// [`ContextOptions::wait_timeout`](crate::ContextOptions::wait_timeout) set one) waits as long as it
    /// takes. The work itself goes on; a later wait waits for it. Shared by every clone of this context.
    pub fn set_wait_timeout(&self, timeout: Option<Duration>) {
        self.0.wait_timeout.set(timeout);
    }

    /// The wait timeout (see [`CudaContext::set_wait_timeout`]).
    pub fn wait_timeout(&self) -> Option<Duration> {
        self.0.wait_timeout.get()
    }

    /// Blocks until the work enqueued on `stream` so far has finished: a plain synchronize without a wait
    /// timeout, else an event polled (yielding, then sleeping up to 1 ms between queries) until it completes
    /// or the timeout passes ([`Error::Timeout`]). `what` names the work in errors.
    pub(crate) fn finish(&self, stream: &CudaStream, what: &'static str) -> Result<()> {
        let Some(timeout) = self.wait_timeout() else {
            return stream.synchronize().map_err(cuda_err(what));
        };
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let done = stream.record_event(flags).map_err(cuda_err(what))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        while !done.try_is_complete().map_err(cuda_err(what))? {
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(Error::Timeout(timeout));
            }
            if waited < Duration::from_micros(200) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause.min(timeout - waited));
                pause = (pause * 2).min(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// The kernel `key` from `source` (function `entry`), compiled for this device: from memory, else the
    /// disk cache, else NVRTC. `smem` raises the kernel's dynamic shared-memory limit.
    pub(crate) fn kernel(&self, key: &KernelKey, source: &str, entry: &str, smem: u32) -> Result<CudaFunction> {
        let mut cache = self.0.kernels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(key) {
            return Ok(f.clone());
        }
        let f = self.load(key, source, entry)?;
        if std::env::var_os("S2ATTN_CUDA_VERBOSE").is_some() {
            // Tuning aid: registers and local memory (spills) of each kernel as it is loaded.
            eprintln!(
                "s2attn: {entry} {:?}: {} registers, {} B local memory, {smem} B dynamic shared memory",
                key.defines,
                f.num_regs().unwrap_or(-1),
                f.local_size_bytes().unwrap_or(-1)
            );
        }
        // The limit covers dynamic and static bytes together: raised whenever a kernel takes dynamic bytes
        // (its static ones may push the sum past the default 48 KiB).
        if smem > 0 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(driver_err("raising the kernel's shared-memory limit"))?;
        }
        cache.insert(key.clone(), f.clone());
        Ok(f)
    }

    fn load(&self, key: &KernelKey, source: &str, entry: &str) -> Result<CudaFunction> {
        let (bin, from_disk) = compile::cubin(key, source, self.0.driver)?;
        let module = match self.0.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin)) {
            Ok(m) => m,
            Err(_) if from_disk => {
                // A cached file the driver refused (truncated, stale): drop it and compile afresh once.
                compile::evict(key, source, self.0.driver);
                let (bin, _) = compile::cubin(key, source, self.0.driver)?;
                self.0
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(bin))
                    .map_err(driver_err("loading the compiled kernel module"))?
            }
            Err(e) => return Err(driver_err("loading the compiled kernel module")(e)),
        };
        module.load_function(entry).map_err(driver_err("finding the kernel entry point"))
    }
}

/// Maps a driver error to [`Error::Cuda`], naming what was being done.
pub(crate) fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::CudaContext;
    use std::time::{Duration, Instant};

    /// The hold kernel keeps the stream busy for the time asked (the timing loop relies on it); a wait with a
    /// timeout shorter than the work on the stream fails with `Error::Timeout` while the work goes on, and a
    /// wait without one then sees it through. One test, so that no other test of this binary loads a module
    /// on the device while the timed wait runs. Skipped where no CUDA device opens.
    #[test]
    fn hold_keeps_the_stream_busy_and_a_wait_past_its_timeout_fails() {
        let Ok(ctx) = CudaContext::open(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (ctx.0.ctx.new_event(flags).expect("event"), ctx.0.ctx.new_event(flags).expect("event"));
        start.record(ctx.stream()).expect("record");
        ctx.hold(20_000_000).expect("hold");
        end.record(ctx.stream()).expect("record");
        ctx.stream().synchronize().expect("synchronize");
        let ms = start.elapsed_ms(&end).expect("elapsed");
        assert!((19.9..2000.0).contains(&ms), "a 20 ms hold took {ms} ms");

        let timeout = Duration::from_millis(5);
        ctx.set_wait_timeout(Some(timeout));
        assert_eq!(ctx.wait_timeout(), Some(timeout));
        ctx.hold(300_000_000).expect("hold");
        let t = Instant::now();
        assert_eq!(ctx.wait(), Err(crate::Error::Timeout(timeout)));
        assert!(t.elapsed() < Duration::from_millis(250), "the timed-out wait took {:?}", t.elapsed());
        ctx.set_wait_timeout(None);
        assert_eq!(ctx.wait_timeout(), None);
        ctx.wait().expect("a wait without a timeout");
        assert!(t.elapsed() >= Duration::from_millis(299), "the hold ended early: {:?}", t.elapsed());
        // A timeout longer than the work lets the wait succeed.
        ctx.set_wait_timeout(Some(Duration::from_secs(10)));
        ctx.hold(2_000_000).expect("hold");
        ctx.wait().expect("a wait within its timeout");
    }
}
