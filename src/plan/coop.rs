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
//! `S2ATTN_TILE` and `S2ATTN_AUTOTUNE` only choose among the candidate tiles of the one kernel form; they
//! are tuning knobs, not form switches.

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

/// Workgroup bytes the coop kernel declares for a tile: K and V rows padded to `head_dim + 8` halves,
/// P rows to `tile_kv + 8` halves, S rows to `tile_kv + 8` floats.
pub fn coop_workgroup_bytes(tile: CoopTile, head_dim: u32) -> u32 {
    let kv = 2 * tile.tile_kv * (head_dim + 8) * 2;
    let p = tile.tile_q * (tile.tile_kv + 8) * 2;
    let s = tile.tile_q * (tile.tile_kv + 8) * 4;
    kv + p + s
}

/// Invocations per workgroup for a tile: one subgroup of [`COOP_SUBGROUP_SIZE`] per 16 query rows.
pub fn coop_workgroup_size(tile: CoopTile) -> u32 {
    tile.tile_q / ROWS_PER_SUBGROUP * COOP_SUBGROUP_SIZE
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
    if coop_candidates(shape, layout, caps).is_empty() {
        return Some(format!("no coop tile fits {} B of workgroup memory", caps.max_workgroup_storage));
    }
    None
}

/// Every tile the device can run for this problem, smallest footprint first.
pub fn coop_candidates(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Vec<CoopTile> {
    let bs = layout.block_size();
    let mut out = Vec::new();
    for tile_q in TILE_Q {
        for tile_kv in TILE_KV {
            let tile = CoopTile { tile_q, tile_kv };
            // Each invocation fetches the same whole number of K/V vec4s per chunk, at most MAX_PF (8).
            let fetches = tile_kv * shape.head_dim / 4;
            let wg = coop_workgroup_size(tile);
            if bs % tile_kv != 0
                || fetches % wg != 0
                || fetches / wg > 8
                || tile_q / bs > 31
                || coop_workgroup_bytes(tile, shape.head_dim) > caps.max_workgroup_storage
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
/// the H100 at 16k..128k tokens (see shaders/NOTES-coop.md); else 64x16, else the first candidate.
fn default_tile(tiles: &[CoopTile]) -> Option<CoopTile> {
    let pick = |q: u32, kv: u32| tiles.iter().copied().find(|t| t.tile_q == q && t.tile_kv == kv);
    pick(128, 32).or_else(|| pick(64, 16)).or_else(|| tiles.first().copied())
}

/// Measurement rounds: candidates are timed round-robin and each keeps its best round, so that a clock
/// or cache transient early in the sweep does not decide the choice.
const TUNE_ROUNDS: usize = 2;

/// The plan for one tile (a candidate).
fn coop_plan(shape: &Shape, tile: CoopTile, reason: String) -> DispatchPlan {
    DispatchPlan {
        variant: KernelVariant::Coop,
        tile_q: tile.tile_q,
        tile_kv: tile.tile_kv,
        workgroup_size: coop_workgroup_size(tile),
        workgroup_bytes: coop_workgroup_bytes(tile, shape.head_dim),
        reason,
    }
}

/// The tag every problem class of this kernel carries in the tuning cache, so that entries measured with
/// another kernel build (written without it) are measured anew.
const CLASS_TAG: &str = " v7";

/// The problem class a tuned tile is remembered for: what changes the best tile (head dim, block size,
/// direction, GQA group, length bucket up to the tuning length).
pub fn problem_class(shape: &Shape, layout: &Layout) -> String {
    let len = shape.seq_len.min(TUNE_MAX_SEQ).next_power_of_two().trailing_zeros();
    format!(
        "{} d{} b{} {} g{} s2^{len}{CLASS_TAG}",
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
    let tiles = coop_candidates(shape, layout, caps);
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
        return Ok(coop_plan(shape, tile, "S2ATTN_TILE".into()));
    }
    let fallback = default_tile(&tiles).ok_or_else(|| Error::Unsupported("no coop tile fits".into()))?;
    let Some(target) = target else {
        return Ok(coop_plan(shape, fallback, "default tile, no device to tune on".into()));
    };
    if std::env::var("S2ATTN_AUTOTUNE").is_ok_and(|v| v == "0" || v == "off") {
        return Ok(coop_plan(shape, fallback, "default tile, S2ATTN_AUTOTUNE=0".into()));
    }
    Ok(autotune(shape, layout, &tiles, fallback, target, TuneCache::dir()))
}

/// Measures every tile (unless the cache in `cache_dir` knows the answer) and keeps the fastest.
fn autotune(
    shape: &Shape,
    layout: &Layout,
    tiles: &[CoopTile],
    fallback: CoopTile,
    target: &mut dyn TuneTarget,
    cache_dir: Result<PathBuf>,
) -> DispatchPlan {
    let device = target.device_key().replace(['\t', '\n'], " ");
    let class = problem_class(shape, layout);
    let cache = cache_dir.and_then(|dir| TuneCache::open(dir.join("autotune.txt")));
    if let Some((tile, ms)) = cache.as_ref().ok().and_then(|c| c.lookup(&device, &class)) {
        if tiles.contains(&tile) {
            return coop_plan(shape, tile, format!("autotuned for {class}: {ms:.3} ms, cached"));
        }
    }
    let mut times: Vec<Result<f64>> = vec![Ok(f64::INFINITY); tiles.len()];
    for _ in 0..TUNE_ROUNDS {
        for (&tile, time) in tiles.iter().zip(times.iter_mut()) {
            if let Ok(best_ms) = time {
                match target.measure(&coop_plan(shape, tile, String::new())) {
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
        return coop_plan(shape, fallback, format!("default tile, tuning failed ({})", tried.join("; ")));
    };
    let stored = match cache.and_then(|mut c| c.store(&device, &class, tile, ms)) {
        Ok(path) => format!("cached in {}", path.display()),
        Err(e) => format!("not cached: {e}"),
    };
    coop_plan(shape, tile, format!("autotuned for {class}: {} ms; {stored}", tried.join(", ")))
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
                let tiles = coop_candidates(&shape, &layout, &caps);
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
        let tiles = coop_candidates(&shape, &layout, &DeviceCaps::h100_vulkan());
        let dir = std::env::temp_dir().join(format!("s2attn-tune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut dev = FakeDevice { measured: Vec::new() };
        let first = autotune(&shape, &layout, &tiles, tiles[0], &mut dev, Ok(dir.clone()));
        assert_eq!((first.tile_q, first.tile_kv), (64, 16), "{}", first.reason);
        let expected: Vec<CoopTile> = (0..TUNE_ROUNDS).flat_map(|_| tiles.iter().copied()).collect();
        assert_eq!(dev.measured, expected, "every candidate is measured once per round");
        assert!(first.reason.contains("cached in"), "{}", first.reason);
        let second = autotune(&shape, &layout, &tiles, tiles[0], &mut dev, Ok(dir.clone()));
        assert_eq!((second.tile_q, second.tile_kv), (64, 16));
        assert_eq!(dev.measured.len(), expected.len(), "the second plan reads the cache");
        // Another class is measured anew.
        let other = Shape::new(1, 4096, 64, DType::F16);
        autotune(
            &other,
            &layout,
            &coop_candidates(&other, &layout, &DeviceCaps::h100_vulkan()),
            tiles[0],
            &mut dev,
            Ok(dir.clone()),
        );
        assert!(dev.measured.len() > expected.len());
        // An unwritable cache still gives the measured choice, and says why it was not kept.
        let blocked = dir.join("autotune.txt").join("not-a-dir");
        let third = autotune(&shape, &layout, &tiles, tiles[0], &mut FakeDevice { measured: Vec::new() }, Ok(blocked));
        assert_eq!((third.tile_q, third.tile_kv), (64, 16));
        assert!(third.reason.contains("not cached"), "{}", third.reason);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn problem_classes_separate_what_changes_the_tile() {
        let layout = Layout::s2(S2Config::new(4, 64, 2, 4)).expect("layout");
        let a = problem_class(&Shape::new(1, 4000, 128, DType::F16), &layout);
        assert_eq!(a, problem_class(&Shape::new(2, 4096, 128, DType::F16), &layout));
        assert_ne!(a, problem_class(&Shape::new(1, 4096, 64, DType::F16), &layout));
        assert_ne!(a, problem_class(&Shape::new(1, 1024, 128, DType::F16), &layout));
        // Beyond the tuning length every size is one class.
        let long = problem_class(&Shape::new(1, 1 << 17, 128, DType::F16), &layout);
        assert_eq!(long, problem_class(&Shape::new(1, 1 << 16, 128, DType::F16), &layout));
    }
}
