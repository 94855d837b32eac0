//! Shader tests (no GPU): every model kernel, composed, validates with naga, and every `.wgsl` file under
//! this crate's `shaders/` ends up in some composed kernel, so no file escapes validation.

use s2attn::gpu::shaders::validate;
use s2attn_model::shaders::{compose, Kernel};
use std::path::Path;

#[test]
fn every_kernel_validates() {
    for &kernel in Kernel::ALL {
        let source = compose(kernel).unwrap_or_else(|e| panic!("composing {}: {e}", kernel.name()));
        assert!(
            !source.lines().any(|l| l.trim_start().starts_with("#include")),
            "{}: an include was left unexpanded",
            kernel.name()
        );
        if let Err(e) = validate(kernel.name(), &source) {
            panic!("{e}");
        }
    }
}

#[test]
fn every_wgsl_file_is_part_of_some_kernel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    if !root.is_dir() && std::env::var_os("CARGO").is_none() {
        eprintln!("skipping: {} is not here (binary run away from its source tree)", root.display());
        return;
    }
    let sources: Vec<String> = Kernel::ALL.iter().map(|&k| compose(k).expect("composes")).collect();
    for &kernel in Kernel::ALL {
        assert!(root.join(kernel.name()).is_file(), "kernel {} has no file under shaders/", kernel.name());
    }
    for entry in std::fs::read_dir(&root).expect("reading shaders/") {
        let file = entry.expect("directory entry").path();
        if file.extension().is_none_or(|x| x != "wgsl") {
            continue;
        }
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
        let used = sources.iter().any(|source| pieces.iter().all(|p| source.contains(p.as_str())));
        assert!(used, "{} is not part of any kernel in Kernel::ALL", file.display());
    }
}

#[test]
fn the_cooperative_matrix_matmul_writes_spirv() {
    // wgpu's Vulkan backend turns the kernel into SPIR-V on devices with cooperative matrices; lavapipe
    // has none, so the translation is checked here.
    let source = compose(Kernel::MatmulCoop).expect("composes");
    let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{}", e.emit_to_string(&source)));
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&source)));
    let values = naga::back::PipelineConstants::from([("W_F16".to_string(), 1.0)]);
    let (module, info) = naga::back::pipeline_constants::process_overrides(&module, &info, None, &values)
        .unwrap_or_else(|e| panic!("resolving overrides: {e:?}"));
    let pipeline =
        naga::back::spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
    let words = naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), Some(&pipeline))
        .unwrap_or_else(|e| panic!("writing SPIR-V: {e:?}"));
    assert_eq!(words.first(), Some(&0x0723_0203), "not a SPIR-V module");
}
