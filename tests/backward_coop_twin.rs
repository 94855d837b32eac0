//! `cpu::backward_coop`, the CPU twin of the cooperative-matrix backward kernels, against the f64 oracle's
//! analytic gradients, on tests/backward_coop.rs's problems: every dQ tile with the default dK/dV tile and
//! every dK/dV tile with the default dQ tile, as the planner offers them an H100 (48 KiB of workgroup memory).
//! The forward's O and LSE come from the coop forward's twin at its default tile, as they would from the GPU.
//! And with a NaN or an infinity in Q, K, V or dO (O and LSE the oracle's, as the forward's redo gives
//! them): wherever neither kernel would arm the portable redo, the gradients are IEEE's. Pure CPU: runs in CI.

mod common;

use common::coop::{
    coop_backward_problems, coop_kernels, nonfinite_layouts, oracle_problem, place, COOP_TOL, EMPTY_COL, EMPTY_ROW,
};
use common::{Problem, Rng};
use s2attn::cpu::CoopBackward;
use s2attn::cpu::{attention_backward_reference, backward_coop, forward_coop, rel_l2_error, BackwardInputs};
use s2attn::plan::{coop_dkdv_candidates, coop_dq_candidates};
use s2attn::plan::{ColumnPlan, DeviceCaps};
use s2attn::{DType, Grads};
use std::collections::BTreeSet;

/// The coop forward's O and LSE at its default tile (the planner's first candidate choice is not needed:
/// any tile's twin is within the forward's tolerance).
fn forward(p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let kernel = coop_kernels(p)[0];
    let mq = p.layout.mergeq(p.seq_len, kernel.tile.tile_q);
    let (out, lse, _) = forward_coop(&p.layout, &p.shape(), &kernel, &mq, q, k, v);
    (out, lse)
}

