//! The backward pass: the f64 oracle's analytic gradients checked by finite differences; the column plan
//! checked against the element mask and against the transpose of the forward's MergeQ lists; the CPU twin
//! of the kernels at many tile sizes; and the GPU kernels (on whatever wgpu adapter there is: lavapipe in
//! CI) against the oracle for every layout family: block sizes, head dims, odd lengths, batch, GQA, dense,
//! pure local, homo_head, dense heads, offsets, bidirectional, custom masks (per-query-head and with empty
//! rows), custom scales, f32 and f16, through host slices and through NaN-poisoned caller buffers.
//! Inputs are fresh random values (never zeros). Sizes are tiny: lavapipe runs ~2 GFLOP/s.

mod common;

use common::{
    from_bytes, poisoned, random_mask, read_back, to_bytes, tolerance, upload, wgpu_context, Inputs, Problem, Rng,
};
use s2attn::cpu::{attention_backward_reference, attention_reference, backward_portable, rel_l2_error, BackwardInputs};
use s2attn::gpu::GradBuffers;
use s2attn::plan::{backward_workgroup_bytes, plan_backward_portable, ColumnPlan, DeviceCaps, MergeQPlan, RowMask};
use s2attn::{AttentionGrad, BlockMask, DType, Error, Grads, Layout, S2Config};

fn s2(c: S2Config) -> Layout {
    Layout::s2(c).expect("valid S2 config")
}

const F32_F16: [DType; 2] = [DType::F32, DType::F16];
/// The head dim of the layout-family tests (every head dim has its own test): one set of pipelines,
/// since lavapipe compiles each in about a second.
const D: u32 = 32;

/// A backward problem: forward inputs plus a random output gradient, all rounded to the storage type.
struct Case {
    p: Problem,
    x: Inputs,
    d_out: Vec<f32>,
}

fn case(p: &Problem, seed: u64) -> Case {
    let d_out = Rng::new(seed ^ 0xD0D0).tensor(p.q_len(), p.dtype);
    Case { p: p.clone(), x: p.inputs(seed), d_out }
}

impl Case {
    fn oracle(&self) -> Grads<f64> {
        attention_backward_reference(&self.p.layout, &self.p.shape(), &self.x.q, &self.x.k, &self.x.v, &self.d_out)
    }
    /// The oracle's O (rounded to the storage type) and LSE, standing in for a forward pass.
    fn oracle_forward(&self) -> (Vec<f32>, Vec<f32>) {
        let r = self.p.reference(&self.x);
        let out = r.out.iter().map(|&o| common::round_to(self.p.dtype, o as f32)).collect();
        (out, r.lse.iter().map(|&l| l as f32).collect())
    }
}

/// Relative L2 error of each gradient under `tol` (NaN anywhere fails: `rel_l2_error` is infinite).
fn assert_grads(what: &str, p: &Problem, got: &Grads<f32>, want: &Grads<f64>, tol: f64) {
    // (dQ and dK vanish where every row has one key, e.g. seq 1; dV never does.)
    assert!(want.dv.iter().any(|&x| x != 0.0), "{what}: the oracle's dv is all zeros: the test lost its point");
    for (name, g, w) in [("dq", &got.dq, &want.dq), ("dk", &got.dk, &want.dk), ("dv", &got.dv, &want.dv)] {
        assert_eq!(g.len(), w.len(), "{what}: {name} length for {p:?}");
        let err = rel_l2_error(g.iter().map(|&x| x as f64), w);
        assert!(err < tol, "{what}: ‖{name}−ref‖/‖ref‖ = {err:.3e} >= {tol:.0e} for {p:?}");
    }
}

/// The bound for `op`'s gradients: the storage type's, or the tensor-core bound where the planner chose
/// the cooperative-matrix backward (f16 dS and P rounded for the matrix units; on adapters with them).
fn grad_tolerance(op: &AttentionGrad, dtype: DType) -> f64 {
    if op.plan().dq.variant == s2attn::KernelVariant::Coop {
        5e-3
    } else {
        tolerance(dtype)
    }
}

fn grad_op(p: &Problem) -> AttentionGrad {
    AttentionGrad::new(wgpu_context(), &p.layout, p.shape())
        .unwrap_or_else(|e| panic!("AttentionGrad::new({p:?}): {e}"))
}

