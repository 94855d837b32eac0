//! NVRTC compilation of the embedded CUDA C sources (`shaders/cuda/`) to CUBIN for one architecture, and
//! the on-disk cache of the results.
//!
//! A kernel is identified by its source, its `-D` defines and the target; the disk cache key hashes those
//! with the driver and NVRTC versions, so a driver or compiler update recompiles. The cache lives in
//! `$S2ATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/s2attn`, else `~/.cache/s2attn`; when that cannot be
//! created or written, kernels are compiled once per process and kept in memory only (see
//! [`CudaContext::describe`](super::CudaContext::describe) for which applies).

use crate::error::{Error, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The S2 forward kernel's source.
pub(crate) const S2_FORWARD_SRC: &str = include_str!("../../shaders/cuda/s2_forward.cu");

/// Where compiled kernels are cached on disk: `$S2ATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/s2attn`, else
/// `$HOME/.cache/s2attn`; `None` when none of these variables is set (or `S2ATTN_CACHE_DIR` is empty or
/// `off`, which turns the disk cache off).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("S2ATTN_CACHE_DIR") {
        let s = dir.to_string_lossy();
        if s.is_empty() || s.eq_ignore_ascii_case("off") {
            return None;
        }
        return Some(PathBuf::from(dir));
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("s2attn"));
    }
    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache").join("s2attn"))
}

/// The disk cache's state, for [`CudaContext::describe`](super::CudaContext::describe).
pub(crate) fn disk_cache_status() -> String {
    match cache_dir() {
        None => "off (set S2ATTN_CACHE_DIR, XDG_CACHE_HOME or HOME to enable)".into(),
        Some(dir) => match std::fs::create_dir_all(&dir) {
            Ok(()) => format!("{}", dir.display()),
            Err(e) => format!("off ({} is not writable: {e}); kernels are kept in memory only", dir.display()),
        },
    }
}

/// What one compilation request names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct KernelKey {
    /// Source file name, for messages and cache file names.
    pub name: &'static str,
    /// `-D` defines, in order.
    pub defines: Vec<(String, i64)>,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    /// Target the architecture-specific variant (`sm_90a`: wgmma), which runs on that exact chip only.
    pub arch_specific: bool,
}

impl KernelKey {
    /// The key of `name` compiled with `defines` (`-DNAME=VALUE`, in order) for `arch` (a real architecture,
    /// not its architecture-specific variant).
    pub(crate) fn new(name: &'static str, arch: (i32, i32), defines: &[(&str, i64)]) -> Self {
        let defines = defines.iter().map(|&(k, v)| (k.to_string(), v)).collect();
        Self { name, defines, arch, arch_specific: false }
    }

    /// The `--gpu-architecture` value: a real architecture, so that NVRTC emits a CUBIN.
    fn target(&self) -> String {
        format!("sm_{}{}{}", self.arch.0, self.arch.1, if self.arch_specific { "a" } else { "" })
    }

    fn options(&self) -> Vec<String> {
        let mut o = vec![format!("--gpu-architecture={}", self.target()), "-std=c++17".into(), "--fmad=true".into()];
        o.extend(self.defines.iter().map(|(k, v)| format!("-D{k}={v}")));
        if std::env::var_os("S2ATTN_CUDA_VERBOSE").is_some() {
            o.push("--ptxas-options=-v".into());
        }
        o
    }
}

/// NVRTC's version, `(major, minor)`.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; the library's presence was checked by the caller.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// 64-bit FNV-1a: a hash that is stable across Rust versions, for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A CUBIN for `key` compiled from `source`: from the disk cache when present, else from NVRTC (then
/// written back when the cache is writable). `driver` is the driver version, part of the cache key. The
/// flag says whether the bytes came from disk.
pub(crate) fn cubin(key: &KernelKey, source: &str, driver: i32) -> Result<(Vec<u8>, bool)> {
    let nvrtc_v = nvrtc_version()?;
    let options = key.options();
    let meta = format!("{options:?} driver {driver} nvrtc {}.{}", nvrtc_v.0, nvrtc_v.1);
    let hash = fnv1a(&[source.as_bytes(), meta.as_bytes()]);
    let path =
        cache_dir().map(|d| d.join(format!("{}-{}-{hash:016x}.cubin", key.name.trim_end_matches(".cu"), key.target())));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if looks_like_elf(&bytes) {
                return Ok((bytes, true));
            }
        }
    }
    let bin = compile(key, source, &options, nvrtc_v)?;
    if let Some(p) = &path {
        store(p, &bin);
    }
    Ok((bin, false))
}

