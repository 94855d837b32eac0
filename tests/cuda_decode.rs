//! The CUDA decode path against the f64 oracle: a `KvCache` whose pages live in CUDA memory (same page
//! planning and eviction as the wgpu cache) decoded by `shaders/cuda/s2_decode.cu` (split pass + LSE
//! combine; the tensor-core kernel for up to 16 rows at head dims 64 and 128, else the narrow one for up to
//! 4 rows, else the general one): mixed lengths across page
//! boundaries, GQA groups of 1/2/4/8, speculative queries, split
//! policies from never to one block per split, several cache segments, fp16 and bf16, non-finite inputs
//! (NaN and -inf scores, NaN V), a token loop on device buffers (`KvCache::append_cuda` from a fused QKV
//! buffer, `Decode::run_cuda`), and the wgpu-only entry points and bad device buffers refusing clearly. Every test needs a CUDA
//! device and skips with a message without one.
//!
//! Tolerances (‖out − ref‖ / ‖ref‖, outputs poisoned before each run): fp16 2e-3 (f16 storage, f32
//! accumulation), bf16 1e-2 (8 significant bits of storage); LSE 1e-4.
#![cfg(feature = "cuda")]

mod common;

use s2attn::cpu::{rel_l2_error, varlen_reference};
use s2attn::inference::SplitPolicy;
use s2attn::{Context, CudaRows, DType, Decode, Error, KvCache, KvCacheConfig, Layout, S2Config, SeqLens};

/// xorshift64*: uniform values in [-1, 1), rounded to the storage type.
fn random(n: usize, seed: u64, dtype: DType) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let x = ((s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            round(x, dtype)
        })
        .collect()
}

fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => half::f16::from_f32(x).to_f32(),
    }
}

/// Decodes the last `q_len` tokens of sequences of `lens` tokens under `layout` on CUDA with `policy`,
/// and returns (O error, LSE error) against the oracle on the full histories, and the call's plan.
#[allow(clippy::too_many_arguments)]
fn decode_error(
    ctx: &Context,
    layout: &Layout,
    d: u32,
    dtype: DType,
    lens: &[u32],
    q_len: u32,
    policy: SplitPolicy,
    segment_pages: Option<u32>,
    seed: u64,
) -> (f64, f64, String) {
    let (h, hk) = (layout.num_heads(), layout.num_kv_heads());
    let max = *lens.iter().max().expect("lens");
    let mut config = KvCacheConfig::new(d, dtype, max).sequences(lens.len() as u32).query_window(q_len);
    if let Some(p) = segment_pages {
        config = config.segment_pages(p);
    }
    let mut cache = KvCache::new(ctx, layout, config).expect("CUDA KV cache");
    let row = (hk * d) as usize;
    let (mut ks, mut vs, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &len) in lens.iter().enumerate() {
        let k = random(len as usize * row, seed + 10 * i as u64, dtype);
        let v = random(len as usize * row, seed + 10 * i as u64 + 1, dtype);
        let id = cache.add_sequence();
        // Appends of odd sizes, across page boundaries.
        let mut done = 0usize;
        for step in [1usize, 37, 64, 5, 300].iter().cycle() {
            if done == len as usize {
                break;
            }
            let n = (*step).min(len as usize - done);
            let r = done * row..(done + n) * row;
            match dtype {
                DType::BF16 => {
                    let conv = |x: &[f32]| x.iter().map(|&y| half::bf16::from_f32(y)).collect::<Vec<_>>();
                    cache.append(id, &conv(&k[r.clone()]), &conv(&v[r])).expect("append");
                }
                _ => {
                    let conv = |x: &[f32]| x.iter().map(|&y| half::f16::from_f32(y)).collect::<Vec<_>>();
                    cache.append(id, &conv(&k[r.clone()]), &conv(&v[r])).expect("append");
                }
            }
            done += n;
        }
        ks.extend(k);
        vs.extend(v);
        ids.push(id);
    }
    let q = random((lens.len() as u32 * q_len * h * d) as usize, seed + 99, dtype);
    let op = Decode::new(&cache).expect("CUDA decode").with_split_policy(policy);
    let (out, lse): (Vec<f32>, Vec<f32>) = match dtype {
        DType::BF16 => {
            let qb: Vec<half::bf16> = q.iter().map(|&x| half::bf16::from_f32(x)).collect();
            let o = op.run(&cache, &ids, &qb).expect("decode");
            (o.out.iter().map(|x| x.to_f32()).collect(), o.lse)
        }
        _ => {
            let qh: Vec<half::f16> = q.iter().map(|&x| half::f16::from_f32(x)).collect();
            let o = op.run(&cache, &ids, &qh).expect("decode");
            (o.out.iter().map(|x| x.to_f32()).collect(), o.lse)
        }
    };
    let seq_lens = SeqLens::from_lens(&vec![q_len; lens.len()], lens).expect("lens");
    let want = varlen_reference(layout, &seq_lens, d, 1.0 / (d as f64).sqrt(), &q, &ks, &vs);
    assert!(!out.iter().any(|x| x.is_nan()), "NaN in the output");
    // Decode's LSE is [sequences, heads, q_len]; the oracle's [heads, total_q].
    let n = lens.len() as u32;
    let lse_packed: Vec<f64> = (0..h)
        .flat_map(|hd| (0..n * q_len).map(move |t| (hd, t)))
        .map(|(hd, t)| lse[((t / q_len * h + hd) * q_len + t % q_len) as usize] as f64)
        .collect();
    let explain = op.explain(&cache, &ids, q_len).expect("explain");
    (rel_l2_error(out.iter().map(|&x| x as f64), &want.out), rel_l2_error(lse_packed, &want.lse), explain)
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        2e-3
    }
}

