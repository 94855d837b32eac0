//! The WGSL sources, embedded with `include_str!`, and the one generator that composes them.
//!
//! WGSL has no includes, so kernels name shared pieces with `#include shared/<file>.wgsl` lines, the
//! storage accessors with `#include storage` and the backward's gradient accessors with
//! `#include grad_storage`; [`compose`] splices them in. Everything else a kernel
//! varies on (head dim, tile sizes, workgroup size) is a WGSL override constant, so there is exactly one
//! source per kernel and no copy-pasted variants.

use crate::error::{Error, Result};
use crate::plan::{DType, DispatchPlan};

/// Shared pieces, by the path kernels include them with.
const SHARED: &[(&str, &str)] = &[
    ("shared/params.wgsl", include_str!("../../shaders/shared/params.wgsl")),
    ("shared/nonfinite.wgsl", include_str!("../../shaders/shared/nonfinite.wgsl")),
    ("shared/storage_f32.wgsl", include_str!("../../shaders/shared/storage_f32.wgsl")),
    ("shared/storage_f16.wgsl", include_str!("../../shaders/shared/storage_f16.wgsl")),
    ("shared/backward.wgsl", include_str!("../../shaders/shared/backward.wgsl")),
    ("shared/grads_f32.wgsl", include_str!("../../shaders/shared/grads_f32.wgsl")),
    ("shared/grads_f16.wgsl", include_str!("../../shaders/shared/grads_f16.wgsl")),
    ("shared/decode.wgsl", include_str!("../../shaders/shared/decode.wgsl")),
    ("shared/decode_words.wgsl", include_str!("../../shaders/shared/decode_words.wgsl")),
    ("shared/coop_chunks.wgsl", include_str!("../../shaders/shared/coop_chunks.wgsl")),
    ("shared/coop_backward.wgsl", include_str!("../../shaders/shared/coop_backward.wgsl")),
    ("shared/coop_grad_out.wgsl", include_str!("../../shaders/shared/coop_grad_out.wgsl")),
    ("shared/coop_redo.wgsl", include_str!("../../shaders/shared/coop_redo.wgsl")),
];

/// The override constants the kernel of `plan` is built with at `head_dim`: the head dim, tile sizes and
/// workgroup size every kernel declares (the rest of a kernel's overrides keep their defaults or are
/// derived from these).
pub(crate) fn overrides(plan: &DispatchPlan, head_dim: u32) -> Vec<(&'static str, u32)> {
    vec![("D", head_dim), ("BQ", plan.tile_q), ("BK", plan.tile_kv), ("WG", plan.workgroup_size)]
}

/// A kernel source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `shaders/forward_portable.wgsl`.
    ForwardPortable,
    /// `shaders/forward_coop.wgsl`: the forward pass on cooperative matrices (f16 storage).
    ForwardCoop,
    /// `shaders/backward_dq.wgsl`: D = rowsum(dO * O) and dQ.
    BackwardDq,
    /// `shaders/backward_dkdv.wgsl`: dK and dV.
    BackwardDkDv,
    /// `shaders/split_merge.wgsl`: merges the portable forward's split partials by their softmax statistics.
    SplitMerge,
    /// `shaders/split_sum.wgsl`: adds the portable backward's split partials of one gradient.
    SplitSum,
    /// `shaders/backward_coop_dq.wgsl`: D and dQ on cooperative matrices (f16 storage).
    BackwardCoopDq,
    /// `shaders/backward_coop_dkdv.wgsl`: dK and dV on cooperative matrices (f16 storage).
    BackwardCoopDkDv,
    /// `shaders/decode_split.wgsl`: decode and variable-length attention over a work list.
    DecodeSplit,
    /// `shaders/decode_split_narrow.wgsl`: decode of items of at most 4 rows, Q/K/V/O in registers.
    DecodeSplitNarrow,
    /// `shaders/decode_combine.wgsl`: merges the split-KV partials of decode by their LSE.
    DecodeCombine,
    /// `shaders/kv_append.wgsl`: scatters K/V rows from device buffers into KV cache pages (32-bit words,
    /// so it serves every storage type).
    KvAppend,
}

