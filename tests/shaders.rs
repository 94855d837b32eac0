//! Shader tests (no GPU): every WGSL kernel, composed for each of its storage types, validates with naga;
//! every `.wgsl` file under `shaders/` ends up in some composed kernel, so no file escapes validation; and
//! the cooperative-matrix kernels, which no CI adapter runs, resolve their override constants and compile
//! to SPIR-V at every tile their planners may pick.

use s2attn::gpu::shaders::{compose, validate, Kernel};
use s2attn::plan::CoopDkdv;
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
    // (tile_q, tile_kv, workgroup size) of every tile the coop planners may pick.
    let forward = [(64, 16, 128), (64, 32, 128), (64, 64, 128), (128, 16, 256), (128, 32, 256), (128, 64, 256)];
    let dq = [(128, 32, 256), (64, 32, 128), (128, 16, 256), (64, 16, 128)];
    let dkdv = [(32, 32, 128), (16, 64, 128), (16, 32, 64), (32, 16, 64), (16, 16, 32)];
    let mut failures = Vec::new();
    for d in [64, 128] {
        for (kernel, tiles) in
            [(Kernel::ForwardCoop, &forward[..]), (Kernel::BackwardCoopDq, &dq), (Kernel::BackwardCoopDkDv, &dkdv)]
        {
            // The dK/dV kernel at each of its one-slice, one-subgroup-per-block switch settings
            // (S2ATTN_BWD_DKDV; v3's, v4's and v5's tiles: coop_dkdv_v3_resolves_its_slices_and_writes_spirv),
            // the others once.
            let switches: Vec<(&str, Vec<(&str, u32)>)> = if kernel == Kernel::BackwardCoopDkDv {
                let one_slice = CoopDkdv::ALL.iter().filter(|(_, s)| s.slices == 1 && s.split == 0);
                one_slice.map(|&(name, s)| (name, s.constants().to_vec())).collect()
            } else {
                vec![("", Vec::new())]
            };
            for &(q, k, wg) in tiles {
                for (name, extra) in &switches {
                    let mut constants = vec![("D", d), ("BQ", q), ("BK", k), ("WG", wg)];
                    constants.extend(extra.iter().copied());
                    if let Err(e) = spirv(kernel, &constants) {
                        failures.push(format!("{} {name} D {d} {q}x{k}: {e}", kernel.name()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The dK/dV switches reach the kernel: each setting compiles to different SPIR-V.
    let words: Vec<Vec<u32>> = CoopDkdv::ALL
        .iter()
        .map(|(name, s)| {
            let wg = 32 * s.subgroups(s2attn::plan::CoopTile { tile_q: 32, tile_kv: 32 });
            let mut constants = vec![("D", 128), ("BQ", 32), ("BK", 32), ("WG", wg)];
            constants.extend(s.constants());
            spirv(Kernel::BackwardCoopDkDv, &constants).unwrap_or_else(|e| panic!("{name}: {e}"))
        })
        .collect();
    let mut distinct = words.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), words.len(), "two dK/dV switch settings give the same SPIR-V");
}

#[test]
fn coop_dkdv_v3_resolves_its_slices_and_writes_spirv() {
    use s2attn::plan::{coop_dkdv_workgroup_bytes, CoopTile};
    // Every tile of every dK/dV setting (v3's two-slice tiles included) validates, writes SPIR-V, and
    // declares the workgroup bytes the planner counts for it.
    let mut failures = Vec::new();
    for d in [64, 128] {
        for (name, kernel) in CoopDkdv::ALL {
            for &(tile_q, tile_kv) in kernel.tiles() {
                let tile = CoopTile { tile_q, tile_kv };
                let wg = 32 * kernel.subgroups(tile);
                let mut constants = vec![("D", d), ("BQ", tile_q), ("BK", tile_kv), ("WG", wg)];
                constants.extend(kernel.constants());
                if let Err(e) = spirv(Kernel::BackwardCoopDkDv, &constants) {
                    failures.push(format!("{name} D {d} {tile}: {e}"));
                    continue;
                }
                let declared = declared_workgroup_bytes(Kernel::BackwardCoopDkDv, &constants);
                let counted = coop_dkdv_workgroup_bytes(tile, d, kernel);
                if declared != counted {
                    failures
                        .push(format!("{name} D {d} {tile}: declares {declared} bytes, the planner counts {counted}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // SPLIT reaches the kernel: v4 and v2 at the same tile and workgroup size differ.
    let tile = CoopTile { tile_q: 32, tile_kv: 32 };
    let split = |k: CoopDkdv| {
        let mut constants = vec![("D", 128), ("BQ", 32), ("BK", 32), ("WG", 256)];
        constants.extend(k.constants());
        spirv(Kernel::BackwardCoopDkDv, &constants).expect("spirv")
    };
    assert_eq!(32 * CoopDkdv::V4.subgroups(tile), 256);
    assert_ne!(split(CoopDkdv::V4), split(CoopDkdv::V2));
    // RS reaches the kernel: v3 and v2 at the same tile and workgroup differ.
    let tile = CoopTile { tile_q: 32, tile_kv: 32 };
    let wg = 32 * CoopDkdv::V3.subgroups(tile);
    let words = |k: CoopDkdv| {
        let mut constants = vec![("D", 128), ("BQ", 32), ("BK", 32), ("WG", wg)];
        constants.extend(k.constants());
        spirv(Kernel::BackwardCoopDkDv, &constants).expect("spirv")
    };
    assert_ne!(words(CoopDkdv::V3), words(CoopDkdv::V2));
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
fn coop_forward_v4_resolves_its_slices_and_writes_spirv() {
    // Every tile the v4 planner may pick (S2ATTN_COOP_FWD=v4 or v4-nopipe), with the slices and pads it
    // gives the pipeline: it compiles to SPIR-V and declares exactly the workgroup bytes the planner counted
    // (128x64 at d128 fills the H200's 48 KiB to the byte). v3's tiles declare what the planner counts too.
    use s2attn::plan::{coop_slices, coop_workgroup_bytes, CoopForward, CoopTile};
    let mut failures = Vec::new();
    let mut sliced = Vec::new();
    for d in [64, 128] {
        for (q, k, wg) in [(64, 16, 128), (64, 32, 128), (64, 64, 128), (128, 16, 256), (128, 32, 256), (128, 64, 256)]
        {
            let tile = CoopTile { tile_q: q, tile_kv: k };
            let base = [("D", d), ("BQ", q), ("BK", k), ("WG", wg)];
            if coop_workgroup_bytes(tile, d) <= 49152
                && declared_workgroup_bytes(Kernel::ForwardCoop, &base) != coop_workgroup_bytes(tile, d)
            {
                failures.push(format!("v3 D {d} {tile}: the kernel declares other bytes than the planner counts"));
            }
            let Some(sl) = coop_slices(CoopForward::V4, tile, d, 49152) else {
                continue;
            };
            let mut constants = base.to_vec();
            constants.extend([("SL", sl.slice), ("SPAD", sl.s_pad), ("PPAD", sl.p_pad), ("PIPE", 1)]);
            let declared = declared_workgroup_bytes(Kernel::ForwardCoop, &constants);
            if declared != sl.workgroup_bytes(tile, d) {
                failures.push(format!(
                    "v4 D {d} {tile} {sl:?}: declares {declared} B, planner counts {}",
                    sl.workgroup_bytes(tile, d)
                ));
            }
            // v4 and v4-nopipe (PIPE 1 and 0).
            for pipe in [1, 0] {
                constants[7].1 = pipe;
                if let Err(e) = spirv(Kernel::ForwardCoop, &constants) {
                    failures.push(format!("v4 PIPE {pipe} D {d} {tile} {sl:?}: {e}"));
                }
            }
            // The slice constants reach the kernel: a sliced chunk declares other S/P arrays than v3's.
            if sl.slice < k {
                sliced.push(tile);
                if declared == declared_workgroup_bytes(Kernel::ForwardCoop, &base) {
                    failures.push(format!("v4 D {d} {tile}: the slice constants did not change the kernel"));
                }
            }
        }
    }
    assert!(!sliced.is_empty(), "no v4 tile runs its chunk in slices: the test lost its point");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn coop_forward_v5_splits_the_head_dim_and_writes_spirv() {
    // v5 (S2ATTN_COOP_FWD=v5): the 64x32 tile at 256 invocations with the head-dim split (HS 2) and Q
    // staged after P. It compiles to SPIR-V at d 64 and 128 and declares exactly the workgroup bytes the
    // planner counts (d128: 48 KiB to the byte), which differ from v3's at the same tile.
    use s2attn::plan::{coop_slices, coop_workgroup_bytes, CoopForward, CoopTile};
    let tile = CoopTile { tile_q: 64, tile_kv: 32 };
    let mut failures = Vec::new();
    for d in [64, 128] {
        let sl = coop_slices(CoopForward::V5, tile, d, 49152).expect("v5 fits 64x32");
        let mut constants = vec![("D", d), ("BQ", 64), ("BK", 32), ("WG", 256)];
        constants.extend([("SL", sl.slice), ("SPAD", sl.s_pad), ("PPAD", sl.p_pad), ("PIPE", 0), ("HS", 2)]);
        let declared = declared_workgroup_bytes(Kernel::ForwardCoop, &constants);
        if declared != sl.workgroup_bytes(tile, d) {
            failures.push(format!(
                "v5 D {d} {sl:?}: declares {declared} B, planner counts {}",
                sl.workgroup_bytes(tile, d)
            ));
        }
        if declared == coop_workgroup_bytes(tile, d) {
            failures.push(format!("v5 D {d}: HS did not change the kernel's workgroup arrays"));
        }
        match spirv(Kernel::ForwardCoop, &constants) {
            Ok(words) => {
                let v3 = spirv(Kernel::ForwardCoop, &[("D", d), ("BQ", 64), ("BK", 32), ("WG", 128)]).expect("v3");
                if words == v3 {
                    failures.push(format!("v5 D {d}: same SPIR-V as v3"));
                }
            }
            Err(e) => failures.push(format!("v5 D {d}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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

#[test]
fn coop_v7_straight_forms_write_spirv() {
    // v7 (S2ATTN_COOP_FWD=v7): v3's tiles and slices with the STRAIGHT bits; every setting compiles to
    // SPIR-V, declares v3's workgroup bytes, and each nonzero one changes the code. The dQ pass's straight
    // form (S2ATTN_BWD_DQ=straight) too.
    use s2attn::plan::{coop_slices, coop_workgroup_bytes, CoopForward, CoopTile};
    let mut failures = Vec::new();
    for (tq, tk) in [(64, 16), (64, 32), (64, 64), (128, 16), (128, 32)] {
        let tile = CoopTile { tile_q: tq, tile_kv: tk };
        for d in [64, 128] {
            let Some(sl) = coop_slices(CoopForward::V7, tile, d, 49152) else { continue };
            assert_eq!(Some(sl), coop_slices(CoopForward::V3, tile, d, 49152), "v7 takes v3's slices");
            let base = vec![("D", d), ("BQ", tq), ("BK", tk), ("WG", 2 * tq), ("SL", sl.slice), ("PIPE", 0)];
            let v3 = spirv(Kernel::ForwardCoop, &base).expect("v3");
            for bits in 0..4 {
                let mut constants = base.clone();
                constants.push(("STRAIGHT", bits));
                if declared_workgroup_bytes(Kernel::ForwardCoop, &constants) != coop_workgroup_bytes(tile, d) {
                    failures.push(format!("v7 {tile} d {d} straight {bits}: workgroup bytes differ from v3's"));
                }
                match spirv(Kernel::ForwardCoop, &constants) {
                    Ok(words) if (words == v3) != (bits == 0) => {
                        failures.push(format!("v7 {tile} d {d} straight {bits}: SPIR-V equal to v3's: {}", words == v3))
                    }
                    Ok(_) => {}
                    Err(e) => failures.push(format!("v7 {tile} d {d} straight {bits}: {e}")),
                }
            }
        }
    }
    // The straight-line dQ pass (S2ATTN_BWD_DQ=straight) at its default tile.
    let dq = [("D", 128), ("BQ", 128), ("BK", 32), ("WG", 256)];
    let plain = spirv(Kernel::BackwardCoopDq, &dq).expect("dQ");
    match spirv(Kernel::BackwardCoopDq, &[&dq[..], &[("STRAIGHT", 1)]].concat()) {
        Ok(words) if words == plain => failures.push("dQ straight: same SPIR-V as the plain dQ pass".into()),
        Ok(_) => {}
        Err(e) => failures.push(format!("dQ straight: {e}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