#[test]
fn cuda_decode_matches_the_oracle_over_groups_lengths_and_splits() {
    let Some(ctx) = common::cuda_context() else { return };
    let policies = [
        ("never split", SplitPolicy::never()),
        ("one block per split", SplitPolicy::split_to(1)),
        ("default", SplitPolicy::for_compute_units(132)),
    ];
    let mut seed = 1;
    // Head dims 64 and 128 with up to 16 rows (groups of 1 to 8, one or two tokens) run the tensor-core
    // kernel; 32 rows, and head dims 32 and 96, the narrow kernel (up to 4 rows) or the general one.
    for (heads, kv_heads, d, block) in [
        (8, 8, 128, 64),
        (8, 2, 128, 64),
        (16, 2, 64, 32),
        (4, 2, 64, 32),
        (4, 1, 128, 16),
        (32, 1, 128, 64),
        (8, 4, 32, 64),
        (16, 2, 96, 16),
    ] {
        let layout = Layout::s2(S2Config::new(heads, block, 3, 4).kv_heads(kv_heads)).expect("layout");
        for dtype in [DType::F16, DType::BF16] {
            for (name, policy) in policies {
                for q_len in [1u32, 2] {
                    seed += 1;
                    let lens = [2u32, 65, 700, 333];
                    let (e, l, explain) = decode_error(ctx, &layout, d, dtype, &lens, q_len, policy, None, seed);
                    let what =
                        format!("{heads}/{kv_heads} heads, d {d}, block {block}, {dtype}, {name}, q_len {q_len}");
                    assert!(e < tol(dtype), "{what}: ‖out−ref‖/‖ref‖ = {e:.3e}");
                    assert!(l < 1e-4, "{what}: lse error {l:.3e}");
                    let rows = heads / kv_heads * q_len;
                    let form = if rows <= 16 && (d == 64 || d == 128) {
                        "tensor-core"
                    } else if rows <= 4 {
                        "narrow"
                    } else {
                        "CUDA s2_decode ("
                    };
                    assert!(explain.contains(form), "{what}: expected the {form} kernel: {explain}");
                }
            }
        }
    }
}

#[test]
fn cuda_decode_runs_one_pass_per_cache_segment() {
    let Some(ctx) = common::cuda_context() else { return };
    let layout = Layout::s2(S2Config::new(8, 64, 2, 4).kv_heads(2)).expect("layout");
    let config = KvCacheConfig::new(128, DType::F16, 2000);
    let per_seq = KvCache::pages_per_sequence(&layout, &config).expect("pages");
    let policy = SplitPolicy::split_to(2);
    let (e, l, _) = decode_error(ctx, &layout, 128, DType::F16, &[2000, 129, 1500], 1, policy, Some(per_seq), 7);
    assert!(e < 2e-3 && l < 1e-4, "three segments: out {e:.3e}, lse {l:.3e}");
}

