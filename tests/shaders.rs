//! Shader tests (no GPU): every WGSL kernel, composed for each of its storage types, validates with naga;
//! every `.wgsl` file under `shaders/` ends up in some composed kernel, so no file escapes validation; and
//! the cooperative-matrix kernels, which no CI adapter runs, resolve their override constants and compile
//! to SPIR-V at every tile their planners may pick. The examples' own WGSL (`examples/common/`) validates too.

use s2attn::gpu::shaders::{compose, validate, Kernel};
use s2attn::Error;
use std::path::{Path, PathBuf};

fn wgsl_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            wgsl_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "wgsl") {
            out.push(path);
        }
    }
}

/// Every composed kernel source, named `file (dtype)`.
fn composed() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &kernel in Kernel::ALL {
        assert!(!kernel.dtypes().is_empty(), "{} is built for no dtype", kernel.name());
        for &dtype in kernel.dtypes() {
            let name = format!("{} ({dtype})", kernel.name());
            let source = compose(kernel, dtype).unwrap_or_else(|e| panic!("composing {name}: {e}"));
            assert!(
                !source.lines().any(|l| l.trim_start().starts_with("#include")),
                "{name}: an include was left unexpanded"
            );
            out.push((name, source));
        }
    }
    out
}

#[test]
fn every_kernel_validates_in_every_dtype() {
    for (name, source) in composed() {
        if let Err(e) = validate(&name, &source) {
            panic!("{e}");
        }
    }
}

#[test]
fn validate_rejects_broken_wgsl() {
    // The check above can fail: a type error and a syntax error are both reported as Error::Shader.
    for bad in ["fn f() -> u32 { return 1.5; }", "fn f( {"] {
        assert!(matches!(validate("bad", bad), Err(Error::Shader { .. })), "{bad:?} passed validation");
    }
}

#[test]
fn every_wgsl_file_is_part_of_some_kernel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    if !root.is_dir() && std::env::var_os("CARGO").is_none() {
        // A test binary copied to another machine (a GPU host without the source tree): the embedded
        // kernels are still validated by the other tests; only the file walk needs the tree. Under cargo the
        // tree is always there, so this never skips in CI.
        eprintln!("skipping: {} is not here (binary run away from its source tree)", root.display());
        return;
    }
    let mut files = Vec::new();
    wgsl_files(&root, &mut files);
    assert!(!files.is_empty(), "no .wgsl files under {}", root.display());
    let sources = composed();
    for &kernel in Kernel::ALL {
        assert!(root.join(kernel.name()).is_file(), "kernel {} has no file under shaders/", kernel.name());
    }
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable shader");
        // Composition replaces `#include` lines and keeps every other line: each run of lines between
        // includes must appear verbatim in one composed kernel.
        let mut pieces = vec![String::new()];
        for line in text.lines() {
            if line.trim_start().starts_with("#include") {
                pieces.push(String::new());
            } else {
                let last = pieces.last_mut().expect("at least one piece");
                last.push_str(line);
                last.push('\n');
            }
        }
        let pieces: Vec<&String> = pieces.iter().filter(|p| !p.trim().is_empty()).collect();
        let used = sources.iter().any(|(_, source)| pieces.iter().all(|p| source.contains(p.as_str())));
        assert!(
            used,
            "{} is not part of any kernel in Kernel::ALL: add it to a kernel (or Kernel::ALL) so that it is validated",
            file.display()
        );
    }
}

#[test]
fn the_examples_own_shaders_validate() {
    let mut files = Vec::new();
    wgsl_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/common"), &mut files);
    assert!(!files.is_empty(), "no WGSL under examples/common");
    for path in files {
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        validate(&path.display().to_string(), &source).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn composing_an_unbuilt_dtype_is_refused() {
    for kernel in Kernel::ALL.iter().filter(|k| !k.dtypes().contains(&s2attn::DType::BF16)) {
        assert!(matches!(compose(*kernel, s2attn::DType::BF16), Err(Error::Unsupported(_))));
    }
}

/// Resolves `constants` in `kernel` (f16) and writes SPIR-V, as wgpu's Vulkan backend does when it builds
/// the pipeline; returns the words or the error.
fn spirv(kernel: Kernel, constants: &[(&str, u32)]) -> Result<Vec<u32>, String> {
    let source = compose(kernel, s2attn::DType::F16).map_err(|e| e.to_string())?;
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| e.emit_to_string(&source))?;
    let flags = naga::valid::ValidationFlags::all();
    let info = naga::valid::Validator::new(flags, naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string(&source))?;
    let values: naga::back::PipelineConstants = constants.iter().map(|&(k, v)| (k.to_string(), v as f64)).collect();
    // naga panics (rather than erring) on some override orders; a panic is a failure here too.
    let (module, info) = std::panic::catch_unwind(|| {
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &values)
            .map(|(m, i)| (m.into_owned(), i))
            .map_err(|e| format!("{e:?}"))
    })
    .map_err(|_| "naga panicked resolving the override constants".to_string())??;
    let pipeline =
        naga::back::spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
    naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), Some(&pipeline))
        .map_err(|e| format!("{e:?}"))
}

