//! MergeQ round trips and the CPU twin: every tile list, expanded back to elements (entries, row masks,
//! causality), reproduces the layout's element mask exactly, for query tiles smaller than, equal to and
//! larger than the block size; S2 causal layouts use one-comparison prefix masks and other masks fall
//! back to per-block bits only where a prefix cannot express them. `cpu::forward_portable` (the kernel's
//! CPU twin) matches the f64 oracle. Pure CPU.

mod common;

use common::{assert_matches, Got, Problem, Rng, F32_TOL};
use s2attn::cpu::{forward_portable, rel_l2_error};
use s2attn::plan::{KvEntry, RowMask, ROWMASK_BITS_FLAG};
use s2attn::{BlockMask, DType, DispatchPlan, KernelVariant, Layout, MergeQPlan, S2Config};

/// S2 layouts (causal and bidirectional, with every kind of head) and custom masks, at `bs`.
fn layouts(bs: u32, rng: &mut Rng) -> Vec<Layout> {
    let s2 = |c: S2Config| Layout::s2(c).expect("valid S2 config");
    let mut out = vec![
        s2(S2Config::new(4, bs, 1, 4)),
        s2(S2Config::new(4, bs, 2, 3).kv_heads(2).offset(1)),
        s2(S2Config::new(8, bs, 1, 8).kv_heads(4).dense_heads(1)),
        s2(S2Config::new(2, bs, 3, 2).homo_head(true)),
        s2(S2Config::new(2, bs, 1, 1)),
        s2(S2Config::new(2, bs, 2, 1000)),
        s2(S2Config::new(4, bs, 2, 3).bidirectional(2, 1)),
        s2(S2Config::new(2, bs, 1, 2).bidirectional(1, 0).offset(1)),
    ];
    for causal in [true, false] {
        let (h, n) = (2, 12);
        let bits = (0..h * n * n).map(|_| rng.chance(0.35)).collect();
        out.push(Layout::custom(BlockMask::new(h, n, n, bs, causal, bits).expect("mask"), 4, 2).expect("custom"));
    }
    out
}

/// Query tile sizes around `bs`: smaller, equal, larger (up to 8 merged blocks).
fn tile_sizes(bs: u32) -> Vec<u32> {
    [bs / 4, bs / 2, bs, 2 * bs, 4 * bs, 8 * bs].into_iter().filter(|&t| t >= 4).collect()
}

/// Expands tile `t` of pattern `p` back to an element mask `[rows of the tile][seq]`, checking the list's
/// own invariants on the way.
fn expand(l: &Layout, plan: &MergeQPlan, p: u32, t: u32) -> Vec<Vec<bool>> {
    let (bs, tq, seq) = (l.block_size(), plan.tile_q(), plan.seq_len());
    let entries = plan.tile(p, t);
    assert!(
        entries.windows(2).all(|w| w[0].kv_block < w[1].kv_block),
        "tile ({p}, {t}) list not ascending: {entries:?}"
    );
    let row0 = t * tq;
    let rows = tq.min(seq - row0);
    let mut mask = vec![vec![false; seq as usize]; rows as usize];
    for &KvEntry { kv_block, rows: rm } in entries {
        assert!(kv_block < l.blocks(seq), "tile ({p}, {t}) names KV block {kv_block} past the sequence");
        if let RowMask::Prefix(n) = rm {
            assert!(n <= tq && n > 0, "prefix {n} outside 1..={tq}");
        }
        let mut any = false;
        for r in 0..rows {
            for kj in kv_block * bs..((kv_block + 1) * bs).min(seq) {
                if rm.attends(r, bs) && (!l.causal() || kj <= row0 + r) {
                    mask[r as usize][kj as usize] = true;
                    any = true;
                }
            }
        }
        assert!(any, "tile ({p}, {t}) lists KV block {kv_block} ({rm:?}) that no row attends");
    }
    mask
}

#[test]
fn tiles_reproduce_the_element_mask() {
    let mut rng = Rng::new(10);
    for bs in [16, 32, 64, 128] {
        for l in layouts(bs, &mut rng) {
            for seq in [1, bs / 2 + 1, 3 * bs, 9 * bs + 5] {
                for tq in tile_sizes(bs) {
                    let plan = l.mergeq(seq, tq);
                    assert_eq!((plan.tile_q(), plan.block_size(), plan.seq_len()), (tq, bs, seq));
                    assert_eq!(plan.tiles(), seq.div_ceil(tq));
                    assert_eq!(plan.patterns(), l.num_patterns());
                    assert_eq!(plan.row_ptr().len(), (plan.patterns() * plan.tiles() + 1) as usize);
                    assert_eq!(*plan.row_ptr().last().expect("row_ptr"), plan.entries().len() as u32);
                    let mut longest = 0;
                    for p in 0..l.num_patterns() {
                        for t in 0..plan.tiles() {
                            longest = longest.max(plan.tile(p, t).len() as u32);
                            let got = expand(&l, &plan, p, t);
                            for (r, row) in got.iter().enumerate() {
                                let qi = t * tq + r as u32;
                                for kj in 0..seq {
                                    assert_eq!(
                                        row[kj as usize],
                                        l.element_active(p, qi, kj),
                                        "{l:?} seq {seq} tile_q {tq}: pattern {p} element ({qi}, {kj})"
                                    );
                                }
                            }
                        }
                    }
                    assert_eq!(plan.max_tile_len(), longest);
                }
            }
        }
    }
}