/// A token loop that never leaves the device: prompts and then one token per step appended by
/// `KvCache::append_cuda` from the K and V columns of an interleaved QKV buffer, each step decoded by
/// `Decode::run_cuda` from device queries into device outputs; the outputs read back at some steps (across
/// block boundaries, an uneven step, a subset of the sequences) and judged against the oracle on the full
/// histories.
#[test]
fn cuda_token_loop_on_device_buffers_matches_the_oracle() {
    let Some(ctx) = common::cuda_context() else { return };
    let stream = ctx.cuda().expect("a CUDA context").stream().clone();
    let (h, hk, d, block) = (8u32, 2u32, 128u32, 64u32);
    let layout = Layout::s2(S2Config::new(h, block, 2, 4).kv_heads(hk)).expect("layout");
    let dtype = DType::F16;
    let prompts = [150u32, 64, 1];
    let steps = 70u32;
    let max = prompts.iter().max().expect("prompts") + steps;
    let config = KvCacheConfig::new(d, dtype, max).sequences(prompts.len() as u32);
    let mut cache = KvCache::new(ctx, &layout, config).expect("CUDA KV cache");
    let ids: Vec<_> = prompts.iter().map(|_| cache.add_sequence()).collect();
    let (row_q, row_kv) = ((h * d) as usize, (hk * d) as usize);
    let qkv_row = row_q + 2 * row_kv;
    let rows =
        CudaRows { k_offset: row_q as u64, v_offset: (row_q + row_kv) as u64, token_stride: Some(qkv_row as u64) };
    let f16 = |x: &[f32]| x.iter().map(|&y| half::f16::from_f32(y).to_bits()).collect::<Vec<u16>>();
    let mut ks: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    let mut vs: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    // Appends `tokens[i]` tokens to `which[i]` from one QKV buffer (their rows one after the other).
    let append =
        |cache: &mut KvCache, ks: &mut [Vec<f32>], vs: &mut [Vec<f32>], which: &[usize], tokens: &[u32], seed: u64| {
            let total: u32 = tokens.iter().sum();
            let qkv = random(total as usize * qkv_row, seed, dtype);
            let mut at = 0usize;
            for (&i, &n) in which.iter().zip(tokens) {
                for t in at..at + n as usize {
                    let r = &qkv[t * qkv_row..(t + 1) * qkv_row];
                    ks[i].extend_from_slice(&r[row_q..row_q + row_kv]);
                    vs[i].extend_from_slice(&r[row_q + row_kv..]);
                }
                at += n as usize;
            }
            let dev = stream.clone_htod(&f16(&qkv)).expect("upload qkv");
            let batch: Vec<_> = which.iter().zip(tokens).map(|(&i, &n)| (ids[i], n)).collect();
            cache.append_cuda(&batch, &dev, &dev, rows).expect("append_cuda");
        };
    append(&mut cache, &mut ks, &mut vs, &[0, 1, 2], &prompts, 1);
    let op = Decode::new(&cache).expect("CUDA decode");
    let mut uploads = 0;
    for step in 0..=steps {
        // Step 40 appends to the first sequence only; step 41 decodes the last two, in reverse.
        let which: Vec<usize> = match step {
            0 => vec![0, 1, 2],
            40 => vec![0],
            41 => vec![2, 1],
            _ => vec![0, 1, 2],
        };
        if step > 0 {
            let grow = if step == 40 { vec![0] } else { vec![0, 1, 2] };
            append(&mut cache, &mut ks, &mut vs, &grow, &vec![1; grow.len()], 100 + step as u64);
        }
        let seqs: Vec<_> = which.iter().map(|&i| ids[i]).collect();
        let q = random(which.len() * row_q, 1000 + step as u64, dtype);
        let q_dev = stream.clone_htod(&f16(&q)).expect("upload q");
        let mut out = stream.alloc_zeros::<u16>(q.len()).expect("out");
        let mut lse = stream.alloc_zeros::<f32>(which.len() * h as usize).expect("lse");
        op.run_cuda(&cache, &seqs, 1, &q_dev, &mut out, &mut lse).expect("run_cuda");
        // Steps 3 to 13 cross no block boundary: each moves the lists' key shift, no work list upload.
        if step == 2 {
            uploads = op.work_list_uploads();
        }
        if step == 13 {
            assert_eq!(op.work_list_uploads(), uploads, "even steps uploaded work lists");
        }
        if ![0, 1, 13, 14, 40, 41, 50, steps].contains(&step) {
            continue;
        }
        let out = stream.clone_dtoh(&out).expect("read out");
        let out: Vec<f32> = out.iter().map(|&x| half::f16::from_bits(x).to_f32()).collect();
        let lse = stream.clone_dtoh(&lse).expect("read lse");
        let lens: Vec<u32> = which.iter().map(|&i| (ks[i].len() / row_kv) as u32).collect();
        let k_all: Vec<f32> = which.iter().flat_map(|&i| ks[i].iter().copied()).collect();
        let v_all: Vec<f32> = which.iter().flat_map(|&i| vs[i].iter().copied()).collect();
        let seq_lens = SeqLens::from_lens(&vec![1; which.len()], &lens).expect("lens");
        let want = varlen_reference(&layout, &seq_lens, d, 1.0 / (d as f64).sqrt(), &q, &k_all, &v_all);
        let e = rel_l2_error(out.iter().map(|&x| x as f64), &want.out);
        // Decode's LSE is [sequences, heads]; the oracle's [heads, sequences].
        let n = which.len() as u32;
        let lse_packed: Vec<f64> = (0..h)
            .flat_map(|hd| (0..n).map(move |t| (hd, t)))
            .map(|(hd, t)| lse[(t * h + hd) as usize] as f64)
            .collect();
        let l = rel_l2_error(lse_packed, &want.lse);
        assert!(e < 2e-3 && l < 1e-4, "step {step} ({lens:?} tokens): out {e:.3e}, lse {l:.3e}");
    }
}

