//! `WgpuContext`: one wgpu device (picked by the library or adopted from the embedding app), what it can do,
//! and the compiled pipelines, cached for the context's lifetime.

use super::shaders::{self, Kernel};
use crate::context::ContextOptions;
use crate::error::{Error, Result};
use crate::plan::{DType, DeviceCaps};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a device is and can do, as reported to users and used by the planner.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// wgpu's adapter description.
    pub info: wgpu::AdapterInfo,
    /// Features enabled on the device.
    pub features: wgpu::Features,
    /// The device's limits.
    pub limits: wgpu::Limits,
    /// Cooperative-matrix shapes, e.g. `16x16x16 f16->f32`.
    pub coop_shapes: Vec<String>,
    /// The planner's view.
    pub caps: DeviceCaps,
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.info;
        writeln!(f, "adapter  {} ({:?}, {:?})", i.name, i.backend, i.device_type)?;
        writeln!(f, "driver   {} {}", i.driver, i.driver_info)?;
        writeln!(
            f,
            "features f16={} subgroups={} (sizes {}..{}) timestamps={} coop=[{}]",
            self.caps.shader_f16,
            self.caps.subgroups,
            i.subgroup_min_size,
            i.subgroup_max_size,
            self.caps.timestamps,
            self.coop_shapes.join(", ")
        )?;
        write!(
            f,
            "limits   workgroup memory {} B, invocations {}, storage binding {} MiB, buffer {} MiB",
            self.caps.max_workgroup_storage,
            self.caps.max_invocations,
            self.caps.max_storage_binding >> 20,
            self.caps.max_buffer >> 20
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    shader: ShaderKey,
    constants: Vec<(&'static str, u32)>,
}

/// What a cached pipeline was compiled from: one of the crate's kernels, or WGSL text handed in by the
/// embedding code ([`WgpuContext::wgsl_pipeline`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ShaderKey {
    Kernel(Kernel, DType),
    Wgsl(String),
}

struct Inner {
    /// Kept alive with the device when the context created it.
    instance: Option<wgpu::Instance>,
    device: wgpu::Device,
    queue: wgpu::Queue,
    capabilities: Capabilities,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    /// [`WgpuContext::wait`]'s timeout.
    wait_timeout: crate::context::WaitTimeout,
}

/// A GPU device with its queue and pipeline cache. `Clone` shares it.
#[derive(Clone)]
pub struct WgpuContext(Arc<Inner>);

impl fmt::Debug for WgpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WgpuContext").field(&self.0.capabilities.info.name).finish()
    }
}

fn backend_name(b: wgpu::Backend) -> &'static str {
    match b {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        wgpu::Backend::Gl => "gl",
        wgpu::Backend::BrowserWebGpu => "webgpu",
        _ => "other",
    }
}

/// The wgpu backends a graphics API name selects (`vulkan`/`vk`, `gl`/`gles`/`opengl`, `metal`, `dx12`/`d3d12`,
/// any case), as `S2ATTN_BACKEND` and [`ContextOptions::wgpu_backend`] take them; an unknown name is
/// [`Error::NoAdapter`] listing the accepted ones.
pub fn parse_backend(name: &str) -> Result<wgpu::Backends> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "vulkan" | "vk" => wgpu::Backends::VULKAN,
        "gl" | "gles" | "opengl" => wgpu::Backends::GL,
        "metal" => wgpu::Backends::METAL,
        "dx12" | "d3d12" => wgpu::Backends::DX12,
        other => {
            return Err(Error::NoAdapter(format!(
                "unknown backend `{other}` (S2ATTN_BACKEND): use auto, cuda, wgpu, vulkan, gl, metal or dx12"
            )))
        }
    })
}

/// A one-line description of an adapter wgpu can see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Adapter name.
    pub name: String,
    /// Backend (`vulkan`, `gl`, ...).
    pub backend: String,
    /// Device type (`DiscreteGpu`, `Cpu`, ...).
    pub device_type: String,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Serialises instance creation, adapter enumeration and device opening across the process, so that threads
/// opening contexts at once (parallel tests, an app opening one context per thread) do not initialise a driver
/// concurrently. It does not make every pattern safe: on the H200's NVIDIA 580 Linux driver, parallel tests that
/// each opened, used and dropped their own pair of Vulkan devices on the one GPU still deadlocked inside the driver
/// (every thread waiting in libnvidia-eglcore; `cuda-gdb` backtraces, 2026-12-01), while the same tests sharing one
/// pair of devices pass. Open a context once and share it (`Context` is `Clone`). Held until the instance and
/// adapters that are not kept are dropped.
fn open_lock() -> std::sync::MutexGuard<'static, ()> {
    static OPEN: Mutex<()> = Mutex::new(());
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let be = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (ty, be)
}