#[test]
fn small_tiles_take_their_blocks_row() {
    let l = Layout::s2(S2Config::new(4, 64, 2, 3).kv_heads(2)).expect("layout");
    let seq = 64 * 7 + 9;
    let idx = l.index(seq);
    for tq in [16, 32, 64] {
        let plan = l.mergeq(seq, tq);
        for p in 0..l.num_patterns() {
            for t in 0..plan.tiles() {
                let want: Vec<KvEntry> = idx
                    .row(p, t * tq / 64)
                    .iter()
                    .map(|&kv_block| KvEntry { kv_block, rows: RowMask::Prefix(tq) })
                    .collect();
                assert_eq!(plan.tile(p, t), want.as_slice(), "tile_q {tq} tile ({p}, {t})");
            }
        }
    }
}

#[test]
fn s2_causal_layouts_use_prefix_masks() {
    let mut rng = Rng::new(11);
    for bs in [16, 32, 64, 128] {
        for l in layouts(bs, &mut rng).into_iter().filter(|l| l.causal() && l.s2_config().is_some()) {
            for tq in tile_sizes(bs) {
                let plan = l.mergeq(9 * bs + 5, tq);
                assert!(plan.all_prefix(), "{l:?} tile_q {tq}: {:?}", plan.entries());
            }
        }
    }
}

/// For a per-block mask entry, a prefix must be impossible: some block below the highest attending one
/// neither attends nor is hidden by causality (or lies past the sequence).
fn assert_bits_needed(l: &Layout, plan: &MergeQPlan, p: u32, t: u32, kv_block: u32, bits: u32) {
    let per = plan.tile_q() / l.block_size();
    let first = t * per;
    let top = 31 - bits.leading_zeros();
    let forbidden = (0..top).any(|b| {
        let qb = first + b;
        let attends = bits >> b & 1 == 1;
        let hidden = l.causal() && qb < kv_block;
        !attends && !hidden
    });
    assert!(forbidden, "tile ({p}, {t}) KV block {kv_block}: bits {bits:#b} could have been a prefix");
    for b in 0..per {
        let qb = first + b;
        if qb < l.blocks(plan.seq_len()) {
            assert_eq!(bits >> b & 1 == 1, l.block_active(p, qb, kv_block), "bit {b} of tile ({p}, {t}) KV {kv_block}");
        }
    }
}

