//! Error paths: each bad input is refused with its specific `Error` variant (and a message naming the
//! argument), never a panic: bad layouts and masks, bad shapes, wrong slices and dtypes, short or
//! misaligned caller buffers, no matching adapter, an unknown `S2ATTN_BACKEND`.

mod common;

use common::{context, poisoned, upload, Problem};
use half::f16;
use s2attn::{Attention, BlockMask, ContextOptions, DType, Error, Layout, S2Config, Shape, TensorView};

fn s2_err(c: S2Config) -> Error {
    Layout::s2(c).expect_err("config must be refused")
}

fn layout() -> Layout {
    Layout::s2(S2Config::new(4, 16, 1, 2).kv_heads(2)).expect("layout")
}

#[test]
fn block_size_not_supported() {
    for bs in [0, 8, 24, 48, 256] {
        assert_eq!(s2_err(S2Config::new(2, bs, 1, 2)), Error::BlockSize(bs));
        assert_eq!(Layout::dense(2, 2, bs, true).expect_err("dense"), Error::BlockSize(bs));
        let mask = BlockMask::new(1, 2, 2, bs, true, vec![true; 4]).expect("mask dims are fine");
        assert_eq!(Layout::custom(mask, 2, 2).expect_err("custom"), Error::BlockSize(bs));
    }
    assert!(Error::BlockSize(48).to_string().contains("48"));
}

#[test]
fn local_blocks_zero() {
    assert_eq!(s2_err(S2Config::new(2, 16, 0, 2)), Error::LocalBlocks(0));
    assert_eq!(s2_err(S2Config::new(2, 16, 1, 2).bidirectional(0, 3)), Error::LocalBlocks(0));
}

#[test]
fn vert_stride_zero() {
    assert_eq!(s2_err(S2Config::new(2, 16, 1, 0)), Error::VertStride(0));
}

#[test]
fn heads_not_a_multiple_of_kv_heads() {
    for (h, kv) in [(6, 4), (3, 2), (0, 1), (2, 0), (2, 4)] {
        let want = Error::HeadGroups { num_heads: h, num_kv_heads: kv };
        assert_eq!(s2_err(S2Config::new(h, 16, 1, 2).kv_heads(kv)), want);
        assert_eq!(Layout::dense(h, kv, 16, true).expect_err("dense"), want);
        let mask = BlockMask::new(1, 2, 2, 16, true, vec![true; 4]).expect("mask");
        assert_eq!(Layout::custom(mask, h, kv).expect_err("custom"), want);
    }
    let msg = Error::HeadGroups { num_heads: 6, num_kv_heads: 4 }.to_string();
    assert!(msg.contains("num_heads (6)") && msg.contains("num_kv_heads (4)"), "{msg}");
}

#[test]
fn more_dense_heads_than_kv_heads() {
    assert_eq!(
        s2_err(S2Config::new(4, 16, 1, 2).kv_heads(2).dense_heads(3)),
        Error::DenseHeads { dense: 3, num_kv_heads: 2 }
    );
}

#[test]
fn bad_mask_dimensions() {
    assert!(matches!(BlockMask::new(1, 3, 3, 16, true, vec![true; 8]), Err(Error::Mask(_))));
    assert!(matches!(BlockMask::new(1, 3, 3, 16, true, vec![true; 10]), Err(Error::Mask(_))));
    for (h, q, k) in [(0, 3, 3), (1, 0, 3), (1, 3, 0)] {
        assert!(matches!(BlockMask::from_fn(h, q, k, 16, true, |_, _, _| true), Err(Error::Mask(_))));
    }
    // Mask heads must divide the query heads.
    let mask = BlockMask::from_fn(3, 4, 4, 16, true, |_, _, _| true).expect("mask");
    assert!(matches!(Layout::custom(mask, 4, 2), Err(Error::Mask(_))));
    // A sequence longer than the mask describes (4 x 4 blocks of 16 = 64 tokens), either dimension.
    for (q, k) in [(4, 4), (5, 4), (4, 5)] {
        let mask = BlockMask::from_fn(1, q, k, 16, true, |_, _, _| true).expect("mask");
        let l = Layout::custom(mask, 2, 2).expect("layout");
        let e = Attention::new(context(), &l, Shape::new(1, 65, 32, DType::F32)).expect_err("too long");
        assert!(matches!(e, Error::Mask(_)), "{e}");
        Attention::new(context(), &l, Shape::new(1, 64, 32, DType::F32)).expect("64 tokens fit");
    }
}

