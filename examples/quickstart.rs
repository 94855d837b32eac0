//! Quickstart: runs S2 attention on the default adapter (lavapipe when there is no GPU), prints the
//! adapter, the layout, the plan, the time and the error against the f64 oracle.
//!
//! `cargo run --release --example quickstart` (env: `S2ATTN_ADAPTER`, `S2ATTN_BACKEND`, `SEQ`).

use s2attn::cpu::{attention_reference, rel_l2_error};
use s2attn::{Attention, Context, DType, Layout, S2Config, Shape};
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("quickstart failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> s2attn::Result<()> {
    let ctx = Context::new()?;
    println!("{}\n", ctx.describe());

    let seq_len: u32 = std::env::var("SEQ").ok().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let (heads, kv_heads, head_dim) = (8, 4, 64);
    let config = S2Config::new(heads, 64, 4, 4).kv_heads(kv_heads);
    let layout = Layout::s2(config.clone())?;
    println!(
        "layout   S2 block {} local {} vert_stride {} heads {heads}/{kv_heads}: density {:.3} (per head {:?}), union complete: {}",
        config.block_size,
        config.local_blocks,
        config.vert_stride,
        layout.density(seq_len),
        layout.head_densities(seq_len).iter().map(|d| format!("{d:.3}")).collect::<Vec<_>>(),
        layout.union_complete(seq_len)
    );

    // f32 where the device has it (every wgpu adapter); the CUDA backend (`--features cuda`) is tensor-core
    // f16/bf16 only, judged at the f16 tolerance.
    let (dtype, tolerance) = if ctx.supports_dtype(DType::F32) { (DType::F32, 1e-5) } else { (DType::F16, 2e-3) };
    let shape = Shape::new(1, seq_len, head_dim, dtype);
    let op = Attention::new(&ctx, &layout, shape)?;
    println!("plan     {}", op.explain());

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    };
    let n_q = (seq_len * heads * head_dim) as usize;
    let n_kv = (seq_len * kv_heads * head_dim) as usize;
    let (mut q, mut k, mut v) = (rand(n_q), rand(n_kv), rand(n_kv));

    let (out, timing) = if dtype == DType::F32 {
        (op.forward(&q, &k, &v)?, op.time_forward(&q, &k, &v, 1, 5)?)
    } else {
        let h = |x: &[f32]| x.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>();
        let (qh, kh, vh) = (h(&q), h(&k), h(&v));
        // The oracle sees the inputs as stored, so only the kernel's own error remains.
        let back = |x: &[half::f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        (q, k, v) = (back(&qh), back(&kh), back(&vh));
        let o = op.forward(&qh, &kh, &vh)?;
        let t = op.time_forward(&qh, &kh, &vh, 1, 5)?;
        (s2attn::Output { out: back(&o.out), lse: o.lse }, t)
    };
    let pairs = layout.active_pairs(seq_len) as f64;
    let flops = 4.0 * head_dim as f64 * pairs;
    println!(
        "time     {:.3} ms median of 5 ({}), {:.3} GFLOP on active blocks = {:.1} GFLOP/s",
        timing.median_ms(),
        if timing.gpu_timestamps { "GPU timestamps" } else { "wall clock" },
        flops / 1e9,
        flops / timing.median_ms() / 1e6
    );

    let t = Instant::now();
    let reference = attention_reference(&layout, 1, seq_len, head_dim, shape.softmax_scale() as f64, &q, &k, &v);
    let err = rel_l2_error(out.out.iter().map(|&x| x as f64), &reference.out);
    let lse_err = rel_l2_error(out.lse.iter().map(|&x| x as f64), &reference.lse);
    println!(
        "check    ‖out−ref‖/‖ref‖ = {err:.2e}, lse {lse_err:.2e} (f64 oracle took {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    if !(err < tolerance && lse_err < tolerance) {
        return Err(s2attn::Error::Device(format!("result off the oracle: {err:.2e}")));
    }
    Ok(())
}
