//! The model kernels' WGSL sources (`shaders/*.wgsl` of this crate), embedded with `include_str!`, and
//! their composition: the kernels that read weights take the accessor with `#include weights.wgsl`, the
//! matmuls their params and bindings with `#include matmul_io.wgsl`.
//! They compile through [`WgpuContext::wgsl_pipeline`], so the library caches them as its own.

use s2attn::gpu::WgpuContext;
use s2attn::{Error, Result};

/// The pieces the kernels include: the weight accessor, the matmuls' params and bindings.
const SHARED: &[(&str, &str)] = &[
    ("weights.wgsl", include_str!("../shaders/weights.wgsl")),
    ("matmul_io.wgsl", include_str!("../shaders/matmul_io.wgsl")),
];

/// A model kernel source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `shaders/embed.wgsl`: the embedding lookup.
    Embed,
    /// `shaders/rmsnorm.wgsl`: RMSNorm.
    RmsNorm,
    /// `shaders/matmul.wgsl`: a chunk of activation rows times f32 or f16 weights, optionally added to
    /// the output.
    Matmul,
    /// `shaders/matmul_coop.wgsl`: a chunk of activation rows times f16 weights on 16x16 f16 cooperative
    /// matrices (f32 activations split into two f16 parts), optionally added to the output.
    MatmulCoop,
    /// `shaders/matvec.wgsl`: one activation row times f32 or f16 weights (read in 16-byte words),
    /// optionally added to the output.
    Matvec,
    /// `shaders/rope.wgsl`: rotary position embedding of Q and K, in place.
    Rope,
    /// `shaders/swiglu.wgsl`: the SiLU-gated MLP activation.
    Swiglu,
    /// `shaders/argmax.wgsl`: greedy sampling on the GPU.
    Argmax,
    /// `shaders/cast.wgsl`: strided f32/f16 copy (the prefill packs Q/K/V for the forward op).
    Cast,
}

impl Kernel {
    /// Every kernel (the naga test validates each). All take f32 activations; f16 weights are pairs in
    /// 32-bit words unpacked in the kernel (an override constant).
    pub const ALL: &'static [Kernel] = &[
        Kernel::Embed,
        Kernel::RmsNorm,
        Kernel::Matmul,
        Kernel::MatmulCoop,
        Kernel::Matvec,
        Kernel::Rope,
        Kernel::Swiglu,
        Kernel::Argmax,
        Kernel::Cast,
    ];

    /// File name under `shaders/`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Embed => "embed.wgsl",
            Kernel::RmsNorm => "rmsnorm.wgsl",
            Kernel::Matmul => "matmul.wgsl",
            Kernel::MatmulCoop => "matmul_coop.wgsl",
            Kernel::Matvec => "matvec.wgsl",
            Kernel::Rope => "rope.wgsl",
            Kernel::Swiglu => "swiglu.wgsl",
            Kernel::Argmax => "argmax.wgsl",
            Kernel::Cast => "cast.wgsl",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Kernel::Embed => include_str!("../shaders/embed.wgsl"),
            Kernel::RmsNorm => include_str!("../shaders/rmsnorm.wgsl"),
            Kernel::Matmul => include_str!("../shaders/matmul.wgsl"),
            Kernel::MatmulCoop => include_str!("../shaders/matmul_coop.wgsl"),
            Kernel::Matvec => include_str!("../shaders/matvec.wgsl"),
            Kernel::Rope => include_str!("../shaders/rope.wgsl"),
            Kernel::Swiglu => include_str!("../shaders/swiglu.wgsl"),
            Kernel::Argmax => include_str!("../shaders/argmax.wgsl"),
            Kernel::Cast => include_str!("../shaders/cast.wgsl"),
        }
    }
}

/// The full WGSL text of `kernel`.
pub fn compose(kernel: Kernel) -> Result<String> {
    let mut out = String::new();
    for line in kernel.source().lines() {
        match line.trim().strip_prefix("#include ") {
            Some(path) => match SHARED.iter().find(|(name, _)| *name == path) {
                Some((_, piece)) => out.push_str(piece),
                None => {
                    let message = format!("unknown include `{path}`");
                    return Err(Error::Shader { name: kernel.name().into(), message });
                }
            },
            None => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

/// The compiled pipeline of `kernel` with `constants` (override name, value), cached by the context.
pub(crate) fn pipeline(
    ctx: &WgpuContext,
    kernel: Kernel,
    constants: &[(&'static str, u32)],
) -> Result<wgpu::ComputePipeline> {
    let source = compose(kernel)?;
    // SAFETY: every loop in the model kernels runs over a finite range fixed by their params before it
    // starts.
    unsafe { ctx.wgsl_pipeline(kernel.name(), &source, constants) }
}
