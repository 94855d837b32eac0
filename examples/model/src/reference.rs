//! The CPU f64 reference of the model (the oracle of `tests/model.rs`): the same weights and the same
//! math as the GPU kernels, each position attending exactly the keys its layer's layout allows.

use super::config::ModelConfig;
use super::weights::Weights;
use s2attn::Result;

fn rmsnorm(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * inv * w as f64).collect()
}

/// `x [k] · w [k, n]`.
fn matvec(x: &[f64], w: &[f32], n: usize) -> Vec<f64> {
    let mut y = vec![0.0; n];
    for (k, &xk) in x.iter().enumerate() {
        for (yj, &wj) in y.iter_mut().zip(&w[k * n..(k + 1) * n]) {
            *yj += xk * wj as f64;
        }
    }
    y
}

fn rope(v: &mut [f64], pos: usize, theta: f32) {
    let d = v.len();
    for p in 0..d / 2 {
        let angle = pos as f64 * (theta as f64).powf(-2.0 * p as f64 / d as f64);
        let (s, c) = angle.sin_cos();
        let (a, b) = (v[p], v[p + d / 2]);
        v[p] = a * c - b * s;
        v[p + d / 2] = a * s + b * c;
    }
}

/// Logits `[tokens.len()][vocab]` of every position of `tokens` (position t predicts token t + 1).
pub fn logits(config: &ModelConfig, weights: &Weights, tokens: &[u32]) -> Result<Vec<Vec<f64>>> {
    config.validate()?;
    let (d, hd) = (config.d_model as usize, config.head_dim as usize);
    let (h_n, hk_n) = (config.heads as usize, config.kv_heads as usize);
    let group = h_n / hk_n;
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            let t = (t as usize).min(config.vocab as usize - 1);
            weights.embed[t * d..(t + 1) * d].iter().map(|&v| v as f64).collect()
        })
        .collect();
    for (layer, w) in weights.layers.iter().enumerate() {
        let layout = config.layout(layer)?;
        // Q, K, V of every position, rotated.
        let qkv: Vec<Vec<f64>> = x
            .iter()
            .enumerate()
            .map(|(pos, xt)| {
                let mut r = matvec(&rmsnorm(xt, &w.attn_norm, config.norm_eps), &w.wqkv, config.qkv_cols() as usize);
                for h in 0..h_n + hk_n {
                    rope(&mut r[h * hd..(h + 1) * hd], pos, config.rope_theta);
                }
                r
            })
            .collect();
        let scale = 1.0 / (hd as f64).sqrt();
        for (t, xt) in x.iter_mut().enumerate() {
            let mut attn = vec![0.0; h_n * hd];
            for h in 0..h_n {
                let pattern = layout.pattern_of_head(h as u32);
                let q = &qkv[t][h * hd..(h + 1) * hd];
                let (k0, v0) = ((h_n + h / group) * hd, (h_n + hk_n + h / group) * hd);
                let keys: Vec<usize> =
                    (0..=t).filter(|&j| layout.element_active(pattern, t as u32, j as u32)).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| q.iter().zip(&qkv[j][k0..k0 + hd]).map(|(a, b)| a * b).sum::<f64>() * scale)
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                for (&j, pj) in keys.iter().zip(&p) {
                    for (o, v) in attn[h * hd..(h + 1) * hd].iter_mut().zip(&qkv[j][v0..v0 + hd]) {
                        *o += pj / sum * v;
                    }
                }
            }
            for (xi, oi) in xt.iter_mut().zip(matvec(&attn, &w.wo, d)) {
                *xi += oi;
            }
            let ffn = config.ffn as usize;
            let gu = matvec(&rmsnorm(xt, &w.mlp_norm, config.norm_eps), &w.wgu, 2 * ffn);
            let a: Vec<f64> = (0..ffn).map(|j| gu[j] / (1.0 + (-gu[j]).exp()) * gu[ffn + j]).collect();
            for (xi, oi) in xt.iter_mut().zip(matvec(&a, &w.wdown, d)) {
                *xi += oi;
            }
        }
    }
    Ok(x.iter()
        .map(|xt| matvec(&rmsnorm(xt, &weights.final_norm, config.norm_eps), &weights.lm_head, config.vocab as usize))
        .collect())
}
