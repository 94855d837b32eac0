//! `StepPlan`: a decode call's work lists carried from one step of a token loop to the next.
//!
//! A token loop decodes the same sequences every step, each a token longer. Their work lists (built from
//! the page tables, one entry per resident block some queried row attends) change only when a queried
//! token enters another query block or a sequence's pages change (a page allocated or freed, both at
//! block boundaries). Between those the lists differ only in each item's key count and query position,
//! so a step patches those instead of walking every resident page again (O(pages)): when every sequence
//! grew by the same tokens, as in a token loop, through the lists' key shift, which the kernels add (one
//! word of the call's parameters; the device copy of the items serves again), else item by item
//! (O(items)). The entries keep their upload tag, so the device copy of them is reused too. A step that must rebuild
//! (some sequence crossed a query block or changed pages) still takes the entries of every other
//! sequence's families from these lists: only the sequences that changed walk their page tables.

use super::kv_cache::SeqId;
use super::worklist::WorkList;

/// What a sequence's part of the lists was built from: its length and its page tables' epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SeqState {
    /// Tokens in the sequence.
    pub len: u32,
    /// The epoch of its page tables (`KvCache::step_state`).
    pub epoch: u64,
}

/// The work lists of the last call of one `q_len`, with what they were built from.
#[derive(Debug)]
pub(crate) struct StepPlan {
    seqs: Vec<SeqId>,
    states: Vec<SeqState>,
    /// `(segment, list)`, as `Decode::work_lists` returns them.
    pub lists: Vec<(usize, WorkList)>,
}

impl StepPlan {
    /// Lists built for `seqs` in `states`.
    pub(crate) fn new(seqs: &[SeqId], states: Vec<SeqState>, lists: Vec<(usize, WorkList)>) -> Self {
        Self { seqs: seqs.to_vec(), states, lists }
    }

    /// Brings the lists to a call over `seqs` now in `states`, querying the last `q_len` tokens of each, by
    /// patching the items' key counts and positions; `false` (nothing changed) where that would not give
    /// the lists a fresh build gives: other sequences or order, a sequence shorter than before or with
    /// other pages, or a queried token in another query block of `block_size` tokens than before.
    pub(crate) fn advance(&mut self, seqs: &[SeqId], states: &[SeqState], q_len: u32, block_size: u32) -> bool {
        if !self.unchanged(seqs, states, q_len, block_size).is_some_and(|same| same.iter().all(|&s| s)) {
            return false;
        }
        // Rows of sequence `si` are query tokens si * q_len .. (si + 1) * q_len.
        let shift: Vec<u32> = self.states.iter().zip(states).map(|(old, new)| new.len - old.len).collect();
        // Every sequence the same tokens longer (a token loop's step): the kernels add the shift, and the
        // items keep their upload tags, so their device copies serve. Unchanged lengths keep the lists.
        if let Some(&d) = shift.first().filter(|&&d| shift.iter().all(|&x| x == d)) {
            if d > 0 {
                for (_, list) in &mut self.lists {
                    list.shift_all_keys(d);
                }
            }
        } else {
            for (_, list) in &mut self.lists {
                list.shift_keys(|tok0| shift[(tok0 / q_len) as usize]);
            }
        }
        self.states.copy_from_slice(states);
        true
    }