/// `op.backward` on host slices of the problem's element type, widened back to f32.
fn run_backward(op: &AttentionGrad, c: &Case, out: &[f32], lse: &[f32]) -> Grads<f32> {
    let fail = |e: Error| -> ! { panic!("backward({:?}): {e}", c.p) };
    let x = &c.x;
    match c.p.dtype {
        DType::F32 => op.backward(&x.q, &x.k, &x.v, out, lse, &c.d_out).unwrap_or_else(|e| fail(e)),
        _ => {
            let h = |v: &[f32]| v.iter().map(|&a| half::f16::from_f32(a)).collect::<Vec<_>>();
            let g = op.backward(&h(&x.q), &h(&x.k), &h(&x.v), &h(out), lse, &h(&c.d_out)).unwrap_or_else(|e| fail(e));
            let w = |v: Vec<half::f16>| v.into_iter().map(f32::from).collect();
            Grads { dq: w(g.dq), dk: w(g.dk), dv: w(g.dv) }
        }
    }
}

/// The GPU forward (for O and the LSE) then the GPU backward, judged against the oracle.
fn check(p: &Problem, seed: u64) {
    let c = case(p, seed);
    let fwd = common::run_host(wgpu_context(), p, &c.x);
    let op = grad_op(p);
    let got = run_backward(&op, &c, &fwd.out, &fwd.lse);
    assert_grads("host", p, &got, &c.oracle(), grad_tolerance(&op, p.dtype));
}

fn check_both(l: &Layout, batch: u32, seq: u32, d: u32, seed: u64) {
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        check(&Problem::new(l, batch, seq, d, dtype), seed * 2 + i as u64);
    }
}

fn custom(mask: BlockMask, heads: u32, kv_heads: u32) -> Layout {
    Layout::custom(mask, heads, kv_heads).expect("custom layout")
}

// ---- the oracle ----

/// `sum(d_out * O)` by the forward oracle, in f64.
fn loss(p: &Problem, q: &[f32], k: &[f32], v: &[f32], d_out: &[f32]) -> f64 {
    let scale = p.shape().softmax_scale() as f64;
    let r = attention_reference(&p.layout, p.batch, p.seq_len, p.head_dim, scale, q, k, v);
    r.out.iter().zip(d_out).map(|(&o, &g)| o * g as f64).sum()
}

#[test]
fn oracle_gradients_match_finite_differences() {
    // Every coordinate of Q, K and V, central differences on the forward oracle. The step is measured
    // after rounding to f32, so the quotient is exact up to O(h^2) truncation.
    let cases = [
        Problem::new(&s2(S2Config::new(4, 16, 1, 2).kv_heads(2)), 2, 37, 8, DType::F32),
        Problem::new(&s2(S2Config::new(2, 16, 1, 2).bidirectional(1, 1).offset(1)), 1, 40, 4, DType::F32)
            .with_scale(0.7),
        Problem::new(&custom(random_mask(7, 4, 3, 16, false, Some(1)), 4, 2), 1, 45, 4, DType::F32),
    ];
    let h = 1e-3f32;
    for (n, p) in cases.iter().enumerate() {
        let c = case(p, 10 + n as u64);
        let want = c.oracle();
        let mut tensors = [c.x.q.clone(), c.x.k.clone(), c.x.v.clone()];
        for (t, analytic) in [&want.dq, &want.dk, &want.dv].into_iter().enumerate() {
            let mut fd = Vec::with_capacity(analytic.len());
            for i in 0..analytic.len() {
                let x0 = tensors[t][i];
                let (up, down) = (x0 + h, x0 - h);
                tensors[t][i] = up;
                let l_up = loss(p, &tensors[0], &tensors[1], &tensors[2], &c.d_out);
                tensors[t][i] = down;
                let l_down = loss(p, &tensors[0], &tensors[1], &tensors[2], &c.d_out);
                tensors[t][i] = x0;
                fd.push((l_up - l_down) / (up as f64 - down as f64));
            }
            assert!(analytic.iter().any(|&g| g.abs() > 1e-3), "case {n}: gradient {t} is (near) zero");
            let err = rel_l2_error(fd.iter().copied(), analytic);
            assert!(err < 1e-5, "case {n}: finite differences of tensor {t} differ from the oracle by {err:.3e}");
        }
    }
}

