//! A small S2 forward (4 heads, 2 KV heads, head dim 64, block 32, local 2, vert_stride 4, 512 tokens, f32)
//! on every wgpu adapter of the machine, timed on the GPU with `Attention::time_forward` (timestamps
//! where the adapter has them, else wall clock around a waited submit). With no adapter it prints a note
//! and measures nothing.
//!
//! `cargo bench --bench forward`.

use criterion::{criterion_group, criterion_main, Criterion};
use s2attn::gpu::WgpuContext;
use s2attn::{Attention, Context, ContextOptions, DType, Layout, S2Config, Shape};
use std::time::Duration;

const SEQ: u32 = 512;
const HEAD_DIM: u32 = 64;

fn inputs(n: usize, mut x: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn forward(c: &mut Criterion) {
    let adapters = WgpuContext::adapters();
    if adapters.is_empty() {
        eprintln!("forward bench: no wgpu adapter on this machine, nothing to measure");
        return;
    }
    let layout = match Layout::s2(S2Config::new(4, 32, 2, 4).kv_heads(2)) {
        Ok(l) => l,
        Err(e) => panic!("the bench layout is valid: {e}"),
    };
    let q = inputs((SEQ * 4 * HEAD_DIM) as usize, 0x2545_f491_4f6c_dd1d);
    let k = inputs((SEQ * 2 * HEAD_DIM) as usize, 0x9e37_79b9_7f4a_7c15);
    let v = inputs((SEQ * 2 * HEAD_DIM) as usize, 0x0123_4567_89ab_cdef);
    let mut g = c.benchmark_group("forward");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for a in adapters {
        let name = format!("{}/{}", a.backend, a.name);
        let op = Context::with_options(&ContextOptions::wgpu(Some(&a.backend), Some(&a.name)))
            .and_then(|ctx| Attention::new(&ctx, &layout, Shape::new(1, SEQ, HEAD_DIM, DType::F32)));
        let op = match op {
            Ok(op) => op,
            Err(e) => {
                eprintln!("forward bench: skipping {name}: {e}");
                continue;
            }
        };
        g.bench_function(name.as_str(), |b| {
            b.iter_custom(|iters| match op.time_forward(&q, &k, &v, 0, iters.max(1) as u32) {
                Ok(t) => Duration::from_secs_f64(t.samples_ms.iter().sum::<f64>() / 1e3),
                Err(e) => panic!("forward on {name} failed: {e}"),
            })
        });
    }
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