#[test]
fn zero_sizes_and_bad_scales() {
    let l = layout();
    for shape in [
        Shape::new(1, 0, 32, DType::F32),
        Shape::new(0, 16, 32, DType::F32),
        Shape::new(1, 16, 0, DType::F32),
        Shape::new(1, 16, 32, DType::F32).with_scale(0.0),
        Shape::new(1, 16, 32, DType::F32).with_scale(-1.0),
        Shape::new(1, 16, 32, DType::F32).with_scale(f32::NAN),
        Shape::new(1, 16, 32, DType::F32).with_scale(f32::INFINITY),
    ] {
        let e = Attention::new(context(), &l, shape).expect_err("must be refused");
        assert!(matches!(e, Error::Shape(_)), "{shape:?}: {e}");
    }
    let e = Attention::new(context(), &l, Shape::new(1, 0, 32, DType::F32)).expect_err("seq 0");
    assert!(e.to_string().contains("seq_len"), "{e}");
    let e = Attention::new(context(), &l, Shape::new(0, 16, 32, DType::F32)).expect_err("batch 0");
    assert!(e.to_string().contains("batch"), "{e}");
}

#[test]
fn head_dim_not_supported() {
    for d in [8, 48, 100, 512] {
        match Attention::new(context(), &layout(), Shape::new(1, 32, d, DType::F32)) {
            Err(Error::HeadDim { got, supported, .. }) => {
                assert_eq!(got, d);
                assert!(!supported.contains(&d));
            }
            other => panic!("head_dim {d}: expected Error::HeadDim, got {other:?}"),
        }
    }
}

#[test]
fn wrong_slice_lengths() {
    let p = Problem::new(&layout(), 2, 20, 32, DType::F32);
    let op = p.op(context());
    let x = p.inputs(3000);
    let short = |v: &[f32]| v[..v.len() - 1].to_vec();
    let long = |v: &[f32]| [v, &[0.5]].concat();
    for (name, q, k, v) in [
        ("q", short(&x.q), x.k.clone(), x.v.clone()),
        ("k", x.q.clone(), short(&x.k), x.v.clone()),
        ("v", x.q.clone(), x.k.clone(), short(&x.v)),
        ("q", long(&x.q), x.k.clone(), x.v.clone()),
        ("v", x.q.clone(), x.k.clone(), long(&x.v)),
    ] {
        match op.forward(&q, &k, &v) {
            Err(Error::Length { tensor, got, expected, .. }) => {
                assert_eq!(tensor, name);
                assert_ne!(got, expected);
            }
            other => panic!("{name} of the wrong length: expected Error::Length, got {:?}", other.map(|_| ())),
        }
    }
    // K with the query heads' size (GQA confusion) is refused too.
    let e = op.forward(&x.q, &x.q, &x.q).expect_err("k sized like q");
    assert!(matches!(e, Error::Length { tensor: "k", .. }), "{e}");
    assert!(e.to_string().contains("k has"), "{e}");
    let e = op.time_forward(&short(&x.q), &x.k, &x.v, 0, 1).expect_err("time_forward checks too");
    assert!(matches!(e, Error::Length { tensor: "q", .. }), "{e}");
}

#[test]
fn dtype_mismatch() {
    let p32 = Problem::new(&layout(), 1, 20, 32, DType::F32);
    let op32 = p32.op(context());
    let h = |n: usize| vec![f16::from_f32(0.25); n];
    let e = op32.forward(&h(p32.q_len()), &h(p32.kv_len()), &h(p32.kv_len())).expect_err("f16 into f32 op");
    assert!(matches!(e, Error::DType { expected: "f32", got: "f16", .. }), "{e}");
    let p16 = Problem::new(&layout(), 1, 20, 32, DType::F16);
    let op16 = p16.op(context());
    let f = |n: usize| vec![0.25f32; n];
    let e = op16.forward(&f(p16.q_len()), &f(p16.kv_len()), &f(p16.kv_len())).expect_err("f32 into f16 op");
    assert!(matches!(e, Error::DType { expected: "f16", got: "f32", .. }), "{e}");
}

