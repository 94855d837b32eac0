//! Planning the cooperative-matrix backward (`shaders/backward_coop_dq.wgsl`, `backward_coop_dkdv.wgsl`):
//! which shapes and devices it takes, the tile of each pass, and [`plan_backward_wgpu`], which picks it
//! over the portable backward where it can run and says why not where it cannot.
//!
//! Tiles: the dQ pass takes `tile_q` query rows (16 per subgroup) and walks keys in chunks of `tile_kv`
//! (as the coop forward); the dK/dV pass takes `tile_kv` keys and walks query tiles of `tile_q` rows from
//! the column plan, one subgroup per 16 keys x 16 rows. Without an override each pass takes the first candidate that fits
//! the device (largest first); `S2ATTN_BWD_DQ_TILE` and `S2ATTN_BWD_DKDV_TILE` (`<tile_q>x<tile_kv>`)
//! force one.
//!
//! The dK/dV kernel's switches ([`CoopDkdv`], override constants of one source): `S2ATTN_BWD_DKDV` = `v2` (the
//! next query tile prefetched into registers during the current one's math, column lists walked
//! descending so that a head's stripe columns read the same query tiles together, the longest columns launched
//! first: [`longest_first_order`]), `v1` (the first kernel: each query tile staged with a plain load, column lists
//! ascending, workgroups launched in KV-tile order), or `prefetch` / `descend` / `longest-first` for one of the
//! three alone. A fourth, the row slices per subgroup (`RS`), makes `v3` = v2 with two 16-row slices per subgroup
//! (`slices`: v1 with them): the same staged query tile needs half the subgroups, each doing twice the math between
//! the tile's two workgroup barriers (opt-in; its own tile candidates, and the one-slice setting, saying so, where
//! none fits). A fifth, `SPLIT`, makes `v4` = v2 with dK and dV of each 16-key x 16-row block on two subgroups (64
//! accumulator registers each instead of 128, twice the subgroups per staged tile, one more workgroup barrier per
//! tile that hands P^T from the dV subgroup to the dK one; its own tiles: at least 32 query rows; the default
//! since the v6 load fixes, with v2 where none of its tiles fits). `v5`
//! fuses two 16-row slices into one 32-row block per subgroup pair (`FUSE` = 2: each round carries twice the data,
//! 4 subgroups per 32x32 tile), `v5-recompute` also drops the P^T hand-over (the dK subgroup recomputes S^T and
//! P^T; `SPLIT` = 2). All are correct; on the H200 v4 is the fastest since the v6 fixes (v3 and the v5s slower
//! than v2; shaders/NOTES-coop.md). The
//! planner writes the choice into the dK/dV plan's reason (what `explain()` prints), and the host reads it back
//! from there with [`CoopDkdv::of_plan`].

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

/// The environment variable that picks the coop dK/dV kernel's switches.
pub const DKDV_KERNEL_VAR: &str = "S2ATTN_BWD_DKDV";

/// Marks the dK/dV kernel's switches in its plan's reason: `dK/dV kernel <name>`.
const DKDV_TAG: &str = "dK/dV kernel ";

/// Marks a dQ plan of the straight-line form (`S2ATTN_BWD_DQ=straight`) in its reason.
const DQ_STRAIGHT_TAG: &str = "dQ kernel straight";

/// The variable that picks the coop dQ kernel's form: `v1` (unset: every subgroup skips the chunks its rows
/// do not see) or `straight` (no skips, the element mask alone; shaders/NOTES-coop.md "v7", written
/// before it was run).
pub const DQ_KERNEL_VAR: &str = "S2ATTN_BWD_DQ";

/// Whether `S2ATTN_BWD_DQ` asks for the straight-line dQ kernel.
fn dq_straight_from_env() -> Result<bool> {
    match std::env::var(DQ_KERNEL_VAR).ok().as_deref().map(str::trim) {
        None | Some("") | Some("v1") => Ok(false),
        Some("straight") => Ok(true),
        Some(other) => Err(Error::Unsupported(format!("{DQ_KERNEL_VAR}={other}: expected v1 or straight"))),
    }
}

/// Whether a coop dQ plan runs the straight-line form (from the tag the planner wrote into its reason).
pub fn coop_dq_straight(plan: &DispatchPlan) -> bool {
    plan.reason.split("; ").any(|part| part == DQ_STRAIGHT_TAG)
}

