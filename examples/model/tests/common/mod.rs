//! Shared by the model crate's tests: the wgpu context they run on.

use s2attn::{Backend, Context, ContextOptions};
use std::sync::OnceLock;

/// The wgpu context these tests share, opened once: `Context::new()` (lavapipe in CI), or the best wgpu
/// adapter where that opens CUDA (the model runs on wgpu only).
pub fn wgpu_context() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| {
        let help = "no GPU adapter: these tests need one (lavapipe in CI: `apt-get install mesa-vulkan-drivers`)";
        let ctx = Context::new().unwrap_or_else(|e| panic!("{help}: {e}"));
        if ctx.wgpu().is_some() {
            return ctx;
        }
        let mut options = ContextOptions::from_env().unwrap_or_else(|e| panic!("{e}"));
        options.backend = Backend::Wgpu;
        Context::with_options(&options).unwrap_or_else(|e| panic!("{help}: {e}"))
    })
}