impl WgpuContext {
    /// Every adapter wgpu can see, best first.
    pub fn adapters() -> Vec<AdapterSummary> {
        let _open = open_lock();
        let mut list = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
        list.sort_by_key(|a| rank(&a.get_info()));
        list.iter()
            .map(|a| {
                let i = a.get_info();
                AdapterSummary {
                    name: i.name,
                    backend: backend_name(i.backend).into(),
                    device_type: format!("{:?}", i.device_type),
                }
            })
            .collect()
    }

    /// Opens the best adapter matching `options` (discrete GPUs first, then integrated, then software;
    /// native APIs before GL).
    pub fn with_options(options: &ContextOptions) -> Result<Self> {
        let backends = match &options.wgpu_backend {
            Some(b) => parse_backend(b)?,
            None => wgpu::Backends::all(),
        };
        let _open = open_lock();
        // The instance must outlive the device: on GL (EGL) dropping it loses the device.
        let instance = instance();
        let mut list = pollster::block_on(instance.enumerate_adapters(backends));
        let seen: Vec<String> =
            list.iter().map(|a| format!("{} ({})", a.get_info().name, backend_name(a.get_info().backend))).collect();
        if let Some(want) = &options.adapter {
            let want = want.to_lowercase();
            list.retain(|a| a.get_info().name.to_lowercase().contains(&want));
        }
        list.sort_by_key(|a| rank(&a.get_info()));
        let Some(adapter) = list.into_iter().next() else {
            return Err(Error::NoAdapter(format!(
                "none matches adapter={:?} backend={:?}; adapters seen: [{}]{}",
                options.adapter,
                options.wgpu_backend,
                seen.join(", "),
                if seen.is_empty() {
                    " (install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers`)"
                } else {
                    ""
                }
            )));
        };
        let ctx = Self::open(instance, adapter)?;
        ctx.set_wait_timeout(options.wait_timeout);
        Ok(ctx)
    }

    fn open(instance: wgpu::Instance, adapter: wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        if let Some(version) = gl_without_compute(&info) {
            return Err(Error::Unsupported(format!(
                "{} (gl) has a GL {version} context, without compute shaders (GL 4.3 or GL ES 3.1 is needed; wgpu's GL \
                 backend on NVIDIA's Linux driver asks for GL 3.3, gfx-rs/wgpu#4751): use its Vulkan adapter",
                info.name
            )));
        }
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::SUBGROUP_BARRIER
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        let features = adapter.features() & wanted;
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: the only experimental feature enabled is cooperative matrices, which the kernels
            // use solely with the shapes the adapter lists.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let coop = adapter.cooperative_matrix_properties();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("s2attn"),
            required_features: features,
            required_limits: adapter.limits(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device(format!("{}: {e}", info.name)))?;
        let mut ctx = Self::build(info, device, queue, &coop);
        if let Some(inner) = Arc::get_mut(&mut ctx.0) {
            inner.instance = Some(instance);
        }
        Ok(ctx)
    }

    /// Adopts a device the embedding application already owns. `info` describes its adapter
    /// (`adapter.get_info()`); `coop` its cooperative-matrix shapes (`adapter.cooperative_matrix_properties()`,
    /// or empty to keep to the portable kernels).
    pub fn from_device(
        info: wgpu::AdapterInfo,
        device: wgpu::Device,
        queue: wgpu::Queue,
        coop: &[wgpu::CooperativeMatrixProperties],
    ) -> Self {
        Self::build(info, device, queue, coop)
    }