impl Kernel {
    /// Every kernel (the naga test validates each in each storage type).
    pub const ALL: &'static [Kernel] = &[
        Kernel::ForwardPortable,
        Kernel::ForwardCoop,
        Kernel::BackwardDq,
        Kernel::BackwardDkDv,
        Kernel::SplitMerge,
        Kernel::SplitSum,
        Kernel::BackwardCoopDq,
        Kernel::BackwardCoopDkDv,
        Kernel::DecodeSplit,
        Kernel::DecodeSplitNarrow,
        Kernel::DecodeCombine,
        Kernel::KvAppend,
    ];

    /// File name under `shaders/`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::ForwardPortable => "forward_portable.wgsl",
            Kernel::ForwardCoop => "forward_coop.wgsl",
            Kernel::BackwardDq => "backward_dq.wgsl",
            Kernel::BackwardDkDv => "backward_dkdv.wgsl",
            Kernel::SplitMerge => "split_merge.wgsl",
            Kernel::SplitSum => "split_sum.wgsl",
            Kernel::BackwardCoopDq => "backward_coop_dq.wgsl",
            Kernel::BackwardCoopDkDv => "backward_coop_dkdv.wgsl",
            Kernel::DecodeSplit => "decode_split.wgsl",
            Kernel::DecodeSplitNarrow => "decode_split_narrow.wgsl",
            Kernel::DecodeCombine => "decode_combine.wgsl",
            Kernel::KvAppend => "kv_append.wgsl",
        }
    }

    /// Whether naga's index clamps stay on for this kernel. They are off only for the cooperative-matrix
    /// kernels, which index their workgroup and register arrays solely with offsets derived from their
    /// override constants (every row and column of a staged tile lies inside its array, as the planner sizes
    /// them), so the clamps only cost time there: 18% on the H100. Buffers keep the device's robust access.
    pub fn index_checks(self) -> bool {
        !matches!(self, Kernel::ForwardCoop | Kernel::BackwardCoopDq | Kernel::BackwardCoopDkDv)
    }

    fn source(self) -> &'static str {
        match self {
            Kernel::ForwardPortable => include_str!("../../shaders/forward_portable.wgsl"),
            Kernel::ForwardCoop => include_str!("../../shaders/forward_coop.wgsl"),
            Kernel::BackwardDq => include_str!("../../shaders/backward_dq.wgsl"),
            Kernel::BackwardDkDv => include_str!("../../shaders/backward_dkdv.wgsl"),
            Kernel::SplitMerge => include_str!("../../shaders/split_merge.wgsl"),
            Kernel::SplitSum => include_str!("../../shaders/split_sum.wgsl"),
            Kernel::BackwardCoopDq => include_str!("../../shaders/backward_coop_dq.wgsl"),
            Kernel::BackwardCoopDkDv => include_str!("../../shaders/backward_coop_dkdv.wgsl"),
            Kernel::DecodeSplit => include_str!("../../shaders/decode_split.wgsl"),
            Kernel::DecodeSplitNarrow => include_str!("../../shaders/decode_split_narrow.wgsl"),
            Kernel::DecodeCombine => include_str!("../../shaders/decode_combine.wgsl"),
            Kernel::KvAppend => include_str!("../../shaders/kv_append.wgsl"),
        }
    }

    /// Storage types the kernel is built for.
    pub fn dtypes(self) -> &'static [DType] {
        match self {
            Kernel::ForwardPortable
            | Kernel::BackwardDq
            | Kernel::BackwardDkDv
            | Kernel::SplitMerge
            | Kernel::SplitSum
            | Kernel::DecodeSplit
            | Kernel::DecodeSplitNarrow
            | Kernel::DecodeCombine => &[DType::F32, DType::F16],
            Kernel::ForwardCoop | Kernel::BackwardCoopDq | Kernel::BackwardCoopDkDv => &[DType::F16],
            // Words, whatever the storage type: composed (and compiled) once, as f32.
            Kernel::KvAppend => &[DType::F32],
        }
    }
}

