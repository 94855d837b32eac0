//! `cpu::forward_coop`, the CPU twin of the cooperative-matrix forward kernel, against the f64 oracle, on
//! tests/forward_coop.rs's problems at every tile the planner offers an H100 (48 KiB of workgroup memory):
//! the kernel's walk, mask predicate and lazy rescale, checked without a matrix unit (every subgroup runs
//! every chunk, so the mask alone must keep out what a subgroup's rows do not see). Also: the lazy
//! rescale's bound is what keeps P finite in f16 (a twin with a larger threshold overflows on the
//! large-scale problems), and the eager twin (threshold 0) agrees. And with a NaN or an infinity in Q, K or
//! V: wherever the kernel would not arm its portable redo, what it wrote is IEEE's (the differential test's
//! f64 oracle). Pure CPU: runs in CI.

mod common;

use common::coop::{
    coop_kernels, coop_problems, nonfinite_layouts, oracle_problem, place, COOP_TOL, EMPTY_COL, EMPTY_ROW, LSE_TOL,
};
use common::{Inputs, Problem, Rng};
use s2attn::cpu::{forward_coop, rel_l2_error, CoopKernel, Reference};
use s2attn::DType;
use std::collections::BTreeSet;

/// The twin's errors against the oracle (out, lse), or why it failed.
fn judge(kernel: &CoopKernel, p: &Problem, x: &Inputs, want: &Reference) -> Result<(f64, f64), String> {
    let mq = p.layout.mergeq(p.seq_len, kernel.tile.tile_q);
    let (out, lse, _) = forward_coop(&p.layout, &p.shape(), kernel, &mq, &x.q, &x.k, &x.v);
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(format!("output element {i} is {}", out[i]));
    }
    for (i, (&g, &w)) in lse.iter().zip(&want.lse).enumerate() {
        if g.is_finite() != w.is_finite() || (!w.is_finite() && g as f64 != w) {
            return Err(format!("lse[{i}] = {g}, oracle {w}"));
        }
    }
    let err = rel_l2_error(out.iter().map(|&v| v as f64), &want.out);
    let lse_err = rel_l2_error(lse.iter().map(|&v| v as f64), &want.lse);
    if err.is_nan() || err >= COOP_TOL {
        return Err(format!("‖out−ref‖/‖ref‖ = {err:.3e} >= {COOP_TOL:.0e}"));
    }
    if lse_err.is_nan() || lse_err >= LSE_TOL {
        return Err(format!("lse error {lse_err:.3e} >= {LSE_TOL:.0e}"));
    }
    Ok((err, lse_err))
}

#[test]
fn the_coop_twin_matches_the_oracle_at_every_tile() {
    let mut failures = Vec::new();
    let mut ran = BTreeSet::new();
    for (n, (name, p, _)) in coop_problems().into_iter().enumerate() {
        let x = p.inputs(7000 + n as u64);
        let want = p.reference(&x);
        for kernel in coop_kernels(&p) {
            let what = format!("{}: {name}", kernel.tile);
            match judge(&kernel, &p, &x, &want) {
                Ok((err, lse)) => println!("ok   {what}: out {err:.2e}, lse {lse:.2e}"),
                Err(why) => failures.push(format!("{what}: {why}")),
            }
            ran.insert(kernel.tile.to_string());
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    // The planner's whole menu was covered: its five tiles (128x64 does not fit 48 KiB).
    println!("ran: {ran:?}");
    for tile in ["64x16", "64x32", "64x64", "128x16", "128x32"] {
        assert!(ran.contains(tile), "never ran {tile}: {ran:?}");
    }
}

#[test]
fn the_lazy_rescale_bound_keeps_p_finite_in_f16() {
    let cases: Vec<_> = coop_problems().into_iter().filter(|(name, _, _)| name.contains("lazy rescale")).collect();
    assert_eq!(cases.len(), 2, "the large-scale problems are part of the coop problem set");
    let mut overflowed = 0;
    for (n, (name, p, _)) in cases.into_iter().enumerate() {
        let x = p.inputs(7100 + n as u64);
        let want = p.reference(&x);
        let kernel = coop_kernels(&p)[0];
        // Eager (the max moves whenever it grows) and the kernel's threshold both match the oracle.
        for tau in [0.0, kernel.tau] {
            judge(&CoopKernel { tau, ..kernel }, &p, &x, &want).unwrap_or_else(|e| panic!("{name}, tau {tau}: {e}"));
        }
        // Past log2(65504) ~ 16, P can exceed what f16 holds: these problems' scores grow by more than that.
        if judge(&CoopKernel { tau: 40.0, ..kernel }, &p, &x, &want).is_err() {
            overflowed += 1;
        }
    }
    assert!(overflowed > 0, "no large-scale problem overflowed f16 with threshold 40: the problems lost their point");
}

#[test]
fn where_the_redo_is_not_armed_non_finite_inputs_give_ieee_results() {
    let mut rng = Rng::new(7300);
    let (mut armed, mut unarmed, mut failures) = (0, 0, Vec::new());
    for (n, (layout, rule, seq, d, empty_blocks)) in nonfinite_layouts().into_iter().enumerate() {
        let p = Problem::new(&layout, 1, seq, d, DType::F16);
        for trial in 0..40 {
            let mut x = p.inputs(7200 + 100 * n as u64 + trial);
            let value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.below(3) as usize];
            let which = rng.below(3);
            let (name, t, empty) = match which {
                0 => ("Q", &mut x.q, EMPTY_ROW),
                1 => ("K", &mut x.k, EMPTY_COL),
                _ => ("V", &mut x.v, EMPTY_COL),
            };
            // On the block mask every other value goes where no active pair reads it.
            let at = place(&mut rng, t, seq, (empty_blocks && trial % 2 == 0).then_some(empty), value);
            let pos: Vec<u32> = (0..seq).collect();
            let want = oracle_problem(&p, &rule, &pos, &x).forward();
            for kernel in coop_kernels(&p) {
                let mq = layout.mergeq(seq, kernel.tile.tile_q);
                let (out, lse, redo) = forward_coop(&layout, &p.shape(), &kernel, &mq, &x.q, &x.k, &x.v);
                if redo {
                    armed += 1;
                    continue;
                }
                unarmed += 1;
                let err = rel_l2_error(out.iter().map(|&v| v as f64), &want.out);
                let lse_err = rel_l2_error(lse.iter().map(|&v| v as f64), &want.lse);
                if err.is_nan() || err >= COOP_TOL || lse_err.is_nan() || lse_err >= LSE_TOL {
                    failures.push(format!(
                        "layout {n}, {}: {value} in {name}[{at}] left the redo unarmed; out error {err:.2e}, lse {lse_err:.2e}",
                        kernel.tile
                    ));
                }
            }
        }
    }
    println!("{armed} runs armed the redo, {unarmed} did not");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(armed > 0 && unarmed > 0, "the non-finite inputs armed the redo {armed} times, left it {unarmed}");
}
