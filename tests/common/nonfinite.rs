//! A decode problem with non-finite inputs, judged against IEEE softmax attention in f64: one token over
//! 64 keys (dense layout, block 16) where a +inf K element makes the first `ninf` keys score -inf for every
//! query head (Q's element 0 is -1), those keys' V hold a NaN, and head 0's Q holds a NaN (a NaN row).

use s2attn::cpu::rel_l2_error;
use s2attn::inference::SplitPolicy;
use s2attn::{Context, DType, Decode, KvCache, KvCacheConfig, Layout, SeqId};

use super::{tolerance, Rng};

/// Keys of the history.
const LEN: usize = 64;

/// [`judge_minus_inf_decode`] for each `(heads, d, dtype)` of `kernels`, with 0, 1, 32 and all 64 keys at
/// -inf, unsplit and one block per split; the first failure.
pub fn judge_minus_inf_decodes(ctx: &Context, kernels: &[(u32, u32, DType)]) -> Result<(), String> {
    let policies = [SplitPolicy::never(), SplitPolicy::split_to(1)];
    for policy in policies {
        for ninf in [0, 1, 32, LEN] {
            for &(heads, d, dtype) in kernels {
                judge_minus_inf_decode(ctx, heads, d, dtype, ninf, policy)?;
            }
        }
    }
    Ok(())
}

/// Runs the problem on `ctx` in `dtype` (f32, f16 or bf16) and checks: head 0 NaN (O and LSE); the other
/// heads the softmax over keys `ninf..` (NaN when `ninf` is all of them), within the dtype's tolerance.
pub fn judge_minus_inf_decode(
    ctx: &Context,
    heads: u32,
    d: u32,
    dtype: DType,
    ninf: usize,
    policy: SplitPolicy,
) -> Result<(), String> {
    let case = format!("{dtype} decode, {heads} heads x {d}, {ninf} keys at -inf, {policy:?}");
    let du = d as usize;
    let layout = Layout::dense(heads, 1, 16, true).map_err(|e| e.to_string())?;
    let mut cache = KvCache::new(ctx, &layout, KvCacheConfig::new(d, dtype, LEN as u32)).map_err(|e| e.to_string())?;
    let mut rng = Rng::new(77 + ninf as u64);
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| super::round_to(dtype, v)).collect() };
    let mut q = round(rng.tensor(heads as usize * du, dtype));
    let mut k = round(rng.tensor(LEN * du, dtype));
    let mut v = round(rng.tensor(LEN * du, dtype));
    for h in 0..heads as usize {
        q[h * du] = -1.0;
    }
    q[1] = f32::NAN;
    for t in 0..ninf {
        k[t * du] = f32::INFINITY;
        v[t * du + 5] = f32::NAN;
    }
    let seq = cache.add_sequence();
    let op = Decode::new(&cache).map_err(|e| e.to_string())?.with_split_policy(policy);
    let (out, lse) = run(&mut cache, &op, seq, dtype, &q, &k, &v).map_err(|e| format!("{case}: {e}"))?;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut want_o, mut got_o) = (Vec::new(), Vec::new());
    for h in 0..heads as usize {
        let o = &out[h * du..(h + 1) * du];
        if h == 0 || ninf == LEN {
            if !(o.iter().all(|x| x.is_nan()) && lse[h].is_nan()) {
                return Err(format!("{case}: head {h} must be NaN: O {o:?}, LSE {}", lse[h]));
            }
            continue;
        }
        let score = |t: usize| (0..du).map(|c| q[h * du + c] as f64 * k[t * du + c] as f64).sum::<f64>() * scale;
        let s: Vec<f64> = (ninf..LEN).map(score).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for c in 0..du {
            want_o.push(s.iter().enumerate().map(|(i, x)| (x - m).exp() / l * v[(ninf + i) * du + c] as f64).sum());
        }
        got_o.extend(o.iter().map(|&x| x as f64));
        if (lse[h] as f64 - (m + l.ln())).abs() > 1e-3 {
            return Err(format!("{case}: head {h} LSE {} vs {}", lse[h], m + l.ln()));
        }
    }
    let err = rel_l2_error(got_o, &want_o);
    if !want_o.is_empty() && (err.is_nan() || err >= tolerance(dtype)) {
        return Err(format!("{case}: O error {err}"));
    }
    Ok(())
}

/// Appends K and V and decodes Q in `dtype`: O as f32 and the LSE.
fn run(
    cache: &mut KvCache,
    op: &Decode,
    seq: SeqId,
    dtype: DType,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> s2attn::Result<(Vec<f32>, Vec<f32>)> {
    macro_rules! with {
        ($t:ty) => {{
            let cast = |x: &[f32]| x.iter().map(|&y| <$t>::from_f32(y)).collect::<Vec<$t>>();
            cache.append(seq, &cast(k), &cast(v))?;
            let o = op.run(cache, &[seq], &cast(q))?;
            Ok((o.out.iter().map(|x| x.to_f32()).collect(), o.lse))
        }};
    }
    match dtype {
        DType::F32 => {
            cache.append(seq, k, v)?;
            let o = op.run(cache, &[seq], q)?;
            Ok((o.out, o.lse))
        }
        DType::F16 => with!(half::f16),
        _ => with!(half::bf16),
    }
}
