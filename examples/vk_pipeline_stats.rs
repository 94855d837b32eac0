//! The driver's own statistics (registers, local memory / stack, shared memory, ...) of every WGSL kernel
//! variant the planner would run for one problem, read through `VK_KHR_pipeline_executable_properties`
//! on a raw Vulkan device (ash). This file owns that tool; shaders/NOTES-coop.md ("Pipeline statistics")
//! records what it measured.
//!
//! For each variant (coop forward v3 at its default tile, v4, v5 and v7 (v7 with `S2ATTN_COOP_STRAIGHT` as
//! set), `S2ATTN_COOP_FWD`; the coop dQ pass; the
//! coop dK/dV kernel v2, v3, v4, v5 and v5-recompute, `S2ATTN_BWD_DKDV`; the portable kernels last) it takes
//! the planner's (source, override constants) from `s2attn::gpu::planned_pipelines` and produces the
//! SPIR-V wgpu 30 would on Vulkan: naga parse + validate, override constants resolved for the entry point
//! (naga's pipeline-constants pass, as wgpu-hal does), naga's SPIR-V backend with wgpu-hal's options as
//! src/gpu/context.rs adjusts them (no loop bounding, no workgroup zero-initialisation, no index clamps in
//! the coop kernels; the integer-division checks of `ShaderRuntimeChecks::checked`). It then builds each
//! compute pipeline with `VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR` and prints every executable's
//! statistics as one table, plus one JSON object per executable with `--json FILE`. `--dump DIR` also
//! asks for the executables' internal representations (whatever text or binary the driver offers) and
//! writes them and each pipeline's pipeline-cache blob (`vkGetPipelineCacheData`, where a driver keeps its
//! compiled code) under DIR, for reading the machine code with the vendor's disassembler.
//!
//! ```text
//! cargo run --release --example vk_pipeline_stats -- [--json FILE] [--spv DIR] [--dump DIR] [--device N]
//!     [--seq 65536] [--heads 32] [--kv-heads 32] [--head-dim 128] [--block 64] [--local 16] [--stride 16]
//!     [--only TEXT[,TEXT..]]
//! ```
//!
//! `--only TEXT[,TEXT..]` keeps the variants whose label contains one of the TEXTs (e.g. `forward v7,dQ`).
//!
//! The tool sets `S2ATTN_COOP_FWD` and `S2ATTN_BWD_DKDV` itself, one variant at a time; the tile variables
//! (`S2ATTN_TILE`, `S2ATTN_BWD_DQ_TILE`, `S2ATTN_BWD_DKDV_TILE`) are honoured as the planner honours them.
//! The planner is asked as for a device with 16x16x16 f16 cooperative matrices and 32-wide subgroups
//! with barriers (the coop kernels' requirements) and this device's workgroup limits; on a device without
//! `VK_KHR_cooperative_matrix` (lavapipe) the coop kernels' SPIR-V is still written and checked, their
//! pipelines are skipped with a note. The pipeline layout is the one wgpu's automatic layout derives (every
//! buffer binding of the module, compute stage). Differences from wgpu that do not change the compute
//! code: portable kernels' buffer accesses are clamped by naga unless the device has robustBufferAccess2
//! (as wgpu-hal decides), and the device enables only the features the kernels need.

use ash::vk;
use s2attn::gpu::shaders::Kernel;
use s2attn::plan::{DeviceCaps, DispatchPlan, SubgroupInfo};
use s2attn::{DType, Layout, S2Config, Shape};
use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io::Write;

type Res<T> = std::result::Result<T, String>;

/// The problem: the paper shape by default.
struct Problem {
    seq: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    block: u32,
    local: u32,
    stride: u32,
}

