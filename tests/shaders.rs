//! Shader tests (no GPU): every WGSL kernel, composed for each of its storage types, validates with naga;
//! and every `.wgsl` file under `shaders/` ends up in some composed kernel, so no file escapes validation.

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
