//! Host-side planning cost: building the compressed block index and the MergeQ tile lists for the paper's
//! S2 layout (32 heads, block 64, local 16, vert_stride 16) from 16k to 128k tokens.
//!
//! `cargo bench --bench host`. Each iteration starts from a fresh `Layout`, so nothing is cached.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use s2attn::{Layout, MergeQPlan, S2Config};
use std::hint::black_box;

fn paper_layout() -> Layout {
    match Layout::s2(S2Config::new(32, 64, 16, 16)) {
        Ok(l) => l,
        Err(e) => panic!("the paper's layout is valid: {e}"),
    }
}

fn host(c: &mut Criterion) {
    let mut g = c.benchmark_group("host");
    g.sample_size(10);
    for seq in [16384u32, 32768, 65536, 131072] {
        g.bench_with_input(BenchmarkId::new("block_index", seq), &seq, |b, &seq| {
            b.iter(|| black_box(paper_layout().index(seq).nnz()))
        });
        let index = paper_layout().index(seq);
        g.bench_with_input(BenchmarkId::new("mergeq_plan", seq), &seq, |b, _| {
            b.iter(|| black_box(MergeQPlan::build(&index, 64, true, 64).tiles()))
        });
        g.bench_with_input(BenchmarkId::new("active_pairs", seq), &seq, |b, &seq| {
            let layout = paper_layout();
            layout.index(seq);
            b.iter(|| black_box(layout.active_pairs(seq)))
        });
    }
    g.finish();
}

criterion_group!(benches, host);
criterion_main!(benches);
