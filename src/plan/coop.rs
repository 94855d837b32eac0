//! Planning the cooperative-matrix forward kernel (`shaders/forward_coop.wgsl`): which shapes it takes,
//! its tile candidates (query rows `tile_q` x keys per chunk `tile_kv`) and the autotuner that measures
//! them once per device and problem class and remembers the winner on disk.
//!
//! The choice, in order: `S2ATTN_TILE=<tile_q>x<tile_kv>` (e.g. `64x32`); the tuning cache
//! (`$S2ATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/s2attn`, else `~/.cache/s2attn`, file `autotune.txt`, one
//! `device<TAB>class<TAB>tile<TAB>ms` line per entry); a measurement of every candidate through the
//! caller's [`TuneTarget`] (unless `S2ATTN_AUTOTUNE=0`), written back to the cache when it is writable;
//! else a fixed default. The reason ends up in [`DispatchPlan::reason`], so `Attention::explain()` shows it.
//!
//! `S2ATTN_COOP_FWD=v4` selects the kernel's v4 form (shaders/NOTES-coop.md): 64-key chunks staged per
//! pair of workgroup barriers and run in softmax slices of 16 or 32 keys, so that they fit the workgroup
//! memory at 128 query rows, with the next 16-key slice's S = Q K^T issued before this slice's softmax;
//! `v4-nopipe` the same without that; `v5` splits O's head dims over a pair of subgroups per 16 query rows
//! (64x32 tiles of 256 invocations, Q in workgroup memory: fewer registers per invocation, so that two
//! workgroups fit an SM); `v3` the form with per-subgroup chunk skips (the default before 2026-12-01's
//! fifth session); unset or `v7`, v3 in straight-line form (every subgroup runs every chunk, P V in both
//! arms of the rescale branch: no control-flow merge for the O accumulators; `S2ATTN_COOP_STRAIGHT` takes
//! its two parts alone), 9-12% faster than v3 on the H200 (BENCHMARKS.md). The version is
//! read when the plan is made (its reason names it) and again when the pipeline is built
//! ([`coop_forward_overrides`]).

use super::{DType, DeviceCaps, DispatchPlan, KernelVariant, Shape};
use crate::error::{Error, Result};
use crate::layout::Layout;
use std::fmt;
use std::path::PathBuf;

/// Head dimensions the coop kernel takes.
pub const COOP_HEAD_DIMS: &[u32] = &[64, 128];
/// Query rows per subgroup (one 16-row matrix tile).
const ROWS_PER_SUBGROUP: u32 = 16;
/// The subgroup width the kernel's row split is written for (two invocations per query row).
pub const COOP_SUBGROUP_SIZE: u32 = 32;
/// The kernel's lazy rescale threshold (its `TAU`, log2 units): a row's running max moves only when a
/// chunk's max exceeds it by more than this, so P stays below `2^COOP_TAU` (finite in f16 up to 15).
pub const COOP_TAU: f32 = 8.0;
/// Query-tile candidates.
const TILE_Q: [u32; 2] = [64, 128];
/// Keys-per-chunk candidates (each must divide the block size).
const TILE_KV: [u32; 3] = [16, 32, 64];
/// Tokens the autotuner measures at most (longer problems are measured at this length).
pub const TUNE_MAX_SEQ: u32 = 16384;

/// A (query rows, keys per chunk) choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopTile {
    /// Query rows per workgroup (a multiple of 16).
    pub tile_q: u32,
    /// Keys staged per chunk (16, 32 or 64).
    pub tile_kv: u32,
}

impl fmt::Display for CoopTile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.tile_q, self.tile_kv)
    }
}

impl std::str::FromStr for CoopTile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Unsupported(format!("tile `{s}` is not <tile_q>x<tile_kv>, e.g. 64x32"));
        let (q, kv) = s.trim().split_once('x').ok_or_else(bad)?;
        Ok(Self { tile_q: q.parse().map_err(|_| bad())?, tile_kv: kv.parse().map_err(|_| bad())? })
    }
}