#[test]
fn coop_kernels_resolve_their_overrides_and_write_spirv() {
    // Every tile the coop planners may pick compiles to SPIR-V and declares exactly the workgroup bytes the
    // planner counts for it.
    use s2attn::plan::{
        coop_dkdv_subgroups, coop_dkdv_workgroup_bytes, coop_dq_workgroup_bytes, coop_workgroup_bytes, CoopTile,
    };
    let forward = [(64, 16), (64, 32), (64, 64), (128, 16), (128, 32)];
    let dq = [(128, 32), (64, 32), (128, 16), (64, 16)];
    let dkdv = [(32, 32), (64, 16), (32, 16)];
    let mut failures = Vec::new();
    for d in [64, 128] {
        let mut cases = Vec::new();
        for (q, k) in forward {
            let tile = CoopTile { tile_q: q, tile_kv: k };
            if coop_workgroup_bytes(tile, d) <= 49152 {
                cases.push((Kernel::ForwardCoop, tile, 2 * q, coop_workgroup_bytes(tile, d)));
            }
        }
        for (q, k) in dq {
            let tile = CoopTile { tile_q: q, tile_kv: k };
            cases.push((Kernel::BackwardCoopDq, tile, 2 * q, coop_dq_workgroup_bytes(tile, d)));
        }
        for (q, k) in dkdv {
            let tile = CoopTile { tile_q: q, tile_kv: k };
            cases.push((
                Kernel::BackwardCoopDkDv,
                tile,
                32 * coop_dkdv_subgroups(tile),
                coop_dkdv_workgroup_bytes(tile, d),
            ));
        }
        for (kernel, tile, wg, counted) in cases {
            let constants = [("D", d), ("BQ", tile.tile_q), ("BK", tile.tile_kv), ("WG", wg)];
            if let Err(e) = spirv(kernel, &constants) {
                failures.push(format!("{} D {d} {tile}: {e}", kernel.name()));
                continue;
            }
            let declared = declared_workgroup_bytes(kernel, &constants);
            if declared != counted {
                failures.push(format!(
                    "{} D {d} {tile}: declares {declared} bytes, the planner counts {counted}",
                    kernel.name()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Bytes of workgroup memory `kernel` (f16) declares with `constants` resolved.
fn declared_workgroup_bytes(kernel: Kernel, constants: &[(&str, u32)]) -> u32 {
    let source = compose(kernel, s2attn::DType::F16).expect("composes");
    let module = naga::front::wgsl::parse_str(&source).expect("parses");
    let caps = naga::valid::Capabilities::all();
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps).validate(&module).expect("valid");
    let values: naga::back::PipelineConstants = constants.iter().map(|&(k, v)| (k.to_string(), v as f64)).collect();
    let (module, _) =
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &values).expect("resolves");
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).expect("lays out");
    let shared = module.global_variables.iter().filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup);
    shared.map(|(_, g)| layouter[g.ty].size).sum()
}

#[test]
fn the_coop_forward_lazy_rescale_threshold_is_the_twins() {
    // cpu::forward_coop models the kernel's TAU with plan::COOP_TAU; the two must not drift apart.
    let source = compose(Kernel::ForwardCoop, s2attn::DType::F16).expect("composes");
    let module = naga::front::wgsl::parse_str(&source).expect("parses");
    let (_, tau) = module.overrides.iter().find(|(_, o)| o.name.as_deref() == Some("TAU")).expect("an override TAU");
    let init = tau.init.expect("TAU has a default");
    match module.global_expressions[init] {
        naga::Expression::Literal(naga::Literal::F32(x)) => assert_eq!(x, s2attn::plan::COOP_TAU),
        ref other => panic!("TAU's default is not an f32 literal: {other:?}"),
    }
}
