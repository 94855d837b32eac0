//! The CUDA backward against the f64 oracle's analytic gradients: O and LSE come from the CUDA forward,
//! dO is fresh random, the gradients are poisoned (0xff bytes: NaN) before every run. Covers head dims
//! 64 and 128, block sizes 16/32/64/128 (key tiles of 16 to 64 keys, MergeQ row masks, key tiles in the
//! second half of a 128-token block), odd lengths, batch, GQA, dense heads, bidirectional layouts, fp16
//! and bf16, and bitwise determinism; on sm_90 (the wgmma dK/dV pass at head dims 64 and 128, blocks of 64
//! and 128) also CTAs that take many work items. Every test needs a CUDA device and skips with a message
//! without one.
//!
//! Tolerances (‖grad − ref‖ / ‖ref‖ for each of dQ, dK, dV): fp16 5e-3, bf16 1.5e-2 (P and dS are rounded
//! to 8 significant bits before their matrix products).
#![cfg(feature = "cuda")]

mod common;

use s2attn::cpu::{attention_backward_reference, rel_l2_error};
use s2attn::{Attention, AttentionGrad, DType, Direction, Layout, S2Config, Shape};

const F16_TOL: f64 = 5e-3;
const BF16_TOL: f64 = 1.5e-2;

/// xorshift64*: uniform values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

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

fn widen<T: Half>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&e| e.to_f32()).collect()
}

/// Forward on CUDA, backward on CUDA, gradients vs the oracle; returns the worst relative error.
fn check<T: Half>(what: &str, layout: &Layout, shape: Shape, seed: u64) -> f64 {
    let Some(ctx) = common::cuda_context() else { return 0.0 };
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let per_head = shape.batch as usize * shape.seq_len as usize * shape.head_dim as usize;
    let mut gen = |heads: u32| (0..per_head * heads as usize).map(|_| T::from(rng.next())).collect::<Vec<T>>();
    let (q, k, v) = (gen(layout.num_heads()), gen(layout.num_kv_heads()), gen(layout.num_kv_heads()));
    let d_out = gen(layout.num_heads());
    let fwd = Attention::new(ctx, layout, shape).unwrap_or_else(|e| panic!("{what}: {e}"));
    let o = fwd.forward(&q, &k, &v).unwrap_or_else(|e| panic!("{what}: {e}"));
    let op = AttentionGrad::new(ctx, layout, shape).unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = op.backward(&q, &k, &v, &o.out, &o.lse, &d_out).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = attention_backward_reference(layout, &shape, &widen(&q), &widen(&k), &widen(&v), &widen(&d_out));
    assert!(want.dv.iter().any(|&x| x != 0.0), "{what}: the oracle's dv is all zeros");
    let mut worst = 0f64;
    let mut line = String::new();
    for (name, g, w) in [("dq", &got.dq, &want.dq), ("dk", &got.dk, &want.dk), ("dv", &got.dv, &want.dv)] {
        assert_eq!(g.len(), w.len(), "{what}: {name} length");
        let err = rel_l2_error(g.iter().map(|&x| x.to_f32() as f64), w);
        assert!(err < T::tol(), "{what}: ‖{name}−ref‖/‖ref‖ = {err:.3e} >= {:.1e}", T::tol());
        line += &format!(" {name} {err:.2e}");
        worst = worst.max(err);
    }
    // Deterministic: a second run gives the same bits.
    let again = op.backward(&q, &k, &v, &o.out, &o.lse, &d_out).unwrap_or_else(|e| panic!("{what}: {e}"));
    let bits = |g: &s2attn::Grads<T>| -> Vec<u8> {
        [&g.dq, &g.dk, &g.dv].iter().flat_map(|x| bytemuck::cast_slice::<T, u8>(x).to_vec()).collect()
    };
    assert!(bits(&again) == bits(&got), "{what}: two runs differ");
    eprintln!("{what}:{line} | {}", op.explain());
    worst
}

fn s2(c: S2Config) -> Layout {
    Layout::s2(c).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn paper_pattern_gqa_batch_odd_length_f16() {
    let layout = s2(S2Config::new(4, 64, 2, 3).kv_heads(2));
    check::<half::f16>("d128 bs64 gqa batch2 seq333", &layout, Shape::new(2, 333, 128, DType::F16), 1);
}

#[test]
fn paper_pattern_bf16() {
    let layout = s2(S2Config::new(4, 64, 2, 3).kv_heads(2));
    check::<half::bf16>("bf16 d128 bs64 seq333", &layout, Shape::new(1, 333, 128, DType::BF16), 2);
}

#[test]
fn head_dim_64_small_blocks_merge_rows() {
    for (bs, seq) in [(16, 261), (32, 200)] {
        let layout = s2(S2Config::new(4, bs, 3, 4).kv_heads(1));
        check::<half::f16>(&format!("d64 bs{bs} seq{seq}"), &layout, Shape::new(1, seq, 64, DType::F16), bs as u64);
        check::<half::bf16>(&format!("bf16 d64 bs{bs}"), &layout, Shape::new(1, seq, 64, DType::BF16), 7);
    }
}

#[test]
fn block_128_splits_key_tiles() {
    let layout = s2(S2Config::new(2, 128, 2, 2));
    check::<half::f16>("d64 bs128 seq517", &layout, Shape::new(1, 517, 64, DType::F16), 3);
}

#[test]
fn dense_heads_and_bidirectional() {
    let mut c = S2Config::new(4, 32, 2, 3).kv_heads(2);
    c.num_dense_heads = 1;
    check::<half::f16>("one dense head", &s2(c), Shape::new(1, 190, 128, DType::F16), 4);
    let mut c = S2Config::new(2, 32, 1, 3);
    c.direction = Direction::Bidirectional { left: 2, right: 1 };
    check::<half::f16>("bidirectional", &s2(c), Shape::new(1, 170, 64, DType::F16), 5);
}

#[test]
fn tiny_lengths() {
    let layout = s2(S2Config::new(2, 16, 2, 2));
    for seq in [1, 17, 64] {
        check::<half::f16>(&format!("seq {seq}"), &layout, Shape::new(1, seq, 64, DType::F16), seq as u64);
    }
}

/// On sm_90 the dK/dV pass runs on wgmma, persistent over (key tile, KV head, sequence) items: enough items that
/// every CTA takes several (its ring and K/V tile change hands across items), GQA with a dense head, and a
/// bidirectional layout at head dim 64 in bf16.
#[test]
fn many_items_per_cta_dense_head_and_bidirectional_blocks_of_64() {
    let mut c = S2Config::new(8, 64, 2, 4).kv_heads(4);
    c.num_dense_heads = 1;
    check::<half::f16>("d128 bs64 gqa dense head batch3 seq2100", &s2(c), Shape::new(3, 2100, 128, DType::F16), 8);
    let mut c = S2Config::new(4, 64, 1, 3);
    c.direction = Direction::Bidirectional { left: 2, right: 1 };
    check::<half::bf16>("bf16 d64 bs64 bidirectional seq700", &s2(c), Shape::new(1, 700, 64, DType::BF16), 9);
}
