//! `cpu::forward_coop`, the CPU twin of the cooperative-matrix forward kernel, against the f64 oracle, on
//! tests/forward_coop.rs's problems at every tile the planner offers an H100 (48 KiB of workgroup memory):
//! the kernel's walk, mask predicate and lazy rescale, checked without a matrix unit (every subgroup runs
//! every chunk, so the mask alone must keep out what a subgroup's rows do not see). Also: the lazy
//! rescale's bound is what keeps P finite in f16 (a twin with a larger threshold overflows on the
//! large-scale problems), and the eager twin (threshold 0) agrees. And with a NaN or an infinity in Q, K or
//! V: wherever the kernel would not arm its portable redo, what it wrote is IEEE's (the differential test's
//! f64 oracle). Pure CPU: runs in CI.

mod common;
#[path = "oracle/mod.rs"]
#[allow(dead_code)]
mod oracle;

use common::coop::{coop_kernels, coop_problems, COOP_TOL, LSE_TOL};
use common::{Inputs, Problem, Rng};
use s2attn::cpu::{forward_coop, rel_l2_error, CoopKernel, Reference};
use s2attn::{BlockMask, DType, Layout, S2Config};
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
    // S2 layouts the oracle states by its own rule: causal, bidirectional, GQA with a dense head.
    let rule = |block, local, vs, dense, bidir| oracle::Rule::S2 {
        block,
        local,
        vert_stride: vs,
        homo: false,
        offset: 0,
        dense_heads: dense,
        bidirectional: bidir,
    };
    let layouts = [
        (S2Config::new(2, 16, 2, 3), rule(16, 2, 3, 0, None), 71, 64),
        (S2Config::new(2, 16, 2, 3).bidirectional(2, 1), rule(16, 2, 3, 0, Some((2, 1))), 90, 64),
        (S2Config::new(4, 32, 1, 4).kv_heads(2).dense_heads(1), rule(32, 1, 4, 1, None), 100, 128),
    ];
    let mut cases: Vec<(Layout, oracle::Rule, u32, u32)> =
        layouts.into_iter().map(|(config, rule, seq, d)| (Layout::s2(config).expect("layout"), rule, seq, d)).collect();
    // A causal block mask whose query block 2 attends nothing and whose key block 3 no query attends: a
    // value placed there is read by no active pair (the redo stays unarmed and the result is still IEEE's).
    let (blocks, empty_row, empty_col) = (6u32, 2u32, 3u32);
    let bits: Vec<bool> = (0..blocks * blocks)
        .map(|i| (i / blocks, i % blocks))
        .map(|(q, k)| q != empty_row && k != empty_col && (k == q || k == 0))
        .collect();
    let mask = BlockMask::new(1, blocks, blocks, 16, true, bits.clone()).expect("mask");
    let rule = oracle::Rule::Mask { block: 16, mask_heads: 1, q_blocks: blocks, kv_blocks: blocks, causal: true, bits };
    cases.push((Layout::custom(mask, 2, 1).expect("custom layout"), rule, blocks * 16, 64));
    let mut rng = Rng::new(7300);
    let (mut armed, mut unarmed, mut failures) = (0, 0, Vec::new());
    for (n, (layout, rule, seq, d)) in cases.into_iter().enumerate() {
        let p = Problem::new(&layout, 1, seq, d, DType::F16);
        for trial in 0..40 {
            let mut x = p.inputs(7200 + 100 * n as u64 + trial);
            let value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.below(3) as usize];
            let (name, t) = match rng.below(3) {
                0 => ("Q", &mut x.q),
                1 => ("K", &mut x.k),
                _ => ("V", &mut x.v),
            };
            let mut at = rng.below(t.len() as u32) as usize;
            if n == 3 && trial % 2 == 0 {
                // Inside the empty query block (Q) or key block (K, V).
                let row = t.len() / seq as usize;
                let block = if name == "Q" { empty_row } else { empty_col };
                at = (block * 16) as usize * row + at % (16 * row);
            }
            t[at] = value;
            let pos: Vec<u32> = (0..seq).collect();
            let want = oracle::Problem {
                rule: &rule,
                heads: layout.num_heads(),
                kv_heads: layout.num_kv_heads(),
                d: d as usize,
                scale: p.shape().softmax_scale() as f64,
                pos: &pos,
                q: &x.q,
                k: &x.k,
                v: &x.v,
            }
            .forward();
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
                if !(err < COOP_TOL && lse_err < LSE_TOL) {
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