    fn build(
        info: wgpu::AdapterInfo,
        device: wgpu::Device,
        queue: wgpu::Queue,
        coop: &[wgpu::CooperativeMatrixProperties],
    ) -> Self {
        let features = device.features();
        let limits = device.limits();
        let coop_enabled = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let coop_shapes: Vec<String> = coop
            .iter()
            .map(|c| format!("{}x{}x{} {:?}->{:?}", c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type))
            .collect();
        let coop_f16_16x16 = coop_enabled
            && coop.iter().any(|c| {
                (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                    && c.ab_type == wgpu::CooperativeScalarType::F16
                    && c.cr_type == wgpu::CooperativeScalarType::F32
            });
        let caps = DeviceCaps {
            name: info.name.clone(),
            backend: backend_name(info.backend).into(),
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer: limits.max_buffer_size,
            max_dispatch: limits.max_compute_workgroups_per_dimension,
            coop_f16_16x16,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            loop_iteration_cap: is_llvmpipe(&info).then_some(crate::plan::LLVMPIPE_LOOP_CAP),
        };
        Self(Arc::new(Inner {
            instance: None,
            device,
            queue,
            capabilities: Capabilities { info, features, limits, coop_shapes, caps },
            pipelines: Mutex::default(),
            wait_timeout: Default::default(),
        }))
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.0.device
    }
    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.0.queue
    }
    /// What the device is and can do.
    pub fn capabilities(&self) -> &Capabilities {
        &self.0.capabilities
    }
    /// The planner's view of the device.
    pub fn caps(&self) -> &DeviceCaps {
        &self.0.capabilities.caps
    }
    /// Adapter name.
    pub fn adapter_name(&self) -> &str {
        &self.0.capabilities.info.name
    }
    /// Backend name (`vulkan`, `gl`, ...).
    pub fn backend_name(&self) -> &'static str {
        backend_name(self.0.capabilities.info.backend)
    }

    /// Blocks until all submitted work has finished, or fails with [`Error::Timeout`] past the wait
    /// timeout ([`WgpuContext::set_wait_timeout`]).
    pub fn wait(&self) -> Result<()> {
        let timeout = self.wait_timeout();
        match self.0.device.poll(wgpu::PollType::Wait { submission_index: None, timeout }) {
            Ok(_) => Ok(()),
            Err(wgpu::PollError::Timeout) => Err(Error::Timeout(timeout.unwrap_or_default())),
            Err(e) => Err(Error::Device(format!("waiting for the GPU: {e}"))),
        }
    }

    /// Sets the longest [`WgpuContext::wait`] (and every call that waits for results) blocks before
    /// failing with [`Error::Timeout`]; `None` (the default unless
    /// [`ContextOptions::wait_timeout`](crate::ContextOptions::wait_timeout) set one) waits as long as it
    /// takes. Shared by every clone of this context.
    pub fn set_wait_timeout(&self, timeout: Option<Duration>) {
        self.0.wait_timeout.set(timeout);
    }

    /// The wait timeout (see [`WgpuContext::set_wait_timeout`]).
    pub fn wait_timeout(&self) -> Option<Duration> {
        self.0.wait_timeout.get()
    }

    /// Maps a `MAP_READ` buffer after the queue drains and copies its first `len` bytes out.
    pub fn read_buffer(&self, buffer: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        super::read_buffer(self, buffer, len)
    }

    /// Refuses a kernel the device cannot run, naming the limit, before wgpu would fail with a bare
    /// validation error (or, for workgroup memory, build it and leave the driver to hang or fault): its
    /// storage buffers per stage, its workgroup memory, and its workgroup size (`WG`).
    fn check_kernel_limits(&self, name: &str, source: &str, constants: &[(&'static str, u32)]) -> Result<()> {
        let limits = &self.0.capabilities.limits;
        let needs = shaders::kernel_needs(name, source, constants)?;
        if needs.storage_buffers > limits.max_storage_buffers_per_shader_stage {
            return Err(Error::DeviceLimit {
                what: format!("the {name} kernel"),
                limit: "max_storage_buffers_per_shader_stage",
                needed: needs.storage_buffers as u64,
                max: limits.max_storage_buffers_per_shader_stage as u64,
            });
        }
        // wgpu does not check this one; past it, a driver may build the pipeline anyway and the kernel
        // then hangs or faults the device.
        if needs.workgroup_bytes > limits.max_compute_workgroup_storage_size as u64 {
            return Err(Error::DeviceLimit {
                what: format!("the {name} kernel's workgroup memory"),
                limit: "max_compute_workgroup_storage_size",
                needed: needs.workgroup_bytes,
                max: limits.max_compute_workgroup_storage_size as u64,
            });
        }
        if let Some(&(_, wg)) = constants.iter().find(|(name, _)| *name == "WG") {
            if wg > limits.max_compute_invocations_per_workgroup || wg > limits.max_compute_workgroup_size_x {
                return Err(Error::DeviceLimit {
                    what: format!("the {name} kernel's workgroup"),
                    limit: "max_compute_invocations_per_workgroup",
                    needed: wg as u64,
                    max: limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x) as u64,
                });
            }
        }
        Ok(())
    }

    /// The compiled pipeline for `kernel` in `dtype` with `constants` (override name, value), compiled on
    /// first use and cached.
    pub(crate) fn pipeline(
        &self,
        kernel: Kernel,
        dtype: DType,
        constants: &[(&'static str, u32)],
    ) -> Result<wgpu::ComputePipeline> {
        let key = PipelineKey { shader: ShaderKey::Kernel(kernel, dtype), constants: constants.to_vec() };
        // SAFETY: loop bounding guards against infinite loops; every loop in the crate's kernels runs
        // over a finite range fixed by the params and the tile lists before it starts.
        unsafe { self.cached_pipeline(key, kernel.name(), kernel.index_checks(), || shaders::compose(kernel, dtype)) }
    }

    /// The compute pipeline of WGSL `source` (entry point `main`) with `constants` (override name, value),
    /// compiled on first use and cached for the context's lifetime, as the crate's own kernels are: the
    /// device's limits are checked first (storage buffers per stage, workgroup memory with the constants
    /// applied, the workgroup size of an override named `WG`: [`Error::DeviceLimit`] names the one passed),
    /// index bounds checks stay on and wgpu's loop bounding is off. `name` labels the shader
    /// in errors. Code outside the crate builds its own kernels with this (the example transformer does).
    ///
    /// # Safety
    ///
    /// Without loop bounding a loop that never ends hangs the device: every loop in `source` must
    /// terminate, as for [`wgpu::Device::create_shader_module_trusted`].
    pub unsafe fn wgsl_pipeline(
        &self,
        name: &str,
        source: &str,
        constants: &[(&'static str, u32)],
    ) -> Result<wgpu::ComputePipeline> {
        let key = PipelineKey { shader: ShaderKey::Wgsl(source.to_string()), constants: constants.to_vec() };
        // SAFETY: the caller vouches that every loop of `source` terminates.
        unsafe { self.cached_pipeline(key, name, true, || Ok(source.to_string())) }
    }

    /// The pipeline cached under `key`, else compiled from `source()` and cached.
    ///
    /// # Safety
    ///
    /// Loop bounding is off: every loop in the source must terminate.
    unsafe fn cached_pipeline(
        &self,
        key: PipelineKey,
        name: &str,
        bounds_checks: bool,
        source: impl FnOnce() -> Result<String>,
    ) -> Result<wgpu::ComputePipeline> {
        let mut cache = self.0.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let source = source()?;
        let constants = &key.constants;
        self.check_kernel_limits(name, &source, constants)?;
        let device = &self.0.device;
        let scopes = ErrorScopes::push(device);
        // wgpu's default checks wrap every loop in a 64-bit iteration counter (`force_loop_bounding`),
        // which keeps drivers from unrolling the kernels' constant-trip loops (the coop kernel ran
        // 15-30% slower on the H100 with it). Bounds checks stay on; only loop bounding is off.
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = false;
        checks.bounds_checks = bounds_checks;
        let descriptor =
            wgpu::ShaderModuleDescriptor { label: Some(name), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // SAFETY: the caller guarantees that every loop in the source terminates.
        let module = unsafe { device.create_shader_module_trusted(descriptor, checks) };
        let values: Vec<(&str, f64)> = constants.iter().map(|&(k, v)| (k, v as f64)).collect();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &values,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(message) = scopes.pop() {
            return Err(Error::Shader { name: name.into(), message });
        }
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }
}

/// Error scopes for every error class wgpu reports (validation, out of memory, internal: a shader the
/// backend's compiler rejects is an *internal* error, which a validation scope alone lets through to the
/// uncaptured-error handler, and that panics).
struct ErrorScopes([wgpu::ErrorScopeGuard; 3]);

impl ErrorScopes {
    fn push(device: &wgpu::Device) -> Self {
        Self([
            device.push_error_scope(wgpu::ErrorFilter::Internal),
            device.push_error_scope(wgpu::ErrorFilter::OutOfMemory),
            device.push_error_scope(wgpu::ErrorFilter::Validation),
        ])
    }

    /// Pops the scopes (innermost first) and returns the first error any of them caught.
    fn pop(self) -> Option<String> {
        let mut first = None;
        for scope in self.0.into_iter().rev() {
            if let Some(e) = pollster::block_on(scope.pop()) {
                first.get_or_insert_with(|| e.to_string());
            }
        }
        first
    }
}

/// The context version of a GL adapter that cannot run compute shaders (desktop GL below 4.3, GL ES below 3.1),
/// read from the version string wgpu reports as `driver_info`; `None` for other backends, for versions with
/// compute, and for strings it cannot read (pipeline creation then reports the failure as `Error::Shader`).
/// Refusing here, before a device exists, keeps such a context from ever being made current.
fn gl_without_compute(info: &wgpu::AdapterInfo) -> Option<String> {
    if info.backend != wgpu::Backend::Gl {
        return None;
    }
    let text = info.driver_info.trim();
    let (es, rest) = match text.strip_prefix("OpenGL ES ") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut parts = rest.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    let needed = if es { (3, 1) } else { (4, 3) };
    ((major, minor) < needed).then(|| format!("{}{major}.{minor}", if es { "ES " } else { "" }))
}

/// Whether the adapter is Mesa's llvmpipe (lavapipe under Vulkan), whose shaders stop looping after
/// [`crate::plan::LLVMPIPE_LOOP_CAP`] iterations per invocation.
fn is_llvmpipe(info: &wgpu::AdapterInfo) -> bool {
    info.name.to_ascii_lowercase().contains("llvmpipe") || info.driver.to_ascii_lowercase().contains("llvmpipe")
}

#[cfg(test)]
mod tests {
    use super::{gl_without_compute, ContextOptions, Duration, Error, WgpuContext};

    /// Submits a kernel that keeps the device busy for a while (milliseconds on a GPU, about a second on
    /// lavapipe): 256 workgroups of 64 invocations, each 60000 dependent steps (under llvmpipe's loop cap).
    fn submit_busy_work(ctx: &WgpuContext) {
        let device = ctx.device();
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("busy"),
            source: wgpu::ShaderSource::Wgsl(
                "@group(0) @binding(0) var<storage, read_write> out: array<u32>;
                 @compute @workgroup_size(64)
                 fn main(@builtin(global_invocation_id) id: vec3<u32>) {
                     var x = id.x;
                     for (var i = 0u; i < 60000u; i++) { x = x * 1664525u + 1013904223u; }
                     out[id.x] = x;
                 }"
                .into(),
            ),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("busy"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let out = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("busy out"),
            size: 256 * 64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("busy"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[wgpu::BindGroupEntry { binding: 0, resource: out.as_entire_binding() }],
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(256, 1, 1);
        }
        ctx.queue().submit([encoder.finish()]);
    }

    #[test]
    fn a_wait_past_the_timeout_fails_with_timeout_and_the_work_still_finishes() {
        let timeout = Duration::from_micros(1);
        let options = ContextOptions { wait_timeout: Some(timeout), ..Default::default() };
        let ctx = WgpuContext::with_options(&options).expect("a wgpu adapter (lavapipe in CI)");
        assert_eq!(ctx.wait_timeout(), Some(timeout));
        submit_busy_work(&ctx);
        match ctx.wait() {
            Err(Error::Timeout(t)) => assert_eq!(t, timeout),
            other => panic!("expected a timeout after {timeout:?}, got {other:?}"),
        }
        ctx.set_wait_timeout(None);
        assert_eq!(ctx.wait_timeout(), None);
        ctx.wait().expect("the work finishes without a timeout");
    }

    fn gl(version: &str) -> wgpu::AdapterInfo {
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Other, wgpu::Backend::Gl);
        info.driver_info = version.into();
        info
    }

    #[test]
    fn gl_versions_without_compute_are_named() {
        assert_eq!(gl_without_compute(&gl("3.3.0 NVIDIA 580.159.04")).as_deref(), Some("3.3"));
        assert_eq!(gl_without_compute(&gl("4.1 Metal - 88")).as_deref(), Some("4.1"));
        assert_eq!(gl_without_compute(&gl("OpenGL ES 3.0 Mesa 22.3.6")).as_deref(), Some("ES 3.0"));
        assert_eq!(gl_without_compute(&gl("4.5 (Core Profile) Mesa 22.3.6")), None);
        assert_eq!(gl_without_compute(&gl("4.6.0 NVIDIA 580.159.04")), None);
        assert_eq!(gl_without_compute(&gl("OpenGL ES 3.2 NVIDIA 580")), None);
        assert_eq!(gl_without_compute(&gl("unreadable")), None);
        let mut vulkan = gl("1.0");
        vulkan.backend = wgpu::Backend::Vulkan;
        assert_eq!(gl_without_compute(&vulkan), None);
    }
}
