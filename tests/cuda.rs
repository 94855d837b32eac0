//! The CUDA backend against the f64 oracle: odd sequence lengths, partial blocks, head dims, block sizes
//! 16/32/64/128, GQA, batch, all-dense and all-local layouts, custom masks (per-block row masks and empty
//! rows), bidirectional layouts, fp16 and bf16, the embedding entry points (cudarc buffers, raw strided
//! pointers) and the error paths. Every test needs a CUDA device and skips with a message without one.
//!
//! Tolerances (‖out − ref‖ / ‖ref‖ on fresh random inputs, outputs poisoned before each run): fp16 5e-3;
//! bf16 1.5e-2, since bf16 keeps 8 significant bits (the probabilities P are rounded to bf16 before P V).
#![cfg(feature = "cuda")]

mod common;

use s2attn::cpu::{attention_reference, rel_l2_error};
use s2attn::cuda::{cudarc, CudaTensor};
use s2attn::{
    Attention, Backend, BlockMask, Context, ContextOptions, DType, Error, KernelVariant, Layout, S2Config, Shape,
};

const F16_TOL: f64 = 5e-3;
const BF16_TOL: f64 = 1.5e-2;

/// xorshift64*: fresh, reproducible-per-seed uniform values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        x as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Host element types of the CUDA kernels.
trait Half: s2attn::Element + Copy {
    fn from(x: f32) -> Self;
    fn tol() -> f64;
}
impl Half for half::f16 {
    fn from(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn tol() -> f64 {
        F16_TOL
    }
}
impl Half for half::bf16 {
    fn from(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn tol() -> f64 {
        BF16_TOL
    }
}

struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
}

fn inputs<T: Half>(layout: &Layout, shape: &Shape, seed: u64) -> Inputs<T> {
    let tokens = shape.batch as usize * shape.seq_len as usize * shape.head_dim as usize;
    let mut rng = Rng::new(seed);
    let mut gen = |heads: u32| (0..tokens * heads as usize).map(|_| T::from(rng.next())).collect::<Vec<T>>();
    let q = gen(layout.num_heads());
    let k = gen(layout.num_kv_heads());
    let v = gen(layout.num_kv_heads());
    Inputs { q, k, v }
}

fn widen<T: Half>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&e| e.to_f32()).collect()
}

/// Checks O and LSE from `out`/`lse` against the oracle on the same (rounded) inputs; returns the error.
fn compare<T: Half>(what: &str, layout: &Layout, shape: &Shape, x: &Inputs<T>, out: &[T], lse: &[f32]) -> f64 {
    let r = attention_reference(
        layout,
        shape.batch,
        shape.seq_len,
        shape.head_dim,
        shape.softmax_scale() as f64,
        &widen(&x.q),
        &widen(&x.k),
        &widen(&x.v),
    );
    let err = rel_l2_error(out.iter().map(|&e| e.to_f32() as f64), &r.out);
    assert!(err < T::tol(), "{what}: relative L2 error {err:.3e} >= {:.1e}", T::tol());
    assert_eq!(lse.len(), r.lse.len(), "{what}: LSE length");
    let mut worst = 0f64;
    for (i, (&got, &want)) in lse.iter().zip(&r.lse).enumerate() {
        if want == f64::NEG_INFINITY {
            assert_eq!(got, f32::NEG_INFINITY, "{what}: LSE[{i}] of a row with no key");
        } else {
            assert!(got.is_finite(), "{what}: LSE[{i}] = {got}, want {want}");
            worst = worst.max((got as f64 - want).abs());
        }
    }
    assert!(worst < 2e-2, "{what}: LSE off by {worst:.3e}");
    err
}