/// The worst of the three gradients' errors, or why the twin failed.
fn judge(p: &Problem, kernels: &CoopBackward, x: &BackwardInputs<'_>, want: &Grads<f64>) -> Result<f64, String> {
    let mq = p.layout.mergeq(p.seq_len, kernels.dq.tile_q);
    let index = p.layout.index(p.seq_len);
    let columns = ColumnPlan::build(&index, p.layout.block_size(), p.layout.causal(), kernels.dkdv.tile_q);
    let (got, _) = backward_coop(&p.layout, &p.shape(), kernels, &mq, &columns, x);
    let mut worst = 0f64;
    for (name, g, w) in [("dq", &got.dq, &want.dq), ("dk", &got.dk, &want.dk), ("dv", &got.dv, &want.dv)] {
        if let Some(i) = g.iter().position(|v| !v.is_finite()) {
            return Err(format!("{name}[{i}] is {}", g[i]));
        }
        let err = rel_l2_error(g.iter().map(|&v| v as f64), w);
        if err.is_nan() || err >= COOP_TOL {
            return Err(format!("‖{name}−ref‖/‖ref‖ = {err:.3e} >= {COOP_TOL:.0e}"));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// Runs every tile on problem `n`; returns the failures and the (pass, tile) pairs run.
fn run_problem(n: usize, name: &str, p: &Problem) -> (Vec<String>, BTreeSet<(&'static str, String)>) {
    let caps = DeviceCaps::h100_vulkan();
    let (mut failures, mut ran) = (Vec::new(), BTreeSet::new());
    let x = p.inputs(8000 + n as u64);
    let d_out = Rng::new(8100 + n as u64).tensor(p.q_len(), p.dtype);
    let (out, lse) = forward(p, &x.q, &x.k, &x.v);
    let inputs = BackwardInputs { q: &x.q, k: &x.k, v: &x.v, out: &out, lse: &lse, d_out: &d_out };
    let want = attention_backward_reference(&p.layout, &p.shape(), &x.q, &x.k, &x.v, &d_out);
    let dq_tiles = coop_dq_candidates(&p.shape(), &p.layout, &caps);
    let dkdv_tiles = coop_dkdv_candidates(&p.shape(), &p.layout, &caps);
    let (Some(&dq0), Some(&dkdv0)) = (dq_tiles.first(), dkdv_tiles.first()) else {
        return (vec![format!("{name}: no coop tile")], ran);
    };
    let dq_runs = dq_tiles.iter().map(|&dq| (dq, dkdv0));
    let runs = dq_runs.chain(dkdv_tiles.iter().skip(1).map(|&t| (dq0, t)));
    for (dq, dkdv) in runs {
        let what = format!("dQ {dq}, dK/dV {dkdv}: {name}");
        match judge(p, &CoopBackward { dq, dkdv }, &inputs, &want) {
            Ok(err) => println!("ok   {what}: worst {err:.2e}"),
            Err(why) => failures.push(format!("{what}: {why}")),
        }
        ran.insert(("dQ", dq.to_string()));
        ran.insert(("dK/dV", dkdv.to_string()));
    }
    (failures, ran)
}

#[test]
fn the_coop_backward_twin_matches_the_oracle_at_every_tile() {
    let problems = coop_backward_problems();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(problems.len());
    let results: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let problems = &problems;
                scope.spawn(move || {
                    let mine = problems.iter().enumerate().skip(t).step_by(threads);
                    mine.map(|(n, (name, p))| run_problem(n, name, p)).collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a twin worker panicked")).collect()
    });
    let failures: Vec<String> = results.iter().flat_map(|(f, _)| f.clone()).collect();
    let ran: BTreeSet<_> = results.into_iter().flat_map(|(_, r)| r).collect();
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    println!("ran: {ran:?}");
    for (pass, tile) in [("dK/dV", "32x32"), ("dK/dV", "64x16"), ("dK/dV", "32x16"), ("dQ", "128x32"), ("dQ", "64x16")]
    {
        assert!(ran.contains(&(pass, tile.to_string())), "{pass} never ran {tile}: {ran:?}");
    }
}

#[test]
fn where_the_redo_is_not_armed_non_finite_inputs_give_ieee_gradients() {
    let caps = DeviceCaps::h100_vulkan();
    let mut rng = Rng::new(8300);
    let (mut armed, mut unarmed, mut failures) = (0, 0, Vec::new());
    for (n, (layout, rule, seq, d, empty_blocks)) in nonfinite_layouts().into_iter().enumerate() {
        let p = Problem::new(&layout, 1, seq, d, DType::F16);
        let dq = coop_dq_candidates(&p.shape(), &layout, &caps)[0];
        let dkdv = coop_dkdv_candidates(&p.shape(), &layout, &caps)[0];
        let kernels = CoopBackward { dq, dkdv };
        let mq = layout.mergeq(seq, dq.tile_q);
        let columns = ColumnPlan::build(&layout.index(seq), layout.block_size(), layout.causal(), dkdv.tile_q);
        for trial in 0..30 {
            let mut x = p.inputs(8200 + 100 * n as u64 + trial);
            let mut d_out = Rng::new(8400 + 100 * n as u64 + trial).tensor(p.q_len(), p.dtype);
            let value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.below(3) as usize];
            let (name, t, empty) = match rng.below(4) {
                0 => ("Q", &mut x.q, EMPTY_ROW),
                1 => ("K", &mut x.k, EMPTY_COL),
                2 => ("V", &mut x.v, EMPTY_COL),
                _ => ("dO", &mut d_out, EMPTY_ROW),
            };
            // On the block mask every other value goes where no active pair reads it.
            let at = place(&mut rng, t, seq, (empty_blocks && trial % 2 == 0).then_some(empty), value);
            let pos: Vec<u32> = (0..seq).collect();
            let oracle = oracle_problem(&p, &rule, &pos, &x);
            let (fwd, want) = (oracle.forward(), oracle.backward(&d_out));
            let (out, lse): (Vec<f32>, Vec<f32>) =
                (fwd.out.iter().map(|&v| v as f32).collect(), fwd.lse.iter().map(|&v| v as f32).collect());
            let inputs = BackwardInputs { q: &x.q, k: &x.k, v: &x.v, out: &out, lse: &lse, d_out: &d_out };
            let (got, redo) = backward_coop(&layout, &p.shape(), &kernels, &mq, &columns, &inputs);
            if redo {
                armed += 1;
                continue;
            }
            unarmed += 1;
            for (g, (w, grad)) in
                [&got.dq, &got.dk, &got.dv].into_iter().zip([(&want.dq, "dQ"), (&want.dk, "dK"), (&want.dv, "dV")])
            {
                let err = rel_l2_error(g.iter().map(|&v| v as f64), w);
                if err.is_nan() || err >= COOP_TOL {
                    failures.push(format!(
                        "layout {n}: {value} in {name}[{at}] left the redo unarmed; {grad} error {err:.2e}"
                    ));
                }
            }
        }
    }
    println!("{armed} runs armed the redo, {unarmed} did not");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(armed > 0 && unarmed > 0, "the non-finite inputs armed the redo {armed} times, left it {unarmed}");
}
