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