/// The coop forward kernel's form (`S2ATTN_COOP_FWD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoopForward {
    /// One softmax slice per staged chunk, subgroups skipping the chunks their rows do not see (the
    /// default until v7 measured faster on the H200).
    V3,
    /// Chunks staged whole, the softmax in the largest slice (32 or 16 keys) whose S and P fit; the next
    /// 16-key slice's scores computed during this slice's softmax.
    V4,
    /// [`CoopForward::V4`]'s slices without the early scores.
    V4NoPipe,
    /// O's head dims split over a pair of subgroups sharing 16 query rows, each pair member computing
    /// half the chunk's scores from Q in workgroup memory (32-key chunks).
    V5,
    /// v3 in straight-line form, the default: every subgroup runs every chunk (masked where it sees none
    /// of it) and O += P V sits in both arms of the rescale branch, so that the O accumulators meet no
    /// merging control flow (the v3 code moves them out and back around those merges; shaders/NOTES-coop.md
    /// "v7"). `S2ATTN_COOP_STRAIGHT=0..3` picks its two parts alone.
    V7,
}

impl CoopForward {
    /// The form `S2ATTN_COOP_FWD` names (`v7` when unset).
    pub fn from_env() -> Result<Self> {
        match std::env::var("S2ATTN_COOP_FWD").as_deref() {
            Err(_) | Ok("") | Ok("v7") => Ok(Self::V7),
            Ok("v3") => Ok(Self::V3),
            Ok("v4") => Ok(Self::V4),
            Ok("v4-nopipe") => Ok(Self::V4NoPipe),
            Ok("v5") => Ok(Self::V5),
            Ok(other) => {
                Err(Error::Unsupported(format!("S2ATTN_COOP_FWD={other}: expected v3, v4, v4-nopipe, v5 or v7")))
            }
        }
    }

    /// `v3`, `v4`, `v4-nopipe`, `v5` or `v7`.
    pub fn name(self) -> &'static str {
        match self {
            Self::V3 => "v3",
            Self::V4 => "v4",
            Self::V4NoPipe => "v4-nopipe",
            Self::V5 => "v5",
            Self::V7 => "v7",
        }
    }

    /// Subgroups per 16 query rows (the kernel's `HS`): 2 in v5 (the head-dim split), else 1.
    pub fn split(self) -> u32 {
        if self == Self::V5 {
            2
        } else {
            1
        }
    }
}

/// How the forward kernel lays out one tile's scores: keys per softmax slice and row paddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopSlices {
    /// Keys per softmax slice (S and P columns): the chunk's keys in v3, 16 or 32 in v4.
    pub slice: u32,
    /// S row padding in floats (8, or 4 where 8 does not fit).
    pub s_pad: u32,
    /// P row padding in halves (8, or 0 where 8 does not fit).
    pub p_pad: u32,
    /// Subgroups per 16 query rows ([`CoopForward::split`]); with 2, Q's rows (padded as K's) are staged
    /// in workgroup memory after P.
    pub split: u32,
}

impl CoopSlices {
    /// Workgroup bytes of `tile` with these slices: K and V rows padded to `head_dim + 8` halves, P rows
    /// of `slice + p_pad` halves, S rows of `slice + s_pad` floats (S's first element doubles as the
    /// kernel's subgroup-count flag); with `split` 2, Q's rows of `head_dim + 8` halves.
    pub fn workgroup_bytes(self, tile: CoopTile, head_dim: u32) -> u32 {
        let kv = 2 * tile.tile_kv * (head_dim + 8) * 2;
        let p = tile.tile_q * (self.slice + self.p_pad) * 2;
        let s = tile.tile_q * (self.slice + self.s_pad) * 4;
        let q = (self.split - 1) * tile.tile_q * (head_dim + 8) * 2;
        kv + p + s + q
    }
}

/// The slices of `tile` in `form` within `max_bytes` of workgroup memory, if any fit: v3 takes the whole
/// chunk with the full pads; v4 the widest slice (the chunk, 32, 16 keys), full pads before tight ones;
/// v5 only 32-key chunks (a pair's two 16-key score halves) at 64 rows, whole, full pads, else S's pad 4.
pub fn coop_slices(form: CoopForward, tile: CoopTile, head_dim: u32, max_bytes: u32) -> Option<CoopSlices> {
    // (S pad, P pad): full, then tight.
    let (widths, pads): (&[u32], &[(u32, u32)]) = match form {
        CoopForward::V3 | CoopForward::V7 => (&[tile.tile_kv], &[(8, 8)]),
        CoopForward::V4 | CoopForward::V4NoPipe => (&[64, 32, 16], &[(8, 8), (4, 0)]),
        CoopForward::V5 if tile.tile_kv == 32 && tile.tile_q == 64 => (&[32], &[(8, 8), (4, 8), (4, 0)]),
        CoopForward::V5 => (&[], &[]),
    };
    let split = form.split();
    widths
        .iter()
        .filter(|&&w| w <= tile.tile_kv && tile.tile_kv % w == 0)
        .flat_map(|&slice| pads.iter().map(move |&(s_pad, p_pad)| CoopSlices { slice, s_pad, p_pad, split }))
        .find(|sl| sl.workgroup_bytes(tile, head_dim) <= max_bytes)
}

