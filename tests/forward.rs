//! GPU forward against the f64 oracle on whatever adapter `Context::new()` finds (lavapipe in CI): block
//! sizes, head dims, odd lengths, batch, GQA, dense, pure local, homo_head, dense heads, offsets,
//! bidirectional, custom masks (an empty row too), f32 and f16, O and LSE; through host slices, through
//! caller-owned NaN-poisoned buffers (`Attention::encode`) and through interleaved QKV views. Sizes are
//! tiny: lavapipe runs ~2 GFLOP/s and the oracle is O(seq^2).

mod common;

use common::{check, context, Path, Problem};
use s2attn::plan::{portable_workgroup_bytes, RowMask};
use s2attn::{Attention, DType, Error, Layout, S2Config};

fn s2(c: S2Config) -> Layout {
    Layout::s2(c).expect("valid S2 config")
}

/// Runs `p` on every listed path with a distinct seed per run.
fn check_all(paths: &[Path], p: &Problem, seed: u64) {
    for (i, &path) in paths.iter().enumerate() {
        check(path, p, seed * 16 + i as u64);
    }
}

const F32_F16: [DType; 2] = [DType::F32, DType::F16];

#[test]
fn adapter_is_present() {
    // Fails loudly (never skips) without an adapter; prints which one the GPU tests ran on.
    let ctx = context();
    println!("GPU tests on {} ({})", ctx.adapter_name(), ctx.backend_name());
}

#[test]
fn every_block_size() {
    for (i, bs) in [16, 32, 64, 128].into_iter().enumerate() {
        for dtype in F32_F16 {
            let l = s2(S2Config::new(2, bs, 2, 3));
            check(Path::Host, &Problem::new(&l, 1, 3 * bs + 5, 64, dtype), 1000 + i as u64);
        }
    }
}

#[test]
fn every_head_dim() {
    let l = s2(S2Config::new(2, 32, 1, 2));
    for (i, d) in [32, 64, 96, 128].into_iter().enumerate() {
        for dtype in F32_F16 {
            check(Path::Host, &Problem::new(&l, 1, 101, d, dtype), 1100 + i as u64);
        }
    }
}

#[test]
fn head_dim_256_runs_wherever_its_smallest_tile_fits() {
    // The portable kernel's smallest tile at d = 256 needs more workgroup memory than some adapters have
    // (lavapipe: 32 KiB); there the op must refuse with DeviceLimit, elsewhere it must be right.
    let l = s2(S2Config::new(2, 16, 2, 2));
    for dtype in F32_F16 {
        let p = Problem::new(&l, 1, 70, 256, dtype);
        match Attention::new(context(), &l, p.shape()) {
            Ok(_) => check(Path::Host, &p, 1200),
            Err(Error::DeviceLimit { limit, needed, max, .. }) => {
                assert_eq!(limit, "max_compute_workgroup_storage_size");
                assert!(max < needed && max < portable_workgroup_bytes(16, 16, 256) as u64);
                println!(
                    "head_dim 256 refused on {}: {needed} B of workgroup memory > {max} B",
                    context().adapter_name()
                );
            }
            Err(e) => panic!("head_dim 256: unexpected {e}"),
        }
    }
}

#[test]
fn odd_sequence_lengths_and_partial_last_blocks() {
    let l = s2(S2Config::new(2, 16, 2, 3).kv_heads(1));
    for (i, seq) in [1, 2, 15, 17, 31, 33, 63, 97].into_iter().enumerate() {
        check(Path::Host, &Problem::new(&l, 1, seq, 32, DType::F32), 1300 + i as u64);
    }
    let l = s2(S2Config::new(2, 64, 1, 2));
    for (i, seq) in [1, 65, 191].into_iter().enumerate() {
        check(Path::Host, &Problem::new(&l, 2, seq, 64, DType::F16), 1350 + i as u64);
    }
}

