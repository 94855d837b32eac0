//! Planning the cooperative-matrix backward (`shaders/backward_coop_dq.wgsl`, `backward_coop_dkdv.wgsl`):
//! which shapes and devices it takes, the tile of each pass, and [`plan_backward_wgpu`], which picks it
//! over the portable backward where it can run and says why not where it cannot.
//!
//! Tiles: the dQ pass takes `tile_q` query rows (16 per subgroup) and walks keys in chunks of `tile_kv`
//! (as the coop forward); the dK/dV pass takes `tile_kv` keys and walks query tiles of `tile_q` rows from
//! the column plan, two subgroups per block of 16 keys x 16 rows (one accumulates dV, the other dK).
//! Without an override each pass takes the first candidate that fits the device (largest first);
//! `S2ATTN_BWD_DQ_TILE` and `S2ATTN_BWD_DKDV_TILE` (`<tile_q>x<tile_kv>`) force one of the candidates (a
//! tuning knob, not a form switch).
//!
//! The dK/dV kernel fetches the next query tile into registers during the current one's math, walks each
//! column list descending (a head's stripe columns read the same query tiles together) and launches the
//! longest columns first ([`longest_first_order`]); see `shaders/backward_coop_dkdv.wgsl`.

use super::coop::COOP_SUBGROUP_SIZE;
use super::COOP_HEAD_DIMS;
use super::{
    plan_backward_portable, BackwardPlan, ColumnPlan, CoopTile, DType, DeviceCaps, DispatchPlan, KernelVariant, Shape,
};
use crate::error::{Error, Result};
use crate::layout::Layout;

/// What the coop backward needs to know about the adapter's subgroups beyond [`DeviceCaps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubgroupInfo {
    /// Smallest subgroup size the adapter may use.
    pub min_size: u32,
    /// Largest subgroup size the adapter may use.
    pub max_size: u32,
    /// Whether subgroup barriers are enabled on the device.
    pub barriers: bool,
}

/// The launch order of the coop dK/dV kernel, which it reads after the column pointers: for each launch
/// slot `kv_head * tiles + tile` (`tiles` = KV tiles of `tile_kv` keys, the dispatch's x), the `kv_head * tiles + tile` it runs. Slots go to the (KV tile, KV head) pairs in
/// descending order of their column lists' length summed over the KV head's query heads (ties in slot
/// order), so that the long stripe columns start first instead of leaving a tail.
pub fn longest_first_order(columns: &ColumnPlan, layout: &Layout, seq_len: u32, tile_kv: u32) -> Vec<u32> {
    let (heads, kv_heads) = (layout.num_heads(), layout.num_kv_heads());
    let (group, per_pattern) = (heads / kv_heads, heads / layout.num_patterns());
    let tiles = seq_len.div_ceil(tile_kv);
    let ptr = columns.col_ptr();
    let len = |head: u32, kb: u32| {
        let slot = ((head / per_pattern) * columns.kv_blocks() + kb) as usize;
        ptr.get(slot + 1).zip(ptr.get(slot)).map_or(0, |(b, a)| b - a)
    };
    let cost = |id: u32| {
        let (kv_head, tile) = (id / tiles, id % tiles);
        let kb = tile * tile_kv / layout.block_size();
        (kv_head * group..(kv_head + 1) * group).map(|h| len(h, kb)).sum::<u32>()
    };
    let mut order: Vec<u32> = (0..tiles * kv_heads).collect();
    order.sort_by_key(|&id| std::cmp::Reverse(cost(id)));
    order
}

/// dQ-pass candidates (query rows, keys per chunk), preferred first.
const DQ_TILES: [(u32, u32); 4] = [(128, 32), (64, 32), (128, 16), (64, 16)];
/// dK/dV-pass candidates (query rows per staged tile, keys per workgroup), preferred first: at least two
/// row groups (the epilogue's reduction slots); 64 rows do not fit 48 KiB at head_dim 128.
const DKDV_TILES: [(u32, u32); 3] = [(32, 32), (64, 16), (32, 16)];
/// vec4s per scratch row of the coop dK/dV kernel (its `SS4` and `PS4`): 16 queries padded by 8.
const DKDV_ROW_VEC4S: u32 = 6;
/// Most Q (and dO) vec4s one invocation of the coop dK/dV kernel fetches per query tile (its `MAX_QF`).
const DKDV_MAX_FETCH: u32 = 16;

