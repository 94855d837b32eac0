//! Layout tests: `Layout` against an independent brute-force mask written here from the rule
//! (every S2 parameter, GQA sharing, dense heads, offsets, bidirectional windows, custom masks), density
//! figures, union completeness, the CSR `BlockIndex` and its transpose. Pure CPU.

mod common;

use common::Rng;
use s2attn::{BlockMask, Direction, Error, Layout, S2Config};

/// The rule, written independently of the library: does query head `qh` attend from query block
/// `qb` to KV block `kb`?
///
/// Causal: `kb <= qb` and (dense head, or local: `0 <= qb - kb < local_blocks`, or stripe:
/// `(kb + h*step + head_sliding_offset) % vert_stride == 0` with `h` the KV head, 0 under `homo_head`,
/// `step = max(1, vert_stride / num_heads)`). Bidirectional `(left, right)`: the window is
/// `qb - left < kb <= qb + right`; beyond it a block at distance `d >= 1` past the window's edge is a
/// stripe when `(d + h*step + offset) % vert_stride == 0`.
fn rule(c: &S2Config, qh: u32, qb: u32, kb: u32) -> bool {
    let kv_head = qh / (c.num_heads / c.num_kv_heads);
    let dense = kv_head + c.num_dense_heads >= c.num_kv_heads;
    let h = if c.homo_head { 0 } else { kv_head } as u64;
    let step = std::cmp::max(1, c.vert_stride / c.num_heads) as u64;
    let stripe = |d: u64| (d + h * step + c.head_sliding_offset as u64) % c.vert_stride as u64 == 0;
    let (qb, kb) = (qb as i64, kb as i64);
    match c.direction {
        Direction::Causal => {
            if kb > qb {
                return false;
            }
            dense || qb - kb < c.local_blocks as i64 || stripe(kb as u64)
        }
        Direction::Bidirectional { left, right } => {
            let (left, right) = (left as i64, right as i64);
            let in_window = kb > qb - left && kb <= qb + right;
            let beyond = if kb <= qb - left { (qb - left + 1) - kb } else { kb - (qb + right) };
            dense || in_window || stripe(beyond as u64)
        }
    }
}

/// Element mask of query head `qh` from the rule: `[seq x seq]`.
fn element_mask(c: &S2Config, qh: u32, seq: u32) -> Vec<bool> {
    let bs = c.block_size;
    let causal = c.direction == Direction::Causal;
    let mut m = Vec::with_capacity((seq * seq) as usize);
    for i in 0..seq {
        for j in 0..seq {
            m.push((!causal || j <= i) && rule(c, qh, i / bs, j / bs));
        }
    }
    m
}

