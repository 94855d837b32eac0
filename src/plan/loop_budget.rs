//! Loop budgets: how the portable kernels stay inside a driver's cap on loop iterations.
//!
//! Mesa's software Vulkan driver (lavapipe, on llvmpipe) ends every loop of a shader invocation once that
//! invocation has run 65535 loop iterations in total, over all its loops, without any error: whatever the
//! kernel had not reached yet is simply not computed. The portable kernels walk lists whose length grows
//! with the sequence (a query tile's KV blocks, a KV block's query tiles times the GQA group), so on such
//! a device a long list is cut into [`ListSplit::splits`] pieces, each walked by its own workgroup, whose
//! partial results one small kernel combines afterwards (`split_merge.wgsl` for the forward's softmax
//! partials, `split_sum.wgsl` for gradients).
//!
//! The counts below are upper bounds: every loop iteration a kernel can run, as if no loop were unrolled,
//! for the SIMD group that runs the most, so a split is planned against nearly the whole cap ([`budget`]);
//! the differential test runs long lists on lavapipe in CI, where a count that is too low would show up as a
//! wrong answer.

use super::{DispatchPlan, PORTABLE_MAX_ACC};
use crate::error::{Error, Result};

/// The loop-iteration cap of llvmpipe (`LP_MAX_TGSI_LOOP_ITERATIONS`), shared by every loop of an invocation.
pub const LLVMPIPE_LOOP_CAP: u32 = 65535;

/// How a list-walking kernel divides the lists its workgroups walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListSplit {
    /// Workgroups per list (1: each list is walked whole and the kernel writes its outputs directly).
    pub splits: u32,
    /// List items each workgroup walks at most (`u32::MAX` when the list is walked whole).
    pub items_per_split: u32,
}

impl ListSplit {
    /// Every list walked whole by one workgroup.
    pub const WHOLE: Self = Self { splits: 1, items_per_split: u32::MAX };

    /// Whether the lists are cut (then the kernel writes partials and a combine pass follows).
    pub fn is_split(&self) -> bool {
        self.splits > 1
    }

    /// The `(splits, items_per_split)` words the kernels read from their params (`0, 0` when whole).
    pub fn params(&self) -> [u32; 2] {
        if self.is_split() {
            [self.splits, self.items_per_split]
        } else {
            [0, 0]
        }
    }
}

/// Loop iterations one invocation of a list-walking kernel runs: `fixed` outside the list walk plus
/// `per_item` for each list item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopCost {
    /// Iterations outside the walk (staging, initialisation, the final writes).
    pub fixed: u64,
    /// Iterations per list item (the item's own loop trip included).
    pub per_item: u64,
}

impl LoopCost {
    /// Splits keeping every invocation's iterations within [`budget`]`(cap)` for lists of up to `longest`
    /// items (`None`: the device has no cap, lists are walked whole). `what` names the kernel in the error
    /// when even one item per workgroup is over the budget.
    pub fn split(&self, longest: u32, cap: Option<u32>, what: &str) -> Result<ListSplit> {
        let Some(cap) = cap else { return Ok(ListSplit::WHOLE) };
        let budget = budget(cap);
        if self.fixed + self.per_item * longest as u64 <= budget {
            return Ok(ListSplit::WHOLE);
        }
        let items = budget.saturating_sub(self.fixed) / self.per_item.max(1);
        if items == 0 {
            return Err(Error::DeviceLimit {
                what: format!("{what}: {} loop iterations for a single list item", self.fixed + self.per_item),
                limit: "the driver's loop-iteration cap per invocation",
                needed: self.fixed + self.per_item,
                max: budget,
            });
        }
        let items = items.min(u32::MAX as u64) as u32;
        Ok(ListSplit { splits: longest.div_ceil(items), items_per_split: items })
    }
}

/// The iterations a kernel may plan for under `cap`: all but a sixteenth, kept for the few iterations
/// outside the counted loops.
pub fn budget(cap: u32) -> u64 {
    cap as u64 - cap as u64 / 16
}

fn ceil_div(a: u32, b: u32) -> u64 {
    a.div_ceil(b.max(1)) as u64
}

/// Tile sizes of a portable kernel as its loops see them: (BQ, BK, WG, D / 4).
fn tiles(plan: &DispatchPlan, head_dim: u32) -> (u32, u32, u32, u32) {
    (plan.tile_q, plan.tile_kv, plan.workgroup_size, head_dim / 4)
}

/// `forward_portable.wgsl`: per KV block of the row list, `block_size / BK` chunks, each staging K and V,
/// scoring (a `D / 4` dot product per score), the row softmax (two passes over BK) and P V.
pub fn forward_portable_cost(plan: &DispatchPlan, head_dim: u32, block_size: u32) -> LoopCost {
    let (bq, bk, wg, d4) = tiles(plan, head_dim);
    let n_acc = ceil_div(bq * d4, wg);
    let chunk =
        2 * ceil_div(bk * d4, wg) + ceil_div(bq * bk, wg) * (1 + d4 as u64) + 2 * bk as u64 + n_acc * (1 + bk as u64);
    let chunks = ceil_div(block_size, bk);
    LoopCost {
        fixed: ceil_div(bq * d4, wg) + PORTABLE_MAX_ACC as u64 + 2 * n_acc + 16,
        per_item: chunks * (chunk + 1) + 1,
    }
}