#[test]
fn batch_and_gqa() {
    for dtype in F32_F16 {
        let l = s2(S2Config::new(8, 16, 1, 4).kv_heads(2));
        check(Path::Host, &Problem::new(&l, 3, 80, 32, dtype), 1400);
        let l = s2(S2Config::new(6, 32, 2, 3).kv_heads(3));
        check(Path::Host, &Problem::new(&l, 2, 99, 64, dtype), 1401);
        let l = s2(S2Config::new(4, 16, 1, 2).kv_heads(1));
        check(Path::Host, &Problem::new(&l, 2, 50, 128, dtype), 1402);
    }
}

#[test]
fn all_dense() {
    for dtype in F32_F16 {
        check(Path::Host, &Problem::new(&s2(S2Config::new(2, 32, 1, 1)), 1, 150, 64, dtype), 1500);
        let causal = Layout::dense(4, 2, 16, true).expect("dense");
        check(Path::Host, &Problem::new(&causal, 2, 77, 32, dtype), 1501);
        let full = Layout::dense(2, 2, 64, false).expect("dense");
        check(Path::Host, &Problem::new(&full, 1, 133, 64, dtype), 1502);
    }
}

#[test]
fn pure_local() {
    // vert_stride far beyond the sequence: local windows (and block 0, whose stripe phase is 0).
    for dtype in F32_F16 {
        let l = s2(S2Config::new(4, 16, 2, 1000).offset(1));
        check(Path::Host, &Problem::new(&l, 1, 150, 64, dtype), 1600);
        let l = s2(S2Config::new(2, 32, 1, 1000));
        check(Path::Host, &Problem::new(&l, 2, 161, 32, dtype), 1601);
    }
}

#[test]
fn homo_head_dense_heads_and_offsets() {
    let cases = [
        S2Config::new(4, 16, 1, 4).homo_head(true),
        S2Config::new(4, 16, 1, 4).homo_head(true).dense_heads(1).kv_heads(2),
        S2Config::new(4, 32, 2, 5).dense_heads(2),
        S2Config::new(4, 16, 1, 8).offset(1),
        S2Config::new(2, 16, 2, 3).offset(7),
        S2Config::new(8, 16, 1, 16).kv_heads(4).offset(3).dense_heads(1),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        for dtype in F32_F16 {
            check(Path::Host, &Problem::new(&s2(c.clone()), 1, 130, 64, dtype), 1700 + i as u64);
        }
    }
}

#[test]
fn bidirectional_windows() {
    let cases = [
        S2Config::new(2, 16, 1, 3).bidirectional(1, 1),
        S2Config::new(4, 16, 1, 2).bidirectional(2, 0).kv_heads(2).offset(1),
        S2Config::new(2, 32, 1, 4).bidirectional(1, 2).dense_heads(1),
        S2Config::new(2, 64, 1, 1000).bidirectional(1, 1),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        for dtype in F32_F16 {
            check(Path::Host, &Problem::new(&s2(c.clone()), 1, 140, 64, dtype), 1800 + i as u64);
        }
    }
}

#[test]
fn custom_masks() {
    for (i, (causal, mask_heads, h, kv)) in [(true, 1, 2, 2), (false, 2, 4, 2), (true, 4, 4, 1)].into_iter().enumerate()
    {
        for dtype in F32_F16 {
            let l =
                Layout::custom(common::random_mask(i as u64, mask_heads, 8, 16, causal, None), h, kv).expect("layout");
            let p = Problem::new(&l, 2, 16 * 8 - 3, 64, dtype);
            let op = p.op(context());
            if op.plan().tile_q > 16 && context().wgpu().is_some() {
                assert!(
                    op.mergeq().entries().iter().any(|e| matches!(e.rows, RowMask::Blocks(_))),
                    "random custom masks merged {}-row tiles without needing a bit mask: the test lost its point",
                    op.plan().tile_q
                );
            }
            check_all(&[Path::Host, Path::Encode], &p, 1900 + i as u64);
        }
    }
}