/// Every combination of the S2 parameters at block level, for one block size.
fn configs(block_size: u32) -> Vec<S2Config> {
    let mut out = Vec::new();
    let heads = [(1, 1), (2, 2), (4, 4), (4, 2), (8, 2), (6, 3), (8, 8)];
    let directions = [
        Direction::Causal,
        Direction::Bidirectional { left: 1, right: 0 },
        Direction::Bidirectional { left: 2, right: 1 },
    ];
    for (h, kv) in heads {
        for local in [1, 2, 3] {
            for stride in [1, 2, 3, 4, 7, 16, 40] {
                for homo in [false, true] {
                    for offset in [0, 1, 5] {
                        for dense in [0, 1, kv] {
                            for dir in directions {
                                let mut c = S2Config::new(h, block_size, local, stride)
                                    .kv_heads(kv)
                                    .homo_head(homo)
                                    .offset(offset)
                                    .dense_heads(dense);
                                c.direction = dir;
                                out.push(c);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn layout(c: &S2Config) -> Layout {
    Layout::s2(c.clone()).unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

#[test]
fn block_rule_matches_brute_force_for_every_parameter() {
    // 14 blocks: long enough for stripes of stride 7 to recur, and the last block partial.
    for bs in [16, 32, 64, 128] {
        let seq = 14 * bs - 5;
        for c in configs(bs) {
            let l = layout(&c);
            assert_eq!(l.blocks(seq), 14);
            assert_eq!(l.causal(), c.direction == Direction::Causal);
            for qh in 0..c.num_heads {
                let p = l.pattern_of_head(qh);
                assert!(p < l.num_patterns(), "{c:?}: head {qh} -> pattern {p}");
                for qb in 0..14 {
                    for kb in 0..14 {
                        assert_eq!(
                            l.block_active(p, qb, kb),
                            rule(&c, qh, qb, kb),
                            "{c:?}: head {qh} block ({qb}, {kb})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn element_mask_matches_brute_force() {
    // The full element mask for a spread of configurations at every block size, odd lengths included.
    let mut rng = Rng::new(1);
    for bs in [16, 32, 64, 128] {
        let all = configs(bs);
        let seq = 5 * bs + 3;
        for _ in 0..12 {
            let c = &all[rng.below(all.len() as u32) as usize];
            let l = layout(c);
            for qh in 0..c.num_heads {
                let want = element_mask(c, qh, seq);
                let p = l.pattern_of_head(qh);
                for i in 0..seq {
                    for j in 0..seq {
                        assert_eq!(
                            l.element_active(p, i, j),
                            want[(i * seq + j) as usize],
                            "{c:?}: head {qh} element ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rule_spot_checks() {
    // Hand-computed cases that pin the rule itself (so the brute force cannot drift with the library).
    // 4 heads, stride 4 -> step 1: KV head h attends stripes kb with (kb + h) % 4 == 0.
    let l = layout(&S2Config::new(4, 16, 1, 4));
    let row = |p: u32| (0..8).filter(|&kb| l.block_active(p, 7, kb)).collect::<Vec<_>>();
    assert_eq!(row(0), [0, 4, 7]);
    assert_eq!(row(1), [3, 7]);
    assert_eq!(row(2), [2, 6, 7]);
    assert_eq!(row(3), [1, 5, 7]);
    // Phi-3-small: offset 1, 2 heads, stride 8 -> step 4: head 0 stripes kb % 8 == 7, head 1 kb % 8 == 3.
    let l = layout(&S2Config::new(2, 64, 2, 8).offset(1));
    let row = |p: u32| (0..16).filter(|&kb| l.block_active(p, 15, kb)).collect::<Vec<_>>();
    assert_eq!(row(0), [7, 14, 15]);
    assert_eq!(row(1), [3, 11, 14, 15]);
    // Bidirectional (1, 1) window, stride 2, 1 head: blocks 2 past the window's edge are stripes.
    let l = layout(&S2Config::new(1, 16, 1, 2).bidirectional(1, 1));
    assert_eq!((0..9).filter(|&kb| l.block_active(0, 4, kb)).collect::<Vec<_>>(), [0, 2, 4, 5, 7]);
    // Local window counts the query's own block.
    let l = layout(&S2Config::new(1, 16, 3, 1000));
    assert_eq!((0..10).filter(|&kb| l.block_active(0, 9, kb)).collect::<Vec<_>>(), [0, 7, 8, 9]);
}

#[test]
fn gqa_groups_share_their_kv_heads_pattern() {
    let c = S2Config::new(8, 16, 1, 4).kv_heads(2);
    let l = layout(&c);
    assert_eq!(l.num_patterns(), 2);
    for h in 0..8 {
        assert_eq!(l.pattern_of_head(h), h / 4, "query head {h}");
    }
    // Different KV heads read different stripes (the shards differ), query heads of a group the same.
    let seq = 16 * 12;
    let masks: Vec<Vec<bool>> = (0..8).map(|h| element_mask(&c, h, seq)).collect();
    assert!(masks[0..4].iter().all(|m| *m == masks[0]));
    assert!(masks[4..8].iter().all(|m| *m == masks[4]));
    assert_ne!(masks[0], masks[4]);
    // homo_head: one pattern; with a dense head every KV head keeps its own.
    assert_eq!(layout(&c.clone().homo_head(true)).num_patterns(), 1);
    let with_dense = layout(&c.clone().homo_head(true).dense_heads(1));
    assert_eq!(with_dense.num_patterns(), 2);
    let idx = with_dense.index(seq);
    assert_eq!(idx.pattern_nnz(1), 12 * 13 / 2, "the dense KV head attends the whole causal triangle");
}

#[test]
fn dense_layouts() {
    for bs in [16, 32, 64, 128] {
        let seq = 3 * bs + 1;
        let causal = Layout::dense(4, 2, bs, true).expect("dense causal");
        let full = Layout::dense(4, 2, bs, false).expect("dense bidirectional");
        for p in 0..causal.num_patterns() {
            for i in 0..seq {
                for j in 0..seq {
                    assert_eq!(causal.element_active(p, i, j), j <= i);
                    assert!(full.element_active(p, i, j));
                }
            }
        }
        assert_eq!(causal.density(seq), 1.0);
        assert_eq!(full.density(seq), 1.0);
        assert!(causal.union_complete(seq) && full.union_complete(seq));
    }
}

/// Random custom masks (causal and not; one shared, per KV head, per query head), including empty rows.
fn custom_cases(rng: &mut Rng) -> Vec<(BlockMask, u32, u32)> {
    let mut out = Vec::new();
    for bs in [16, 32, 64, 128] {
        for causal in [true, false] {
            for (mask_heads, h, kv) in [(1, 4, 2), (2, 4, 2), (4, 4, 2), (3, 6, 3)] {
                let (qn, kn) = (6 + rng.below(3), 6 + rng.below(3));
                let bits = (0..mask_heads * qn * kn).map(|_| rng.chance(0.4)).collect();
                let mask = BlockMask::new(mask_heads, qn, kn, bs, causal, bits).expect("valid mask");
                out.push((mask, h, kv));
            }
        }
    }
    out
}

#[test]
fn custom_masks_match_brute_force() {
    let mut rng = Rng::new(2);
    for (mask, h, kv) in custom_cases(&mut rng) {
        let l = Layout::custom(mask.clone(), h, kv).expect("valid custom layout");
        assert_eq!(l.num_patterns(), mask.heads());
        assert_eq!(l.causal(), mask.causal());
        let bs = mask.block_size();
        let nb = mask.q_blocks().min(mask.kv_blocks());
        let seq = nb * bs - 3;
        l.check_seq_len(seq).expect("seq fits the mask");
        for qh in 0..h {
            let mh = qh / (h / mask.heads()); // the mask head this query head uses
            let p = l.pattern_of_head(qh);
            assert_eq!(p, mh);
            for i in 0..seq {
                for j in 0..seq {
                    let want = (!mask.causal() || j <= i) && mask.get(mh, i / bs, j / bs);
                    assert_eq!(l.element_active(p, i, j), want, "{mask:?} head {qh} element ({i}, {j})");
                }
            }
        }
        // Longer sequences than the mask describes are refused.
        let too_long = (mask.q_blocks().min(mask.kv_blocks()) + 1) * bs;
        assert!(matches!(l.check_seq_len(too_long), Err(Error::Mask(_))));
    }
}

#[test]
fn block_mask_from_fn_matches_new() {
    let f = |h: u32, q: u32, k: u32| (h + q * 3 + k * 5) % 4 == 0;
    let a = BlockMask::from_fn(2, 5, 7, 32, false, f).expect("from_fn");
    let bits = (0..2).flat_map(|h| (0..5).flat_map(move |q| (0..7).map(move |k| f(h, q, k)))).collect();
    let b = BlockMask::new(2, 5, 7, 32, false, bits).expect("new");
    assert_eq!(a, b);
    assert!(!a.get(2, 0, 0) && !a.get(0, 5, 0) && !a.get(0, 0, 7), "outside the matrix reads false");
}

/// Brute-force block counts of every pattern: (active, possible).
fn brute_counts(l: &Layout, c: Option<&S2Config>, seq: u32) -> Vec<(u64, u64)> {
    let nb = l.blocks(seq);
    let possible = if l.causal() { nb as u64 * (nb as u64 + 1) / 2 } else { nb as u64 * nb as u64 };
    (0..l.num_heads())
        .map(|qh| {
            let mut n = 0;
            for qb in 0..nb {
                for kb in 0..nb {
                    let on = match c {
                        Some(c) => rule(c, qh, qb, kb),
                        None => l.block_active(l.pattern_of_head(qh), qb, kb) && (!l.causal() || kb <= qb),
                    };
                    n += on as u64;
                }
            }
            (n, possible)
        })
        .collect()
}

#[test]
fn density_figures_match_brute_force() {
    for bs in [16, 64] {
        let seq = 11 * bs - 1;
        for c in configs(bs).iter().step_by(7) {
            let l = layout(c);
            let counts = brute_counts(&l, Some(c), seq);
            let heads = l.head_densities(seq);
            assert_eq!(heads.len(), c.num_heads as usize);
            for (qh, (&d, &(n, possible))) in heads.iter().zip(&counts).enumerate() {
                let want = n as f64 / possible as f64;
                assert!((d - want).abs() < 1e-12, "{c:?}: head {qh} density {d} vs {want}");
                assert!((l.pattern_density(l.pattern_of_head(qh as u32), seq) - want).abs() < 1e-12);
            }
            let mean = counts.iter().map(|&(n, p)| n as f64 / p as f64).sum::<f64>() / counts.len() as f64;
            assert!((l.density(seq) - mean).abs() < 1e-12, "{c:?}: density {} vs {mean}", l.density(seq));
            if c.vert_stride == 1 || c.num_dense_heads == c.num_kv_heads {
                assert_eq!(l.density(seq), 1.0, "{c:?}");
            }
        }
    }
    // A worked figure: 1 head, local 1, stride 2, 4 blocks: rows {0}, {0,1}, {0,2}, {0,2,3} = 8 of 10.
    let l = layout(&S2Config::new(1, 16, 1, 2));
    assert!((l.density(64) - 0.8).abs() < 1e-12);
}

#[test]
fn active_pairs_match_the_element_mask() {
    let mut rng = Rng::new(3);
    for bs in [16, 32] {
        let all = configs(bs);
        let seq = 6 * bs - 7;
        for _ in 0..10 {
            let c = &all[rng.below(all.len() as u32) as usize];
            let l = layout(c);
            let want: u64 =
                (0..c.num_heads).map(|qh| element_mask(c, qh, seq).iter().filter(|&&b| b).count() as u64).sum();
            assert_eq!(l.active_pairs(seq), want, "{c:?}");
        }
    }
}

#[test]
fn union_complete_matches_brute_force() {
    for bs in [16, 128] {
        let seq = 13 * bs;
        for c in configs(bs) {
            let l = layout(&c);
            let nb = 13;
            let want = (0..nb).all(|qb| {
                let last = if l.causal() { qb } else { nb - 1 };
                (0..=last).all(|kb| (0..c.num_heads).any(|qh| rule(&c, qh, qb, kb)))
            });
            assert_eq!(l.union_complete(seq), want, "{c:?}");
        }
    }
}

#[test]
fn union_complete_true_and_false_cases() {
    let seq = 16 * 20;
    let complete = |c: S2Config| layout(&c).union_complete(seq);
    // heads >= stride with step 1: the stripes of the heads tile every residue.
    assert!(complete(S2Config::new(4, 16, 1, 4)));
    assert!(complete(S2Config::new(8, 16, 1, 8).offset(3)));
    // Dense (stride 1), a dense head, or a window as long as the sequence.
    assert!(complete(S2Config::new(2, 16, 1, 1)));
    assert!(complete(S2Config::new(2, 16, 1, 8).dense_heads(1)));
    assert!(complete(S2Config::new(2, 16, 20, 64)));
    // 2 heads, stride 8 -> step 4: stripes only at residues 0 and 4.
    assert!(!complete(S2Config::new(2, 16, 1, 8)));
    // homo_head: every head on the same stripes.
    assert!(!complete(S2Config::new(4, 16, 1, 4).homo_head(true)));
    // GQA: 2 KV heads cannot cover stride 4 with local 1 (step 1: residues 0 and 3).
    assert!(!complete(S2Config::new(4, 16, 1, 4).kv_heads(2)));
    // ... but they cover stride 2 (residues 0 and 1), and a window as wide as a stripe gap does not help
    // once the sequence outgrows it.
    assert!(complete(S2Config::new(4, 16, 1, 2).kv_heads(2)));
    assert!(!complete(S2Config::new(4, 16, 3, 4).kv_heads(2)));
    // Custom masks: the diagonal alone is incomplete, the lower triangle split over two heads complete.
    let diag = BlockMask::from_fn(1, 20, 20, 16, true, |_, q, k| q == k).expect("mask");
    assert!(!Layout::custom(diag, 2, 2).expect("layout").union_complete(seq));
    let split = BlockMask::from_fn(2, 20, 20, 16, true, |h, q, k| (q + k) % 2 == h).expect("mask");
    assert!(Layout::custom(split, 2, 2).expect("layout").union_complete(seq));
}

/// The rows every `BlockIndex` must hold: for each pattern and query block, the active KV blocks.
fn brute_rows(l: &Layout, seq: u32) -> Vec<Vec<u32>> {
    let nb = l.blocks(seq);
    let mut rows = Vec::new();
    for p in 0..l.num_patterns() {
        for qb in 0..nb {
            let last = if l.causal() { qb } else { nb - 1 };
            rows.push((0..=last).filter(|&kb| l.block_active(p, qb, kb)).collect());
        }
    }
    rows
}

#[test]
fn block_index_rows_match_brute_force_and_transpose_round_trips() {
    let mut layouts: Vec<Layout> = configs(16).iter().step_by(11).map(layout).collect();
    layouts.extend(configs(64).iter().step_by(37).map(layout));
    let mut rng = Rng::new(4);
    for (mask, h, kv) in custom_cases(&mut rng) {
        layouts.push(Layout::custom(mask, h, kv).expect("custom layout"));
    }
    for l in &layouts {
        let bs = l.block_size();
        for seq in [1, bs - 1, bs, 5 * bs + 1] {
            let idx = l.index(seq);
            let nb = l.blocks(seq);
            assert_eq!((idx.seq_len(), idx.q_blocks(), idx.patterns()), (seq, nb, l.num_patterns()));
            assert_eq!(idx.row_ptr().len(), (l.num_patterns() * nb + 1) as usize);
            let want = brute_rows(l, seq);
            for p in 0..l.num_patterns() {
                let mut nnz = 0;
                for qb in 0..nb {
                    let row = idx.row(p, qb);
                    assert_eq!(row, want[(p * nb + qb) as usize].as_slice(), "{l:?} seq {seq} row ({p}, {qb})");
                    nnz += row.len() as u64;
                }
                assert_eq!(idx.pattern_nnz(p), nnz);
            }
            assert_eq!(idx.nnz(), want.iter().map(Vec::len).sum::<usize>());
            assert_eq!(idx.cols().len(), idx.nnz());

            // Transpose: column kb lists exactly the query blocks whose row holds kb, ascending, and the
            // rows rebuilt from the columns are the original rows.
            let t = idx.transpose();
            assert_eq!(t.col_ptr().len(), idx.row_ptr().len());
            assert_eq!(t.rows().len(), idx.nnz());
            let mut rebuilt = vec![Vec::new(); (l.num_patterns() * nb) as usize];
            for p in 0..l.num_patterns() {
                for kb in 0..nb {
                    let col = t.column(p, kb);
                    assert!(col.windows(2).all(|w| w[0] < w[1]), "column ({p}, {kb}) not ascending");
                    let want_col: Vec<u32> = (0..nb).filter(|&qb| idx.row(p, qb).contains(&kb)).collect();
                    assert_eq!(col, want_col.as_slice(), "{l:?} seq {seq} column ({p}, {kb})");
                    for &qb in col {
                        rebuilt[(p * nb + qb) as usize].push(kb);
                    }
                }
            }
            for r in &mut rebuilt {
                r.sort_unstable();
            }
            assert_eq!(rebuilt, want, "{l:?} seq {seq}: rows rebuilt from the transpose");
        }
    }
}

#[test]
fn indexes_are_cached_per_sequence_length() {
    let l = layout(&S2Config::new(4, 16, 2, 4));
    let a = l.index(100);
    assert!(std::sync::Arc::ptr_eq(&a, &l.index(100)));
    assert!(!std::sync::Arc::ptr_eq(&a, &l.index(101)));
    // Clones share the cache.
    assert!(std::sync::Arc::ptr_eq(&a, &l.clone().index(100)));
    let m = l.mergeq(100, 64);
    assert!(std::sync::Arc::ptr_eq(&m, &l.mergeq(100, 64)));
    assert!(!std::sync::Arc::ptr_eq(&m, &l.mergeq(100, 32)));
}

#[test]
fn extreme_parameters_follow_the_rule_without_overflow() {
    // Any u32 is a valid offset, stride or window: the rule is evaluated without wrapping or panicking.
    let m = u32::MAX;
    let cases = [
        S2Config::new(4, 16, 1, 4).offset(m),
        S2Config::new(4, 16, 1, 7).offset(m - 2),
        S2Config::new(2, 16, 1, m),
        S2Config::new(2, 16, 1, m).offset(m),
        S2Config::new(8, 16, m, 3),
        S2Config::new(2, 16, 1, 3).bidirectional(m, m),
        S2Config::new(2, 16, 1, 3).bidirectional(1, m).offset(m),
        S2Config::new(70_000, 16, 1, m - 1).kv_heads(70_000),
    ];
    for c in cases {
        let l = layout(&c);
        for qh in [0, 1, c.num_heads - 1] {
            let p = l.pattern_of_head(qh);
            for qb in 0..12 {
                for kb in 0..12 {
                    assert_eq!(l.block_active(p, qb, kb), rule(&c, qh, qb, kb), "{c:?}: head {qh} ({qb}, {kb})");
                }
            }
        }
        let want: usize = (0..l.num_patterns())
            .map(|p| (0..12).map(|qb| (0..12).filter(|&kb| l.block_active(p, qb, kb)).count()).sum::<usize>())
            .sum();
        assert_eq!(l.index(12 * 16).nnz(), want, "{c:?}");
    }
}

#[test]
fn kv_head_ranges_are_sub_layouts_of_their_parent() {
    let mut parents = vec![
        layout(&S2Config::new(8, 16, 1, 4).kv_heads(4)),
        layout(&S2Config::new(8, 16, 2, 3).kv_heads(2).homo_head(true)),
        layout(&S2Config::new(4, 32, 1, 4).dense_heads(1).offset(1)),
        layout(&S2Config::new(4, 16, 1, 2).bidirectional(1, 1)),
    ];
    let mut rng = Rng::new(5);
    for (mask, h, kv) in custom_cases(&mut rng).into_iter().filter(|(m, ..)| m.block_size() == 16) {
        parents.push(Layout::custom(mask, h, kv).expect("custom"));
    }
    for parent in &parents {
        let (h_n, hk_n) = (parent.num_heads(), parent.num_kv_heads());
        let group = h_n / hk_n;
        let seq = parent.block_size() * 5 + 3;
        for start in 0..hk_n {
            for end in start + 1..=hk_n {
                let Ok(sub) = parent.kv_head_range(start..end) else {
                    continue; // ranges that cut a shared pattern are refused (checked below)
                };
                assert_eq!((sub.num_heads(), sub.num_kv_heads()), ((end - start) * group, end - start));
                assert_eq!(sub.causal(), parent.causal());
                for h in 0..sub.num_heads() {
                    let (ps, pp) = (sub.pattern_of_head(h), parent.pattern_of_head(start * group + h));
                    for i in 0..seq {
                        for j in 0..seq {
                            assert_eq!(
                                sub.element_active(ps, i, j),
                                parent.element_active(pp, i, j),
                                "{parent:?} KV heads {start}..{end}: head {h} element ({i}, {j})"
                            );
                        }
                    }
                }
            }
        }
        assert!(parent.kv_head_range(0..0).is_err() && parent.kv_head_range(0..hk_n + 1).is_err());
    }
    // A mask shared by 2 query heads cannot be split between them (4 query heads on 4 KV heads).
    let mask = BlockMask::from_fn(2, 4, 4, 16, true, |h, q, k| (q + k + h) % 2 == 0).expect("mask");
    let l = Layout::custom(mask, 4, 4).expect("custom");
    assert!(matches!(l.kv_head_range(1..3), Err(Error::Shape(_))));
    assert!(l.kv_head_range(2..4).is_ok() && l.kv_head_range(1..2).is_ok());
}