struct Args {
    problem: Problem,
    json: Option<String>,
    spv: Option<String>,
    dump: Option<String>,
    device: Option<usize>,
    only: Option<String>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        problem: Problem { seq: 65536, heads: 32, kv_heads: 32, head_dim: 128, block: 64, local: 16, stride: 16 },
        json: None,
        spv: None,
        dump: None,
        device: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u32>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--json" => a.json = Some(value()?),
            "--spv" => a.spv = Some(value()?),
            "--dump" => a.dump = Some(value()?),
            "--device" => a.device = Some(num(value()?)? as usize),
            "--only" => a.only = Some(value()?),
            "--seq" => a.problem.seq = num(value()?)?,
            "--heads" => a.problem.heads = num(value()?)?,
            "--kv-heads" => a.problem.kv_heads = num(value()?)?,
            "--head-dim" => a.problem.head_dim = num(value()?)?,
            "--block" => a.problem.block = num(value()?)?,
            "--local" => a.problem.local = num(value()?)?,
            "--stride" => a.problem.stride = num(value()?)?,
            "-h" | "--help" => {
                println!("{}", USAGE);
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(a)
}

const USAGE: &str =
    "vk_pipeline_stats [--json FILE] [--spv DIR] [--dump DIR] [--device N] [--seq N] [--heads N] [--kv-heads N] \
                     [--head-dim N] [--block N] [--local N] [--stride N] [--only TEXT[,TEXT..]]";

/// One pipeline to build: a label, the planner's pass and its inputs.
struct Variant {
    label: String,
    kernel: Kernel,
    plan: DispatchPlan,
    source: String,
    constants: Vec<(&'static str, u32)>,
}

/// The variants, each from the planner with the environment variable that selects it set.
fn variants(p: &Problem, caps: &DeviceCaps) -> Res<Vec<Variant>> {
    let layout = Layout::s2(S2Config::new(p.heads, p.block, p.local, p.stride).kv_heads(p.kv_heads))
        .map_err(|e| format!("layout: {e}"))?;
    let shape = Shape::new(1, p.seq, p.head_dim, DType::F16);
    let sg = Some(SubgroupInfo { min_size: 32, max_size: 32, barriers: true });
    let plan = |fwd: &str, dkdv: &str, caps: &DeviceCaps| {
        std::env::set_var("S2ATTN_COOP_FWD", fwd);
        std::env::set_var("S2ATTN_BWD_DKDV", dkdv);
        s2attn::gpu::planned_pipelines(&shape, &layout, caps, sg).map_err(|e| format!("planning {fwd}/{dkdv}: {e}"))
    };
    let mut out = Vec::new();
    let mut take = |label: String, (kernel, plan, source, constants)| {
        out.push(Variant { label, kernel, plan, source, constants });
    };
    // Passes: [forward, dQ, dK/dV].
    let mut v2 = plan("v3", "v2", caps)?.into_iter();
    let (fwd_v3, dq, dkdv_v2) = (v2.next(), v2.next(), v2.next());
    let fwd_v4 = plan("v4", "v2", caps)?.into_iter().next();
    let fwd_v5 = plan("v5", "v2", caps)?.into_iter().next();
    let fwd_v7 = plan("v7", "v2", caps)?.into_iter().next();
    let passes = [
        ("forward v3", fwd_v3),
        ("forward v4", fwd_v4),
        ("forward v5", fwd_v5),
        ("forward v7", fwd_v7),
        ("dQ", dq),
        ("dK/dV v2", dkdv_v2),
    ];
    for (label, pass) in passes {
        take(label.to_string(), pass.ok_or("planner returned too few passes")?);
    }
    for dkdv in ["v3", "v4", "v5", "v5-recompute"] {
        let pass = plan("v3", dkdv, caps)?.into_iter().nth(2).ok_or("planner returned too few passes")?;
        take(format!("dK/dV {dkdv}"), pass);
    }
    // The portable kernels (what a device without cooperative matrices runs).
    let portable = DeviceCaps { coop_f16_16x16: false, ..caps.clone() };
    for (label, pass) in
        ["portable forward", "portable dQ", "portable dK/dV"].into_iter().zip(plan("v3", "v2", &portable)?)
    {
        take(label.to_string(), pass);
    }
    std::env::remove_var("S2ATTN_COOP_FWD");
    std::env::remove_var("S2ATTN_BWD_DKDV");
    Ok(out)
}

/// What the device offers, as the SPIR-V writer and the feature checks need it.
struct DeviceInfo {
    api_version: u32,
    coop: bool,
    robust2: bool,
    f16: bool,
    storage16: bool,
    io16: bool,
    memory_model: bool,
    subgroup_ops: vk::SubgroupFeatureFlags,
    size_control: bool,
}

/// SPIR-V of `v` as wgpu 30's Vulkan backend writes it, with the module after override processing.
fn spirv(v: &Variant, dev: &DeviceInfo) -> Res<(Vec<u32>, naga::Module, naga::back::spv::BindingMap)> {
    use naga::back::spv;
    let module = naga::front::wgsl::parse_str(&v.source).map_err(|e| e.emit_to_string(&v.source))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string(&v.source))?;
    let values: naga::back::PipelineConstants = v.constants.iter().map(|&(k, x)| (k.to_string(), x as f64)).collect();
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, "main")),
        &values,
    )
    .map_err(|e| format!("override constants: {e}"))?;
    // wgpu-hal's capability list (vulkan/adapter.rs) for the features src/gpu/context.rs requests.
    let mut caps = vec![
        spv::Capability::Shader,
        spv::Capability::Matrix,
        spv::Capability::Sampled1D,
        spv::Capability::Image1D,
        spv::Capability::ImageQuery,
        spv::Capability::DerivativeControl,
        spv::Capability::StorageImageExtendedFormats,
        spv::Capability::SampledCubeArray,
        spv::Capability::SampleRateShading,
        spv::Capability::GroupNonUniform,
        spv::Capability::GroupNonUniformVote,
        spv::Capability::GroupNonUniformArithmetic,
        spv::Capability::GroupNonUniformBallot,
        spv::Capability::GroupNonUniformShuffle,
        spv::Capability::GroupNonUniformShuffleRelative,
        spv::Capability::GroupNonUniformQuad,
        spv::Capability::Float16,
        spv::Capability::CooperativeMatrixKHR,
        spv::Capability::VulkanMemoryModel,
    ];
    caps.sort_by_key(|c| *c as u32);
    let unchecked = naga::proc::BoundsCheckPolicy::Unchecked;
    let restrict = naga::proc::BoundsCheckPolicy::Restrict;
    // Kernels without index checks (the coop kernels, `Kernel::index_checks`) get every policy unchecked, as
    // wgpu-hal maps `bounds_checks: false`.
    let bounds_check_policies = if !v.kernel.index_checks() {
        naga::proc::BoundsCheckPolicies {
            index: unchecked,
            buffer: unchecked,
            image_load: unchecked,
            binding_array: unchecked,
        }
    } else {
        naga::proc::BoundsCheckPolicies {
            index: restrict,
            buffer: if dev.robust2 { unchecked } else { restrict },
            image_load: restrict,
            binding_array: unchecked,
        }
    };
    let lang_version = match dev.api_version {
        v if v >= vk::API_VERSION_1_3 => (1, 6),
        v if v >= vk::API_VERSION_1_2 => (1, 5),
        v if v >= vk::API_VERSION_1_1 => (1, 3),
        _ => (1, 0),
    };
    // wgpu-hal's binding map: each group's bindings numbered densely in binding order.
    let mut bindings: Vec<naga::ResourceBinding> =
        module.global_variables.iter().filter_map(|(_, var)| var.binding).collect();
    bindings.sort_by_key(|b| (b.group, b.binding));
    bindings.dedup();
    let mut binding_map = spv::BindingMap::default();
    let mut next = (u32::MAX, 0);
    for b in bindings {
        next = if next.0 == b.group { (b.group, next.1 + 1) } else { (b.group, 0) };
        binding_map.insert(b, spv::BindingInfo { descriptor_set: b.group, binding: next.1, binding_array_size: None });
    }
    let options = spv::Options {
        lang_version,
        flags: spv::WriterFlags::LABEL_VARYINGS | spv::WriterFlags::FORCE_POINT_SIZE,
        fake_missing_bindings: false,
        binding_map: binding_map.clone(),
        capabilities: Some(caps.into_iter().collect()),
        bounds_check_policies,
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: false,
        ray_query_initialization_tracking: true,
        trace_ray_argument_validation: true,
        use_storage_input_output_16: dev.f16 && dev.io16,
        debug_info: None,
        // Task shaders only.
        task_dispatch_limits: None,
        mesh_shader_primitive_indices_clamp: true,
        emit_int_div_checks: true,
    };
    let pipeline = spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
    let words = spv::write_vec(&module, &info, &options, Some(&pipeline)).map_err(|e| format!("SPIR-V: {e}"))?;
    Ok((words, module.into_owned(), binding_map))
}