/// Forgets a cached CUBIN the driver refused (a truncated or stale file), so the next call recompiles.
pub(crate) fn evict(key: &KernelKey, source: &str, driver: i32) {
    if let (Ok(nvrtc_v), Some(dir)) = (nvrtc_version(), cache_dir()) {
        let meta = format!("{:?} driver {driver} nvrtc {}.{}", key.options(), nvrtc_v.0, nvrtc_v.1);
        let hash = fnv1a(&[source.as_bytes(), meta.as_bytes()]);
        let _ = std::fs::remove_file(dir.join(format!(
            "{}-{}-{hash:016x}.cubin",
            key.name.trim_end_matches(".cu"),
            key.target()
        )));
    }
}

fn looks_like_elf(bytes: &[u8]) -> bool {
    bytes.len() > 64 && bytes.starts_with(b"\x7fELF")
}

/// Writes `bin` atomically (temporary file + rename); a cache that cannot be written is skipped.
fn store(path: &Path, bin: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bin).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Destroys an NVRTC program on every path out of [`compile`].
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by `create_program` and is destroyed once, here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn compile(key: &KernelKey, source: &str, options: &[String], nvrtc_v: (i32, i32)) -> Result<Vec<u8>> {
    let src = CString::new(source).map_err(|_| Error::Cuda(format!("{}: source contains a NUL byte", key.name)))?;
    let name = CString::new(key.name).map_err(|_| Error::Cuda("kernel name contains a NUL byte".into()))?;
    let prog = Program(
        nvrtc::create_program(&src, Some(&name))
            .map_err(|e| Error::Cuda(format!("nvrtcCreateProgram({}): {e:?}", key.name)))?,
    );
    // SAFETY: `prog.0` is a live program; options are NUL-free strings built above.
    let compiled = unsafe { nvrtc::compile_program(prog.0, options) };
    if let Err(e) = compiled {
        let log = program_log(&prog);
        let target = key.target();
        let msg = format!(
            "NVRTC {}.{} could not compile {} for {target} ({e:?}), options {options:?}:\n{log}",
            nvrtc_v.0, nvrtc_v.1, key.name
        );
        if e.0 == nvrtc_sys::nvrtcResult::NVRTC_ERROR_INVALID_OPTION || log.contains("gpu-architecture") {
            return Err(Error::Unsupported(format!(
                "this NVRTC cannot target {target} (compute capability {}.{}): {msg}",
                key.arch.0, key.arch.1
            )));
        }
        return Err(Error::Cuda(msg));
    }
    if std::env::var_os("S2ATTN_CUDA_VERBOSE").is_some() {
        // Tuning aid: NVRTC's (and ptxas') warnings, e.g. wgmma serialisation advisories.
        let log = program_log(&prog);
        if !log.is_empty() {
            eprintln!("s2attn: NVRTC log for {} {:?}:\n{log}", key.name, key.defines);
        }
    }
    let mut size = 0usize;
    // SAFETY: `prog.0` compiled successfully; the buffer is sized by NVRTC's own answer.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcGetCUBINSize({}): {e:?}", key.name)))?;
    if size == 0 {
        return Err(Error::Cuda(format!("NVRTC produced no CUBIN for {} ({})", key.name, key.target())));
    }
    let mut bin = vec![0u8; size];
    // SAFETY: `bin` holds `size` bytes, as NVRTC asked.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, bin.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcGetCUBIN({}): {e:?}", key.name)))?;
    Ok(bin)
}

fn program_log(prog: &Program) -> String {
    // SAFETY: `prog.0` is a live program.
    match unsafe { nvrtc::get_program_log(prog.0) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_separates_parts() {
        assert_eq!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"ab", b"c"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn options_name_a_real_architecture() {
        let key = KernelKey::new("s2_forward.cu", (9, 0), &[("HEAD_DIM", 128)]);
        let o = key.options();
        assert!(o.contains(&"--gpu-architecture=sm_90".to_string()), "{o:?}");
        let o = KernelKey { arch_specific: true, ..key }.options();
        assert!(o.contains(&"--gpu-architecture=sm_90a".to_string()), "{o:?}");
        assert!(o.contains(&"-DHEAD_DIM=128".to_string()), "{o:?}");
    }

    #[test]
    fn elf_check_refuses_truncated_files() {
        assert!(!looks_like_elf(b"\x7fELF"));
        assert!(!looks_like_elf(&[0u8; 100]));
    }
}
