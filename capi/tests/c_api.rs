//! The C API from C: compiles `tests/c/smoke.c` (host memory) and `tests/c/buffers.c` (device buffers)
//! with the system C compiler (`$CC`, else `cc`) against the `cdylib` and the `staticlib` cargo built next
//! to this test binary, runs them, and fails with their output when any of their checks (outputs against
//! attention computed in C and against the host path, error codes) fails.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::Command;

const CC_HELP: &str = "tests/c_api.rs compiles tests/c/smoke.c and needs a C compiler: install one \
     (Debian: `apt-get install gcc`) or point $CC at it";

/// The directory cargo put this test binary in (`target/<profile>/deps`), where it also put the library
/// artifacts of the same build.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().expect("the test binary has a directory").to_path_buf()
}

/// A private link to (or copy of) `name` from the deps directory, in `dir`. The copy keeps the test independent of
/// other cargo runs sharing the target directory: with a `cdylib` crate type the library's file names carry
/// no hash, so a concurrent build with another profile or feature set rewrites them in place.
fn artifact(name: &str, dir: &Path) -> PathBuf {
    let src = deps_dir().join(name);
    assert!(
        src.is_file(),
        "{} not found: capi/Cargo.toml's [lib] must list crate-type = [\"cdylib\", \"staticlib\", \"rlib\"] \
         (cargo builds the C libraries for this test only through the rlib), or a concurrent cargo build in \
         the same target directory is rewriting it: rerun",
        src.display()
    );
    let dst = dir.join(name);
    let _ = std::fs::remove_file(&dst);
    // A hard link pins the file as it is now (a rebuild replaces it with a new file); copy across devices.
    if std::fs::hard_link(&src, &dst).is_err() {
        std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copying {} (a concurrent build?): {e}", src.display()));
    }
    dst
}

/// Compiles `tests/c/<source>` into `exe` with `link` appended to the command line.
fn compile(source: &str, exe: &Path, link: &[&std::ffi::OsStr]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let mut cmd = Command::new(&cc);
    cmd.args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c").join(source))
        .arg("-o")
        .arg(exe)
        .args(link)
        .arg("-lm");
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{CC_HELP} ({cc:?} not found)"),
        Err(e) => panic!("running {cc:?}: {e}"),
    };
    assert!(
        out.status.success(),
        "compiling {source} failed ({:?}):\n{}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the compiled program and fails with its output unless it passes.
fn run(exe: &Path) {
    let mut cmd = Command::new(exe);
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        cmd.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success(), "{} failed ({}):\n{stdout}\n{stderr}", exe.display(), out.status);
    assert!(stdout.contains("all C API checks passed"), "{} ended early:\n{stdout}\n{stderr}", exe.display());
}

/// A directory of this test's own under cargo's scratch space.
fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_api").join(name);
    std::fs::create_dir_all(&dir).expect("creating the C test's output directory");
    dir
}

#[test]
fn smoke_c_against_the_shared_library() {
    let dir = out_dir("shared");
    let lib = artifact(if cfg!(target_os = "macos") { "libs2attn_capi.dylib" } else { "libs2attn_capi.so" }, &dir);
    let exe = dir.join("smoke");
    let rpath = format!("-Wl,-rpath,{}", dir.display());
    compile("smoke.c", &exe, &[lib.as_os_str(), rpath.as_ref()]);
    run(&exe);
}

#[test]
fn buffers_c_against_the_shared_library() {
    let dir = out_dir("buffers");
    let lib = artifact(if cfg!(target_os = "macos") { "libs2attn_capi.dylib" } else { "libs2attn_capi.so" }, &dir);
    let exe = dir.join("buffers");
    let rpath = format!("-Wl,-rpath,{}", dir.display());
    compile("buffers.c", &exe, &[lib.as_os_str(), rpath.as_ref()]);
    run(&exe);
}

/// The static archive with the system libraries the Rust standard library needs on Linux (what
/// `cargo rustc --lib -- --print native-static-libs` reports there); this is the link line the header
/// documents.
#[test]
#[cfg(target_os = "linux")]
fn smoke_c_against_the_static_library() {
    let dir = out_dir("static");
    let lib = artifact("libs2attn_capi.a", &dir);
    let exe = dir.join("smoke");
    let mut link: Vec<&std::ffi::OsStr> = vec![lib.as_os_str()];
    link.extend(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"].map(std::ffi::OsStr::new));
    compile("smoke.c", &exe, &link);
    run(&exe);
}