/// The full WGSL text of `kernel` for `dtype` storage.
pub fn compose(kernel: Kernel, dtype: DType) -> Result<String> {
    let (storage, grads) = match dtype {
        DType::F32 => ("shared/storage_f32.wgsl", "shared/grads_f32.wgsl"),
        DType::F16 => ("shared/storage_f16.wgsl", "shared/grads_f16.wgsl"),
        DType::BF16 => {
            return Err(Error::Unsupported("bf16 storage has no WGSL kernel; use the CUDA backend".into()));
        }
    };
    let mut out = String::new();
    for line in kernel.source().lines() {
        match line.trim().strip_prefix("#include ") {
            Some(path) => {
                let path = match path.trim() {
                    "storage" => storage,
                    "grad_storage" => grads,
                    other => other,
                };
                let (_, text) = SHARED.iter().find(|(p, _)| *p == path).ok_or_else(|| Error::Shader {
                    name: kernel.name().into(),
                    message: format!("unknown include `{path}`"),
                })?;
                out.push_str(text);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

/// Parses and validates composed WGSL with naga, returning the error text with source context.
pub fn validate(name: &str, source: &str) -> Result<()> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| Error::Shader { name: name.into(), message: e.emit_to_string(source) })?;
    let mut validator =
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
    validator.validate(&module).map_err(|e| Error::Shader { name: name.into(), message: e.emit_to_string(source) })?;
    Ok(())
}

/// What the entry point `main` of a kernel needs of the device, for the limits it is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelNeeds {
    /// Storage buffers it binds (`max_storage_buffers_per_shader_stage`).
    pub storage_buffers: u32,
    /// Bytes of workgroup memory its variables take with the override constants applied, each placed at
    /// its alignment (`max_compute_workgroup_storage_size`).
    pub workgroup_bytes: u64,
}

/// [`KernelNeeds`] of composed WGSL built with `constants` (override name, value): parsed, validated and
/// its overrides resolved by naga, as wgpu does when it builds the pipeline.
pub fn kernel_needs(name: &str, source: &str, constants: &[(&str, u32)]) -> Result<KernelNeeds> {
    let shader_err = |message: String| Error::Shader { name: name.into(), message };
    let module = naga::front::wgsl::parse_str(source).map_err(|e| shader_err(e.emit_to_string(source)))?;
    let mut validator =
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
    let info = validator.validate(&module).map_err(|e| shader_err(e.emit_to_string(source)))?;
    let values: naga::back::PipelineConstants = constants.iter().map(|&(k, v)| (k.to_string(), v as f64)).collect();
    // naga panics (rather than erring) on some malformed override uses; either is this kernel's error.
    let resolved = std::panic::catch_unwind(|| {
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &values)
            .map(|(m, i)| (m.into_owned(), i.into_owned()))
            .map_err(|e| format!("resolving the override constants: {e}"))
    })
    .map_err(|_| shader_err("naga panicked resolving the override constants".into()))?;
    let (module, info) = resolved.map_err(shader_err)?;
    let main = module
        .entry_points
        .iter()
        .position(|e| e.name == "main")
        .ok_or_else(|| shader_err("no entry point `main`".into()))?;
    let uses = info.get_entry_point(main);
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).map_err(|e| shader_err(format!("laying out the types: {e}")))?;
    let used = || module.global_variables.iter().filter(|&(h, _)| !uses[h].is_empty());
    let storage_buffers = used().filter(|(_, g)| matches!(g.space, naga::AddressSpace::Storage { .. })).count() as u32;
    let workgroup_bytes = used().filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup).fold(0u64, |at, (_, g)| {
        let layout = layouter[g.ty];
        layout.alignment.round_up(at as u32) as u64 + layout.size as u64
    });
    Ok(KernelNeeds { storage_buffers, workgroup_bytes })
}

#[cfg(test)]
mod tests {
    use super::{compose, kernel_needs, overrides, Kernel};
    use crate::gpu::backward::backward_kernels;
    use crate::gpu::forward::forward_kernel;
    use crate::gpu::plan_attend_for;
    use crate::layout::{Layout, S2Config};
    use crate::plan::{
        coop_candidates, coop_dkdv_candidates, coop_dkdv_subgroups, coop_dkdv_workgroup_bytes, coop_dq_candidates,
        coop_dq_workgroup_bytes, coop_workgroup_bytes, coop_workgroup_size, plan_backward_portable, plan_portable,
        DType, DeviceCaps, DispatchPlan, Shape, COOP_HEAD_DIMS, COOP_SUBGROUP_SIZE, PORTABLE_HEAD_DIMS,
    };
    use std::collections::HashMap;

