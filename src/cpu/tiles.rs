//! The work the forward twins walk: every (sequence, query head, query tile), with the head's KV head and
//! layout pattern, as the forward kernels' dispatch grid covers it.

use crate::layout::Layout;
use crate::plan::MergeQPlan;

/// One query tile of one head of one sequence.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileTask {
    /// Sequence in the batch.
    pub b: u32,
    /// Query head.
    pub h: u32,
    /// The KV head `h` reads (its GQA group's).
    pub kv_head: u32,
    /// The layout pattern of `h` (which tile lists it walks).
    pub pattern: u32,
    /// Query tile.
    pub tile: u32,
    /// The tile's first query row.
    pub row0: u32,
}

/// Every tile of every head of every sequence, in dispatch order.
pub(crate) fn tile_tasks<'a>(
    layout: &'a Layout,
    mergeq: &'a MergeQPlan,
    batch: u32,
) -> impl Iterator<Item = TileTask> + 'a {
    let (h_n, hk_n) = (layout.num_heads(), layout.num_kv_heads());
    (0..batch).flat_map(move |b| {
        (0..h_n).flat_map(move |h| {
            let (kv_head, pattern) = (h / (h_n / hk_n), layout.pattern_of_head(h));
            (0..mergeq.tiles()).map(move |tile| TileTask { b, h, kv_head, pattern, tile, row0: tile * mergeq.tile_q() })
        })
    })
}