/// Runs `layout` at `shape` on the host path and checks it; returns the op for further use.
fn check<T: Half>(ctx: &Context, what: &str, layout: &Layout, shape: Shape, seed: u64) -> Attention {
    let op = Attention::new(ctx, layout, shape).unwrap_or_else(|e| panic!("{what}: {e}"));
    let x = inputs::<T>(layout, &shape, seed);
    let out = op.forward(&x.q, &x.k, &x.v).unwrap_or_else(|e| panic!("{what}: {e}"));
    let err = compare(what, layout, &shape, &x, &out.out, &out.lse);
    eprintln!("{what}: rel L2 {err:.2e} | {}", op.explain());
    op
}

fn s2(heads: u32, kv: u32, bs: u32, local: u32, stride: u32) -> Layout {
    Layout::s2(S2Config::new(heads, bs, local, stride).kv_heads(kv)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn paper_pattern_f16_and_bf16_both_head_dims() {
    let Some(ctx) = common::cuda_context() else { return };
    for d in [64, 128] {
        let layout = s2(4, 4, 64, 4, 4);
        check::<half::f16>(ctx, &format!("f16 d{d} seq 1000"), &layout, Shape::new(1, 1000, d, DType::F16), d as u64);
        check::<half::bf16>(
            ctx,
            &format!("bf16 d{d} seq 1000"),
            &layout,
            Shape::new(1, 1000, d, DType::BF16),
            7 + d as u64,
        );
    }
}

#[test]
fn every_block_size_with_odd_lengths() {
    let Some(ctx) = common::cuda_context() else { return };
    for (bs, seq) in [(16, 333), (32, 517), (64, 1029), (128, 901)] {
        let layout = s2(4, 2, bs, 3, 3);
        check::<half::f16>(
            ctx,
            &format!("block {bs} seq {seq} gqa 4/2"),
            &layout,
            Shape::new(1, seq, 64, DType::F16),
            bs as u64,
        );
    }
}

#[test]
fn other_head_dims() {
    let Some(ctx) = common::cuda_context() else { return };
    for d in [32, 96, 256] {
        let layout = s2(2, 2, 64, 2, 3);
        check::<half::f16>(ctx, &format!("d{d}"), &layout, Shape::new(1, 700, d, DType::F16), 100 + d as u64);
    }
}

#[test]
fn batch_and_gqa_and_scale() {
    let Some(ctx) = common::cuda_context() else { return };
    let layout = s2(8, 2, 32, 4, 5);
    check::<half::f16>(ctx, "batch 3 gqa 8/2", &layout, Shape::new(3, 300, 64, DType::F16), 11);
    check::<half::bf16>(
        ctx,
        "batch 2 bf16 scale 0.05",
        &layout,
        Shape::new(2, 257, 128, DType::BF16).with_scale(0.05),
        12,
    );
}

#[test]
fn dense_and_all_local_and_tiny() {
    let Some(ctx) = common::cuda_context() else { return };
    let dense = Layout::dense(4, 4, 64, true).unwrap_or_else(|e| panic!("{e}"));
    check::<half::f16>(ctx, "dense causal", &dense, Shape::new(1, 777, 128, DType::F16), 21);
    let local = s2(4, 4, 16, 2, 1 << 20);
    check::<half::f16>(ctx, "all local", &local, Shape::new(1, 600, 64, DType::F16), 22);
    for seq in [1, 2, 15, 17] {
        check::<half::f16>(
            ctx,
            &format!("seq {seq}"),
            &s2(2, 1, 16, 1, 2),
            Shape::new(2, seq, 64, DType::F16),
            23 + seq as u64,
        );
    }
}

#[test]
fn bidirectional_layouts() {
    let Some(ctx) = common::cuda_context() else { return };
    let layout = Layout::s2(S2Config::new(4, 32, 2, 4).bidirectional(2, 1)).unwrap_or_else(|e| panic!("{e}"));
    check::<half::f16>(ctx, "bidirectional", &layout, Shape::new(1, 413, 64, DType::F16), 31);
    let dense = Layout::dense(2, 2, 64, false).unwrap_or_else(|e| panic!("{e}"));
    check::<half::bf16>(ctx, "dense bidirectional", &dense, Shape::new(1, 300, 128, DType::BF16), 32);
}

#[test]
fn custom_masks_with_block_row_masks_and_empty_rows() {
    let Some(ctx) = common::cuda_context() else { return };
    // Query block 1 skips KV block 0 while blocks 0 and 2 keep it: with 16-token blocks merged into
    // 64/128-row tiles this needs per-block row masks, and query block 3 has no key at all.
    let (bs, nb) = (16, 24);
    let mask =
        BlockMask::from_fn(2, nb, nb, bs, true, |h, q, k| q != 3 && (k == q || (k == 0 && q != 1) || (k + h) % 3 == 0))
            .unwrap_or_else(|e| panic!("{e}"));
    let layout = Layout::custom(mask, 4, 2).unwrap_or_else(|e| panic!("{e}"));
    let op = check::<half::f16>(ctx, "custom mask", &layout, Shape::new(1, nb * bs - 5, 64, DType::F16), 41);
    assert!(!op.mergeq().all_prefix(), "the mask was meant to need per-block row masks");
}

/// Checks a grid of >= 264 CTAs, which takes 128-row tiles: four 32-row warps on mma.sync, or two 64-row
/// warpgroups on wgmma on sm_90 (head dim 128).
fn check_large<T: Half>(what: &str, layout: &Layout, shape: Shape, seed: u64) {
    let Some(ctx) = common::cuda_context() else { return };
    let op = check::<T>(ctx, what, layout, shape, seed);
    assert!(op.plan().tile_q >= 128, "{what}: {}", op.explain());
    let eligible = op.plan().tile_kv == 64 && op.plan().tile_q == 128 && shape.head_dim == 128;
    let hopper = ctx.cuda().is_some_and(|c| c.arch() == (9, 0));
    let wgmma = op.plan().variant == KernelVariant::CudaWgmma;
    assert_eq!(wgmma, eligible && hopper, "{what}: {}", op.explain());
    assert_eq!(wgmma, op.plan().reason.starts_with("wgmma"), "the reason names the kernel: {}", op.explain());
}

#[test]
fn large_grid_f16_d128() {
    check_large::<half::f16>("large grid, f16 d128", &s2(4, 2, 64, 3, 4), Shape::new(8, 1100, 128, DType::F16), 71);
}

#[test]
fn large_grid_f16_d64() {
    check_large::<half::f16>("large grid, f16 d64", &s2(4, 2, 64, 3, 4), Shape::new(9, 1000, 64, DType::F16), 72);
}

#[test]
fn large_grid_bf16_d128() {
    check_large::<half::bf16>("large grid, bf16 d128", &s2(4, 2, 64, 3, 4), Shape::new(9, 1000, 128, DType::BF16), 73);
}

#[test]
fn large_grid_bf16_d64() {
    check_large::<half::bf16>("large grid, bf16 d64", &s2(4, 2, 64, 3, 4), Shape::new(9, 1000, 64, DType::BF16), 74);
}

/// A softmax scale of 2 (23x the usual 1/sqrt(128)) spreads the scores over hundreds of log2 units, so rows'
/// maxima jump far along their walks: the kernels' lazy O rescale (only once a maximum has risen past a slack)
/// must still keep every P, sum and O relative to one maximum per row. (Were it to overflow, the exact kernel
/// would redo the op; `shaders/cuda/emu/forward_check.cc qscale=12` checks that each kernel alone gets such
/// rows right without raising the flag.)
#[test]
fn large_scores_rescale_o_when_maxima_jump() {
    let layout = s2(4, 2, 64, 3, 4);
    // Grids as large as the large_grid tests', so that the planner takes 128-row tiles (and wgmma on sm_90 at d128).
    check_large::<half::f16>("scale 2, f16 d128", &layout, Shape::new(8, 1100, 128, DType::F16).with_scale(2.0), 81);
    check_large::<half::bf16>("scale 2, bf16 d128", &layout, Shape::new(9, 1000, 128, DType::BF16).with_scale(2.0), 82);
    check_large::<half::f16>("scale 2, f16 d64", &layout, Shape::new(9, 1000, 64, DType::F16).with_scale(2.0), 83);
}

#[test]
fn large_grid_block_128_and_dense_bidirectional() {
    check_large::<half::f16>("large grid, block 128", &s2(2, 2, 128, 2, 3), Shape::new(17, 1000, 128, DType::F16), 75);
    let dense = Layout::dense(4, 4, 64, false).unwrap_or_else(|e| panic!("{e}"));
    check_large::<half::f16>("large grid, dense bidirectional", &dense, Shape::new(9, 900, 64, DType::F16), 76);
}

/// 128-row MergeQ tiles of eight 16-token blocks (sixteen at 256 rows) with per-block row masks.
#[test]
fn large_grid_custom_mask() {
    let (bs, nb) = (16, 24);
    let mask =
        BlockMask::from_fn(2, nb, nb, bs, true, |h, q, k| q != 3 && (k == q || (k == 0 && q != 1) || (k + h) % 3 == 0))
            .unwrap_or_else(|e| panic!("{e}"));
    let custom = Layout::custom(mask, 4, 2).unwrap_or_else(|e| panic!("{e}"));
    check_large::<half::f16>("large grid, custom mask", &custom, Shape::new(24, nb * bs - 5, 64, DType::F16), 77);
}

#[test]
fn repeated_runs_agree() {
    let Some(ctx) = common::cuda_context() else { return };
    let layout = s2(4, 4, 64, 4, 4);
    let shape = Shape::new(4, 4096, 128, DType::F16);
    let op = Attention::new(ctx, &layout, shape).unwrap_or_else(|e| panic!("{e}"));
    let x = inputs::<half::f16>(&layout, &shape, 51);
    let a = op.forward(&x.q, &x.k, &x.v).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..3 {
        let b = op.forward(&x.q, &x.k, &x.v).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            a.out.iter().zip(&b.out).all(|(x, y)| x.to_bits() == y.to_bits()),
            "outputs differ between runs: a race"
        );
        assert_eq!(a.lse, b.lse, "LSE differs between runs: a race");
    }
}

#[test]
fn embedding_paths_match_the_host_path() {
    let Some(ctx) = common::cuda_context() else { return };
    let Some(cuda) = ctx.cuda() else { panic!("a CUDA context without a CUDA device") };
    let layout = s2(4, 2, 64, 3, 4);
    let shape = Shape::new(2, 513, 64, DType::F16);
    let op = Attention::new(ctx, &layout, shape).unwrap_or_else(|e| panic!("{e}"));
    let x = inputs::<half::f16>(&layout, &shape, 61);
    let host = op.forward(&x.q, &x.k, &x.v).unwrap_or_else(|e| panic!("{e}"));
    let bits = |v: &[half::f16]| v.iter().map(|e| e.to_bits()).collect::<Vec<u16>>();
    let stream = cuda.stream();

    // cudarc buffers the caller owns, outputs poisoned with NaN.
    let up = |v: &[u16]| stream.clone_htod(v).unwrap_or_else(|e| panic!("{e}"));
    let (q, k, v) = (up(&bits(&x.q)), up(&bits(&x.k)), up(&bits(&x.v)));
    let mut out = up(&vec![0xffffu16; x.q.len()]);
    let mut lse = stream.clone_htod(&vec![f32::NAN; host.lse.len()]).unwrap_or_else(|e| panic!("{e}"));
    op.forward_cuda(&q, &k, &v, &mut out, &mut lse).unwrap_or_else(|e| panic!("{e}"));
    let got = stream.clone_dtoh(&out).unwrap_or_else(|e| panic!("{e}"));
    let got_lse = stream.clone_dtoh(&lse).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, bits(&host.out), "cudarc-buffer output differs from the host path");
    assert_eq!(got_lse, host.lse, "cudarc-buffer LSE differs from the host path");

    // Raw pointers into one packed [batch, seq, q|k|v] buffer, output into a strided buffer too.
    let (h, hk, d) = (4usize, 2usize, 64usize);
    let row = (h + 2 * hk) * d;
    let tokens = (shape.batch * shape.seq_len) as usize;
    let mut packed = vec![0u16; tokens * row];
    let (qb, kb, vb) = (bits(&x.q), bits(&x.k), bits(&x.v));
    for t in 0..tokens {
        packed[t * row..][..h * d].copy_from_slice(&qb[t * h * d..][..h * d]);
        packed[t * row + h * d..][..hk * d].copy_from_slice(&kb[t * hk * d..][..hk * d]);
        packed[t * row + (h + hk) * d..][..hk * d].copy_from_slice(&vb[t * hk * d..][..hk * d]);
    }
    let packed = up(&packed);
    let out_row = h * d + 8;
    let strided_out = up(&vec![0xffffu16; tokens * out_row]);
    let mut lse2 = stream.clone_htod(&vec![f32::NAN; host.lse.len()]).unwrap_or_else(|e| panic!("{e}"));
    {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (base, _g) = packed.device_ptr(stream);
        let (obase, _o) = strided_out.device_ptr(stream);
        let (lbase, _l) = lse2.device_ptr_mut(stream);
        let el = 2u64;
        let view = |off: usize| CudaTensor::strided(base + off as u64 * el, row as u64);
        // SAFETY: every view lies inside `packed` / `strided_out` / `lse2`, alive until the stream syncs below.
        unsafe {
            op.forward_cuda_raw(
                None,
                &view(0),
                &view(h * d),
                &view((h + hk) * d),
                &CudaTensor::strided(obase, out_row as u64),
                lbase,
            )
        }
        .unwrap_or_else(|e| panic!("{e}"));
    }
    ctx.wait().unwrap_or_else(|e| panic!("{e}"));
    let got = stream.clone_dtoh(&strided_out).unwrap_or_else(|e| panic!("{e}"));
    let want = bits(&host.out);
    for t in 0..tokens {
        assert_eq!(&got[t * out_row..][..h * d], &want[t * h * d..][..h * d], "strided output, token {t}");
        assert!(got[t * out_row + h * d..][..8].iter().all(|&b| b == 0xffff), "padding written at token {t}");
    }
    assert_eq!(stream.clone_dtoh(&lse2).unwrap_or_else(|e| panic!("{e}")), host.lse, "raw-pointer LSE");

    // Misaligned strides are refused with a clear message.
    let bad = CudaTensor::strided(0x1000, 4 * 64 + 4);
    // SAFETY: refused before any launch.
    let e = unsafe { op.forward_cuda_raw(None, &bad, &bad, &bad, &bad, 0x1000) }.expect_err("misaligned stride");
    assert!(matches!(e, Error::Shape(_)), "{e}");
}

#[test]
fn auto_backend_takes_cuda_and_f32_is_refused_clearly() {
    let Some(ctx) = common::cuda_context() else { return };
    let auto = Context::with_options(&ContextOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(auto.backend(), Backend::Cuda, "Auto must take CUDA when it is built in and present");
    let layout = s2(2, 2, 64, 2, 2);
    let e = Attention::new(ctx, &layout, Shape::new(1, 128, 64, DType::F32)).expect_err("f32 on CUDA");
    assert!(matches!(&e, Error::Unsupported(m) if m.contains("f16")), "{e}");
    let e = Attention::new(ctx, &layout, Shape::new(1, 128, 80, DType::F16)).expect_err("head_dim 80");
    assert!(matches!(e, Error::HeadDim { got: 80, .. }), "{e}");
    let op = Attention::new(ctx, &layout, Shape::new(1, 128, 64, DType::F16)).unwrap_or_else(|e| panic!("{e}"));
    let e =
        op.forward(&[half::bf16::ZERO; 4], &[half::bf16::ZERO; 4], &[half::bf16::ZERO; 4]).expect_err("wrong dtype");
    assert!(matches!(e, Error::DType { .. }), "{e}");
}
