//! Planning the cooperative-matrix backward (`shaders/backward_coop_dq.wgsl`, `backward_coop_dkdv.wgsl`):
//! which shapes and devices it takes, the tile of each pass, and [`plan_backward_wgpu`], which picks it
//! over the portable backward where it can run and says why not where it cannot.
//!
//! Tiles: the dQ pass takes `tile_q` query rows (16 per subgroup) and walks keys in chunks of `tile_kv`
//! (as the coop forward); the dK/dV pass takes `tile_kv` keys and walks query tiles of `tile_q` rows from
//! the column plan, one subgroup per 16 keys x 16 rows. Without an override each pass takes the first candidate that fits
//! the device (largest first); `S2ATTN_BWD_DQ_TILE` and `S2ATTN_BWD_DKDV_TILE` (`<tile_q>x<tile_kv>`)
//! force one.

use super::coop::COOP_SUBGROUP_SIZE;
use super::COOP_HEAD_DIMS;
use super::{plan_backward_portable, BackwardPlan, CoopTile, DType, DeviceCaps, DispatchPlan, KernelVariant, Shape};
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

/// dQ-pass candidates (query rows, keys per chunk), preferred first.
const DQ_TILES: [(u32, u32); 4] = [(128, 32), (64, 32), (128, 16), (64, 16)];
/// dK/dV-pass candidates (query rows per staged tile, keys per workgroup), preferred first.
const DKDV_TILES: [(u32, u32); 5] = [(32, 32), (16, 64), (16, 32), (32, 16), (16, 16)];

/// Workgroup bytes of the coop dQ kernel: K and V chunks (rows padded to `head_dim + 8` halves), dS rows
/// (`tile_kv + 8` halves) and S/dP rows (`tile_kv + 8` floats) per query row, one flag.
pub fn coop_dq_workgroup_bytes(tile: CoopTile, head_dim: u32) -> u32 {
    let (q, k) = (tile.tile_q, tile.tile_kv);
    2 * k * (head_dim + 8) * 2 + q * (k + 8) * 2 + q * (k + 8) * 4 + 4
}

/// Workgroup bytes of the coop dK/dV kernel: K, V, Q and dO rows (padded), per subgroup 16 rows of P^T
/// and dS^T (24 halves) and of S^T/dP^T (24 floats), LSE and D per query, one flag.
pub fn coop_dkdv_workgroup_bytes(tile: CoopTile, head_dim: u32) -> u32 {
    let (q, k) = (tile.tile_q, tile.tile_kv);
    let rows = 16 * dkdv_subgroups(tile);
    2 * (k + q) * (head_dim + 8) * 2 + rows * 24 * (2 * 2 + 4) + 2 * q * 4 + 4
}

/// Subgroups of the coop dK/dV kernel: one per 16 keys x 16 query rows.
fn dkdv_subgroups(tile: CoopTile) -> u32 {
    (tile.tile_kv / 16) * (tile.tile_q / 16)
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
    if let Ok(forced) = std::env::var(var) {
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
    let (d, bs) = (shape.head_dim, layout.block_size());
    let fits = |bytes: u32, wg: u32| bytes <= caps.max_workgroup_storage && wg <= caps.max_invocations;
    let dq: Vec<CoopTile> = DQ_TILES
        .iter()
        .map(|&(tile_q, tile_kv)| CoopTile { tile_q, tile_kv })
        .filter(|t| {
            let wg = t.tile_q / 16 * COOP_SUBGROUP_SIZE;
            let fetches = t.tile_kv * d / 4;
            bs % t.tile_kv == 0
                && fetches % wg == 0
                && fetches / wg <= 8
                && t.tile_q / bs <= 31
                && fits(coop_dq_workgroup_bytes(*t, d), wg)
                && shape.seq_len.div_ceil(t.tile_q) <= caps.max_dispatch
        })
        .collect();
    let dkdv: Vec<CoopTile> = DKDV_TILES
        .iter()
        .map(|&(tile_q, tile_kv)| CoopTile { tile_q, tile_kv })
        .filter(|t| {
            let wg = dkdv_subgroups(*t) * COOP_SUBGROUP_SIZE;
            bs % t.tile_kv == 0
                && t.tile_q / bs <= 31
                && fits(coop_dkdv_workgroup_bytes(*t, d), wg)
                && shape.seq_len.div_ceil(t.tile_kv) <= caps.max_dispatch
        })
        .collect();
    let (dq_tile, dq_why) = pick("S2ATTN_BWD_DQ_TILE", &dq, "dQ")?;
    let (dkdv_tile, dkdv_why) = pick("S2ATTN_BWD_DKDV_TILE", &dkdv, "dK/dV")?;
    Ok(BackwardPlan {
        dq: pass_plan(dq_tile, dq_tile.tile_q / 16, coop_dq_workgroup_bytes(dq_tile, d), dq_why),
        dkdv: pass_plan(dkdv_tile, dkdv_subgroups(dkdv_tile), coop_dkdv_workgroup_bytes(dkdv_tile, d), dkdv_why),
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
    use super::super::coop::tests::h100;
    use super::*;
    use crate::layout::S2Config;

    const SG32: Option<SubgroupInfo> = Some(SubgroupInfo { min_size: 32, max_size: 32, barriers: true });

    #[test]
    fn picks_coop_where_it_fits_and_says_why_not_elsewhere() {
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let caps = h100();
        for d in [64, 128] {
            let plan = plan_backward_wgpu(&Shape::new(1, 4096, d, DType::F16), &layout, &caps, SG32).expect("plan");
            assert_eq!((plan.dq.variant, plan.dkdv.variant), (KernelVariant::Coop, KernelVariant::Coop));
            assert!(plan.dq.workgroup_bytes <= caps.max_workgroup_storage);
            assert!(plan.dkdv.workgroup_bytes <= caps.max_workgroup_storage);
            assert_eq!(plan.dq.workgroup_size, plan.dq.tile_q * 2);
            assert_eq!(plan.dkdv.workgroup_size, plan.dkdv.tile_kv * plan.dkdv.tile_q / 8);
        }
        // Both head dims take 32 keys x 32 query rows (four subgroups) in the dK/dV pass.
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
        let plain = DeviceCaps { coop_f16_16x16: false, ..h100() };
        let plan = plan_backward_wgpu(&Shape::new(1, 4096, 128, DType::F16), &layout, &plain, SG32).expect("plan");
        assert!(!plan.dq.reason.contains("coop"), "{}", plan.dq.reason);
    }

    #[test]
    fn tiles_respect_block_size_and_workgroup_memory() {
        for bs in [16, 32, 64, 128] {
            let layout = Layout::s2(S2Config::new(4, bs, 2, 4)).expect("layout");
            for d in [64, 128] {
                let plan = plan_backward_coop(&Shape::new(1, 1000, d, DType::F16), &layout, &h100(), SG32)
                    .unwrap_or_else(|e| panic!("block {bs} d {d}: {e}"));
                assert_eq!(bs % plan.dq.tile_kv, 0);
                assert_eq!(bs % plan.dkdv.tile_kv, 0);
                assert!(plan.dq.workgroup_bytes <= 49152 && plan.dkdv.workgroup_bytes <= 49152);
            }
        }
        // 16 KiB of workgroup memory fits no dQ tile at head_dim 128.
        let small = DeviceCaps { max_workgroup_storage: 16384, ..h100() };
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        assert!(plan_backward_coop(&Shape::new(1, 1000, 128, DType::F16), &layout, &small, SG32).is_err());
    }
}
