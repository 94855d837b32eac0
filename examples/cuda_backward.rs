//! Times the CUDA forward and backward at the paper's sizes (32 heads, head dim 128, block 64, local 16,
//! vert_stride 16; 16k / 64k / 128k tokens) and prints the median times, forward + backward, and the
//! effective rates: 4 * head_dim FLOPs per active query-key pair forward, 2.5x that backward (the usual
//! convention; the deterministic kernels do 3.5x: S and dP are recomputed by the dQ pass).
//!
//! ```text
//! cargo run --release --features cuda --example cuda_backward -- [--seq 16384,65536,131072]
//!     [--dtype f16,bf16] [--iters 10] [--heads 32] [--dim 128] [--block 64] [--local 16] [--stride 16]
//! ```

#[cfg(feature = "cuda")]
#[path = "common/args.rs"]
mod args;

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_backward needs the `cuda` feature: cargo run --release --features cuda --example cuda_backward");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_backward: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
fn run() -> Result<(), Box<dyn std::error::Error>> {
    use s2attn::{Attention, AttentionGrad, Backend, Context, ContextOptions, DType, Element, Layout, S2Config, Shape};

    let args = args::Args::from_env();
    let (heads, dim, block) = (args.one("--heads", 32)?, args.one("--dim", 128)?, args.one("--block", 64)?);
    let (local, stride, iters) = (args.one("--local", 16)?, args.one("--stride", 16)?, args.one("--iters", 10)?);
    let seqs = args.nums("--seq", "16384,65536,131072")?;
    let dtypes = args.list("--dtype", "f16")?;

    let ctx = Context::with_options(&ContextOptions { backend: Backend::Cuda, ..Default::default() })?;
    println!("{}", ctx.describe());
    let layout = Layout::s2(S2Config::new(heads, block, local, stride))?;
    let max_seq = seqs.iter().copied().max().unwrap_or(0) as usize;
    let elems = max_seq * heads as usize * dim as usize;
    let raw = args::random_inputs(3 * elems);

    fn row<T: Element>(
        ctx: &Context,
        layout: &Layout,
        shape: Shape,
        x: [&[T]; 3],
        iters: u32,
    ) -> Result<(f64, f64, String), Box<dyn std::error::Error>> {
        let [q, k, v] = x;
        let fwd = Attention::new(ctx, layout, shape)?;
        let o = fwd.forward(q, k, v)?;
        let f = fwd.time_forward(q, k, v, 2, iters)?.median_ms();
        let op = AttentionGrad::new(ctx, layout, shape)?;
        // dO: the V values (any fresh non-zero data times the same).
        let b = op.time_backward(q, k, v, &o.out, &o.lse, v, (2, iters))?.median_ms();
        Ok((f, b, op.explain()))
    }

    println!(
        "| dtype | seq | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s (2.5x) | bwd kernel TFLOP/s (3.5x) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for dt in &dtypes {
        for &seq in &seqs {
            let n = seq as usize * heads as usize * dim as usize;
            let shape = |dtype| Shape::new(1, seq, dim, dtype);
            let slices = |conv: &dyn Fn(f32) -> u16| -> [Vec<u16>; 3] {
                [0, 1, 2].map(|i| raw[i * elems..i * elems + n].iter().map(|&x| conv(x)).collect())
            };
            let (f, b, explain) = match dt.as_str() {
                "f16" => {
                    let [q, k, v] = slices(&|x| half::f16::from_f32(x).to_bits());
                    let cast = |x: &[u16]| x.iter().map(|&b| half::f16::from_bits(b)).collect::<Vec<_>>();
                    let (q, k, v) = (cast(&q), cast(&k), cast(&v));
                    row(&ctx, &layout, shape(DType::F16), [&q, &k, &v], iters)?
                }
                "bf16" => {
                    let [q, k, v] = slices(&|x| half::bf16::from_f32(x).to_bits());
                    let cast = |x: &[u16]| x.iter().map(|&b| half::bf16::from_bits(b)).collect::<Vec<_>>();
                    let (q, k, v) = (cast(&q), cast(&k), cast(&v));
                    row(&ctx, &layout, shape(DType::BF16), [&q, &k, &v], iters)?
                }
                other => return Err(format!("--dtype {other}: use f16 or bf16").into()),
            };
            let fwd_flops = 4.0 * dim as f64 * layout.active_pairs(seq) as f64;
            let rate = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;
            println!(
                "| {dt} | {seq} | {f:.3} | {b:.3} | {:.3} | {:.1} | {:.1} | {:.1} |",
                f + b,
                rate(fwd_flops, f),
                rate(2.5 * fwd_flops, b),
                rate(3.5 * fwd_flops, b)
            );
            notes.push(explain);
        }
    }
    for n in notes {
        println!("{n}");
    }
    Ok(())
}
