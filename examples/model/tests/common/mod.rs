//! Shared by the model crate's tests: the wgpu context they run on, and the judge of a run's logits against
//! the reference.

use s2attn::{Backend, Context, ContextOptions};
use std::sync::OnceLock;

/// The wgpu context these tests share, opened once: `Context::new()` (lavapipe in CI), or the best wgpu
/// adapter where that opens CUDA (the model runs on wgpu only).
#[allow(dead_code)]
pub fn wgpu_context() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| {
        let help = "no GPU adapter: these tests need one (lavapipe in CI: `apt-get install mesa-vulkan-drivers`)";
        let ctx = Context::new().unwrap_or_else(|e| panic!("{help}: {e}"));
        if ctx.wgpu().is_some() {
            return ctx;
        }
        let mut options = ContextOptions::from_env().unwrap_or_else(|e| panic!("{e}"));
        options.backend = Backend::Wgpu;
        Context::with_options(&options).unwrap_or_else(|e| panic!("{help}: {e}"))
    })
}

fn argmax(x: &[f64]) -> (usize, f64) {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    (order[0], x[order[0]] - x[order[1]])
}

/// Holds `logits[i]` (after feeding `tokens[..=first + i]`) within `rel` (relative to the largest logit) of
/// the `reference` logits of those positions, and the greedy token `tokens[first + i + 1]` to the
/// reference's argmax wherever its top two are further apart than the error allows; returns how many
/// positions were that clear.
#[allow(dead_code)]
pub fn judge_logits(
    reference: &[Vec<f64>],
    first: usize,
    tokens: &[u32],
    logits: &[Vec<f32>],
    rel: f64,
    what: &str,
) -> usize {
    let mut decided = 0;
    for (i, got) in logits.iter().enumerate() {
        let pos = first + i;
        let want = &reference[pos];
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = got.iter().zip(want).fold(0f64, |m, (&g, &r)| m.max((g as f64 - r).abs()));
        let tol = rel * (1.0 + scale);
        assert!(err <= tol, "{what}, position {pos}: max |logit error| {err:e} > {tol:e} (scale {scale})");
        let (best, margin) = argmax(want);
        if margin > 10.0 * tol {
            decided += 1;
            assert_eq!(tokens[pos + 1] as usize, best, "{what}, position {pos}: argmax vs reference");
        }
    }
    decided
}