/// The module's `OpCapability` names and `OpExtension` strings.
fn spirv_needs(words: &[u32]) -> (Vec<String>, Vec<String>) {
    let (mut caps, mut exts) = (Vec::new(), Vec::new());
    let mut i = 5;
    while i < words.len() {
        let (count, op) = ((words[i] >> 16) as usize, words[i] & 0xffff);
        if count == 0 || i + count > words.len() {
            break;
        }
        match op {
            17 => caps.push(
                naga::back::spv::Capability::from_u32(words[i + 1])
                    .map_or_else(|| format!("capability {}", words[i + 1]), |c| format!("{c:?}")),
            ),
            10 => {
                let bytes: Vec<u8> = words[i + 1..i + count].iter().flat_map(|w| w.to_le_bytes()).collect();
                let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
                exts.push(String::from_utf8_lossy(&bytes[..end]).into_owned());
            }
            _ => {}
        }
        i += count;
    }
    (caps, exts)
}

/// What the device lacks for these capabilities, if anything.
fn missing_for(caps: &[String], dev: &DeviceInfo) -> Vec<String> {
    let mut missing = Vec::new();
    for c in caps {
        let (ok, what) = match c.as_str() {
            "CooperativeMatrixKHR" => (dev.coop, "VK_KHR_cooperative_matrix (16x16x16 f16->f32, subgroup scope)"),
            "Float16" => (dev.f16, "shaderFloat16"),
            "StorageBuffer16BitAccess" | "UniformAndStorageBuffer16BitAccess" => {
                (dev.storage16, "storageBuffer16BitAccess / uniformAndStorageBuffer16BitAccess")
            }
            "StorageInputOutput16" => (dev.io16, "storageInputOutput16"),
            "VulkanMemoryModel" => (dev.memory_model, "vulkanMemoryModel"),
            "GroupNonUniformVote" => (dev.subgroup_ops.contains(vk::SubgroupFeatureFlags::VOTE), "subgroup vote"),
            "GroupNonUniformArithmetic" => {
                (dev.subgroup_ops.contains(vk::SubgroupFeatureFlags::ARITHMETIC), "subgroup arithmetic")
            }
            "GroupNonUniformBallot" => (dev.subgroup_ops.contains(vk::SubgroupFeatureFlags::BALLOT), "subgroup ballot"),
            "GroupNonUniformShuffle" => {
                (dev.subgroup_ops.contains(vk::SubgroupFeatureFlags::SHUFFLE), "subgroup shuffle")
            }
            "GroupNonUniformShuffleRelative" => {
                (dev.subgroup_ops.contains(vk::SubgroupFeatureFlags::SHUFFLE_RELATIVE), "subgroup shuffle relative")
            }
            "GroupNonUniformQuad" => (dev.subgroup_ops.contains(vk::SubgroupFeatureFlags::QUAD), "subgroup quad"),
            _ => (true, ""),
        };
        if !ok && !missing.iter().any(|m: &String| m == what) {
            missing.push(what.to_string());
        }
    }
    missing
}

