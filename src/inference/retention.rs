//! The eviction rule of the KV cache: for each KV head and each KV block, the last query block that can
//! still attend it (through any query head of the KV head's group). A block stays resident while some
//! future query can reach it; its page is freed once every future query starts past that point.
//!
//! Causal S2 patterns are monotone: once a query block stops attending KV block `kb` (it left the local
//! window and `kb` is no stripe), no later query block attends it again, so the last attending query
//! block is found by bisection. Other layouts (custom masks, head ranges) are scanned from the end.

use crate::layout::Layout;

/// Per KV head, per KV block: the last query block attending it (`None`: no query ever does).
#[derive(Clone, Debug)]
pub(crate) struct Retention {
    last: Vec<Vec<Option<u32>>>,
}

impl Retention {
    /// The rule for sequences of at most `max_blocks` blocks.
    pub(crate) fn new(layout: &Layout, max_blocks: u32) -> Self {
        let group = layout.num_heads() / layout.num_kv_heads();
        let monotone = layout.s2_config().is_some() && layout.causal();
        let last = (0..layout.num_kv_heads())
            .map(|kvh| {
                let mut patterns: Vec<u32> =
                    (kvh * group..(kvh + 1) * group).map(|h| layout.pattern_of_head(h)).collect();
                patterns.dedup();
                let active = |qb: u32, kb: u32| patterns.iter().any(|&p| layout.block_active(p, qb, kb));
                (0..max_blocks)
                    .map(|kb| {
                        if monotone {
                            last_monotone(&active, kb, max_blocks)
                        } else {
                            last_scan(&active, kb, max_blocks)
                        }
                    })
                    .collect()
            })
            .collect();
        Self { last }
    }

    /// Whether KV block `kb` of KV head `kv_head` must stay resident while future queries lie in query
    /// blocks `qb_min` and later.
    pub(crate) fn keeps(&self, kv_head: u32, kb: u32, qb_min: u32) -> bool {
        matches!(self.last[kv_head as usize].get(kb as usize), Some(&Some(last)) if last >= qb_min)
    }

    /// The most blocks of `kv_head` one sequence holds resident at once as it grows to `max_blocks` blocks,
    /// when future queries start at query block `qb_min_at(b)` while its last token lies in block `b`
    /// (`qb_min_at` non-decreasing): the pages a pool needs per sequence and KV head.
    pub(crate) fn peak_resident(&self, kv_head: u32, qb_min_at: impl Fn(u32) -> u32) -> u32 {
        let last = &self.last[kv_head as usize];
        // Block kb is resident while the last block b satisfies kb <= b and qb_min_at(b) <= last[kb].
        let n = last.len();
        let mut delta = vec![0i64; n + 1];
        for (kb, l) in last.iter().enumerate() {
            let Some(l) = *l else { continue };
            // qb_min_at is non-decreasing: the last b with qb_min_at(b) <= l, by bisection.
            let (mut lo, mut hi) = (kb, n);
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if qb_min_at(mid as u32) <= l {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            if qb_min_at(kb as u32) <= l {
                delta[kb] += 1;
                delta[lo + 1] -= 1;
            }
        }
        let mut run = 0i64;
        delta[..n]
            .iter()
            .map(|d| {
                run += d;
                run
            })
            .max()
            .unwrap_or(0) as u32
    }
}

/// The last `qb` in `kb..max_blocks` with `active(qb, kb)`, for patterns where activity only ends.
fn last_monotone(active: &impl Fn(u32, u32) -> bool, kb: u32, max_blocks: u32) -> Option<u32> {
    if !active(kb, kb) {
        return last_scan(active, kb, max_blocks);
    }
    let (mut lo, mut hi) = (kb, max_blocks - 1);
    if active(hi, kb) {
        return Some(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if active(mid, kb) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The last `qb` in `kb..max_blocks` with `active(qb, kb)`, by scanning down.
fn last_scan(active: &impl Fn(u32, u32) -> bool, kb: u32, max_blocks: u32) -> Option<u32> {
    (kb..max_blocks).rev().find(|&qb| active(qb, kb))
}