/// Workgroup bytes of the coop dQ kernel: K and V chunks (rows padded to `head_dim + 8` halves), dS rows
/// (`tile_kv + 8` halves) and S/dP rows (`tile_kv + 8` floats) per query row, one flag.
pub fn coop_dq_workgroup_bytes(tile: CoopTile, head_dim: u32) -> u32 {
    let (q, k) = (tile.tile_q, tile.tile_kv);
    2 * k * (head_dim + 8) * 2 + q * (k + 8) * 2 + q * (k + 8) * 4 + 4
}

/// Blocks of 16 keys x 16 query rows per coop dK/dV workgroup at `tile`.
fn dkdv_blocks(tile: CoopTile) -> u32 {
    (tile.tile_kv / 16) * (tile.tile_q / 16)
}

/// Subgroups per coop dK/dV workgroup at `tile`: two per block (dV on one, dK on the other).
pub fn coop_dkdv_subgroups(tile: CoopTile) -> u32 {
    2 * dkdv_blocks(tile)
}

/// Workgroup bytes of the coop dK/dV kernel: K, V, Q and dO rows (padded), per block 16 rows of P^T and
/// dS^T (halves) and of S^T/dP^T (floats), LSE and D per query, one flag.
pub fn coop_dkdv_workgroup_bytes(tile: CoopTile, head_dim: u32) -> u32 {
    let (q, k) = (tile.tile_q, tile.tile_kv);
    let rows = 16 * dkdv_blocks(tile);
    2 * (k + q) * (head_dim + 8) * 2 + rows * 2 * DKDV_ROW_VEC4S * 8 + rows * DKDV_ROW_VEC4S * 16 + 2 * q * 4 + 4
}