#[test]
fn supports_dtype_matches_what_ops_accept() {
    let ctx = context();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let made = Attention::new(ctx, &layout(), Shape::new(1, 20, 32, dtype));
        assert_eq!(ctx.supports_dtype(dtype), made.is_ok(), "{dtype}: {:?}", made.err());
    }
}

#[test]
fn iters_zero_is_refused() {
    let p = Problem::new(&layout(), 1, 20, 32, DType::F32);
    let x = p.inputs(3001);
    let e = p.op(context()).time_forward(&x.q, &x.k, &x.v, 0, 0).expect_err("iters 0");
    assert!(matches!(e, Error::Shape(_)), "{e}");
}

#[test]
fn caller_buffers_too_small() {
    let p = Problem::new(&layout(), 2, 20, 32, DType::F32);
    let op = p.op(context());
    let es = p.dtype.size();
    let (q_bytes, kv_bytes, lse_bytes) = (p.q_len() as u64 * es, p.kv_len() as u64 * es, p.lse_len() as u64 * 4);
    let full = |bytes: u64| poisoned(bytes);
    let (q, k, v, o, lse) = (full(q_bytes), full(kv_bytes), full(kv_bytes), full(q_bytes), full(lse_bytes));
    let run = |q: &wgpu::Buffer, k: &wgpu::Buffer, v: &wgpu::Buffer, o: &wgpu::Buffer, lse: (&wgpu::Buffer, u64)| {
        common::encode_and_submit(
            &op,
            &TensorView::new(q),
            &TensorView::new(k),
            &TensorView::new(v),
            &TensorView::new(o),
            lse,
        )
    };
    run(&q, &k, &v, &o, (&lse, 0)).expect("exact sizes are fine");
    let short = |bytes: u64| full(bytes - 4);
    for (name, result) in [
        ("q", run(&short(q_bytes), &k, &v, &o, (&lse, 0))),
        ("k", run(&q, &short(kv_bytes), &v, &o, (&lse, 0))),
        ("v", run(&q, &k, &short(kv_bytes), &o, (&lse, 0))),
        ("out", run(&q, &k, &v, &short(q_bytes), (&lse, 0))),
        ("lse", run(&q, &k, &v, &o, (&short(lse_bytes), 0))),
        ("lse", run(&q, &k, &v, &o, (&lse, 1))),
    ] {
        match result {
            Err(Error::BufferTooSmall { tensor, got, needed }) => {
                assert_eq!(tensor, name);
                assert!(got < needed, "{name}: {got} >= {needed}");
            }
            other => panic!("{name} too small: expected Error::BufferTooSmall, got {other:?}"),
        }
    }
    // A view whose offset pushes the tensor past the buffer's end.
    let e = common::encode_and_submit(
        &op,
        &TensorView::strided(&q, 4, 4 * 32),
        &TensorView::new(&k),
        &TensorView::new(&v),
        &TensorView::new(&o),
        (&lse, 0),
    )
    .expect_err("offset view past the end");
    assert!(matches!(e, Error::BufferTooSmall { tensor: "q", .. }), "{e}");
}

#[test]
fn bad_views() {
    let p = Problem::new(&layout(), 1, 20, 32, DType::F32);
    let op = p.op(context());
    let big = upload(&vec![0u8; 4 * 20 * 4 * 32 * 4]);
    let lse = poisoned(p.lse_len() as u64 * 4);
    let row_q = 4 * 32;
    let cases = [
        // Token stride below the row length.
        (TensorView::strided(&big, 0, row_q - 4), TensorView::new(&big), TensorView::new(&big)),
        // Offset not a multiple of 4 elements.
        (TensorView::strided(&big, 2, row_q), TensorView::new(&big), TensorView::new(&big)),
        // Stride not a multiple of 4 elements.
        (TensorView::strided(&big, 0, row_q + 2), TensorView::new(&big), TensorView::new(&big)),
        // K and V with different token strides.
        (TensorView::new(&big), TensorView::strided(&big, 0, 64), TensorView::strided(&big, 0, 128)),
    ];
    for (i, (q, k, v)) in cases.iter().enumerate() {
        let e = common::encode_and_submit(&op, q, k, v, &TensorView::new(&big), (&lse, 0)).expect_err("bad view");
        assert!(matches!(e, Error::Shape(_)), "case {i}: {e}");
    }
}