/// One statistic's value as text and as JSON.
fn stat_value(s: &vk::PipelineExecutableStatisticKHR<'_>) -> (String, serde_json::Value) {
    // SAFETY: the union member read is the one `format` names.
    unsafe {
        match s.format {
            vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                let b = s.value.b32 != 0;
                (b.to_string(), b.into())
            }
            vk::PipelineExecutableStatisticFormatKHR::INT64 => (s.value.i64.to_string(), s.value.i64.into()),
            vk::PipelineExecutableStatisticFormatKHR::UINT64 => (s.value.u64.to_string(), s.value.u64.into()),
            vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => (format!("{:.3}", s.value.f64), s.value.f64.into()),
            other => (format!("?{other:?}"), serde_json::Value::Null),
        }
    }
}

fn cstr(c: std::result::Result<&CStr, std::ffi::FromBytesUntilNulError>) -> String {
    c.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A table row: one executable of one variant.
struct Row {
    label: String,
    tile: String,
    wg: u32,
    bytes: u32,
    executable: String,
    subgroup: u32,
    stats: Vec<(String, String, serde_json::Value)>,
    /// Each statistic's name and the driver's description of it.
    descriptions: Vec<(String, String)>,
}

struct Vulkan {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    /// `None` where the device lacks VK_KHR_pipeline_executable_properties (SPIR-V is still written and checked).
    exec: Option<ash::khr::pipeline_executable_properties::Device>,
    name: String,
    driver: String,
    info: DeviceInfo,
    caps: DeviceCaps,
}

impl Drop for Vulkan {
    fn drop(&mut self) {
        // SAFETY: every object made from the device was destroyed after use; nothing is in flight.
        unsafe {
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

fn vulkan(pick: Option<usize>) -> Res<Vulkan> {
    // SAFETY: loading the system's Vulkan loader; the calls below follow the Vulkan spec's valid usage
    // (structure chains built from ash's typed builders, handles used only while alive).
    unsafe {
        let entry = ash::Entry::load().map_err(|e| format!("no Vulkan loader: {e}"))?;
        let app =
            vk::ApplicationInfo::default().application_name(c"vk_pipeline_stats").api_version(vk::API_VERSION_1_3);
        let instance = entry
            .create_instance(&vk::InstanceCreateInfo::default().application_info(&app), None)
            .map_err(|e| format!("vkCreateInstance: {e}"))?;
        let phds = instance.enumerate_physical_devices().map_err(|e| format!("no Vulkan devices: {e}"))?;
        if phds.is_empty() {
            instance.destroy_instance(None);
            return Err("no Vulkan device".into());
        }
        let pdev = match pick {
            Some(i) => *phds.get(i).ok_or_else(|| format!("--device {i}: only {} devices", phds.len()))?,
            None => *phds
                .iter()
                .find(|&&p| {
                    instance.get_physical_device_properties(p).device_type == vk::PhysicalDeviceType::DISCRETE_GPU
                })
                .unwrap_or(&phds[0]),
        };
        let result = open_device(&entry, &instance, pdev);
        if result.is_err() {
            instance.destroy_instance(None);
        }
        result.map(|(device, exec, name, driver, info, caps)| Vulkan {
            _entry: entry,
            instance,
            device,
            exec,
            name,
            driver,
            info,
            caps,
        })
    }
}

#[allow(clippy::type_complexity)]
unsafe fn open_device(
    entry: &ash::Entry,
    instance: &ash::Instance,
    pdev: vk::PhysicalDevice,
) -> Res<(ash::Device, Option<ash::khr::pipeline_executable_properties::Device>, String, String, DeviceInfo, DeviceCaps)>
{
    let props = instance.get_physical_device_properties(pdev);
    let name = cstr(props.device_name_as_c_str());
    if props.api_version < vk::API_VERSION_1_3 {
        return Err(format!("{name}: Vulkan 1.3 needed, the device has {}", vk::api_version_minor(props.api_version)));
    }
    let exts = instance.enumerate_device_extension_properties(pdev).map_err(|e| format!("device extensions: {e}"))?;
    let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
    let exec_name = ash::khr::pipeline_executable_properties::NAME;
    let has_exec = has(exec_name);
    let coop_name = ash::khr::cooperative_matrix::NAME;
    let robust_name = ash::ext::robustness2::NAME;
    // Supported features.
    let mut f_exec = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
    let mut f_coop = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
    let mut f_robust = vk::PhysicalDeviceRobustness2FeaturesEXT::default();
    let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
    let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
    let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
    let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut f11).push_next(&mut f12).push_next(&mut f13);
    if has_exec {
        f2 = f2.push_next(&mut f_exec);
    }
    if has(coop_name) {
        f2 = f2.push_next(&mut f_coop);
    }
    if has(robust_name) {
        f2 = f2.push_next(&mut f_robust);
    }
    instance.get_physical_device_features2(pdev, &mut f2);
    let base = f2.features;
    let exec_ok = has_exec && f_exec.pipeline_executable_info != 0;
    let coop_16 = has(coop_name) && f_coop.cooperative_matrix != 0 && {
        let ci = ash::khr::cooperative_matrix::Instance::new(entry, instance);
        let list = ci.get_physical_device_cooperative_matrix_properties(pdev).unwrap_or_default();
        list.iter().any(|c| {
            (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                && c.a_type == vk::ComponentTypeKHR::FLOAT16
                && c.b_type == vk::ComponentTypeKHR::FLOAT16
                && c.c_type == vk::ComponentTypeKHR::FLOAT32
                && c.result_type == vk::ComponentTypeKHR::FLOAT32
                && c.scope == vk::ScopeKHR::SUBGROUP
        })
    };
    let mut p11 = vk::PhysicalDeviceVulkan11Properties::default();
    let mut driver_props = vk::PhysicalDeviceDriverProperties::default();
    let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut p11).push_next(&mut driver_props);
    instance.get_physical_device_properties2(pdev, &mut p2);
    let driver = format!("{} {}", cstr(driver_props.driver_name_as_c_str()), cstr(driver_props.driver_info_as_c_str()));
    let subgroup_ops = if p11.subgroup_supported_stages.contains(vk::ShaderStageFlags::COMPUTE) {
        p11.subgroup_supported_operations
    } else {
        vk::SubgroupFeatureFlags::empty()
    };
    let info = DeviceInfo {
        api_version: props.api_version,
        coop: coop_16,
        robust2: has(robust_name) && f_robust.robust_buffer_access2 != 0,
        f16: f12.shader_float16 != 0,
        storage16: f11.storage_buffer16_bit_access != 0 && f11.uniform_and_storage_buffer16_bit_access != 0,
        io16: f11.storage_input_output16 != 0,
        memory_model: f12.vulkan_memory_model != 0,
        subgroup_ops,
        size_control: f13.subgroup_size_control != 0,
    };
    // Enabled features: what the kernels need, and the robustness wgpu turns on.
    let queue_family = instance
        .get_physical_device_queue_family_properties(pdev)
        .iter()
        .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
        .ok_or_else(|| format!("{name}: no compute queue"))? as u32;
    let priorities = [1.0f32];
    let queues = [vk::DeviceQueueCreateInfo::default().queue_family_index(queue_family).queue_priorities(&priorities)];
    let mut e_exec =
        vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default().pipeline_executable_info(true);
    let mut e_coop = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default().cooperative_matrix(true);
    let mut e_robust = vk::PhysicalDeviceRobustness2FeaturesEXT::default().robust_buffer_access2(true);
    let mut e11 = vk::PhysicalDeviceVulkan11Features::default()
        .storage_buffer16_bit_access(info.storage16)
        .uniform_and_storage_buffer16_bit_access(info.storage16)
        .storage_input_output16(info.io16);
    let mut e12 = vk::PhysicalDeviceVulkan12Features::default()
        .shader_float16(info.f16)
        .vulkan_memory_model(info.memory_model)
        .vulkan_memory_model_device_scope(info.memory_model && f12.vulkan_memory_model_device_scope != 0);
    let mut e13 = vk::PhysicalDeviceVulkan13Features::default().subgroup_size_control(info.size_control);
    let base_enabled = vk::PhysicalDeviceFeatures::default().robust_buffer_access(base.robust_buffer_access != 0);
    let mut e2 = vk::PhysicalDeviceFeatures2::default()
        .features(base_enabled)
        .push_next(&mut e11)
        .push_next(&mut e12)
        .push_next(&mut e13);
    let mut names = Vec::new();
    if exec_ok {
        names.push(exec_name.as_ptr());
        e2 = e2.push_next(&mut e_exec);
    }
    if info.coop {
        names.push(coop_name.as_ptr());
        e2 = e2.push_next(&mut e_coop);
    }
    if info.robust2 {
        names.push(robust_name.as_ptr());
        e2 = e2.push_next(&mut e_robust);
    }
    let create =
        vk::DeviceCreateInfo::default().queue_create_infos(&queues).enabled_extension_names(&names).push_next(&mut e2);
    let device = instance.create_device(pdev, &create, None).map_err(|e| format!("{name}: vkCreateDevice: {e}"))?;
    let exec = exec_ok.then(|| ash::khr::pipeline_executable_properties::Device::new(instance, &device));
    let l = props.limits;
    let caps = DeviceCaps {
        name: name.clone(),
        backend: "vulkan".into(),
        max_workgroup_storage: l.max_compute_shared_memory_size,
        max_invocations: l.max_compute_work_group_invocations,
        max_storage_binding: l.max_storage_buffer_range as u64,
        max_buffer: l.max_storage_buffer_range as u64,
        max_dispatch: l.max_compute_work_group_count.into_iter().min().unwrap_or(65535),
        // The coop kernels' requirements, so that their SPIR-V is written on any device.
        coop_f16_16x16: true,
        shader_f16: true,
        subgroups: true,
        timestamps: false,
        loop_iteration_cap: None,
    };
    Ok((device, exec, name, driver, info, caps))
}

/// Builds `v`'s pipeline and reads its executables' statistics.
unsafe fn pipeline_stats(
    vk_: &Vulkan,
    exec: &ash::khr::pipeline_executable_properties::Device,
    v: &Variant,
    words: &[u32],
    module: &naga::Module,
    binding_map: &naga::back::spv::BindingMap,
    dump: Option<&str>,
) -> Res<Vec<Row>> {
    let device = &vk_.device;
    // The automatic layout: every buffer binding of the module, per group, numbered as the binding map.
    let mut groups: BTreeMap<u32, Vec<vk::DescriptorSetLayoutBinding<'static>>> = BTreeMap::new();
    for (_, var) in module.global_variables.iter() {
        let Some(b) = &var.binding else { continue };
        let Some(target) = binding_map.get(b) else { continue };
        let ty = match var.space {
            naga::AddressSpace::Uniform => vk::DescriptorType::UNIFORM_BUFFER,
            naga::AddressSpace::Storage { .. } => vk::DescriptorType::STORAGE_BUFFER,
            other => return Err(format!("binding {}/{} in {other:?}: not a buffer", b.group, b.binding)),
        };
        groups.entry(b.group).or_default().push(
            vk::DescriptorSetLayoutBinding::default()
                .binding(target.binding)
                .descriptor_type(ty)
                .descriptor_count(1)
                .stage_flags(vk::ShaderStageFlags::COMPUTE),
        );
    }
    let count = groups.keys().next_back().map_or(0, |g| g + 1);
    let mut set_layouts = Vec::new();
    let cleanup = |set_layouts: &[vk::DescriptorSetLayout]| {
        for &l in set_layouts {
            device.destroy_descriptor_set_layout(l, None);
        }
    };
    for g in 0..count {
        let bindings = groups.get(&g).map_or(&[][..], |b| &b[..]);
        match device
            .create_descriptor_set_layout(&vk::DescriptorSetLayoutCreateInfo::default().bindings(bindings), None)
        {
            Ok(l) => set_layouts.push(l),
            Err(e) => {
                cleanup(&set_layouts);
                return Err(format!("descriptor set layout: {e}"));
            }
        }
    }
    let layout =
        match device.create_pipeline_layout(&vk::PipelineLayoutCreateInfo::default().set_layouts(&set_layouts), None) {
            Ok(l) => l,
            Err(e) => {
                cleanup(&set_layouts);
                return Err(format!("pipeline layout: {e}"));
            }
        };
    let result = (|| {
        let shader = device
            .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(words), None)
            .map_err(|e| format!("shader module: {e}"))?;
        // As wgpu-hal: varying subgroup size allowed where subgroups are on.
        let stage_flags = if vk_.info.size_control {
            vk::PipelineShaderStageCreateFlags::ALLOW_VARYING_SUBGROUP_SIZE
        } else {
            vk::PipelineShaderStageCreateFlags::empty()
        };
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .flags(stage_flags)
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(shader)
            .name(c"main");
        let mut flags = vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR;
        if dump.is_some() {
            flags |= vk::PipelineCreateFlags::CAPTURE_INTERNAL_REPRESENTATIONS_KHR;
        }
        let info = vk::ComputePipelineCreateInfo::default().flags(flags).stage(stage).layout(layout);
        // A fresh cache per pipeline, so that its blob holds this pipeline's code only.
        let cache = match dump {
            Some(_) => device
                .create_pipeline_cache(&vk::PipelineCacheCreateInfo::default(), None)
                .map_err(|e| format!("vkCreatePipelineCache: {e}"))?,
            None => vk::PipelineCache::null(),
        };
        let created = device.create_compute_pipelines(cache, &[info], None);
        device.destroy_shader_module(shader, None);
        if let Some(dir) = dump {
            let file = format!("{dir}/{}.cache.bin", v.label.replace(['/', ' '], "_"));
            let saved = match &created {
                Ok(_) => device.get_pipeline_cache_data(cache).map_err(|e| format!("vkGetPipelineCacheData: {e}")),
                Err(_) => Ok(Vec::new()),
            };
            device.destroy_pipeline_cache(cache, None);
            std::fs::write(&file, saved?).map_err(|e| format!("{file}: {e}"))?;
        }
        let pipeline = created.map_err(|(_, e)| format!("vkCreateComputePipelines: {e}"))?[0];
        let rows = (|| {
            let execs = exec
                .get_pipeline_executable_properties(&vk::PipelineInfoKHR::default().pipeline(pipeline))
                .map_err(|e| format!("vkGetPipelineExecutablePropertiesKHR: {e}"))?;
            let mut rows = Vec::new();
            for (i, e) in execs.iter().enumerate() {
                let stats = exec
                    .get_pipeline_executable_statistics(
                        &vk::PipelineExecutableInfoKHR::default().pipeline(pipeline).executable_index(i as u32),
                    )
                    .map_err(|e| format!("vkGetPipelineExecutableStatisticsKHR: {e}"))?;
                if let Some(dir) = dump {
                    let info = vk::PipelineExecutableInfoKHR::default().pipeline(pipeline).executable_index(i as u32);
                    dump_internal(exec, &info, &format!("{dir}/{}.exec{i}", v.label.replace(['/', ' '], "_")))?;
                }
                rows.push(Row {
                    label: v.label.clone(),
                    tile: format!("{}x{}", v.plan.tile_q, v.plan.tile_kv),
                    wg: v.plan.workgroup_size,
                    bytes: v.plan.workgroup_bytes,
                    executable: cstr(e.name_as_c_str()),
                    subgroup: e.subgroup_size,
                    stats: stats
                        .iter()
                        .map(|s| {
                            let (text, json) = stat_value(s);
                            (cstr(s.name_as_c_str()), text, json)
                        })
                        .collect(),
                    descriptions: stats
                        .iter()
                        .map(|s| (cstr(s.name_as_c_str()), cstr(s.description_as_c_str())))
                        .collect(),
                });
            }
            Ok(rows)
        })();
        device.destroy_pipeline(pipeline, None);
        rows
    })();
    device.destroy_pipeline_layout(layout, None);
    cleanup(&set_layouts);
    result
}

/// Writes every internal representation the driver gives for one executable to `{stem}.irN.{txt,bin}`
/// (the two-call pattern with data buffers, which ash's wrapper leaves out).
///
/// # Safety
/// `info` names a live pipeline created with `CAPTURE_INTERNAL_REPRESENTATIONS_KHR`.
unsafe fn dump_internal(
    exec: &ash::khr::pipeline_executable_properties::Device,
    info: &vk::PipelineExecutableInfoKHR<'_>,
    stem: &str,
) -> Res<()> {
    let f = exec.fp().get_pipeline_executable_internal_representations_khr;
    let dev = exec.device();
    let mut count = 0u32;
    let r = f(dev, info, &mut count, std::ptr::null_mut());
    if r != vk::Result::SUCCESS {
        return Err(format!("vkGetPipelineExecutableInternalRepresentationsKHR (count): {r}"));
    }
    let mut reps = vec![vk::PipelineExecutableInternalRepresentationKHR::default(); count as usize];
    let r = f(dev, info, &mut count, reps.as_mut_ptr());
    if r != vk::Result::SUCCESS && r != vk::Result::INCOMPLETE {
        return Err(format!("vkGetPipelineExecutableInternalRepresentationsKHR (sizes): {r}"));
    }
    let mut bufs: Vec<Vec<u8>> = reps.iter().map(|x| vec![0u8; x.data_size]).collect();
    for (x, b) in reps.iter_mut().zip(bufs.iter_mut()) {
        x.p_data = b.as_mut_ptr().cast();
    }
    let r = f(dev, info, &mut count, reps.as_mut_ptr());
    if r != vk::Result::SUCCESS && r != vk::Result::INCOMPLETE {
        return Err(format!("vkGetPipelineExecutableInternalRepresentationsKHR (data): {r}"));
    }
    println!("    {} internal representation(s) for {stem}", reps.len());
    for (k, (x, b)) in reps.iter().zip(&bufs).enumerate() {
        let text = x.is_text != 0;
        let file = format!("{stem}.ir{k}.{}", if text { "txt" } else { "bin" });
        println!("      {}: {} ({} B, {})", cstr(x.name_as_c_str()), cstr(x.description_as_c_str()), b.len(), file);
        std::fs::write(&file, b).map_err(|e| format!("{file}: {e}"))?;
    }
    Ok(())
}

/// Workgroups per SM the registers allow on NVIDIA (65536 32-bit registers per SM, allocated per thread
/// in multiples of 8; at most 2048 threads and 32 workgroups per SM).
fn workgroups_per_sm(regs: u64, wg: u32) -> u64 {
    let per_thread = regs.div_ceil(8) * 8;
    if per_thread == 0 || wg == 0 {
        return 0;
    }
    (65536 / (per_thread * wg as u64)).min(2048 / wg as u64).min(32)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vk_pipeline_stats: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    let vk_ = vulkan(args.device)?;
    let p = &args.problem;
    println!("device: {} ({})", vk_.name, vk_.driver);
    println!(
        "problem: {} tokens, {} heads, {} kv heads, head dim {}, block {}, local {}, vert_stride {}, f16",
        p.seq, p.heads, p.kv_heads, p.head_dim, p.block, p.local, p.stride
    );
    println!(
        "planner limits: {} B workgroup memory, {} invocations; cooperative matrices (16x16x16 f16->f32): {}",
        vk_.caps.max_workgroup_storage,
        vk_.caps.max_invocations,
        if vk_.info.coop { "yes" } else { "no: VK_KHR_cooperative_matrix missing, coop pipelines skipped" }
    );
    if vk_.exec.is_none() {
        println!(
            "missing extension {} (or its pipelineExecutableInfo feature): SPIR-V is written and checked, no pipeline is built",
            ash::khr::pipeline_executable_properties::NAME.to_string_lossy()
        );
    }
    let mut list = variants(p, &vk_.caps)?;
    if let Some(only) = &args.only {
        list.retain(|v| only.split(',').any(|o| v.label.contains(o)));
    }
    let mut json = match &args.json {
        Some(path) => Some(std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?),
        None => None,
    };
    for dir in [&args.spv, &args.dump].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
    }
    let mut rows: Vec<Row> = Vec::new();
    for v in &list {
        let consts: Vec<String> = v.constants.iter().map(|(k, x)| format!("{k}={x}")).collect();
        print!("{:<18} {:<7} {}: ", v.label, format!("{}x{}", v.plan.tile_q, v.plan.tile_kv), consts.join(" "));
        let (words, module, binding_map) = match spirv(v, &vk_.info) {
            Ok(x) => x,
            Err(e) => {
                println!("SPIR-V failed: {e}");
                continue;
            }
        };
        if let Some(dir) = &args.spv {
            let file = format!("{dir}/{}.spv", v.label.replace(['/', ' '], "_"));
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            std::fs::write(&file, bytes).map_err(|e| format!("{file}: {e}"))?;
        }
        print!("{}; ", v.plan.reason);
        let (caps, exts) = spirv_needs(&words);
        let missing = missing_for(&caps, &vk_.info);
        print!("{} words, capabilities [{}], extensions [{}]", words.len(), caps.join(" "), exts.join(" "));
        if !missing.is_empty() {
            println!("\n    skipped: the device lacks {}", missing.join(", "));
            continue;
        }
        let Some(exec) = &vk_.exec else {
            println!();
            continue;
        };
        let _ = std::io::stdout().flush();
        let start = std::time::Instant::now();
        // SAFETY: the SPIR-V was written by naga for this device's capabilities, checked above.
        match unsafe { pipeline_stats(&vk_, exec, v, &words, &module, &binding_map, args.dump.as_deref()) } {
            Ok(new) => {
                println!(", compiled in {:.2} s", start.elapsed().as_secs_f64());
                for r in &new {
                    if let Some(f) = json.as_mut() {
                        let stats: serde_json::Map<String, serde_json::Value> =
                            r.stats.iter().map(|(k, _, j)| (k.clone(), j.clone())).collect();
                        let constants: serde_json::Map<String, serde_json::Value> =
                            v.constants.iter().map(|&(k, x)| (k.to_string(), x.into())).collect();
                        let line = serde_json::json!({
                            "device": vk_.name, "driver": vk_.driver, "variant": r.label, "kernel": v.kernel.name(),
                            "tile": r.tile, "workgroup_size": r.wg, "planned_workgroup_bytes": r.bytes,
                            "constants": constants, "reason": v.plan.reason, "executable": r.executable,
                            "subgroup_size": r.subgroup, "stats": stats,
                        });
                        writeln!(f, "{line}").map_err(|e| format!("--json: {e}"))?;
                    }
                }
                rows.extend(new);
            }
            Err(e) => println!("\n    failed: {e}"),
        }
    }
    print_table(&rows);
    match &vk_.exec {
        None => Err(format!(
            "{}: missing extension {}; no statistics read",
            vk_.name,
            ash::khr::pipeline_executable_properties::NAME.to_string_lossy()
        )),
        Some(_) if rows.is_empty() => Err("no pipeline statistics read".into()),
        Some(_) => Ok(()),
    }
}

fn print_table(rows: &[Row]) {
    if rows.is_empty() {
        println!("\nno pipeline statistics (no pipeline was built)");
        return;
    }
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        for (n, _, _) in &r.stats {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
    }
    let regs_name = names.iter().find(|n| n.to_lowercase().contains("register")).copied();
    let mut header = vec![
        "variant".to_string(),
        "tile".into(),
        "WG".into(),
        "planned smem B".into(),
        "executable".into(),
        "sg".into(),
    ];
    header.extend(names.iter().map(|n| n.to_string()));
    if regs_name.is_some() {
        header.push("WG/SM by regs".into());
    }
    let mut table = vec![header];
    for r in rows {
        let mut line = vec![
            r.label.clone(),
            r.tile.clone(),
            r.wg.to_string(),
            r.bytes.to_string(),
            r.executable.clone(),
            r.subgroup.to_string(),
        ];
        for n in &names {
            line.push(r.stats.iter().find(|(k, _, _)| k == n).map_or("-".into(), |(_, t, _)| t.clone()));
        }
        if let Some(rn) = regs_name {
            let regs = r.stats.iter().find(|(k, _, _)| k == rn).and_then(|(_, _, j)| j.as_u64());
            line.push(regs.map_or("-".into(), |x| workgroups_per_sm(x, r.wg).to_string()));
        }
        table.push(line);
    }
    println!();
    for n in &names {
        let d = rows.iter().flat_map(|r| &r.descriptions).find(|(k, _)| k == n).map_or("", |(_, d)| d.as_str());
        println!("{n}: {d}");
    }
    println!();
    println!("| {} |", table[0].join(" | "));
    println!("|{}", " --- |".repeat(table[0].len()));
    for line in &table[1..] {
        println!("| {} |", line.join(" | "));
    }
}