/// Every dQ tile (query rows, keys per chunk) the device can run for this problem, preferred first: the
/// block size, the fetch registers, the workgroup's memory and invocations, the dispatch.
pub fn coop_dq_candidates(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Vec<CoopTile> {
    let (d, bs) = (shape.head_dim, layout.block_size());
    DQ_TILES
        .iter()
        .map(|&(tile_q, tile_kv)| CoopTile { tile_q, tile_kv })
        .filter(|t| {
            let wg = t.tile_q / 16 * COOP_SUBGROUP_SIZE;
            let fetches = t.tile_kv * d / 4;
            bs % t.tile_kv == 0
                && fetches % wg == 0
                && fetches / wg <= 8
                && t.tile_q / bs <= 31
                && coop_dq_workgroup_bytes(*t, d) <= caps.max_workgroup_storage
                && wg <= caps.max_invocations
                && shape.seq_len.div_ceil(t.tile_q) <= caps.max_dispatch
        })
        .collect()
}

/// Every dK/dV tile (query rows per staged tile, keys per workgroup) the device can run for this
/// problem, preferred first: the block size, the fetch registers, the workgroup's memory and invocations,
/// the dispatch.
pub fn coop_dkdv_candidates(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Vec<CoopTile> {
    let (d, bs) = (shape.head_dim, layout.block_size());
    DKDV_TILES
        .iter()
        .map(|&(tile_q, tile_kv)| CoopTile { tile_q, tile_kv })
        .filter(|t| {
            let wg = coop_dkdv_subgroups(*t) * COOP_SUBGROUP_SIZE;
            let fetches = t.tile_q * d / 4;
            fetches % wg == 0
                && fetches / wg <= DKDV_MAX_FETCH
                && bs % t.tile_kv == 0
                && t.tile_q / bs <= 31
                && coop_dkdv_workgroup_bytes(*t, d) <= caps.max_workgroup_storage
                && wg <= caps.max_invocations
                && shape.seq_len.div_ceil(t.tile_kv) <= caps.max_dispatch
        })
        .collect()
}

/// Why the coop backward cannot take this problem on this device, or `None` when it can.
pub fn coop_backward_unsupported(shape: &Shape, caps: &DeviceCaps, subgroups: Option<SubgroupInfo>) -> Option<String> {
    if !caps.coop_f16_16x16 {
        return Some("no 16x16x16 f16->f32 cooperative matrices".into());
    }
    if !caps.shader_f16 || !caps.subgroups {
        return Some("the coop backward needs shader-f16 and subgroups".into());
    }
    if shape.dtype != DType::F16 {
        return Some(format!("the coop backward reads f16 storage, not {}", shape.dtype));
    }
    if !COOP_HEAD_DIMS.contains(&shape.head_dim) {
        return Some(format!("the coop backward takes head_dim {COOP_HEAD_DIMS:?}, not {}", shape.head_dim));
    }
    match subgroups {
        None => Some("unknown subgroup sizes".into()),
        Some(s) if (s.min_size, s.max_size) != (COOP_SUBGROUP_SIZE, COOP_SUBGROUP_SIZE) => Some(format!(
            "the coop backward needs {COOP_SUBGROUP_SIZE}-wide subgroups, the adapter uses {}..{}",
            s.min_size, s.max_size
        )),
        Some(s) if !s.barriers => Some("the coop backward needs subgroup barriers".into()),
        Some(_) => None,
    }
}

/// A coop backward pass's plan with `subgroups` subgroups per workgroup.
fn pass_plan(tile: CoopTile, subgroups: u32, bytes: u32, reason: String) -> DispatchPlan {
    DispatchPlan {
        variant: KernelVariant::Coop,
        tile_q: tile.tile_q,
        tile_kv: tile.tile_kv,
        workgroup_size: subgroups * COOP_SUBGROUP_SIZE,
        workgroup_bytes: bytes,
        reason,
    }
}

/// The tile of one pass: the override in `var` if set (refused unless it is a candidate that fits), else
/// the first candidate that fits.
fn pick(var: &str, candidates: &[CoopTile], pass: &str) -> Result<(CoopTile, String)> {
    // Unset or blank: the first candidate that fits.
    if let Some(forced) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
        let tile: CoopTile = forced.parse()?;
        if !candidates.contains(&tile) {
            let list: Vec<String> = candidates.iter().map(|t| t.to_string()).collect();
            return Err(Error::Unsupported(format!("{var}={tile} does not fit; candidates: {}", list.join(", "))));
        }
        return Ok((tile, var.to_string()));
    }
    let first = candidates.first().copied().ok_or_else(|| Error::Unsupported(format!("no coop {pass} tile fits")))?;
    Ok((first, "largest tile that fits".into()))
}

/// Plans the coop backward (errors say why it cannot run; [`plan_backward_wgpu`] then falls back).
pub fn plan_backward_coop(
    shape: &Shape,
    layout: &Layout,
    caps: &DeviceCaps,
    subgroups: Option<SubgroupInfo>,
) -> Result<BackwardPlan> {
    if let Some(why) = coop_backward_unsupported(shape, caps, subgroups) {
        return Err(Error::Unsupported(why));
    }
    let d = shape.head_dim;
    let dq = coop_dq_candidates(shape, layout, caps);
    let dkdv = coop_dkdv_candidates(shape, layout, caps);
    let (dq_tile, dq_why) = pick("S2ATTN_BWD_DQ_TILE", &dq, "dQ")?;
    let (dkdv_tile, dkdv_why) = pick("S2ATTN_BWD_DKDV_TILE", &dkdv, "dK/dV")?;
    Ok(BackwardPlan {
        dq: pass_plan(dq_tile, dq_tile.tile_q / 16, coop_dq_workgroup_bytes(dq_tile, d), dq_why),
        dkdv: pass_plan(dkdv_tile, coop_dkdv_subgroups(dkdv_tile), coop_dkdv_workgroup_bytes(dkdv_tile, d), dkdv_why),
    })
}

/// Plans a wgpu backward: the coop kernels where the adapter and the shape suit them, else the portable
/// kernels with the reason the coop ones were passed over (on adapters with matrix units) in the reasons.
pub fn plan_backward_wgpu(
    shape: &Shape,
    layout: &Layout,
    caps: &DeviceCaps,
    subgroups: Option<SubgroupInfo>,
) -> Result<BackwardPlan> {
    match plan_backward_coop(shape, layout, caps, subgroups) {
        Ok(plan) => Ok(plan),
        Err(why) if caps.coop_f16_16x16 => {
            let mut plan = plan_backward_portable(shape, layout, caps)?;
            for p in [&mut plan.dq, &mut plan.dkdv] {
                p.reason = format!("{}; not coop: {why}", p.reason);
            }
            Ok(plan)
        }
        Err(_) => plan_backward_portable(shape, layout, caps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::S2Config;

    const SG32: Option<SubgroupInfo> = Some(SubgroupInfo { min_size: 32, max_size: 32, barriers: true });

    #[test]
    fn picks_coop_where_it_fits_and_says_why_not_elsewhere() {
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let caps = DeviceCaps::h100_vulkan();
        for d in [64, 128] {
            let plan = plan_backward_wgpu(&Shape::new(1, 4096, d, DType::F16), &layout, &caps, SG32).expect("plan");
            assert_eq!((plan.dq.variant, plan.dkdv.variant), (KernelVariant::Coop, KernelVariant::Coop));
            assert!(plan.dq.workgroup_bytes <= caps.max_workgroup_storage);
            assert!(plan.dkdv.workgroup_bytes <= caps.max_workgroup_storage);
            assert_eq!(plan.dq.workgroup_size, plan.dq.tile_q * 2);
            // Two subgroups per 16 keys x 16 rows.
            let tile = CoopTile { tile_q: plan.dkdv.tile_q, tile_kv: plan.dkdv.tile_kv };
            assert_eq!(plan.dkdv.workgroup_size, coop_dkdv_subgroups(tile) * COOP_SUBGROUP_SIZE);
        }
        // Both head dims take 32 keys x 32 query rows in the dK/dV pass.
        let p128 = plan_backward_coop(&Shape::new(1, 4096, 128, DType::F16), &layout, &caps, SG32).expect("plan");
        assert_eq!((p128.dq.tile_q, p128.dq.tile_kv, p128.dkdv.tile_q, p128.dkdv.tile_kv), (128, 32, 32, 32));
        let p64 = plan_backward_coop(&Shape::new(1, 4096, 64, DType::F16), &layout, &caps, SG32).expect("plan");
        assert_eq!((p64.dkdv.tile_q, p64.dkdv.tile_kv), (32, 32));
        // Blocks of 16 tokens take 16-key tiles (and 16-key chunks in the dQ pass).
        let l16 = Layout::s2(S2Config::new(4, 16, 2, 4)).expect("layout");
        let p16 = plan_backward_coop(&Shape::new(1, 4096, 128, DType::F16), &l16, &caps, SG32).expect("plan");
        assert_eq!((p16.dq.tile_kv, p16.dkdv.tile_q, p16.dkdv.tile_kv), (16, 32, 16));
        let fallbacks = [
            (Shape::new(1, 4096, 128, DType::F32), SG32, "f16 storage"),
            (Shape::new(1, 4096, 96, DType::F16), SG32, "head_dim"),
            (Shape::new(1, 4096, 128, DType::F16), None, "subgroup sizes"),
            (
                Shape::new(1, 4096, 128, DType::F16),
                Some(SubgroupInfo { min_size: 16, max_size: 64, barriers: true }),
                "32-wide",
            ),
            (
                Shape::new(1, 4096, 128, DType::F16),
                Some(SubgroupInfo { min_size: 32, max_size: 32, barriers: false }),
                "barriers",
            ),
        ];
        for (shape, sg, why) in fallbacks {
            let plan = plan_backward_wgpu(&shape, &layout, &caps, sg).expect("portable plan");
            assert_eq!(plan.dq.variant, KernelVariant::Portable, "{why}");
            assert!(plan.dq.reason.contains("not coop") && plan.dq.reason.contains(why), "{}", plan.dq.reason);
        }
        // Without matrix units nothing about coop is said.
        let plain = DeviceCaps { coop_f16_16x16: false, ..DeviceCaps::h100_vulkan() };
        let plan = plan_backward_wgpu(&Shape::new(1, 4096, 128, DType::F16), &layout, &plain, SG32).expect("plan");
        assert!(!plan.dq.reason.contains("coop"), "{}", plan.dq.reason);
    }

    #[test]
    fn dkdv_splits_dk_and_dv_over_two_subgroups() {
        let caps = DeviceCaps::h100_vulkan();
        let tile = |p: &DispatchPlan| (p.tile_q, p.tile_kv, p.workgroup_size);
        for (bs, d, want) in
            [(64, 128, (32, 32, 256)), (64, 64, (32, 32, 256)), (16, 128, (32, 16, 128)), (16, 64, (64, 16, 256))]
        {
            let layout = Layout::s2(S2Config::new(4, bs, 2, 4)).expect("layout");
            let shape = Shape::new(1, 4096, d, DType::F16);
            let plan = plan_backward_coop(&shape, &layout, &caps, SG32).expect("plan").dkdv;
            assert_eq!(tile(&plan), want, "block {bs} d {d}");
            let ct = CoopTile { tile_q: plan.tile_q, tile_kv: plan.tile_kv };
            assert_eq!(plan.workgroup_bytes, coop_dkdv_workgroup_bytes(ct, d));
            assert!(plan.workgroup_bytes <= caps.max_workgroup_storage);
            // Every candidate has at least two row groups (the epilogue's slots) and keeps the fetch within
            // the kernel's registers.
            for t in coop_dkdv_candidates(&shape, &layout, &caps) {
                assert!(t.tile_q >= 32, "{t}");
                assert!(t.tile_q * d / 4 / (coop_dkdv_subgroups(t) * COOP_SUBGROUP_SIZE) <= DKDV_MAX_FETCH, "{t}");
            }
        }
        assert_eq!(coop_dkdv_workgroup_bytes(CoopTile { tile_q: 32, tile_kv: 32 }, 128), 47364);
    }

    #[test]
    fn longest_first_order_is_a_permutation_longest_columns_first() {
        // Causal S2 with stripes: the earliest stripe blocks have the longest columns; GQA sums two heads.
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4).kv_heads(2)).expect("layout");
        let (seq, tile_q, tile_kv) = (2000, 32, 32);
        let columns = ColumnPlan::build(&layout.index(seq), layout.block_size(), layout.causal(), tile_q);
        let order = longest_first_order(&columns, &layout, seq, tile_kv);
        let tiles = seq.div_ceil(tile_kv);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..tiles * 2).collect::<Vec<_>>(), "not a permutation");
        let cost = |id: u32| {
            let (kv_head, kb) = (id / tiles, id % tiles * tile_kv / 64);
            (2 * kv_head..2 * kv_head + 2)
                .map(|h| {
                    let slot = ((h / (4 / layout.num_patterns())) * columns.kv_blocks() + kb) as usize;
                    columns.col_ptr()[slot + 1] - columns.col_ptr()[slot]
                })
                .sum::<u32>()
        };
        let costs: Vec<u32> = order.iter().map(|&id| cost(id)).collect();
        assert!(costs.windows(2).all(|w| w[0] >= w[1]), "{costs:?}");
        assert!(costs[0] > 2 * costs[costs.len() - 1], "the order met no long column: {costs:?}");
    }

    #[test]
    fn tiles_respect_block_size_and_workgroup_memory() {
        for bs in [16, 32, 64, 128] {
            let layout = Layout::s2(S2Config::new(4, bs, 2, 4)).expect("layout");
            for d in [64, 128] {
                let plan =
                    plan_backward_coop(&Shape::new(1, 1000, d, DType::F16), &layout, &DeviceCaps::h100_vulkan(), SG32)
                        .unwrap_or_else(|e| panic!("block {bs} d {d}: {e}"));
                assert_eq!(bs % plan.dq.tile_kv, 0);
                assert_eq!(bs % plan.dkdv.tile_kv, 0);
                assert!(plan.dq.workgroup_bytes <= 49152 && plan.dkdv.workgroup_bytes <= 49152);
            }
        }
        // 16 KiB of workgroup memory fits no dQ tile at head_dim 128.
        let small = DeviceCaps { max_workgroup_storage: 16384, ..DeviceCaps::h100_vulkan() };
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        assert!(plan_backward_coop(&Shape::new(1, 1000, 128, DType::F16), &layout, &small, SG32).is_err());
    }
}
