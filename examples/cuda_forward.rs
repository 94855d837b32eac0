//! Times the CUDA forward kernel at the paper's sizes (32 heads, head dim 128, block 64, local 16):
//! 16k / 64k / 128k tokens with vert_stride 16 and 128k with vert_stride 64, fp16 and bf16, and prints
//! the median time and the effective rate (4 * head_dim * active query-key pairs per second).
//!
//! ```text
//! cargo run --release --features cuda --example cuda_forward -- [--seq 16384,65536] [--stride 16,64]
//!     [--dtype f16,bf16] [--iters 20] [--heads 32] [--dim 128] [--block 64] [--local 16]
//! ```
//! Without flags it runs the paper's four rows in both dtypes.

#[cfg(feature = "cuda")]
#[path = "common/args.rs"]
mod args;

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_forward needs the `cuda` feature: cargo run --release --features cuda --example cuda_forward");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_forward: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
fn run() -> Result<(), Box<dyn std::error::Error>> {
    use s2attn::{Attention, Backend, Context, ContextOptions, DType, Layout, S2Config, Shape};

    let args = args::Args::from_env();
    let heads = args.one("--heads", 32)?;
    let dim = args.one("--dim", 128)?;
    let block = args.one("--block", 64)?;
    let local = args.one("--local", 16)?;
    let iters = args.one("--iters", 20)?;
    let strides = args.nums("--stride", "16,64")?;
    let seqs = args.nums("--seq", "16384,65536,131072")?;
    let dtypes = args.list("--dtype", "f16,bf16")?;

    let ctx = Context::with_options(&ContextOptions { backend: Backend::Cuda, ..Default::default() })?;
    println!("{}", ctx.describe());
    let max_seq = seqs.iter().copied().max().unwrap_or(0) as usize;
    let elems = max_seq * heads as usize * dim as usize;
    // Random inputs in [-1, 1) (never zeros), generated once at the largest size; smaller rows use a prefix.
    let raw = args::random_inputs(3 * elems);
    println!("| dtype | seq | vert_stride | density | median ms | min ms | TFLOP/s (effective) | plan |");
    println!("|---|---|---|---|---|---|---|---|");
    for dt in &dtypes {
        let dtype = match dt.as_str() {
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => return Err(format!("--dtype {other}: use f16 or bf16").into()),
        };
        let bits: Vec<u16> =
            raw.iter()
                .map(|&x| {
                    if dtype == DType::F16 {
                        half::f16::from_f32(x).to_bits()
                    } else {
                        half::bf16::from_f32(x).to_bits()
                    }
                })
                .collect();
        for &seq in &seqs {
            for &stride in &strides {
                // The paper's rows: vert_stride 64 only at the longest length, unless asked for explicitly.
                if stride != strides[0] && seq as usize != max_seq && !args.has("--stride") {
                    continue;
                }
                let layout = Layout::s2(S2Config::new(heads, block, local, stride))?;
                let shape = Shape::new(1, seq, dim, dtype);
                let op = Attention::new(&ctx, &layout, shape)?;
                let n = seq as usize * heads as usize * dim as usize;
                let (q, k, v) = (&bits[..n], &bits[elems..elems + n], &bits[2 * elems..2 * elems + n]);
                let t = if dtype == DType::F16 {
                    let cast = |x: &[u16]| x.iter().map(|&b| half::f16::from_bits(b)).collect::<Vec<_>>();
                    op.time_forward(&cast(q), &cast(k), &cast(v), 3, iters)?
                } else {
                    let cast = |x: &[u16]| x.iter().map(|&b| half::bf16::from_bits(b)).collect::<Vec<_>>();
                    op.time_forward(&cast(q), &cast(k), &cast(v), 3, iters)?
                };
                let flops = 4.0 * dim as f64 * layout.active_pairs(seq) as f64;
                let med = t.median_ms();
                println!(
                    "| {dt} | {seq} | {stride} | {:.4} | {med:.3} | {:.3} | {:.1} | {} |",
                    layout.density(seq),
                    t.min_ms(),
                    flops / (med * 1e-3) / 1e12,
                    op.plan()
                );
            }
        }
    }
    Ok(())
}