#[test]
fn bit_masks_only_where_a_prefix_cannot_work() {
    let mut rng = Rng::new(12);
    let mut seen_bits = 0;
    for bs in [16, 32] {
        for l in layouts(bs, &mut rng) {
            let seq = 9 * bs + 5;
            for tq in tile_sizes(bs).into_iter().filter(|&t| t > bs) {
                let plan = l.mergeq(seq, tq);
                for p in 0..l.num_patterns() {
                    for t in 0..plan.tiles() {
                        for e in plan.tile(p, t) {
                            if let RowMask::Blocks(bits) = e.rows {
                                seen_bits += 1;
                                assert_bits_needed(&l, &plan, p, t, e.kv_block, bits);
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(seen_bits > 0, "the custom and bidirectional layouts must need some bit masks");

    // A hand-made hole: blocks 0 and 2 of a 4-block tile attend KV block 0, block 1 does not.
    let mask = BlockMask::from_fn(1, 4, 4, 16, true, |_, q, k| k == q || (k == 0 && q != 1)).expect("mask");
    let l = Layout::custom(mask, 1, 1).expect("layout");
    let plan = l.mergeq(64, 64);
    assert_eq!(plan.tiles(), 1);
    let entries = plan.tile(0, 0);
    assert_eq!(entries[0], KvEntry { kv_block: 0, rows: RowMask::Blocks(0b1101) });
    // KV block 1 is attended by query block 1 only and query block 0 is hidden by causality: a prefix of
    // two blocks (query block 0's rows see nothing of it anyway). Likewise KV blocks 2 and 3.
    assert_eq!(entries[1], KvEntry { kv_block: 1, rows: RowMask::Prefix(32) });
    assert_eq!(entries[2], KvEntry { kv_block: 2, rows: RowMask::Prefix(48) });
    assert_eq!(entries[3], KvEntry { kv_block: 3, rows: RowMask::Prefix(64) });
}

#[test]
fn gpu_words_encode_the_row_masks() {
    assert_eq!(RowMask::Prefix(48).encode(), 48);
    assert_eq!(RowMask::Blocks(0b101).encode(), ROWMASK_BITS_FLAG | 0b101);
    assert!(RowMask::Blocks(0b101).attends(40, 16) && !RowMask::Blocks(0b101).attends(20, 16));
    assert!(RowMask::Prefix(48).attends(47, 16) && !RowMask::Prefix(48).attends(48, 16));
    let mut rng = Rng::new(13);
    for l in layouts(16, &mut rng) {
        let plan = l.mergeq(16 * 9 + 5, 64);
        let words = plan.gpu_entries();
        assert_eq!(words.len(), plan.entries().len());
        for (w, e) in words.iter().zip(plan.entries()) {
            assert_eq!(w[0], e.kv_block);
            match e.rows {
                RowMask::Prefix(n) => assert!(w[1] == n && n < ROWMASK_BITS_FLAG),
                RowMask::Blocks(b) => assert_eq!(w[1], ROWMASK_BITS_FLAG | b),
            }
        }
    }
}

fn plan(tile_q: u32, tile_kv: u32) -> DispatchPlan {
    DispatchPlan {
        variant: KernelVariant::Portable,
        tile_q,
        tile_kv,
        workgroup_size: 64,
        workgroup_bytes: 0,
        reason: "test".into(),
    }
}

#[test]
fn cpu_twin_matches_the_oracle() {
    let mut rng = Rng::new(14);
    let mut seed = 100;
    for bs in [16, 32, 64] {
        let seq = 4 * bs + 3;
        for l in layouts(bs, &mut rng) {
            for (tq, tk) in [(bs / 2, bs / 2), (bs, 16), (2 * bs, bs), (4 * bs, 16)] {
                let p = Problem::new(&l, 2, seq, 32, DType::F32);
                let x = p.inputs(seed);
                seed += 1;
                let mq = l.mergeq(seq, tq);
                let scale = p.shape().softmax_scale();
                let (out, lse) = forward_portable(&l, &plan(tq, tk), &mq, p.batch, p.head_dim, scale, &x.q, &x.k, &x.v);
                let what = format!("cpu twin tile {tq}q x {tk}kv");
                assert_matches(&what, &p, &Got { out, lse }, &p.reference(&x));
            }
        }
    }
}

#[test]
fn cpu_twin_with_a_custom_scale_and_empty_rows() {
    // Query block 1 attends nothing: its rows must come out as zeros with LSE -inf.
    let mask = BlockMask::from_fn(1, 4, 4, 16, false, |_, q, k| q != 1 && (k + q) % 3 != 1).expect("mask");
    let l = Layout::custom(mask, 2, 1).expect("layout");
    let p = Problem::new(&l, 1, 60, 64, DType::F32).with_scale(0.3);
    let x = p.inputs(15);
    let want = p.reference(&x);
    for tq in [16, 64] {
        let (out, lse) = forward_portable(&l, &plan(tq, 16), &l.mergeq(60, tq), 1, 64, 0.3, &x.q, &x.k, &x.v);
        for h in 0..2 {
            for i in 16..32 {
                assert_eq!(lse[h * 60 + i], f32::NEG_INFINITY);
                assert!(out[(i * 2 + h) * 64..][..64].iter().all(|&o| o == 0.0));
            }
        }
        assert_matches("cpu twin, empty rows", &p, &Got { out, lse }, &want);
    }
}

#[test]
fn rel_l2_error_judges_what_it_should() {
    let want = [1.0, -2.0, f64::NEG_INFINITY, 3.0];
    assert_eq!(rel_l2_error(want, &want), 0.0);
    let e = rel_l2_error([1.0, -2.0, f64::NEG_INFINITY, 3.0 + 1e-3], &want);
    assert!(e > 0.0 && e < F32_TOL * 100.0);
    assert_eq!(rel_l2_error([f64::NAN, -2.0, f64::NEG_INFINITY, 3.0], &want), f64::INFINITY);
    // A finite value where the oracle has -inf (a row that should have no key) is an error, not ignored.
    assert_eq!(rel_l2_error([1.0, -2.0, 0.0, 3.0], &want), f64::INFINITY);
    // Too few or too many values.
    assert_eq!(rel_l2_error([1.0, -2.0], &want), f64::INFINITY);
    assert_eq!(rel_l2_error([1.0, -2.0, f64::NEG_INFINITY, 3.0, 4.0], &want), f64::INFINITY);
}