#[test]
fn no_matching_adapter() {
    for options in [
        ContextOptions::wgpu(None, Some("no-such-adapter-s2attn-test")),
        ContextOptions { adapter: Some("no-such-adapter-s2attn-test".into()), ..ContextOptions::default() },
    ] {
        match s2attn::Context::with_options(&options) {
            Err(Error::NoAdapter(msg)) => assert!(msg.contains("no-such-adapter-s2attn-test"), "{msg}"),
            other => panic!("expected Error::NoAdapter, got {other:?}"),
        }
    }
    // An unknown wgpu API name.
    let e = s2attn::Context::with_options(&ContextOptions::wgpu(Some("glide"), None)).expect_err("bad api");
    assert!(matches!(&e, Error::NoAdapter(m) if m.contains("glide")), "{e}");
}

#[test]
fn unknown_backend_in_the_environment() {
    // The shared context is opened first so that no other test here reads the variable while it is set.
    let _ = context();
    let old = std::env::var("S2ATTN_BACKEND").ok();
    std::env::set_var("S2ATTN_BACKEND", "quantum-annealer");
    let from_env = ContextOptions::from_env();
    let new = s2attn::Context::new();
    match old {
        Some(v) => std::env::set_var("S2ATTN_BACKEND", v),
        None => std::env::remove_var("S2ATTN_BACKEND"),
    }
    match from_env {
        Err(Error::NoAdapter(msg)) => assert!(msg.contains("quantum-annealer"), "{msg}"),
        other => panic!("expected Error::NoAdapter for S2ATTN_BACKEND=quantum-annealer, got {other:?}"),
    }
    assert!(matches!(new, Err(Error::NoAdapter(_))), "Context::new() with a bad S2ATTN_BACKEND: {new:?}");
}

#[test]
fn a_kernel_past_the_workgroup_memory_limit_is_refused_by_name() {
    // wgpu builds such a pipeline without a word and the driver may run it into a hang; the library's
    // pipeline builder counts each kernel's workgroup variables (override constants applied) first.
    let ctx = context().wgpu().expect("a wgpu context");
    let max = ctx.capabilities().limits.max_compute_workgroup_storage_size;
    let source = "override N: u32 = 4u;\n\
        var<workgroup> tile: array<vec4<f32>, N>;\n\
        var<workgroup> flags: array<atomic<u32>, 4>;\n\
        @group(0) @binding(0) var<storage, read_write> out: array<f32>;\n\
        @compute @workgroup_size(64)\n\
        fn main(@builtin(local_invocation_index) i: u32) {\n\
            tile[i % N] = vec4<f32>(f32(i));\n\
            atomicAdd(&flags[i % 4u], 1u);\n\
            workgroupBarrier();\n\
            out[i] = tile[(i + 1u) % N].x + f32(atomicLoad(&flags[0]));\n\
        }\n";
    // The tile alone fills the limit; with the 16 bytes of flags it is over by 16.
    let n = max / 16;
    // SAFETY: the kernel has no loops.
    match unsafe { ctx.wgsl_pipeline("workgroup memory probe", source, &[("N", n)]) } {
        Err(Error::DeviceLimit { limit, needed, max: m, .. }) => {
            assert_eq!(limit, "max_compute_workgroup_storage_size");
            assert_eq!((needed, m), (max as u64 + 16, max as u64));
        }
        other => panic!("expected DeviceLimit, got {:?}", other.map(|_| ())),
    }
    // SAFETY: as above.
    unsafe { ctx.wgsl_pipeline("workgroup memory probe", source, &[("N", n - 1)]) }.expect("exactly at the limit");
}