#[test]
fn oracle_rows_without_keys_contribute_nothing() {
    // A custom mask whose query block 1 attends nothing: dQ of those rows is exactly zero, and dropping
    // those rows' dO changes nothing else.
    let p = Problem::new(&custom(random_mask(3, 1, 4, 16, true, Some(1)), 2, 1), 1, 60, 8, DType::F32);
    let mut c = case(&p, 20);
    let before = c.oracle();
    for t in 16..32 {
        for h in 0..2 {
            let row = ((t * 2 + h) * 8) as usize;
            assert!(before.dq[row..row + 8].iter().all(|&g| g == 0.0), "dq of empty row {t} head {h}");
            c.d_out[row..row + 8].iter_mut().for_each(|g| *g = 0.5);
        }
    }
    let after = c.oracle();
    assert_eq!((before.dk, before.dv), (after.dk, after.dv), "dO of rows without keys leaked into dK/dV");
}

// ---- the column plan ----

fn plan_layouts() -> Vec<Layout> {
    vec![
        s2(S2Config::new(4, 16, 2, 3)),
        s2(S2Config::new(4, 16, 1, 4).kv_heads(2).offset(1).dense_heads(1)),
        s2(S2Config::new(2, 32, 3, 2).homo_head(true)),
        s2(S2Config::new(2, 16, 1, 1000)),
        s2(S2Config::new(2, 16, 2, 3).bidirectional(2, 1)),
        Layout::dense(2, 1, 16, false).expect("dense"),
        custom(random_mask(1, 2, 9, 16, true, Some(3)), 2, 2),
        custom(random_mask(2, 1, 9, 16, false, None), 2, 1),
    ]
}

