//! Multi-device: opens every device of the machine, splits one S2 attention call across them by measured
//! speed, and compares the split call with each device alone (host round trips: upload, kernels, readback;
//! median of `ITERS`). Checks the split output against the oracle on a small size first.
//!
//! `cargo run --release --example multi_device` (env: `SEQ` default 8192, `HEADS` 32, `KV_HEADS` 8,
//! `HEAD_DIM` 128, `ITERS` 5; f16, block 64, local 16, vert_stride 16).

use s2attn::cpu::{attention_reference, rel_l2_error};
use s2attn::{Attention, DType, Layout, MultiDevice, S2Config, Shape};
use std::time::Instant;

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn random(n: usize, seed: u64) -> Vec<half::f16> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            half::f16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect()
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    if let Err(e) = run() {
        eprintln!("multi_device failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> s2attn::Result<()> {
    let (seq, heads, kv_heads, d, iters) =
        (env("SEQ", 8192), env("HEADS", 32), env("KV_HEADS", 8), env("HEAD_DIM", 128), env("ITERS", 5));
    let set = MultiDevice::open_all()?;
    println!("devices: {:?}", set.device_names());
    for s in set.skipped() {
        println!("skipped: {s}");
    }
    let layout = Layout::s2(S2Config::new(heads, 64, 16, 16).kv_heads(kv_heads))?;

    // Correctness of the split on a small size.
    let small = Shape::new(1, 700, d, DType::F16);
    let plan = set.plan(&layout, small)?;
    let (nq, nkv) = ((700 * heads * d) as usize, (700 * kv_heads * d) as usize);
    let (q, k, v) = (random(nq, 1), random(nkv, 2), random(nkv, 3));
    let out = set.forward(&plan, &q, &k, &v)?;
    let f = |x: &[half::f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
    let reference = attention_reference(&layout, 1, 700, d, small.softmax_scale() as f64, &f(&q), &f(&k), &f(&v));
    let err = rel_l2_error(out.out.iter().map(|x| x.to_f64()), &reference.out);
    println!("check at 700 tokens: ‖out−ref‖/‖ref‖ = {err:.2e}\n{plan}\n");

    let shape = Shape::new(1, seq, d, DType::F16);
    println!("speeds (query-key pairs per ms): {:?}", set.speeds(&layout, &shape)?);
    let plan = set.plan(&layout, shape)?;
    println!("plan for {seq} tokens, {heads} heads / {kv_heads} KV heads, head_dim {d}, f16:\n{plan}");
    let (nq, nkv) = ((seq * heads * d) as usize, (seq * kv_heads * d) as usize);
    let (q, k, v) = (random(nq, 4), random(nkv, 5), random(nkv, 6));
    set.forward(&plan, &q, &k, &v)?;
    let split = median(
        (0..iters)
            .map(|_| {
                let t = Instant::now();
                set.forward(&plan, &q, &k, &v).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<s2attn::Result<Vec<_>>>()?,
    );
    println!("split across the set: {split:.2} ms (host round trip, median of {iters})");
    for (i, name) in set.device_names().iter().enumerate() {
        let alone = set.subset(&[i])?;
        let op_plan = alone.plan(&layout, shape)?;
        let times: s2attn::Result<Vec<f64>> = (0..=iters)
            .map(|_| {
                let t = Instant::now();
                alone.forward(&op_plan, &q, &k, &v).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect();
        match times {
            Ok(mut t) => {
                t.remove(0);
                let ms = median(t);
                let kernel = op_plan.ops().first().map(Attention::explain).unwrap_or_default();
                println!("device {i} {name} alone: {ms:.2} ms (split/alone = {:.2})\n  {kernel}", split / ms);
            }
            Err(e) => println!("device {i} {name} alone: failed: {e}"),
        }
    }
    Ok(())
}