/// `backward_dq.wgsl`: per KV block of the row list, `block_size / BK` chunks, each staging K and V, the
/// (P, dS) pairs (two `D / 4` dot products each) and dS K; plus D for the tile's rows.
pub fn backward_dq_cost(plan: &DispatchPlan, head_dim: u32, block_size: u32) -> LoopCost {
    let (bq, bk, wg, d4) = tiles(plan, head_dim);
    let n_acc = ceil_div(bq * d4, wg);
    let chunk = ceil_div(bk * d4, wg) + ceil_div(bq * bk, wg) * (1 + d4 as u64) + n_acc * (1 + bk as u64);
    let chunks = ceil_div(block_size, bk);
    LoopCost {
        fixed: ceil_div(bq * d4, wg) + ceil_div(bq, wg) * (1 + d4 as u64) + PORTABLE_MAX_ACC as u64 + n_acc + 16,
        per_item: chunks * (chunk + 1) + 1,
    }
}

/// `backward_dkdv.wgsl`: per query tile of the column lists (of every query head of the GQA group), the
/// staged Q and dO rows, the (P, dS) pairs and the dK, dV accumulation over BQ rows; plus the head loop.
pub fn backward_dkdv_cost(plan: &DispatchPlan, head_dim: u32, group: u32) -> LoopCost {
    let (bq, bk, wg, d4) = tiles(plan, head_dim);
    let n_acc = ceil_div(bk * d4, wg);
    let item =
        ceil_div(bq * d4, wg) + ceil_div(bq, wg) + ceil_div(bq * bk, wg) * (1 + d4 as u64) + n_acc * (1 + bq as u64);
    LoopCost {
        fixed: 2 * group as u64 + ceil_div(bk * d4, wg) + PORTABLE_MAX_ACC as u64 / 2 + n_acc + 16,
        per_item: item + 1,
    }
}

/// The combine kernels' iterations for `splits` partials of rows of `head_dim`: the softmax merge reads
/// each split's LSE twice and its `D / 4` vec4s once per row; the gradient sum reads `splits` values per
/// element. Both must fit the cap too.
pub fn check_combine(splits: u32, head_dim: u32, cap: Option<u32>, what: &str) -> Result<()> {
    let Some(cap) = cap else { return Ok(()) };
    let needed = 3 * splits as u64 * (1 + head_dim as u64 / 4) + 16;
    if needed > budget(cap) {
        return Err(Error::DeviceLimit {
            what: format!("{what}: combining {splits} partial results"),
            limit: "the driver's loop-iteration cap per invocation",
            needed,
            max: budget(cap),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::KernelVariant;

    fn plan(tile_q: u32, tile_kv: u32) -> DispatchPlan {
        DispatchPlan {
            variant: KernelVariant::Portable,
            tile_q,
            tile_kv,
            workgroup_size: 64,
            workgroup_bytes: 0,
            reason: String::new(),
        }
    }

    #[test]
    fn no_cap_never_splits() {
        let cost = backward_dkdv_cost(&plan(8, 16), 128, 32);
        assert_eq!(cost.split(1 << 20, None, "dkdv").unwrap(), ListSplit::WHOLE);
    }

    #[test]
    fn splits_keep_each_workgroup_within_the_budget() {
        for (cost, longest) in [
            (forward_portable_cost(&plan(16, 8), 256, 64), 512),
            (backward_dq_cost(&plan(16, 8), 128, 128), 4096),
            (backward_dkdv_cost(&plan(8, 16), 128, 4), 1536),
            (backward_dkdv_cost(&plan(32, 32), 32, 1), 7),
        ] {
            let s = cost.split(longest, Some(LLVMPIPE_LOOP_CAP), "k").unwrap();
            let walked = s.items_per_split.min(longest) as u64;
            assert!(cost.fixed + cost.per_item * walked <= budget(LLVMPIPE_LOOP_CAP), "{cost:?} {s:?}");
            assert!(
                s.splits as u64 * s.items_per_split.min(longest) as u64 >= longest as u64,
                "{s:?} covers {longest}"
            );
            assert_eq!(s.is_split(), cost.fixed + cost.per_item * longest as u64 > budget(LLVMPIPE_LOOP_CAP));
        }
    }

    #[test]
    fn an_item_over_the_budget_is_an_error() {
        let cost = LoopCost { fixed: 10, per_item: 64_000 };
        let err = cost.split(2, Some(LLVMPIPE_LOOP_CAP), "the portable forward").unwrap_err();
        assert!(err.to_string().contains("loop-iteration cap"), "{err}");
    }
}