#[test]
fn column_plan_covers_exactly_the_active_pairs() {
    // Brute force over the element mask: a (query, key) pair is active iff the key's block lists the
    // query's tile with a row mask admitting the query's row (causality masking the rest).
    for l in plan_layouts() {
        let bs = l.block_size();
        for seq in [1, 17, 100, 143] {
            let index = l.index(seq);
            for tile_q in [4, 8, 16, 32, 64] {
                let plan = ColumnPlan::build(&index, bs, l.causal(), tile_q);
                for p in 0..l.num_patterns() {
                    for kb in 0..l.blocks(seq) {
                        let col = plan.column(p, kb);
                        assert!(col.windows(2).all(|w| w[0].q_tile < w[1].q_tile), "column ({p}, {kb}) not ascending");
                    }
                    for qi in 0..seq {
                        for kj in 0..seq {
                            let listed = plan
                                .column(p, kj / bs)
                                .iter()
                                .any(|e| e.q_tile == qi / tile_q && e.rows.attends(qi % tile_q, bs));
                            let planned = listed && (!l.causal() || kj <= qi);
                            assert_eq!(
                                planned,
                                l.element_active(p, qi, kj),
                                "{l:?} seq {seq} tile {tile_q} ({p}, {qi}, {kj})"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn column_plan_is_the_transpose_of_the_forward_lists() {
    // Same tiles, same row masks as the forward's MergeQ lists: forward and backward mask alike.
    let mut merged_bits = false;
    for l in plan_layouts() {
        for seq in [1, 33, 100, 256] {
            let index = l.index(seq);
            for tile_q in [4, 8, 16, 32, 64] {
                let built = ColumnPlan::build(&index, l.block_size(), l.causal(), tile_q);
                let mergeq = MergeQPlan::build(&index, l.block_size(), l.causal(), tile_q);
                assert_eq!(built, ColumnPlan::transpose_of(&mergeq), "{l:?} seq {seq} tile {tile_q}");
                merged_bits |= built.entries().iter().any(|e| matches!(e.rows, RowMask::Blocks(_)));
            }
        }
    }
    assert!(merged_bits, "no case needed per-block row masks: the merged path went untested");
}

// ---- the CPU twin ----

fn caps(workgroup_bytes: u32) -> DeviceCaps {
    DeviceCaps {
        max_workgroup_storage: workgroup_bytes,
        max_invocations: 256,
        max_storage_binding: 1 << 30,
        max_buffer: 1 << 30,
        max_dispatch: 65535,
        ..DeviceCaps::default()
    }
}

#[test]
fn cpu_twin_matches_the_oracle_at_every_tile_size() {
    let cases = [
        (s2(S2Config::new(4, 16, 2, 3).kv_heads(2)), 2, 61, 32),
        (s2(S2Config::new(2, 32, 1, 2).offset(1).dense_heads(1)), 1, 100, 64),
        (s2(S2Config::new(2, 16, 1, 3).bidirectional(1, 2)), 1, 50, 32),
        (custom(random_mask(5, 4, 5, 16, true, Some(2)), 4, 2), 1, 77, 32),
        (custom(random_mask(6, 2, 4, 16, false, None), 2, 1), 2, 64, 64),
    ];
    let mut tiles = std::collections::BTreeSet::new();
    for (n, (l, batch, seq, d)) in cases.into_iter().enumerate() {
        let p = Problem::new(&l, batch, seq, d, DType::F32);
        let c = case(&p, 30 + n as u64);
        let want = c.oracle();
        let (out, lse) = c.oracle_forward();
        for bytes in [8 << 10, 16 << 10, 32 << 10, 64 << 10] {
            let Ok(plan) = plan_backward_portable(&p.shape(), &l, &caps(bytes)) else { continue };
            let index = l.index(seq);
            let mergeq = MergeQPlan::build(&index, l.block_size(), l.causal(), plan.dq.tile_q);
            let columns = ColumnPlan::build(&index, l.block_size(), l.causal(), plan.dkdv.tile_q);
            let x = BackwardInputs { q: &c.x.q, k: &c.x.k, v: &c.x.v, out: &out, lse: &lse, d_out: &c.d_out };
            let got = backward_portable(&l, &p.shape(), &plan, &mergeq, &columns, &x);
            assert_grads(&format!("twin at {plan}"), &p, &got, &want, 1e-5);
            tiles.insert((plan.dq.tile_q, plan.dq.tile_kv, plan.dkdv.tile_q, plan.dkdv.tile_kv));
        }
    }
    assert!(tiles.len() >= 4, "only {} tile choices were exercised: {tiles:?}", tiles.len());
    assert!(tiles.iter().any(|t| t.2 > 16), "no dK/dV plan merged query blocks: {tiles:?}");
}

#[test]
fn planner_respects_registers_and_workgroup_memory() {
    let l = s2(S2Config::new(2, 16, 1, 2));
    for d in [32, 64, 96, 128, 256] {
        for bytes in [16 << 10, 32 << 10, 48 << 10] {
            let shape = Problem::new(&l, 1, 64, d, DType::F32).shape();
            let plan = match plan_backward_portable(&shape, &l, &caps(bytes)) {
                Ok(plan) => plan,
                // The smallest tiles at d = 256 (4 x 4) need 16.5 KiB.
                Err(Error::DeviceLimit { needed, .. }) if d == 256 && bytes == 16 << 10 => {
                    assert_eq!(needed, backward_workgroup_bytes(4, 4, 256) as u64);
                    continue;
                }
                Err(e) => panic!("d {d}, {bytes} B: {e}"),
            };
            for k in [&plan.dq, &plan.dkdv] {
                assert!(k.workgroup_bytes <= bytes, "d {d}: {k}");
                assert!(k.tile_kv <= l.block_size(), "d {d}: KV tile larger than a block: {k}");
            }
            assert!(plan.dq.tile_q * d / 4 <= 64 * 16 && 2 * plan.dkdv.tile_kv * d / 4 <= 64 * 16, "d {d}: {plan}");
        }
    }
    let shape = Problem::new(&l, 1, 64, 48, DType::F32).shape();
    assert!(matches!(plan_backward_portable(&shape, &l, &caps(1 << 16)), Err(Error::HeadDim { got: 48, .. })));
    let shape = Problem::new(&l, 1, 64, 256, DType::F32).shape();
    assert!(matches!(plan_backward_portable(&shape, &l, &caps(4096)), Err(Error::DeviceLimit { .. })));
}

// ---- the GPU kernels ----

#[test]
fn every_block_size() {
    for (i, bs) in [16, 32, 64, 128].into_iter().enumerate() {
        check_both(&s2(S2Config::new(2, bs, 2, 3)), 1, 3 * bs + 5, D, 100 + i as u64);
    }
}

#[test]
fn every_head_dim() {
    // O and the LSE come from the oracle here, so that head dims the forward refuses on this adapter
    // (256 needs more workgroup memory than lavapipe's 32 KiB for the forward) still test the backward.
    let l = s2(S2Config::new(2, 16, 1, 2).kv_heads(1));
    for (i, d) in [32, 64, 96, 128, 256].into_iter().enumerate() {
        for dtype in F32_F16 {
            let p = Problem::new(&l, 1, 45, d, dtype);
            let c = case(&p, 200 + i as u64);
            let op = match AttentionGrad::new(wgpu_context(), &l, p.shape()) {
                Ok(op) => op,
                Err(Error::DeviceLimit { limit: "max_compute_workgroup_storage_size", needed, max, .. })
                    if d == 256 =>
                {
                    assert!(needed > max);
                    println!("head_dim 256 backward refused: {needed} B of workgroup memory > {max} B");
                    continue;
                }
                Err(e) => panic!("AttentionGrad::new({p:?}): {e}"),
            };
            let (out, lse) = c.oracle_forward();
            let tol = grad_tolerance(&op, dtype);
            assert_grads(&op.explain(), &p, &run_backward(&op, &c, &out, &lse), &c.oracle(), tol);
        }
    }
}

#[test]
fn odd_sequence_lengths_and_partial_last_blocks() {
    let l = s2(S2Config::new(2, 16, 2, 3).kv_heads(1));
    for (i, seq) in [1, 2, 15, 17, 33, 97].into_iter().enumerate() {
        check(&Problem::new(&l, 1, seq, D, DType::F32), 300 + i as u64);
    }
    let l = s2(S2Config::new(2, 64, 1, 2));
    for (i, seq) in [1, 65, 131].into_iter().enumerate() {
        check(&Problem::new(&l, 2, seq, D, DType::F16), 320 + i as u64);
    }
}

#[test]
fn batch_and_gqa() {
    check_both(&s2(S2Config::new(8, 16, 1, 4).kv_heads(2)), 3, 50, D, 400);
    check_both(&s2(S2Config::new(6, 32, 2, 3).kv_heads(3)), 2, 70, D, 401);
    check_both(&s2(S2Config::new(4, 16, 1, 2).kv_heads(1)), 2, 40, D, 402);
}

#[test]
fn dense_and_pure_local() {
    check_both(&s2(S2Config::new(2, 32, 1, 1)), 1, 100, D, 500);
    check_both(&Layout::dense(4, 2, 16, true).expect("dense"), 2, 47, D, 501);
    check_both(&Layout::dense(2, 2, 64, false).expect("dense"), 1, 90, D, 502);
    // vert_stride beyond the sequence: local windows only (plus block 0's stripe at phase 0).
    check_both(&s2(S2Config::new(4, 16, 2, 1000).offset(1)), 1, 100, D, 503);
}

#[test]
fn homo_head_dense_heads_and_offsets() {
    let cases = [
        S2Config::new(4, 16, 1, 4).homo_head(true),
        S2Config::new(4, 16, 1, 4).homo_head(true).dense_heads(1).kv_heads(2),
        S2Config::new(4, 32, 2, 5).dense_heads(2),
        S2Config::new(8, 16, 1, 16).kv_heads(4).offset(3).dense_heads(1),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        check_both(&s2(c), 1, 90, D, 600 + i as u64);
    }
}

#[test]
fn bidirectional_windows() {
    check_both(&s2(S2Config::new(4, 16, 1, 3).bidirectional(1, 1)), 1, 70, D, 700);
    check_both(&s2(S2Config::new(2, 32, 1, 2).bidirectional(2, 0).kv_heads(1)), 2, 75, D, 701);
}

#[test]
fn custom_masks_per_query_head_and_with_empty_rows() {
    // Mask heads = query heads under GQA: the query heads a dK/dV workgroup sums walk different lists.
    let cases = [
        (custom(random_mask(11, 4, 6, 16, true, None), 4, 2), 1, 90),
        (custom(random_mask(12, 2, 5, 16, false, Some(1)), 2, 1), 2, 77),
        (custom(random_mask(13, 1, 4, 32, true, Some(2)), 2, 2), 1, 120),
    ];
    for (i, (l, batch, seq)) in cases.into_iter().enumerate() {
        check_both(&l, batch, seq, D, 800 + i as u64);
    }
}

#[test]
fn custom_softmax_scale() {
    let l = s2(S2Config::new(2, 16, 1, 3));
    for (i, scale) in [0.05f32, 2.0].into_iter().enumerate() {
        check(&Problem::new(&l, 1, 60, D, DType::F32).with_scale(scale), 900 + i as u64);
    }
}

/// Runs `op` through `encode` on caller buffers whose gradients start out as NaN.
fn run_encode(op: &AttentionGrad, c: &Case, out: &[f32], lse: &[f32]) -> Grads<f32> {
    let dt = c.p.dtype;
    let up = |v: &[f32]| upload(&to_bytes(dt, v));
    let (q, k, v, o, d_out) = (up(&c.x.q), up(&c.x.k), up(&c.x.v), up(out), up(&c.d_out));
    let lse = upload(bytemuck::cast_slice(lse));
    let (dq, dk, dv) = (
        poisoned(c.x.q.len() as u64 * dt.size()),
        poisoned(c.x.k.len() as u64 * dt.size()),
        poisoned(c.x.v.len() as u64 * dt.size()),
    );
    let buffers = GradBuffers { q: &q, k: &k, v: &v, out: &o, lse: &lse, d_out: &d_out, dq: &dq, dk: &dk, dv: &dv };
    let (device, queue) = common::device();
    let mut encoder = device.create_command_encoder(&Default::default());
    op.encode(&mut encoder, &buffers).unwrap_or_else(|e| panic!("encode({:?}): {e}", c.p));
    queue.submit([encoder.finish()]);
    let get = |b: &wgpu::Buffer| from_bytes(dt, &read_back(b));
    Grads { dq: get(&dq), dk: get(&dk), dv: get(&dv) }
}

#[test]
fn caller_owned_buffers_poisoned_with_nan() {
    // Every gradient element must be written, including keys no query attends and rows without keys.
    let cases = [
        (s2(S2Config::new(2, 16, 2, 3)), 1, 83),
        (s2(S2Config::new(8, 32, 1, 4).kv_heads(2).dense_heads(1)), 2, 70),
        (s2(S2Config::new(2, 16, 1, 2).bidirectional(1, 1).offset(1)), 2, 45),
        (custom(random_mask(14, 2, 4, 16, true, Some(1)), 2, 1), 1, 61),
    ];
    for (i, (l, batch, seq)) in cases.into_iter().enumerate() {
        for dtype in F32_F16 {
            let p = Problem::new(&l, batch, seq, D, dtype);
            let c = case(&p, 1000 + i as u64);
            let fwd = common::run_host(wgpu_context(), &p, &c.x);
            let got = run_encode(&grad_op(&p), &c, &fwd.out, &fwd.lse);
            assert_grads("encode", &p, &got, &c.oracle(), tolerance(dtype));
        }
    }
}

#[test]
fn deterministic_and_reusable() {
    // Same inputs twice: bitwise-identical gradients; new inputs on the same op: still right.
    let l = s2(S2Config::new(4, 16, 1, 3).kv_heads(2));
    let p = Problem::new(&l, 2, 64, D, DType::F32);
    let op = grad_op(&p);
    let c = case(&p, 1100);
    let (out, lse) = c.oracle_forward();
    let first = run_backward(&op, &c, &out, &lse);
    let bits = |g: &Grads<f32>| [&g.dq, &g.dk, &g.dv].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    assert_eq!(bits(&first), bits(&run_backward(&op, &c, &out, &lse)), "two identical calls differ");
    assert_eq!(bits(&first), bits(&run_encode(&op, &c, &out, &lse)), "host and encode paths differ");
    let c2 = case(&p, 1101);
    let (out2, lse2) = c2.oracle_forward();
    assert_grads("reused op", &p, &run_backward(&op, &c2, &out2, &lse2), &c2.oracle(), 1e-5);
}

#[test]
fn bad_arguments_are_named() {
    let l = s2(S2Config::new(4, 16, 1, 3).kv_heads(2));
    let p = Problem::new(&l, 1, 20, 32, DType::F32);
    let op = grad_op(&p);
    let (q, kv, lse) = (vec![0.5f32; p.q_len()], vec![0.5f32; p.kv_len()], vec![0f32; p.lse_len()]);
    let short = vec![0.5f32; 3];
    let calls: [(&str, [&[f32]; 6]); 6] = [
        ("q", [&short, &kv, &kv, &q, &lse, &q]),
        ("k", [&q, &short, &kv, &q, &lse, &q]),
        ("v", [&q, &kv, &short, &q, &lse, &q]),
        ("out", [&q, &kv, &kv, &short, &lse, &q]),
        ("lse", [&q, &kv, &kv, &q, &short, &q]),
        ("d_out", [&q, &kv, &kv, &q, &lse, &short]),
    ];
    for (name, [a, b, c, d, e, f]) in calls {
        match op.backward(a, b, c, d, e, f) {
            Err(Error::Length { tensor, got: 3, .. }) => assert_eq!(tensor, name),
            other => panic!("short {name}: {other:?}"),
        }
    }
    let h = vec![half::f16::ZERO; p.q_len()];
    assert!(matches!(op.backward(&h, &h, &h, &h, &lse, &h), Err(Error::DType { .. })));
    let bf16 = Problem::new(&l, 1, 20, 32, DType::BF16).shape();
    assert!(matches!(AttentionGrad::new(wgpu_context(), &l, bf16), Err(Error::Unsupported(_))));
    let d48 = Problem::new(&l, 1, 20, 48, DType::F32).shape();
    assert!(matches!(AttentionGrad::new(wgpu_context(), &l, d48), Err(Error::HeadDim { got: 48, .. })));

    // Caller buffers: too small, and outputs aliasing inputs.
    let buf = |n: usize| upload(&vec![0u8; n * 4]);
    let (qb, kb, vb, ob, lb, gb) =
        (buf(p.q_len()), buf(p.kv_len()), buf(p.kv_len()), buf(p.q_len()), buf(p.lse_len()), buf(p.q_len()));
    let (dq, dk, dv, tiny) = (buf(p.q_len()), buf(p.kv_len()), buf(p.kv_len()), buf(1));
    let good = GradBuffers { q: &qb, k: &kb, v: &vb, out: &ob, lse: &lb, d_out: &gb, dq: &dq, dk: &dk, dv: &dv };
    let mut encoder = common::device().0.create_command_encoder(&Default::default());
    let small = GradBuffers { dk: &tiny, ..good };
    assert!(matches!(op.encode(&mut encoder, &small), Err(Error::BufferTooSmall { tensor: "dk", .. })));
    let aliased = GradBuffers { dq: &qb, ..good };
    assert!(matches!(op.encode(&mut encoder, &aliased), Err(Error::Shape(m)) if m.contains("alias")));
    let unbindable = common::device().0.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: p.q_len() as u64 * 4,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let no_storage = GradBuffers { d_out: &unbindable, ..good };
    assert!(matches!(op.encode(&mut encoder, &no_storage), Err(Error::Shape(m)) if m.contains("d_out")));
    op.encode(&mut encoder, &good).expect("valid buffers encode");
}

#[test]
fn timing_runs_and_refuses_zero_iterations() {
    let l = s2(S2Config::new(2, 16, 1, 3));
    let p = Problem::new(&l, 1, 40, 32, DType::F32);
    let op = grad_op(&p);
    let c = case(&p, 1200);
    let (out, lse) = c.oracle_forward();
    let x = &c.x;
    let t = op.time_backward(&x.q, &x.k, &x.v, &out, &lse, &c.d_out, (1, 3)).expect("time_backward");
    assert_eq!(t.samples_ms.len(), 3);
    assert!(t.samples_ms.iter().all(|s| s.is_finite() && *s >= 0.0), "{t:?}");
    let zero = op.time_backward(&x.q, &x.k, &x.v, &out, &lse, &c.d_out, (0, 0));
    assert!(matches!(zero, Err(Error::Shape(_))));
    // Timing reuses the op's tensors: the next call is still right.
    assert_grads("after timing", &p, &run_backward(&op, &c, &out, &lse), &c.oracle(), 1e-5);
}