/// Workgroup bytes the v3 coop kernel declares for a tile: K and V rows padded to `head_dim + 8` halves,
/// P rows to `tile_kv + 8` halves, S rows to `tile_kv + 8` floats.
pub fn coop_workgroup_bytes(tile: CoopTile, head_dim: u32) -> u32 {
    CoopSlices { slice: tile.tile_kv, s_pad: 8, p_pad: 8, split: 1 }.workgroup_bytes(tile, head_dim)
}

/// The override constants beyond `D`, `BQ`, `BK` and `WG` that the forward pipeline of `plan` needs:
/// none for v3; the slice width, pads and early scores for v4; those and the head-dim split `HS` for v5;
/// v3's and the straight-line bits `STRAIGHT` for v7 (`S2ATTN_COOP_FWD`, read again here).
pub fn coop_forward_overrides(plan: &DispatchPlan, head_dim: u32) -> Result<Vec<(&'static str, u32)>> {
    let form = CoopForward::from_env()?;
    let diag = coop_diag()?;
    if form == CoopForward::V3 {
        return Ok(diag.map(|d| vec![("DIAG", d)]).unwrap_or_default());
    }
    let tile = CoopTile { tile_q: plan.tile_q, tile_kv: plan.tile_kv };
    let sl = coop_slices(form, tile, head_dim, plan.workgroup_bytes)
        .ok_or_else(|| Error::Unsupported(format!("the {} coop forward has no slices for tile {tile}", form.name())))?;
    let pipe = u32::from(form == CoopForward::V4);
    let mut out = vec![("SL", sl.slice), ("SPAD", sl.s_pad), ("PPAD", sl.p_pad), ("PIPE", pipe)];
    if sl.split > 1 {
        out.push(("HS", sl.split));
    }
    if form == CoopForward::V7 {
        out.push(("STRAIGHT", coop_straight()?));
    }
    out.extend(diag.map(|d| ("DIAG", d)));
    Ok(out)
}

/// A diagnostic number below `limit` from the environment variable `var`: `None` when it is unset or blank.
fn env_below(var: &str, limit: u32) -> Result<Option<u32>> {
    match std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n < limit)
            .map(Some)
            .ok_or_else(|| Error::Unsupported(format!("{var}={v}: expected a number below {limit}"))),
    }
}

/// v7's straight-line parts (the kernel's `STRAIGHT` bits): `S2ATTN_COOP_STRAIGHT` (0..3; 1 every subgroup
/// runs every chunk, 2 P V in both arms of the rescale branch), both when unset. For measuring the parts
/// alone; every setting computes the same result.
pub fn coop_straight() -> Result<u32> {
    Ok(env_below("S2ATTN_COOP_STRAIGHT", 4)?.unwrap_or(3))
}

/// `S2ATTN_COOP_DIAG`: a diagnostic bit set that leaves stages of the coop forward out (the kernel's
/// `DIAG` override lists them; its results are wrong unless the set is empty). For timing what a stage
/// costs, never for use.
pub fn coop_diag() -> Result<Option<u32>> {
    Ok(env_below("S2ATTN_COOP_DIAG", 128)?.filter(|&d| d != 0))
}

/// Invocations per workgroup for a tile: one subgroup of [`COOP_SUBGROUP_SIZE`] per 16 query rows.
pub fn coop_workgroup_size(tile: CoopTile) -> u32 {
    tile.tile_q / ROWS_PER_SUBGROUP * COOP_SUBGROUP_SIZE
}

/// Invocations per workgroup for a tile in `form`: [`CoopForward::split`] subgroups per 16 query rows.
pub fn coop_forward_workgroup_size(form: CoopForward, tile: CoopTile) -> u32 {
    coop_workgroup_size(tile) * form.split()
}

