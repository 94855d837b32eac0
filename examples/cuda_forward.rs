//! Times the CUDA forward kernel at the paper's sizes (32 heads, head dim 128, block 64, local 16):
//! 16k / 64k / 128k tokens with vert_stride 16 and 128k with vert_stride 64, fp16 and bf16, and prints
//! the median time and the effective rate (4 * head_dim * active query-key pairs per second).
//!
//! ```text
//! cargo run --release --features cuda --example cuda_forward -- [--seq 16384,65536] [--stride 16,64]
//!     [--dtype f16,bf16] [--iters 20] [--heads 32] [--dim 128] [--block 64] [--local 16]
//! ```
//! Without flags it runs the paper's four rows in both dtypes.

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

    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = |flag: &str, default: &str| -> Result<Vec<String>, String> {
        let v = match args.iter().position(|a| a == flag) {
            Some(i) => args.get(i + 1).cloned().ok_or(format!("{flag} needs a value"))?,
            None => default.to_string(),
        };
        Ok(v.split(',').map(str::to_string).collect())
    };
    let nums = |flag: &str, default: &str| -> Result<Vec<u32>, String> {
        list(flag, default)?.iter().map(|s| s.parse::<u32>().map_err(|e| format!("{flag} {s}: {e}"))).collect()
    };
    let one = |flag: &str, default: u32| -> Result<u32, String> { Ok(nums(flag, &default.to_string())?[0]) };
    let heads = one("--heads", 32)?;
    let dim = one("--dim", 128)?;
    let block = one("--block", 64)?;
    let local = one("--local", 16)?;
    let iters = one("--iters", 20)?;
    let strides = nums("--stride", "16,64")?;
    let seqs = nums("--seq", "16384,65536,131072")?;
    let dtypes = list("--dtype", "f16,bf16")?;

    let ctx = Context::with_options(&ContextOptions { backend: Backend::Cuda, ..Default::default() })?;
    println!("{}", ctx.describe());
    let max_seq = seqs.iter().copied().max().unwrap_or(0) as usize;
    let elems = max_seq * heads as usize * dim as usize;
    // Random inputs in [-1, 1) (never zeros), generated once at the largest size; smaller rows use a prefix.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let raw: Vec<f32> = (0..3 * elems)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
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
                if stride != strides[0] && seq as usize != max_seq && args.iter().all(|a| a != "--stride") {
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