#[test]
fn cuda_cache_refuses_the_wgpu_entry_points_clearly() {
    let Some(ctx) = common::cuda_context() else { return };
    let layout = Layout::s2(S2Config::new(4, 16, 2, 2)).expect("layout");
    let cache = KvCache::new(ctx, &layout, KvCacheConfig::new(64, DType::F16, 256)).expect("cache");
    assert!(matches!(cache.pools(0), Err(Error::Unsupported(_))), "pools() of a CUDA cache");
    assert!(cache.cuda_pools(0).is_ok());
    let f32_cache = KvCache::new(ctx, &layout, KvCacheConfig::new(64, DType::F32, 256)).expect("f32 cache");
    assert!(matches!(Decode::new(&f32_cache), Err(Error::Unsupported(_))), "f32 decode on CUDA");
    // Device appends and decodes with buffers too small or misplaced fail by name and change nothing.
    let stream = ctx.cuda().expect("a CUDA context").stream().clone();
    let mut cache = cache;
    let id = cache.add_sequence();
    let row = 4 * 64;
    let small = stream.alloc_zeros::<u16>(row - 1).expect("alloc");
    let rows = stream.alloc_zeros::<u16>(2 * row).expect("alloc");
    let too_small = cache.append_cuda(&[(id, 1)], &small, &rows, CudaRows::default());
    assert!(matches!(too_small, Err(Error::BufferTooSmall { tensor: "k", .. })), "{too_small:?}");
    let odd = CudaRows { k_offset: 1, ..CudaRows::default() };
    assert!(matches!(cache.append_cuda(&[(id, 1)], &rows, &rows, odd), Err(Error::Shape(_))), "odd offset");
    let narrow = CudaRows { token_stride: Some(row as u64 - 2), ..CudaRows::default() };
    assert!(matches!(cache.append_cuda(&[(id, 1)], &rows, &rows, narrow), Err(Error::Shape(_))), "narrow stride");
    assert_eq!(cache.seq_len(id).expect("len"), 0, "a refused append changed the cache");
    cache.append_cuda(&[(id, 2)], &rows, &rows, CudaRows::default()).expect("append_cuda");
    let op = Decode::new(&cache).expect("decode");
    let q = stream.alloc_zeros::<u16>(row).expect("alloc");
    let mut out = stream.alloc_zeros::<u16>(row - 8).expect("alloc");
    let mut lse = stream.alloc_zeros::<f32>(4).expect("alloc");
    let r = op.run_cuda(&cache, &[id], 1, &q, &mut out, &mut lse);
    assert!(matches!(r, Err(Error::BufferTooSmall { tensor: "out", .. })), "{r:?}");
}

/// Non-finite inputs as IEEE softmax attention gives them (`common::nonfinite`): a NaN Q row is NaN,
/// -inf scores and their NaN V add nothing (also when whole splits hold only such keys), keys that all
/// score -inf give NaN; on the tensor-core (4 and 8 heads per KV head at head dim 128), narrow (4 at head
/// dim 32) and general (8 at head dim 96) kernels, fp16 and bf16.
#[test]
fn cuda_decode_gives_ieee_results_for_non_finite_inputs() {
    let Some(ctx) = common::cuda_context() else { return };
    if let Err(e) = common::nonfinite::judge_minus_inf_decodes(
        ctx,
        &[(4, 128, DType::F16), (8, 128, DType::BF16), (4, 32, DType::BF16), (8, 96, DType::F16)],
    ) {
        panic!("{e}");
    }
}