/// What the autotuner needs from a device: who it is and how fast a candidate runs there.
pub trait TuneTarget {
    /// Adapter and driver, as one line (the cache key's first half).
    fn device_key(&self) -> String;
    /// The smallest and largest subgroup sizes the adapter may use.
    fn subgroup_sizes(&self) -> (u32, u32);
    /// Whether the device has subgroup barriers enabled (the kernel synchronises each subgroup's rows
    /// with them).
    fn subgroup_barriers(&self) -> bool;
    /// Median milliseconds of one forward pass with `plan` on a problem of `shape`'s class.
    fn measure(&mut self, plan: &DispatchPlan) -> Result<f64>;
}

/// Why the coop kernel cannot take this problem on this device, or `None` when it can.
pub fn coop_unsupported(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Option<String> {
    if !caps.coop_f16_16x16 {
        return Some("no 16x16x16 f16->f32 cooperative matrices".into());
    }
    if !caps.shader_f16 || !caps.subgroups {
        return Some("the coop kernel needs shader-f16 and subgroups".into());
    }
    if shape.dtype != DType::F16 {
        return Some(format!("the coop kernel reads f16 storage, not {}", shape.dtype));
    }
    if !COOP_HEAD_DIMS.contains(&shape.head_dim) {
        return Some(format!("the coop kernel takes head_dim {COOP_HEAD_DIMS:?}, not {}", shape.head_dim));
    }
    // v4 takes every tile v3 takes (its first layout is v3's), so v3's list decides.
    if coop_candidates(shape, layout, caps, CoopForward::V3).is_empty() {
        return Some(format!("no coop tile fits {} B of workgroup memory", caps.max_workgroup_storage));
    }
    None
}

/// Every tile the device can run for this problem in `form`, smallest footprint first.
pub fn coop_candidates(shape: &Shape, layout: &Layout, caps: &DeviceCaps, form: CoopForward) -> Vec<CoopTile> {
    let bs = layout.block_size();
    let mut out = Vec::new();
    for tile_q in TILE_Q {
        for tile_kv in TILE_KV {
            let tile = CoopTile { tile_q, tile_kv };
            // Each invocation fetches the same whole number of K/V vec4s per chunk, at most MAX_PF (8).
            let fetches = tile_kv * shape.head_dim / 4;
            let wg = coop_forward_workgroup_size(form, tile);
            if bs % tile_kv != 0
                || fetches % wg != 0
                || fetches / wg > 8
                || tile_q / bs > 31
                || coop_slices(form, tile, shape.head_dim, caps.max_workgroup_storage).is_none()
                || wg > caps.max_invocations
                || shape.seq_len.div_ceil(tile_q) > caps.max_dispatch
            {
                continue;
            }
            out.push(tile);
        }
    }
    out
}

/// The default without measurements: 128 query rows (8 subgroups) and 32 keys per chunk, the fastest on
/// the H100 at 16k..128k tokens (see shaders/NOTES-coop.md); else 64x16, else the first candidate. v4
/// prefers 128x64 (its point: 64-key chunks at 128 rows); v5 takes its one tile, 64x32.
fn default_tile(tiles: &[CoopTile], form: CoopForward) -> Option<CoopTile> {
    let pick = |q: u32, kv: u32| tiles.iter().copied().find(|t| t.tile_q == q && t.tile_kv == kv);
    let first = match form {
        CoopForward::V3 | CoopForward::V7 => None,
        CoopForward::V4 | CoopForward::V4NoPipe => pick(128, 64),
        CoopForward::V5 => pick(64, 32),
    };
    first.or_else(|| pick(128, 32)).or_else(|| pick(64, 16)).or_else(|| tiles.first().copied())
}

/// The kernel form and the device's workgroup memory, which together fix a tile's slices.
#[derive(Clone, Copy, Debug)]
struct Form {
    form: CoopForward,
    max_bytes: u32,
}

/// Measurement rounds: candidates are timed round-robin and each keeps its best round, so that a clock
/// or cache transient early in the sweep does not decide the choice.
const TUNE_ROUNDS: usize = 2;

/// The plan for one tile (a candidate: its slices fit); v4 plans name the form and the slice width.
fn coop_plan(shape: &Shape, tile: CoopTile, form: Form, reason: String) -> DispatchPlan {
    let sl = coop_slices(form.form, tile, shape.head_dim, form.max_bytes);
    let bytes =
        sl.map_or_else(|| coop_workgroup_bytes(tile, shape.head_dim), |sl| sl.workgroup_bytes(tile, shape.head_dim));
    let reason = match (form.form, sl) {
        (CoopForward::V3, _) | (_, None) => reason,
        (f @ CoopForward::V5, Some(_)) if reason.is_empty() => {
            format!("{}, head dim split over subgroup pairs", f.name())
        }
        (f @ CoopForward::V5, Some(_)) => format!("{}, head dim split over subgroup pairs; {reason}", f.name()),
        (f @ CoopForward::V7, Some(_)) if reason.is_empty() => format!("{}, straight-line chunks", f.name()),
        (f @ CoopForward::V7, Some(_)) => format!("{}, straight-line chunks; {reason}", f.name()),
        (f, Some(sl)) if reason.is_empty() => format!("{}, {}-key slices", f.name(), sl.slice),
        (f, Some(sl)) => format!("{}, {}-key slices; {reason}", f.name(), sl.slice),
    };
    DispatchPlan {
        variant: KernelVariant::Coop,
        tile_q: tile.tile_q,
        tile_kv: tile.tile_kv,
        workgroup_size: coop_forward_workgroup_size(form.form, tile),
        workgroup_bytes: bytes,
        reason,
    }
}

/// The problem class a tuned tile is remembered for: what changes the best tile (head dim, block size,
/// direction, GQA group, length bucket up to the tuning length).
pub fn problem_class(shape: &Shape, layout: &Layout, form: CoopForward) -> String {
    let len = shape.seq_len.min(TUNE_MAX_SEQ).next_power_of_two().trailing_zeros();
    // v3 keeps the class names its cache entries were written under.
    let form = if form == CoopForward::V3 { String::new() } else { format!(" {}", form.name()) };
    format!(
        "{} d{} b{} {} g{} s2^{len}{form}",
        shape.dtype,
        shape.head_dim,
        layout.block_size(),
        if layout.causal() { "causal" } else { "bidir" },
        layout.num_heads() / layout.num_kv_heads(),
    )
}

/// Plans the coop kernel (see the module docs for the order of choices). Errors name why the kernel
/// cannot run; the caller falls back to the portable kernel.
pub fn plan_coop(
    shape: &Shape,
    layout: &Layout,
    caps: &DeviceCaps,
    target: Option<&mut dyn TuneTarget>,
) -> Result<DispatchPlan> {
    if let Some(why) = coop_unsupported(shape, layout, caps) {
        return Err(Error::Unsupported(why));
    }
    if let Some(t) = &target {
        let (lo, hi) = t.subgroup_sizes();
        if (lo, hi) != (COOP_SUBGROUP_SIZE, COOP_SUBGROUP_SIZE) {
            return Err(Error::Unsupported(format!(
                "the coop kernel needs {COOP_SUBGROUP_SIZE}-wide subgroups, the adapter uses {lo}..{hi}"
            )));
        }
        if !t.subgroup_barriers() {
            return Err(Error::Unsupported("the coop kernel needs subgroup barriers".into()));
        }
    }
    let form = Form { form: CoopForward::from_env()?, max_bytes: caps.max_workgroup_storage };
    let tiles = coop_candidates(shape, layout, caps, form.form);
    // Unset or blank: the planner's (or the autotuner's) choice.
    if let Some(forced) = std::env::var("S2ATTN_TILE").ok().filter(|v| !v.trim().is_empty()) {
        let tile: CoopTile = forced.parse()?;
        if !tiles.contains(&tile) {
            let list: Vec<String> = tiles.iter().map(|t| t.to_string()).collect();
            return Err(Error::Unsupported(format!(
                "S2ATTN_TILE={tile} does not fit; candidates: {}",
                list.join(", ")
            )));
        }
        return Ok(coop_plan(shape, tile, form, "S2ATTN_TILE".into()));
    }
    let fallback = default_tile(&tiles, form.form).ok_or_else(|| Error::Unsupported("no coop tile fits".into()))?;
    let Some(target) = target else {
        return Ok(coop_plan(shape, fallback, form, "default tile, no device to tune on".into()));
    };
    if std::env::var("S2ATTN_AUTOTUNE").is_ok_and(|v| v == "0" || v == "off") {
        return Ok(coop_plan(shape, fallback, form, "default tile, S2ATTN_AUTOTUNE=0".into()));
    }
    Ok(autotune(shape, layout, &tiles, fallback, form, target, TuneCache::dir()))
}

/// Measures every tile (unless the cache in `cache_dir` knows the answer) and keeps the fastest.
fn autotune(
    shape: &Shape,
    layout: &Layout,
    tiles: &[CoopTile],
    fallback: CoopTile,
    form: Form,
    target: &mut dyn TuneTarget,
    cache_dir: Result<PathBuf>,
) -> DispatchPlan {
    let device = target.device_key().replace(['\t', '\n'], " ");
    let class = problem_class(shape, layout, form.form);
    let cache = cache_dir.and_then(|dir| TuneCache::open(dir.join("autotune.txt")));
    if let Some((tile, ms)) = cache.as_ref().ok().and_then(|c| c.lookup(&device, &class)) {
        if tiles.contains(&tile) {
            return coop_plan(shape, tile, form, format!("autotuned for {class}: {ms:.3} ms, cached"));
        }
    }
    let mut times: Vec<Result<f64>> = vec![Ok(f64::INFINITY); tiles.len()];
    for _ in 0..TUNE_ROUNDS {
        for (&tile, time) in tiles.iter().zip(times.iter_mut()) {
            if let Ok(best_ms) = time {
                match target.measure(&coop_plan(shape, tile, form, String::new())) {
                    Ok(ms) => *best_ms = best_ms.min(ms),
                    Err(e) => *time = Err(e),
                }
            }
        }
    }
    let mut best: Option<(CoopTile, f64)> = None;
    let mut tried = Vec::new();
    for (&tile, time) in tiles.iter().zip(&times) {
        match time {
            Ok(ms) if ms.is_finite() => {
                tried.push(format!("{tile} {ms:.3}"));
                if best.is_none_or(|(_, b)| *ms < b) {
                    best = Some((tile, *ms));
                }
            }
            Ok(_) => tried.push(format!("{tile} no time")),
            Err(e) => tried.push(format!("{tile} failed: {e}")),
        }
    }
    let Some((tile, ms)) = best else {
        return coop_plan(shape, fallback, form, format!("default tile, tuning failed ({})", tried.join("; ")));
    };
    let stored = match cache.and_then(|mut c| c.store(&device, &class, tile, ms)) {
        Ok(path) => format!("cached in {}", path.display()),
        Err(e) => format!("not cached: {e}"),
    };
    coop_plan(shape, tile, form, format!("autotuned for {class}: {} ms; {stored}", tried.join(", ")))
}

/// The on-disk tuning cache: `device<TAB>class<TAB>tile<TAB>ms` lines, the last line for a key wins.
struct TuneCache {
    path: PathBuf,
    lines: Vec<String>,
}

impl TuneCache {
    /// The cache directory the environment names.
    fn dir() -> Result<PathBuf> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        var("S2ATTN_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("s2attn")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("s2attn")))
            .ok_or_else(|| Error::Unsupported("no cache directory (set S2ATTN_CACHE_DIR or HOME)".into()))
    }

    fn open(path: PathBuf) -> Result<Self> {
        let lines = match std::fs::read_to_string(&path) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::Unsupported(format!("reading {}: {e}", path.display()))),
        };
        Ok(Self { path, lines })
    }

    fn lookup(&self, device: &str, class: &str) -> Option<(CoopTile, f64)> {
        self.lines.iter().rev().find_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() == 4 && f[0] == device && f[1] == class {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
    }

    fn store(&mut self, device: &str, class: &str, tile: CoopTile, ms: f64) -> Result<PathBuf> {
        let prefix = format!("{device}\t{class}\t");
        self.lines.retain(|l| !l.starts_with(&prefix));
        self.lines.push(format!("{prefix}{tile}\t{ms:.4}"));
        let io = |e: std::io::Error| Error::Unsupported(format!("writing {}: {e}", self.path.display()));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Write a sibling and rename, so that a concurrent reader never sees half a file.
        let tmp = self.path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, self.lines.join("\n") + "\n").map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::S2Config;

    const V3: Form = Form { form: CoopForward::V3, max_bytes: 49152 };

    #[test]
    fn v4_slices_fit_64_key_chunks_at_128_rows() {
        let big = CoopTile { tile_q: 128, tile_kv: 64 };
        // d128: 64 staged keys leave room for 16-key slices with the tight pads only, exactly 48 KiB.
        let sl = coop_slices(CoopForward::V4, big, 128, 49152).expect("128x64 d128 fits");
        assert_eq!(sl, CoopSlices { slice: 16, s_pad: 4, p_pad: 0, split: 1 });
        assert_eq!(sl.workgroup_bytes(big, 128), 49152);
        // d64: 32-key slices with the full pads.
        assert_eq!(
            coop_slices(CoopForward::V4, big, 64, 49152),
            Some(CoopSlices { slice: 32, s_pad: 8, p_pad: 8, split: 1 })
        );
        assert_eq!(coop_slices(CoopForward::V3, big, 128, 49152), None);
        // Where v3's layout fits, v4's is the same.
        for (q, kv) in [(64, 16), (64, 32), (128, 16), (128, 32)] {
            let tile = CoopTile { tile_q: q, tile_kv: kv };
            assert_eq!(coop_slices(CoopForward::V4, tile, 128, 49152), coop_slices(CoopForward::V3, tile, 128, 49152));
        }
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let shape = Shape::new(1, 4096, 128, DType::F16);
        let v4 = coop_candidates(&shape, &layout, &DeviceCaps::h100_vulkan(), CoopForward::V4);
        assert!(v4.contains(&big), "{v4:?}");
        assert_eq!(default_tile(&v4, CoopForward::V4), Some(big));
        let v4_form = Form { form: CoopForward::V4, max_bytes: 49152 };
        let plan = coop_plan(&shape, big, v4_form, "x".into());
        assert_eq!(plan.workgroup_bytes, 49152);
        assert!(plan.reason.starts_with("v4, 16-key slices"), "{}", plan.reason);
        assert_ne!(problem_class(&shape, &layout, CoopForward::V4), problem_class(&shape, &layout, CoopForward::V3));
    }

    #[test]
    fn v5_splits_64x32_tiles_over_subgroup_pairs() {
        let tile = CoopTile { tile_q: 64, tile_kv: 32 };
        // d128: Q staged after P, S's tight pad, exactly 48 KiB; d64 keeps the full pads.
        let sl = coop_slices(CoopForward::V5, tile, 128, 49152).expect("64x32 d128 fits");
        assert_eq!(sl, CoopSlices { slice: 32, s_pad: 4, p_pad: 8, split: 2 });
        assert_eq!(sl.workgroup_bytes(tile, 128), 49152);
        assert_eq!(
            coop_slices(CoopForward::V5, tile, 64, 49152),
            Some(CoopSlices { slice: 32, s_pad: 8, p_pad: 8, split: 2 })
        );
        for other in [(64, 16), (64, 64), (128, 32)] {
            let other = CoopTile { tile_q: other.0, tile_kv: other.1 };
            assert_eq!(coop_slices(CoopForward::V5, other, 128, 49152), None, "{other}");
        }
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let shape = Shape::new(1, 4096, 128, DType::F16);
        let v5 = coop_candidates(&shape, &layout, &DeviceCaps::h100_vulkan(), CoopForward::V5);
        assert_eq!(v5, vec![tile]);
        assert_eq!(default_tile(&v5, CoopForward::V5), Some(tile));
        let plan = coop_plan(&shape, tile, Form { form: CoopForward::V5, max_bytes: 49152 }, String::new());
        assert_eq!((plan.workgroup_size, plan.workgroup_bytes), (256, 49152));
        assert!(plan.reason.starts_with("v5, "), "{}", plan.reason);
        assert_ne!(problem_class(&shape, &layout, CoopForward::V5), problem_class(&shape, &layout, CoopForward::V3));
    }

    #[test]
    fn tiles_parse_and_print() {
        let t: CoopTile = "128x16".parse().expect("parses");
        assert_eq!(t, CoopTile { tile_q: 128, tile_kv: 16 });
        assert_eq!(t.to_string(), "128x16");
        assert!("64".parse::<CoopTile>().is_err());
        assert!("ax32".parse::<CoopTile>().is_err());
    }

    #[test]
    fn candidates_fit_the_device_and_the_block() {
        let caps = DeviceCaps::h100_vulkan();
        for bs in [16, 32, 64, 128] {
            let layout = Layout::s2(S2Config::new(4, bs, 2, 4)).expect("layout");
            for d in [64, 128] {
                let shape = Shape::new(1, 4096, d, DType::F16);
                let tiles = coop_candidates(&shape, &layout, &caps, CoopForward::V3);
                assert!(!tiles.is_empty(), "block {bs} d {d}");
                for t in &tiles {
                    assert!(coop_workgroup_bytes(*t, d) <= caps.max_workgroup_storage);
                    assert_eq!(bs % t.tile_kv, 0);
                }
                // 64-key chunks fit 48 KiB only with 64 rows at head_dim 64.
                assert_eq!(tiles.contains(&CoopTile { tile_q: 64, tile_kv: 64 }), d == 64 && bs >= 64);
                assert!(!tiles.contains(&CoopTile { tile_q: 128, tile_kv: 64 }));
            }
        }
    }

    #[test]
    fn unsupported_shapes_are_refused_with_a_reason() {
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let caps = DeviceCaps::h100_vulkan();
        assert!(coop_unsupported(&Shape::new(1, 256, 128, DType::F16), &layout, &caps).is_none());
        for shape in [Shape::new(1, 256, 96, DType::F16), Shape::new(1, 256, 128, DType::F32)] {
            assert!(plan_coop(&shape, &layout, &caps, None).is_err());
        }
        let no_coop = DeviceCaps { coop_f16_16x16: false, ..caps };
        assert!(coop_unsupported(&Shape::new(1, 256, 128, DType::F16), &layout, &no_coop).is_some());
    }

    /// A device whose timings are made up: 64x16 is fastest.
    struct FakeDevice {
        measured: Vec<CoopTile>,
    }

    impl TuneTarget for FakeDevice {
        fn device_key(&self) -> String {
            "fake\tadapter".into()
        }
        fn subgroup_sizes(&self) -> (u32, u32) {
            (32, 32)
        }
        fn subgroup_barriers(&self) -> bool {
            true
        }
        fn measure(&mut self, plan: &DispatchPlan) -> Result<f64> {
            let tile = CoopTile { tile_q: plan.tile_q, tile_kv: plan.tile_kv };
            self.measured.push(tile);
            Ok(1.0 + (tile.tile_q + tile.tile_kv) as f64 / 100.0
                - if tile == (CoopTile { tile_q: 64, tile_kv: 16 }) { 1.0 } else { 0.0 })
        }
    }

    #[test]
    fn autotune_measures_once_then_reads_the_cache() {
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let shape = Shape::new(1, 4096, 128, DType::F16);
        let tiles = coop_candidates(&shape, &layout, &DeviceCaps::h100_vulkan(), CoopForward::V3);
        let dir = std::env::temp_dir().join(format!("s2attn-tune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut dev = FakeDevice { measured: Vec::new() };
        let first = autotune(&shape, &layout, &tiles, tiles[0], V3, &mut dev, Ok(dir.clone()));
        assert_eq!((first.tile_q, first.tile_kv), (64, 16), "{}", first.reason);
        let expected: Vec<CoopTile> = (0..TUNE_ROUNDS).flat_map(|_| tiles.iter().copied()).collect();
        assert_eq!(dev.measured, expected, "every candidate is measured once per round");
        assert!(first.reason.contains("cached in"), "{}", first.reason);
        let second = autotune(&shape, &layout, &tiles, tiles[0], V3, &mut dev, Ok(dir.clone()));
        assert_eq!((second.tile_q, second.tile_kv), (64, 16));
        assert_eq!(dev.measured.len(), expected.len(), "the second plan reads the cache");
        // Another class is measured anew.
        let other = Shape::new(1, 4096, 64, DType::F16);
        autotune(
            &other,
            &layout,
            &coop_candidates(&other, &layout, &DeviceCaps::h100_vulkan(), CoopForward::V3),
            tiles[0],
            V3,
            &mut dev,
            Ok(dir.clone()),
        );
        assert!(dev.measured.len() > expected.len());
        // An unwritable cache still gives the measured choice, and says why it was not kept.
        let blocked = dir.join("autotune.txt").join("not-a-dir");
        let third =
            autotune(&shape, &layout, &tiles, tiles[0], V3, &mut FakeDevice { measured: Vec::new() }, Ok(blocked));
        assert_eq!((third.tile_q, third.tile_kv), (64, 16));
        assert!(third.reason.contains("not cached"), "{}", third.reason);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn problem_classes_separate_what_changes_the_tile() {
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let a = problem_class(&Shape::new(1, 4000, 128, DType::F16), &layout, CoopForward::V3);
        assert_eq!(a, problem_class(&Shape::new(2, 4096, 128, DType::F16), &layout, CoopForward::V3));
        assert_ne!(a, problem_class(&Shape::new(1, 4096, 64, DType::F16), &layout, CoopForward::V3));
        assert_ne!(a, problem_class(&Shape::new(1, 1024, 128, DType::F16), &layout, CoopForward::V3));
        // Beyond the tuning length every size is one class.
        let long = problem_class(&Shape::new(1, 1 << 17, 128, DType::F16), &layout, CoopForward::V3);
        assert_eq!(long, problem_class(&Shape::new(1, 1 << 16, 128, DType::F16), &layout, CoopForward::V3));
    }
}
