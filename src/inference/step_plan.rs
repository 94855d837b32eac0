//! `StepPlan`: a decode call's work lists carried from one step of a token loop to the next.
//!
//! A token loop decodes the same sequences every step, each a token longer. Their work lists (built from
//! the page tables, one entry per resident block some queried row attends) change only when a queried
//! token enters another query block or a sequence's pages change (a page allocated or freed, both at
//! block boundaries). Between those the lists differ only in each item's key count and query position,
//! so a step patches those (O(items)) instead of walking every resident page again (O(pages)); the
//! entries keep their upload tag, so the device copy of them is reused too. A step that must rebuild
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
        // Unchanged lengths keep the lists as they are (and their upload tags, so their device copies serve).
        if shift.iter().any(|&d| d > 0) {
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
}