#[test]
fn custom_mask_with_an_empty_row_gives_zeros_and_lse_minus_infinity() {
    for (i, causal) in [true, false].into_iter().enumerate() {
        for dtype in F32_F16 {
            let l =
                Layout::custom(common::random_mask(40 + i as u64, 1, 6, 16, causal, Some(2)), 2, 1).expect("layout");
            let p = Problem::new(&l, 2, 90, 32, dtype);
            let x = p.inputs(2000 + i as u64);
            let want = p.reference(&x);
            assert!(want.lse.contains(&f64::NEG_INFINITY), "the oracle sees the empty row");
            let got = common::run_encode(&p, &x);
            for b in 0..2 {
                for h in 0..2 {
                    for t in 32..48 {
                        assert_eq!(got.lse[((b * 2 + h) * 90 + t) as usize], f32::NEG_INFINITY, "lse b{b} h{h} t{t}");
                        let row = &got.out[(((b * 90 + t) * 2 + h) * 32) as usize..][..32];
                        assert!(row.iter().all(|&o| o == 0.0), "empty row b{b} h{h} t{t} = {row:?}");
                    }
                }
            }
            common::assert_matches("empty row", &p, &got, &want);
        }
    }
}

#[test]
fn custom_softmax_scale() {
    let l = s2(S2Config::new(2, 16, 1, 3));
    for (i, scale) in [0.05f32, 0.5, 2.0].into_iter().enumerate() {
        check(Path::Host, &Problem::new(&l, 1, 70, 32, DType::F32).with_scale(scale), 2100 + i as u64);
    }
}

#[test]
fn caller_owned_buffers_poisoned_with_nan() {
    // A representative set through `Attention::encode`: every element of O and the LSE must be written.
    let cases = [
        (s2(S2Config::new(2, 16, 2, 3)), 1, 83, 64),
        (s2(S2Config::new(8, 32, 1, 4).kv_heads(2).dense_heads(1)), 2, 70, 32),
        (s2(S2Config::new(2, 128, 1, 2)), 1, 300, 128),
        (s2(S2Config::new(2, 16, 1, 2).bidirectional(1, 1).offset(1)), 2, 45, 96),
        (Layout::dense(2, 1, 64, true).expect("dense"), 1, 65, 64),
    ];
    for (i, (l, batch, seq, d)) in cases.into_iter().enumerate() {
        for dtype in F32_F16 {
            check(Path::Encode, &Problem::new(&l, batch, seq, d, dtype), 2200 + i as u64);
        }
    }
}

#[test]
fn strided_views_into_one_qkv_buffer() {
    let cases = [
        (s2(S2Config::new(4, 16, 1, 4).kv_heads(2)), 2, 57, 64),
        (s2(S2Config::new(2, 32, 2, 3)), 1, 100, 32),
        (s2(S2Config::new(2, 64, 1, 2).bidirectional(1, 1)), 1, 129, 128),
    ];
    for (i, (l, batch, seq, d)) in cases.into_iter().enumerate() {
        for dtype in F32_F16 {
            check(Path::Strided, &Problem::new(&l, batch, seq, d, dtype), 2300 + i as u64);
        }
    }
}

#[test]
fn an_op_reused_with_new_inputs_stays_right_and_allocates_nothing() {
    let l = s2(S2Config::new(4, 16, 1, 4).kv_heads(2));
    let p = Problem::new(&l, 1, 64, 64, DType::F32);
    let op = p.op(context());
    let x = p.inputs(2400);
    common::assert_matches("first call", &p, &common::run_host_op(&op, &p, &x), &p.reference(&x));
    let created = op.buffers_created();
    for seed in [2401, 2402] {
        let x = p.inputs(seed);
        common::assert_matches("reused op", &p, &common::run_host_op(&op, &p, &x), &p.reference(&x));
    }
    assert_eq!(op.buffers_created(), created, "steady-state forward calls must not create buffers");
}