    /// Per sequence of a call over the same `seqs` in the same order (else `None`): whether its families'
    /// entries in these lists are those a fresh build gives now in `states` (same pages, no shorter, every
    /// queried token in the same query block of `block_size` tokens as before).
    pub(crate) fn unchanged(
        &self,
        seqs: &[SeqId],
        states: &[SeqState],
        q_len: u32,
        block_size: u32,
    ) -> Option<Vec<bool>> {
        if self.seqs != seqs || self.states.len() != states.len() || q_len == 0 {
            return None;
        }
        let same_blocks =
            |old: u32, new: u32| (0..q_len).all(|t| (old + t - q_len) / block_size == (new + t - q_len) / block_size);
        Some(
            self.states
                .iter()
                .zip(states)
                .map(|(old, new)| {
                    old.epoch == new.epoch && new.len >= old.len && old.len >= q_len && same_blocks(old.len, new.len)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{SeqState, StepPlan};
    use crate::inference::kv_cache::SeqId;
    use crate::inference::worklist::{RowShape, SplitPolicy, WorkItem, WorkList, WorkListBuilder};
    use crate::{Layout, S2Config};

    /// Lists of two sequences of `lens` tokens (one token queried each; GQA group 2, block 16, D 8), their
    /// blocks on pages in order, split at 2 blocks per item.
    fn lists(layout: &Layout, lens: [u32; 2]) -> (usize, WorkList) {
        let shape = RowShape {
            num_heads: 4,
            group: 2,
            n_tok: 1,
            block_size: 16,
            causal: true,
            kv_tok_stride: 2,
            lse_head_stride: 1,
        };
        let mut builder = WorkListBuilder::new(layout, shape);
        for (si, len) in lens.into_iter().enumerate() {
            for kvh in 0..2u32 {
                let si = si as u32;
                let rows = WorkItem {
                    head0: kvh * 2,
                    tok0: si,
                    pos0: len - 1,
                    n_valid: 1,
                    kv_len: len,
                    lse0: si * 4 + kvh * 2,
                    ..WorkItem::default()
                };
                // Page of (sequence, KV head, block): 8 blocks each.
                let page = |kb: u32| ((si * 2 + kvh) * 8 + kb) * 16 * 2;
                builder.family(rows, (0..len.div_ceil(16)).map(|kb| (kb, page(kb))));
            }
        }
        (0, builder.finish(&SplitPolicy::split_to(2), 0))
    }

    fn plan(lens: &[u32]) -> StepPlan {
        let seqs: Vec<SeqId> = (0..lens.len() as u64).map(SeqId::for_tests).collect();
        StepPlan::new(&seqs, lens.iter().map(|&len| SeqState { len, epoch: 0 }).collect(), Vec::new())
    }

    fn states(lens: &[u32], epoch: u64) -> Vec<SeqState> {
        lens.iter().map(|&len| SeqState { len, epoch }).collect()
    }

    #[test]
    fn a_token_inside_the_query_block_patches() {
        let seqs: Vec<SeqId> = (0..2).map(SeqId::for_tests).collect();
        let mut p = plan(&[70, 100]);
        assert!(p.advance(&seqs, &states(&[71, 101], 0), 1, 64));
        assert!(p.advance(&seqs, &states(&[127, 101], 0), 1, 64));
    }

    #[test]
    fn another_query_block_pages_or_sequences_rebuild() {
        let seqs: Vec<SeqId> = (0..2).map(SeqId::for_tests).collect();
        // Token 128 (length 129) is in query block 2.
        assert!(!plan(&[128, 100]).advance(&seqs, &states(&[129, 101], 0), 1, 64));
        assert!(!plan(&[70, 100]).advance(&seqs, &states(&[71, 101], 1), 1, 64));
        assert!(!plan(&[70, 100]).advance(&seqs[..1], &states(&[71], 0), 1, 64));
        assert!(!plan(&[70, 100]).advance(&[seqs[1], seqs[0]], &states(&[71, 101], 0), 1, 64));
        assert!(!plan(&[70, 100]).advance(&seqs, &states(&[69, 100], 0), 1, 64));
        // A window of 4 whose middle token crosses a block boundary while its first and last do not.
        let mut p = plan(&[6]);
        assert!(!p.advance(&seqs[..1], &states(&[7], 0), 4, 4));
        assert!(plan(&[6]).advance(&seqs[..1], &states(&[6], 0), 4, 4));
    }

    #[test]
    fn a_rebuild_keeps_the_sequences_that_did_not_change() {
        let seqs: Vec<SeqId> = (0..3).map(SeqId::for_tests).collect();
        let p = plan(&[127, 100, 60]);
        // The first crosses into query block 2, the others stay: only the first walks its page tables.
        assert_eq!(p.unchanged(&seqs, &states(&[129, 101, 63], 0), 1, 64), Some(vec![false, true, true]));
        // Other pages (epoch), a shorter sequence: walked too.
        let moved = [SeqState { len: 128, epoch: 0 }, SeqState { len: 100, epoch: 1 }, SeqState { len: 59, epoch: 0 }];
        assert_eq!(p.unchanged(&seqs, &moved, 1, 64), Some(vec![true, false, false]));
        // Other sequences or another order: nothing to take from.
        assert_eq!(p.unchanged(&seqs[..2], &states(&[127, 100], 0), 1, 64), None);
        assert_eq!(p.unchanged(&[seqs[1], seqs[0], seqs[2]], &states(&[127, 100, 60], 0), 1, 64), None);
    }

    #[test]
    fn an_even_step_moves_the_key_shift_and_the_kernels_see_the_items_of_a_fresh_build() {
        let layout = Layout::s2(S2Config::new(4, 16, 2, 3).kv_heads(2)).expect("layout");
        let seqs: Vec<SeqId> = (0..2).map(SeqId::for_tests).collect();
        let lens = |a, b| [SeqState { len: a, epoch: 0 }, SeqState { len: b, epoch: 0 }];
        let mut p = StepPlan::new(&seqs, lens(50, 70).to_vec(), vec![lists(&layout, [50, 70])]);
        let tag = p.lists[0].1.items_tag();
        // Both 3 tokens longer: the key shift, same items (and tag); equal to a fresh build.
        assert!(p.advance(&seqs, &lens(53, 73), 1, 16));
        let even = p.lists[0].1.clone();
        assert_eq!((even.key_shift(), even.items_tag()), (3, tag));
        assert_eq!(even.items(), lists(&layout, [50, 70]).1.items(), "the items are as built");
        assert_eq!(even, lists(&layout, [53, 73]).1);
        // One 2 longer, the other 1: the items take the shift and this step's, the key shift is 0 again.
        assert!(p.advance(&seqs, &lens(55, 74), 1, 16));
        let uneven = &p.lists[0].1;
        assert_eq!(uneven.key_shift(), 0);
        assert_ne!(uneven.items_tag(), tag);
        assert_eq!(*uneven, lists(&layout, [55, 74]).1);
        assert_eq!(uneven.items(), lists(&layout, [55, 74]).1.items());
        // The CPU twin reads a shifted list as the kernels do: as the fresh build of the longer sequences.
        let (d, scale) = (8usize, 0.35f32);
        let wave = |n: usize, f: f32| (0..n).map(|i| (i as f32 * f).sin() * 0.9).collect::<Vec<f32>>();
        let (q, k, v) = (wave(2 * 4 * d, 0.7), wave(2 * 2 * 8 * 16 * d, 1.3), wave(2 * 2 * 8 * 16 * d, 0.4));
        let fresh = lists(&layout, [53, 73]).1;
        let twin = |l: &WorkList| crate::cpu::attend_worklist(l, d as u32, scale, &q, &k, &v, 8);
        assert_eq!(twin(&even), twin(&fresh));
        assert_ne!(twin(&lists(&layout, [50, 70]).1), twin(&fresh), "the shift matters to these keys");
    }
}