/// The switches of the coop dK/dV kernel (`shaders/backward_coop_dkdv.wgsl`'s `PREFETCH`, `DESCEND`,
/// `LONGEST_FIRST`, `RS` and `SPLIT` override constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopDkdv {
    /// Fetch the next query tile's Q, dO, LSE and D into registers during the current tile's math.
    pub prefetch: bool,
    /// Walk each column list from its last query tile down.
    pub descend: bool,
    /// Launch the workgroups with the longest column lists first ([`longest_first_order`]).
    pub longest_first: bool,
    /// 16-row slices of each staged query tile per subgroup (1 or 2).
    pub slices: u32,
    /// dK and dV of each block on two subgroups (one slice each): 0 no, 1 with P^T handed from the dV
    /// subgroup to the dK one through workgroup memory, 2 with the dK subgroup recomputing it.
    pub split: u32,
    /// 16-row halves per block (1 or 2; 2 only with `split`): rounds of 16 keys x 16 `fuse` rows.
    pub fuse: u32,
}

impl CoopDkdv {
    /// The first kernel: plain staging, ascending lists, KV-tile launch order.
    pub const V1: Self = Self { prefetch: false, descend: false, longest_first: false, slices: 1, split: 0, fuse: 1 };
    /// The three boolean switches on, one slice per subgroup.
    pub const V2: Self = Self { prefetch: true, descend: true, longest_first: true, slices: 1, split: 0, fuse: 1 };
    /// v2 with two 16-row slices of each staged query tile per subgroup.
    pub const V3: Self = Self { slices: 2, ..Self::V2 };
    /// v2 with dK and dV of each block on two subgroups.
    pub const V4: Self = Self { split: 1, ..Self::V2 };
    /// v4 with 32-row blocks (two 16-row halves per round).
    pub const V5: Self = Self { fuse: 2, ..Self::V4 };
    /// v5 without the P^T hand-over (the dK subgroup recomputes S^T and P^T).
    pub const V5_RECOMPUTE: Self = Self { split: 2, ..Self::V5 };
    /// Every setting with its name, as `S2ATTN_BWD_DKDV` takes it.
    pub const ALL: [(&'static str, Self); 10] = [
        ("v1", Self::V1),
        ("v2", Self::V2),
        ("v3", Self::V3),
        ("v4", Self::V4),
        ("v5", Self::V5),
        ("v5-recompute", Self::V5_RECOMPUTE),
        ("prefetch", Self { prefetch: true, ..Self::V1 }),
        ("descend", Self { descend: true, ..Self::V1 }),
        ("longest-first", Self { longest_first: true, ..Self::V1 }),
        ("slices", Self { slices: 2, ..Self::V1 }),
    ];

    /// The setting's name (`v1`, `v2`, `v3`, `v4`, `v5`, `v5-recompute`, `prefetch`, `descend`,
    /// `longest-first`, `slices`).
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, k)| *k == self).map_or("v1", |(n, _)| n)
    }

    /// The setting named `s` (see [`CoopDkdv::ALL`]).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        Self::ALL.iter().find(|(n, _)| *n == s).map(|&(_, k)| k).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
            Error::Unsupported(format!("{DKDV_KERNEL_VAR}={s}: not one of {}", names.join(", ")))
        })
    }

    /// The setting `S2ATTN_BWD_DKDV` asks for; v4 when unset (v2 where no v4 tile fits, saying so). Once
    /// the loads stopped stalling (shaders/NOTES-coop.md, v6) v4 took the H200's dK/dV pass at 64k from
    /// 89.0 to 74.4 ms; before that v2 was the fastest (64k forward+backward 191 ms against v1's 244).
    pub fn from_env() -> Result<Self> {
        std::env::var(DKDV_KERNEL_VAR).ok().filter(|s| !s.trim().is_empty()).map_or(Ok(Self::V4), |s| Self::parse(&s))
    }

    /// The setting a coop dK/dV plan was made with (from the tag the planner wrote into its reason; v1
    /// for plans without one).
    pub fn of_plan(plan: &DispatchPlan) -> Self {
        let tagged = plan.reason.split("; ").find_map(|part| part.strip_prefix(DKDV_TAG));
        tagged.and_then(|name| Self::parse(name).ok()).unwrap_or(Self::V1)
    }

    /// The kernel's override constants for this setting.
    pub fn constants(self) -> [(&'static str, u32); 8] {
        let (ss4, ps4) = self.row_vec4s();
        [
            ("PREFETCH", self.prefetch as u32),
            ("DESCEND", self.descend as u32),
            ("LONGEST_FIRST", self.longest_first as u32),
            ("RS", self.slices),
            ("SPLIT", self.split),
            ("FUSE", self.fuse),
            ("SS4", ss4),
            ("PS4", ps4),
        ]
    }

    /// vec4s per scratch row: S^T/dP^T (f32) and P^T/dS^T (f16), 16 `fuse` queries padded by 8 (v5-recompute:
    /// by 4 and unpadded, to fit its per-subgroup S^T rows in 48 KiB at 32x32, head_dim 128).
    pub fn row_vec4s(self) -> (u32, u32) {
        match (self.fuse, self.split) {
            (2, 2) => (9, 8),
            (2, _) => (10, 10),
            _ => (6, 6),
        }
    }

    /// The (query rows per staged tile, keys per workgroup) candidates of this setting, preferred first.
    pub fn tiles(self) -> &'static [(u32, u32)] {
        if self.fuse == 2 {
            &DKDV_TILES_V5
        } else if self.split > 0 {
            &DKDV_TILES_V4
        } else if self.slices == 2 {
            &DKDV_TILES_V3
        } else {
            &DKDV_TILES
        }
    }

    /// Blocks of 16 keys x `16 * slices * fuse` query rows per workgroup at `tile` (16 scratch rows each).
    pub fn blocks(self, tile: CoopTile) -> u32 {
        (tile.tile_kv / 16) * (tile.tile_q / 16 / self.slices.max(1) / self.fuse.max(1))
    }

    /// Subgroups per workgroup at `tile`: one per block, two with [`CoopDkdv::split`].
    pub fn subgroups(self, tile: CoopTile) -> u32 {
        self.blocks(tile) * (1 + self.split.min(1))
    }
}