    /// A kernel, its storage type and override constants.
    type Build = (Kernel, DType, Vec<(&'static str, u32)>);

    /// Checks that `kernel` built with `constants` takes at most `planned` bytes of workgroup memory.
    struct Checker(HashMap<Build, u64>);

    impl Checker {
        fn check(&mut self, kernel: Kernel, dtype: DType, constants: Vec<(&'static str, u32)>, planned: u32) {
            let key = (kernel, dtype, constants);
            let needs = *self.0.entry(key.clone()).or_insert_with(|| {
                let source = compose(kernel, dtype).expect("compose");
                kernel_needs(kernel.name(), &source, &key.2).expect("kernel needs").workgroup_bytes
            });
            assert!(needs <= planned as u64, "{kernel:?} {dtype} {:?}: takes {needs} B, planned {planned}", key.2);
        }
        fn plan(&mut self, kernel: Kernel, dtype: DType, plan: &DispatchPlan, head_dim: u32) {
            self.check(kernel, dtype, overrides(plan, head_dim), plan.workgroup_bytes);
        }
    }

    /// Every tile the forward, backward and decode planners may pick (coop candidates on an H100-class
    /// Vulkan adapter; portable and decode plans on 16 to 64 KiB of workgroup memory) takes no more
    /// workgroup memory than the planner counted, so the pipeline builder's limit check never refuses a
    /// planned kernel and a planner's count is never below what the device is asked for.
    #[test]
    fn planned_workgroup_bytes_cover_each_kernels_own() {
        let mut c = Checker(HashMap::new());
        let h100 = DeviceCaps::h100_vulkan();
        for block in [16, 32, 64, 128] {
            let layout = Layout::s2(S2Config::new(4, block, 2, 3).kv_heads(2)).expect("layout");
            for &d in COOP_HEAD_DIMS {
                let shape = Shape::new(1, 2048, d, DType::F16);
                for t in coop_candidates(&shape, &layout, &h100) {
                    let constants = vec![("D", d), ("BQ", t.tile_q), ("BK", t.tile_kv), ("WG", coop_workgroup_size(t))];
                    c.check(Kernel::ForwardCoop, DType::F16, constants, coop_workgroup_bytes(t, d));
                }
                for t in coop_dq_candidates(&shape, &layout, &h100) {
                    // One subgroup per 16 query rows, as the forward.
                    let constants = vec![("D", d), ("BQ", t.tile_q), ("BK", t.tile_kv), ("WG", coop_workgroup_size(t))];
                    c.check(Kernel::BackwardCoopDq, DType::F16, constants, coop_dq_workgroup_bytes(t, d));
                }
                for t in coop_dkdv_candidates(&shape, &layout, &h100) {
                    let wg = coop_dkdv_subgroups(t) * COOP_SUBGROUP_SIZE;
                    let constants = vec![("D", d), ("BQ", t.tile_q), ("BK", t.tile_kv), ("WG", wg)];
                    c.check(Kernel::BackwardCoopDkDv, DType::F16, constants, coop_dkdv_workgroup_bytes(t, d));
                }
            }
            for storage in [16384, 32768, 49152, 65536] {
                let caps = DeviceCaps { max_workgroup_storage: storage, coop_f16_16x16: false, ..h100.clone() };
                for &d in PORTABLE_HEAD_DIMS {
                    for dtype in [DType::F32, DType::F16] {
                        let shape = Shape::new(1, 2048, d, dtype);
                        if let Ok(plan) = plan_portable(&shape, &layout, &caps) {
                            c.plan(forward_kernel(&plan).expect("kernel"), dtype, &plan, d);
                        }
                        if let Ok(plan) = plan_backward_portable(&shape, &layout, &caps) {
                            let (dq, dkdv) = backward_kernels(&plan).expect("kernels");
                            c.plan(dq, dtype, &plan.dq, d);
                            c.plan(dkdv, dtype, &plan.dkdv, d);
                        }
                        // Decode items of GQA groups 1, 4 and 8, one token and windows of 5.
                        for (group, n_tok) in [1, 4, 8].into_iter().flat_map(|g| [(g, 1), (g, 5)]) {
                            if let Ok(plan) = plan_attend_for(&caps, dtype, d, group, &[n_tok], block) {
                                assert!(plan.workgroup_bytes <= storage, "{plan} on {storage} B");
                                let (kernel, constants) = plan.split_kernel(dtype, d);
                                c.check(kernel, dtype, constants, plan.workgroup_bytes);
                            }
                        }
                    }
                }
            }
        }
        assert!(c.0.len() > 50, "only {} distinct kernels checked", c.0.len());
    }
}