/// The launch order of the coop dK/dV kernel with [`CoopDkdv::longest_first`], which it reads after the
/// column pointers: for each launch slot `kv_head * tiles + tile` (`tiles` = KV tiles of `tile_kv` keys,
/// the dispatch's x), the `kv_head * tiles + tile` it runs. Slots go to the (KV tile, KV head) pairs in
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
/// dK/dV-pass candidates (query rows per staged tile, keys per workgroup), preferred first.
const DKDV_TILES: [(u32, u32); 5] = [(32, 32), (16, 64), (16, 32), (32, 16), (16, 16)];
/// dK/dV-pass candidates with two row slices per subgroup (v3): query tiles of 32 or 64 rows.
const DKDV_TILES_V3: [(u32, u32); 4] = [(64, 32), (32, 32), (64, 16), (32, 16)];
/// dK/dV-pass candidates with dK and dV on two subgroups (v4): the measured tiles, of at least two row groups
/// (v2's tiles of 32 rows; 64 rows do not fit 48 KiB at head_dim 128).
const DKDV_TILES_V4: [(u32, u32); 3] = [(32, 32), (64, 16), (32, 16)];
/// dK/dV-pass candidates with 32-row blocks (v5): 64 rows only where they fit (head_dim 64).
const DKDV_TILES_V5: [(u32, u32); 4] = [(64, 32), (32, 32), (64, 16), (32, 16)];
/// Most Q (and dO) vec4s one invocation of the coop dK/dV kernel fetches per query tile (its `MAX_QF`).
const DKDV_MAX_FETCH: u32 = 16;

/// Workgroup bytes of the coop dQ kernel: K and V chunks (rows padded to `head_dim + 8` halves), dS rows
/// (`tile_kv + 8` halves) and S/dP rows (`tile_kv + 8` floats) per query row, one flag.
pub fn coop_dq_workgroup_bytes(tile: CoopTile, head_dim: u32) -> u32 {
    let (q, k) = (tile.tile_q, tile.tile_kv);
    2 * k * (head_dim + 8) * 2 + q * (k + 8) * 2 + q * (k + 8) * 4 + 4
}

/// Workgroup bytes of the coop dK/dV kernel `kernel`: K, V, Q and dO rows (padded), per block (subgroup, or
/// subgroup pair with `split`) 16 rows of P^T and dS^T ([`CoopDkdv::row_vec4s`] vec4s of halves) and of
/// S^T/dP^T (of floats; per subgroup with `split` 2), LSE and D per query, one flag.
pub fn coop_dkdv_workgroup_bytes(tile: CoopTile, head_dim: u32, kernel: CoopDkdv) -> u32 {
    let (q, k) = (tile.tile_q, tile.tile_kv);
    let (ss4, ps4) = kernel.row_vec4s();
    let rows = 16 * kernel.blocks(tile);
    let s_rows = if kernel.split == 2 { 16 * kernel.subgroups(tile) } else { rows };
    2 * (k + q) * (head_dim + 8) * 2 + rows * 2 * ps4 * 8 + s_rows * ss4 * 16 + 2 * q * 4 + 4
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
/// problem with `kernel`, preferred first: the block size, the fetch registers, the workgroup's memory and
/// invocations, the dispatch.
pub fn coop_dkdv_candidates(shape: &Shape, layout: &Layout, caps: &DeviceCaps, kernel: CoopDkdv) -> Vec<CoopTile> {
    let (d, bs) = (shape.head_dim, layout.block_size());
    kernel
        .tiles()
        .iter()
        .map(|&(tile_q, tile_kv)| CoopTile { tile_q, tile_kv })
        .filter(|t| {
            let wg = kernel.subgroups(*t) * COOP_SUBGROUP_SIZE;
            let fetches = t.tile_q * d / 4;
            wg > 0
                && t.tile_q % (16 * kernel.slices * kernel.fuse) == 0
                && (kernel.split == 0 || (kernel.slices == 1 && t.tile_q >= 32))
                && (kernel.fuse == 1 || kernel.split > 0)
                && fetches % wg == 0
                && fetches / wg <= DKDV_MAX_FETCH
                && bs % t.tile_kv == 0
                && t.tile_q / bs <= 31
                && coop_dkdv_workgroup_bytes(*t, d, kernel) <= caps.max_workgroup_storage
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
    plan_coop_with(shape, layout, caps, CoopDkdv::from_env()?)
}

/// [`plan_backward_coop`] past its device checks, with the dK/dV setting `asked`.
fn plan_coop_with(shape: &Shape, layout: &Layout, caps: &DeviceCaps, asked: CoopDkdv) -> Result<BackwardPlan> {
    let d = shape.head_dim;
    let dq = coop_dq_candidates(shape, layout, caps);
    let mut kernel = asked;
    let mut dkdv = coop_dkdv_candidates(shape, layout, caps, kernel);
    let mut note = String::new();
    if dkdv.is_empty() && (kernel.slices > 1 || kernel.split > 0) {
        // v3's 32/64-row tiles do not fit (16-key tiles at head_dim 128), or no v4/v5 tile does: v2, saying so.
        kernel = CoopDkdv { slices: 1, split: 0, fuse: 1, ..kernel };
        dkdv = coop_dkdv_candidates(shape, layout, caps, kernel);
        note = format!("; {} has no tile that fits here", asked.name());
    }
    let (dq_tile, mut dq_why) = pick("S2ATTN_BWD_DQ_TILE", &dq, "dQ")?;
    if dq_straight_from_env()? {
        dq_why = format!("{dq_why}; {DQ_STRAIGHT_TAG}");
    }
    let (dkdv_tile, dkdv_why) = pick("S2ATTN_BWD_DKDV_TILE", &dkdv, "dK/dV")?;
    let dkdv_why = format!("{dkdv_why}; {DKDV_TAG}{}{note}", kernel.name());
    let dkdv_bytes = coop_dkdv_workgroup_bytes(dkdv_tile, d, kernel);
    Ok(BackwardPlan {
        dq: pass_plan(dq_tile, dq_tile.tile_q / 16, coop_dq_workgroup_bytes(dq_tile, d), dq_why),
        dkdv: pass_plan(dkdv_tile, kernel.subgroups(dkdv_tile), dkdv_bytes, dkdv_why),
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
            // One subgroup per 16 keys x 16 rows, two with the default v4's split.
            let tile = CoopTile { tile_q: plan.dkdv.tile_q, tile_kv: plan.dkdv.tile_kv };
            let kernel = CoopDkdv::of_plan(&plan.dkdv);
            assert_eq!(kernel, CoopDkdv::from_env().expect("S2ATTN_BWD_DKDV"), "{}", plan.dkdv.reason);
            assert_eq!(plan.dkdv.workgroup_size, kernel.subgroups(tile) * COOP_SUBGROUP_SIZE);
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
    fn dkdv_switches_round_trip_through_the_plan_reason() {
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let mut plan =
            plan_backward_coop(&Shape::new(1, 4096, 128, DType::F16), &layout, &DeviceCaps::h100_vulkan(), SG32)
                .expect("plan")
                .dkdv;
        for (name, kernel) in CoopDkdv::ALL {
            assert_eq!(CoopDkdv::parse(name).expect("known name"), kernel);
            assert_eq!(kernel.name(), name);
            plan.reason = format!("largest tile that fits; {DKDV_TAG}{name}");
            assert_eq!(CoopDkdv::of_plan(&plan), kernel, "{}", plan.reason);
        }
        let on = [("PREFETCH", 1), ("DESCEND", 1), ("LONGEST_FIRST", 1)];
        let rest = |k: CoopDkdv| k.constants()[3..].to_vec();
        assert_eq!(CoopDkdv::V2.constants()[..3], on);
        assert_eq!(rest(CoopDkdv::V2), [("RS", 1), ("SPLIT", 0), ("FUSE", 1), ("SS4", 6), ("PS4", 6)]);
        assert_eq!(rest(CoopDkdv::V3), [("RS", 2), ("SPLIT", 0), ("FUSE", 1), ("SS4", 6), ("PS4", 6)]);
        assert_eq!(CoopDkdv::V4.constants()[..3], on);
        assert_eq!(rest(CoopDkdv::V4), [("RS", 1), ("SPLIT", 1), ("FUSE", 1), ("SS4", 6), ("PS4", 6)]);
        assert_eq!(rest(CoopDkdv::V5), [("RS", 1), ("SPLIT", 1), ("FUSE", 2), ("SS4", 10), ("PS4", 10)]);
        assert_eq!(rest(CoopDkdv::V5_RECOMPUTE), [("RS", 1), ("SPLIT", 2), ("FUSE", 2), ("SS4", 9), ("PS4", 8)]);
        assert!(CoopDkdv::parse("v6").is_err());
        plan.reason = "largest tile that fits".into();
        assert_eq!(CoopDkdv::of_plan(&plan), CoopDkdv::V1);
    }

    #[test]
    fn v3_takes_two_row_slices_per_subgroup_or_says_why_not() {
        let caps = DeviceCaps::h100_vulkan();
        let l64 = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let tile = |p: &DispatchPlan| (p.tile_q, p.tile_kv, p.workgroup_size);
        // d128: 32 rows x 32 keys in two subgroups (64 rows do not fit 48 KiB); d64: 64 x 32 in four.
        for (d, want) in [(128, (32, 32, 64)), (64, (64, 32, 128))] {
            let shape = Shape::new(1, 4096, d, DType::F16);
            let plan = plan_coop_with(&shape, &l64, &caps, CoopDkdv::V3).expect("plan").dkdv;
            assert_eq!(tile(&plan), want, "d {d}");
            assert_eq!(CoopDkdv::of_plan(&plan), CoopDkdv::V3, "{}", plan.reason);
            assert!(plan.workgroup_bytes <= caps.max_workgroup_storage);
            let ct = CoopTile { tile_q: plan.tile_q, tile_kv: plan.tile_kv };
            assert_eq!(plan.workgroup_bytes, coop_dkdv_workgroup_bytes(ct, d, CoopDkdv::V3));
            // Every candidate keeps the fetch within MAX_QF and gives each subgroup two slices.
            let candidates = coop_dkdv_candidates(&shape, &l64, &caps, CoopDkdv::V3);
            for t in &candidates {
                let wg = CoopDkdv::V3.subgroups(*t) * COOP_SUBGROUP_SIZE;
                assert!(t.tile_q * d / 4 / wg <= DKDV_MAX_FETCH, "{t}");
                assert_eq!(t.tile_q % 32, 0, "{t}");
            }
        }
        // 16-token blocks at d128: no v3 tile fits; v2, and the reason says so.
        let l16 = Layout::s2(S2Config::new(4, 16, 2, 4)).expect("layout");
        let plan = plan_coop_with(&Shape::new(1, 4096, 128, DType::F16), &l16, &caps, CoopDkdv::V3).expect("plan");
        assert_eq!(CoopDkdv::of_plan(&plan.dkdv), CoopDkdv::V2, "{}", plan.dkdv.reason);
        assert!(plan.dkdv.reason.contains("v3 has no tile"), "{}", plan.dkdv.reason);
        let v2 = plan_coop_with(&Shape::new(1, 4096, 128, DType::F16), &l16, &caps, CoopDkdv::V2).expect("plan");
        assert_eq!(tile(&plan.dkdv), tile(&v2.dkdv));
        // At d64 16-token blocks take 64 rows x 16 keys, two subgroups.
        let p64 = plan_coop_with(&Shape::new(1, 4096, 64, DType::F16), &l16, &caps, CoopDkdv::V3).expect("plan");
        assert_eq!(tile(&p64.dkdv), (64, 16, 64));
    }

    #[test]
    fn v4_splits_dk_and_dv_over_two_subgroups_at_v2s_workgroup_bytes() {
        let caps = DeviceCaps::h100_vulkan();
        let tile = |p: &DispatchPlan| (p.tile_q, p.tile_kv, p.workgroup_size);
        for (bs, d, want) in
            [(64, 128, (32, 32, 256)), (64, 64, (32, 32, 256)), (16, 128, (32, 16, 128)), (16, 64, (64, 16, 256))]
        {
            let layout = Layout::s2(S2Config::new(4, bs, 2, 4)).expect("layout");
            let shape = Shape::new(1, 4096, d, DType::F16);
            let plan = plan_coop_with(&shape, &layout, &caps, CoopDkdv::V4).expect("plan").dkdv;
            assert_eq!(tile(&plan), want, "block {bs} d {d}");
            assert_eq!(CoopDkdv::of_plan(&plan), CoopDkdv::V4, "{}", plan.reason);
            assert!(plan.reason.contains("dK/dV kernel v4"), "{}", plan.reason);
            let ct = CoopTile { tile_q: plan.tile_q, tile_kv: plan.tile_kv };
            assert_eq!(plan.workgroup_bytes, coop_dkdv_workgroup_bytes(ct, d, CoopDkdv::V4));
            assert!(plan.workgroup_bytes <= caps.max_workgroup_storage);
            // The same scratch as v2 at the same tile (one block per subgroup pair), twice the subgroups.
            assert_eq!(plan.workgroup_bytes, coop_dkdv_workgroup_bytes(ct, d, CoopDkdv::V2));
            assert_eq!(CoopDkdv::V4.subgroups(ct), 2 * CoopDkdv::V2.subgroups(ct));
            // Every candidate has at least two row groups (the epilogue's slots) and one slice.
            for t in coop_dkdv_candidates(&shape, &layout, &caps, CoopDkdv::V4) {
                assert!(t.tile_q >= 32, "{t}");
            }
        }
    }

    #[test]
    fn v5_takes_32_row_blocks_in_four_subgroups_within_48_kib() {
        let caps = DeviceCaps::h100_vulkan();
        let tile = |p: &DispatchPlan| (p.tile_q, p.tile_kv, p.workgroup_size);
        // d128: 32x32 in 4 subgroups (2 blocks of 16 keys x 32 rows); 16-token blocks: 32x16 in 2; d64: v5
        // takes 64 rows (8 subgroups), v5-recompute's per-subgroup S^T rows do not fit them.
        for (kernel, d64) in [(CoopDkdv::V5, (64, 32, 256)), (CoopDkdv::V5_RECOMPUTE, (32, 32, 128))] {
            for (bs, d, want) in [(64, 128, (32, 32, 128)), (16, 128, (32, 16, 64)), (64, 64, d64)] {
                let layout = Layout::s2(S2Config::new(4, bs, 2, 4)).expect("layout");
                let shape = Shape::new(1, 4096, d, DType::F16);
                let plan = plan_coop_with(&shape, &layout, &caps, kernel).expect("plan").dkdv;
                assert_eq!(tile(&plan), want, "{} block {bs} d {d}", kernel.name());
                assert_eq!(CoopDkdv::of_plan(&plan), kernel, "{}", plan.reason);
                let ct = CoopTile { tile_q: plan.tile_q, tile_kv: plan.tile_kv };
                assert_eq!(plan.workgroup_bytes, coop_dkdv_workgroup_bytes(ct, d, kernel));
                assert!(
                    plan.workgroup_bytes <= caps.max_workgroup_storage,
                    "{} {}",
                    kernel.name(),
                    plan.workgroup_bytes
                );
            }
        }
        let t = CoopTile { tile_q: 32, tile_kv: 32 };
        assert_eq!(coop_dkdv_workgroup_bytes(t, 128, CoopDkdv::V5), 45316);
        assert_eq!(coop_dkdv_workgroup_bytes(t, 128, CoopDkdv::V5_RECOMPUTE), 48388);
        assert_eq!(coop_dkdv_workgroup_bytes(t, 128, CoopDkdv::V2), 47364);
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
