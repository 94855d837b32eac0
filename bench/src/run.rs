//! Measuring for `s2attn-bench`: opening every device the command line asks for, then per grid point the
//! sparse op and the dense op of the same shape, in the point's mode: the forward (`fwd`), the forward plus
//! the backward (`fwd+bwd`, see [`crate::timer`]) or decode (see [`crate::decode`]), on fresh random input
//! sets rotated while they fit in cache (see [`data::set_count`]), and each configuration checked against
//! the f64 oracle at a small size (see [`crate::check`]).

use crate::check::{DecodeOracle, Dims, PassOracle};
use crate::data::{self, Sample, Set};
use crate::grid::{Args, Mode, Precision, Problem};
use crate::report::{self, Row};
use crate::timer::Timed;
use s2attn::gpu::WgpuContext;
use s2attn::{Attention, AttentionGrad, Backend, Context, ContextOptions, Layout, Shape, Timing};
use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// A device to measure on.
pub struct Target {
    /// The open device.
    pub ctx: Context,
    /// `vulkan`, `gl`, `metal`, `dx12`, `cuda`.
    pub backend: String,
    /// Adapter or device name.
    pub adapter: String,
    /// A CPU rasteriser (lavapipe, llvmpipe, WARP).
    pub software: bool,
}

fn wants(args: &Args, backend: &str) -> bool {
    match &args.backends {
        None => true,
        Some(list) => list.iter().any(|b| b == backend || (b == "wgpu" && backend != "cuda")),
    }
}

fn name_matches(args: &Args, name: &str) -> bool {
    args.adapter.as_ref().is_none_or(|a| name.to_lowercase().contains(&a.to_lowercase()))
}

/// Opens the devices the command line names (all of them by default). Devices that fail to open, and
/// backends that were asked for and are absent, become notes. Without `--adapter`, software adapters are
/// left out when a hardware device is present (a paper grid on lavapipe would take days).
pub fn open_targets(args: &Args, notes: &mut Vec<String>) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::new();
    let mut push = |ctx: Context, notes: &mut Vec<String>| {
        let (backend, adapter) = (ctx.backend_name().to_string(), ctx.adapter_name().to_string());
        if !name_matches(args, &adapter) {
            notes.push(format!("{adapter} ({backend}) skipped: its name does not contain {:?}", args.adapter));
        } else if !targets.iter().any(|t| t.backend == backend && t.adapter == adapter) {
            let software = ctx.capabilities().is_some_and(|c| c.info.device_type == wgpu::DeviceType::Cpu);
            targets.push(Target { ctx, backend, adapter, software });
        }
    };
    let explicit = |b: &str| args.backends.as_ref().is_some_and(|l| l.iter().any(|x| x == b));
    if explicit("auto") {
        match Context::new() {
            Ok(ctx) => push(ctx, notes),
            Err(e) => notes.push(format!("auto: {e}")),
        }
    }
    let adapters = WgpuContext::adapters();
    for a in &adapters {
        if !wants(args, &a.backend) || !name_matches(args, &a.name) {
            continue;
        }
        match Context::with_options(&ContextOptions::wgpu(Some(&a.backend), Some(&a.name))) {
            Ok(ctx) => push(ctx, notes),
            Err(e) => notes.push(format!("{} ({}): {e}", a.name, a.backend)),
        }
    }
    for api in ["vulkan", "gl", "metal", "dx12"] {
        if explicit(api) && !adapters.iter().any(|a| a.backend == api) {
            notes.push(format!("{api}: no adapter on this machine"));
        }
    }
    if explicit("cuda") || (args.backends.is_none() && cfg!(feature = "cuda")) {
        let opts = ContextOptions { backend: Backend::Cuda, ..ContextOptions::default() };
        match Context::with_options(&opts) {
            Ok(ctx) => push(ctx, notes),
            Err(e) => notes.push(format!("cuda: {e}")),
        }
    }
    if args.adapter.is_none() && targets.iter().any(|t| !t.software) {
        for t in targets.iter().filter(|t| t.software) {
            notes.push(format!(
                "{} ({}) skipped: software adapter beside a GPU (name it with --adapter to include it)",
                t.adapter, t.backend
            ));
        }
        targets.retain(|t| !t.software);
    }
    targets
}

/// Relative error the oracle check must stay under for a storage type (f16/bf16 outputs are rounded; the
/// gradients of `fwd+bwd` are held to the same bounds, as in the library's tests).
pub fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-4,
        Precision::F16 => 2e-3,
        Precision::Bf16 => 1.6e-2,
    }
}

/// How a row's error begins when the backend lacks what the mode needs (the library's
/// `Error::Unsupported`): such rows are notes, not failures.
pub const UNSUPPORTED: &str = "unsupported: ";

/// A sparse or dense configuration, as far as the oracle check is concerned.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct CheckKey {
    dense: bool,
    problem: Problem,
}

/// A finished measurement (before it becomes a row).
#[derive(Clone)]
struct Measured {
    variant: String,
    timing: Timing,
    check: Option<(f64, u32)>,
    sets: u32,
    kv_bytes: Option<(u64, u64)>,
    split_ms: Option<(f64, f64)>,
}

/// What the cached host inputs depend on: (tensors per set, batch, seq, heads, kv_heads, head_dim, dtype,
/// sets).
type InputKey = (usize, u32, u32, u32, u32, u32, Precision, usize);

/// Shared, type-erased data (typed host inputs, oracles), downcast by element type.
type Shared = Arc<dyn Any + Send + Sync>;

/// The row fields a grid point fixes.
fn problem_row(p: &Problem) -> Row {
    Row {
        mode: p.mode.name().into(),
        batch: p.batch,
        seq: p.seq,
        heads: p.heads,
        kv_heads: p.kv_heads,
        head_dim: p.head_dim,
        block: p.block,
        local: p.local,
        vert_stride: p.vert_stride,
        offset: 0,
        dtype: p.dtype.name().into(),
        causal: p.causal,
        ..Row::default()
    }
}

/// Walks the grid on each target, caching inputs, oracle answers, checks and dense timings.
pub struct Runner<'a> {
    args: &'a Args,
    seed: u64,
    inputs: Option<(InputKey, Shared)>,
    oracles: HashMap<CheckKey, Shared>,
    checks: HashMap<(usize, CheckKey), Result<(f64, u32), String>>,
    /// Dense timings per (target, problem with the sparsity fields zeroed).
    dense: HashMap<(usize, Problem), Result<Measured, String>>,
    /// Sequence lengths whose dense run was skipped (`--dense-max-seq`).
    pub dense_skipped: std::collections::BTreeSet<u32>,
    /// Checks above [`tolerance`].
    pub over_tolerance: Vec<String>,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Runs `f`, turning library errors and panics (wgpu reports some device errors by panicking) into
/// messages.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(p))))
}

fn msg(e: s2attn::Error) -> String {
    e.to_string()
}

/// Times the forward on a CUDA op, rotating through `sets` (`time_forward` with one set).
#[cfg(feature = "cuda")]
fn time_cuda<T: Sample>(
    t: &Target,
    op: &Attention,
    sets: &[Set<T>],
    lse: u64,
    runs: (u32, u32),
) -> Result<Timing, String> {
    if let [s] = sets {
        return op.time_forward(&s[0], &s[1], &s[2], runs.0, runs.1).map_err(msg);
    }
    crate::timer::time_cuda(&t.ctx, op, sets, lse, runs)
}

#[cfg(not(feature = "cuda"))]
fn time_cuda<T: Sample>(t: &Target, _: &Attention, _: &[Set<T>], _: u64, _: (u32, u32)) -> Result<Timing, String> {
    Err(format!("{} is not a wgpu device and this build has no CUDA", t.adapter))
}

impl<'a> Runner<'a> {
    /// A runner for `args`.
    pub fn new(args: &'a Args) -> Self {
        Self {
            args,
            seed: 0x5eed_2407_1767_8000,
            inputs: None,
            oracles: HashMap::new(),
            checks: HashMap::new(),
            dense: HashMap::new(),
            dense_skipped: Default::default(),
            over_tolerance: Vec::new(),
        }
    }

    fn next_seed(&mut self) -> u64 {
        self.seed = self.seed.wrapping_add(0x1000_0000);
        self.seed
    }

    /// The row fields every measurement of `p` on `t` shares.
    fn base(p: &Problem, t: &Target, implementation: String) -> Row {
        Row {
            implementation,
            device: t.adapter.clone(),
            adapter: Some(t.adapter.clone()),
            backend: Some(t.backend.clone()),
            ..problem_row(p)
        }
    }

    fn row(&mut self, p: &Problem, t: &Target, dense: bool, m: Result<Measured, String>) -> Row {
        let prefix = if dense { "s2attn-dense" } else { "s2attn" };
        let variant = m.as_ref().map_or("unplanned", |m| m.variant.as_str());
        let mut r = Self::base(p, t, format!("{prefix}/{}/{variant}", t.backend));
        let layout = report::row_layout(&r, dense);
        match (m, layout) {
            (Err(e), _) => r.error = Some(e),
            (_, Err(e)) => r.error = Some(e.to_string()),
            (Ok(m), Ok(layout)) => {
                let w = report::work(&layout, &r);
                r.ms = Some(m.timing.median_ms());
                r.min_ms = Some(m.timing.min_ms());
                r.max_ms = Some(m.timing.max_ms());
                r.density = Some(w.density);
                r.timer = Some(if m.timing.gpu_timestamps { "gpu" } else { "wall" }.into());
                r.iters = Some(m.timing.samples_ms.len() as u32);
                r.input_sets = Some(m.sets);
                r.kv_bytes = m.kv_bytes.map(|k| k.0);
                r.kv_dense_bytes = m.kv_bytes.map(|k| k.1);
                r.fwd_ms = m.split_ms.map(|s| s.0);
                r.bwd_ms = m.split_ms.map(|s| s.1);
                report::set_rates(&mut r, &w);
                if let Some((err, cs)) = m.check {
                    r.max_rel_err = Some(err);
                    r.check_seq = Some(cs);
                    // NaN counts as over tolerance.
                    if err.is_nan() || err > tolerance(p.dtype) {
                        self.over_tolerance.push(format!(
                            "{} {} on {}: error {err:.2e} at seq {cs} exceeds {:.0e}",
                            r.implementation,
                            p,
                            t.adapter,
                            tolerance(p.dtype)
                        ));
                    }
                }
            }
        }
        r
    }

    fn layout(p: &Problem, dense: bool) -> s2attn::Result<Layout> {
        report::row_layout(&problem_row(p), dense)
    }

    /// `n` host input sets for `p`: `[q, k, v]`, plus `d_out` for `fwd+bwd`. The last sets generated are
    /// kept for the next grid point of the same shape (the dense run, other sparsity settings).
    fn host_sets<T: Sample>(&mut self, p: &Problem, n: usize) -> Arc<Vec<Set<T>>> {
        let tokens = p.batch as usize * p.seq as usize;
        let nq = tokens * p.heads as usize * p.head_dim as usize;
        let nkv = tokens * p.kv_heads as usize * p.head_dim as usize;
        let lens: &[usize] = if p.mode == Mode::FwdBwd { &[nq, nkv, nkv, nq] } else { &[nq, nkv, nkv] };
        let key = (lens.len(), p.batch, p.seq, p.heads, p.kv_heads, p.head_dim, p.dtype, n);
        if let Some((k, shared)) = &self.inputs {
            if *k == key {
                if let Ok(sets) = shared.clone().downcast::<Vec<Set<T>>>() {
                    return sets;
                }
            }
        }
        self.inputs = None; // free the previous sets first: at 128k they are GBs
        let sets = Arc::new(data::sets::<T>(n, lens, self.next_seed()));
        self.inputs = Some((key, sets.clone()));
        sets
    }

    /// The oracle cached under `key`, built by `build` on first use.
    fn oracle<O: Send + Sync + 'static>(
        &mut self,
        key: CheckKey,
        build: impl FnOnce(u64) -> Result<O, String>,
    ) -> Result<Arc<O>, String> {
        if let Some(o) = self.oracles.get(&key).and_then(|o| o.clone().downcast::<O>().ok()) {
            return Ok(o);
        }
        let o = Arc::new(build(self.next_seed())?);
        self.oracles.insert(key, o.clone());
        Ok(o)
    }

    /// Error against the oracle of `p`'s layout at `min(seq, --check-seq)` tokens: batch 1, or for decode
    /// up to two sequences.
    fn check<T: Sample>(
        &mut self,
        ti: usize,
        t: &Target,
        p: &Problem,
        dense: bool,
    ) -> Option<Result<(f64, u32), String>> {
        let cs = p.seq.min(self.args.check_seq);
        if cs == 0 {
            return None;
        }
        let batch = if p.mode == Mode::Decode { p.batch.min(2) } else { 1 };
        let small = Problem { batch, seq: cs, ..*p };
        let key = CheckKey { dense, problem: small };
        if let Some(r) = self.checks.get(&(ti, key)) {
            return Some(r.clone());
        }
        let dims = Dims { batch, seq: cs, head_dim: p.head_dim, dtype: p.dtype.dtype() };
        let result = guarded(|| {
            let layout = Self::layout(&small, dense).map_err(msg)?;
            let err = match p.mode {
                Mode::Fwd | Mode::FwdBwd => {
                    let backward = p.mode == Mode::FwdBwd;
                    let o = self.oracle(key, |seed| Ok(PassOracle::<T>::new(&layout, &dims, backward, seed)))?;
                    o.error(&t.ctx, &layout, &dims)?
                }
                Mode::Decode => {
                    let o = self.oracle(key, |seed| DecodeOracle::<T>::new(&layout, &dims, seed))?;
                    o.error(&t.ctx, &layout, &dims)?
                }
            };
            Ok((err, cs))
        });
        self.checks.insert((ti, key), result.clone());
        Some(result)
    }

    /// Times the forward, or the forward then the backward, of `p` under `layout` on `t`, over `n` input
    /// sets. Returns the implementation's variant name (`<forward>+<backward>` for `fwd+bwd`).
    fn time_pass<T: Sample>(
        &mut self,
        t: &Target,
        p: &Problem,
        layout: &Layout,
        n: usize,
    ) -> Result<(String, Timed), String> {
        let shape = Shape::new(p.batch, p.seq, p.head_dim, p.dtype.dtype());
        let op = Attention::new(&t.ctx, layout, shape).map_err(msg)?;
        let grad = match p.mode {
            Mode::FwdBwd => Some(AttentionGrad::new(&t.ctx, layout, shape).map_err(msg)?),
            _ => None,
        };
        let fwd = op.plan().variant.name();
        let variant = match &grad {
            Some(g) => format!("{fwd}+{}", g.plan().dq.variant.name()),
            None => fwd.to_string(),
        };
        if self.args.verbose {
            eprintln!("  plan: {}", op.explain());
            if let Some(g) = &grad {
                eprintln!("  plan: {}", g.explain());
            }
        }
        let sets = self.host_sets::<T>(p, n);
        let lse = p.batch as u64 * p.heads as u64 * p.seq as u64;
        let runs = (self.args.warmup, self.args.iters);
        let timing = guarded(|| match t.ctx.wgpu() {
            Some(ctx) => {
                let warm_s = f64::from(self.args.warmup_ms) / 1e3;
                crate::timer::time_wgpu(ctx, &op, grad.as_ref(), &sets, lse, runs, self.args.budget_s, warm_s)
            }
            None => {
                let fwd = time_cuda(t, &op, &sets, lse, runs)?;
                match &grad {
                    None => Ok(Timed { timing: fwd, split_ms: None }),
                    Some(g) => {
                        // The backward of a CUDA op, on the first input set with its own forward's O and LSE.
                        let s = &sets[0];
                        let out = op.forward(&s[0], &s[1], &s[2]).map_err(msg)?;
                        let bwd = g.time_backward(&s[0], &s[1], &s[2], &out.out, &out.lse, &s[3], runs).map_err(msg)?;
                        let samples_ms = fwd.samples_ms.iter().zip(&bwd.samples_ms).map(|(f, b)| f + b).collect();
                        let split_ms = Some((fwd.median_ms(), bwd.median_ms()));
                        Ok(Timed { timing: Timing { samples_ms, gpu_timestamps: fwd.gpu_timestamps }, split_ms })
                    }
                }
            }
        })?;
        Ok((variant, timing))
    }

    fn measure_typed<T: Sample>(
        &mut self,
        ti: usize,
        t: &Target,
        p: &Problem,
        dense: bool,
    ) -> Result<Measured, String> {
        let layout = Self::layout(p, dense).map_err(msg)?;
        let w = report::work(&layout, &problem_row(p));
        let runs = (self.args.warmup, self.args.iters);
        let sets = data::set_count(w.footprint as u64, self.args.rotate_bytes, runs.0 + runs.1);
        let (variant, Timed { timing, split_ms }, kv_bytes) = match p.mode {
            Mode::Fwd | Mode::FwdBwd => {
                let (variant, timed) = self.time_pass::<T>(t, p, &layout, sets)?;
                (variant, timed, None)
            }
            Mode::Decode => {
                let seed = self.next_seed();
                let d = guarded(|| crate::decode::time::<T>(&t.ctx, &layout, p, sets, runs, seed))?;
                if self.args.verbose {
                    eprintln!("  plan: {}", d.explain);
                }
                // Decode exposes no kernel variant: its WGSL kernels are the portable ones, on CUDA s2_decode.cu.
                let variant = if t.ctx.wgpu().is_some() { "portable" } else { "decode" };
                (variant.to_string(), Timed { timing: d.timing, split_ms: None }, Some(d.kv_bytes))
            }
        };
        let check = match self.check::<T>(ti, t, p, dense) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => return Err(format!("oracle check: {e}")),
        };
        Ok(Measured { variant, timing, check, sets: sets as u32, kv_bytes, split_ms })
    }

    fn measure(&mut self, ti: usize, t: &Target, p: &Problem, dense: bool) -> Result<Measured, String> {
        match p.dtype {
            Precision::F32 => self.measure_typed::<f32>(ti, t, p, dense),
            Precision::F16 => self.measure_typed::<half::f16>(ti, t, p, dense),
            Precision::Bf16 => self.measure_typed::<half::bf16>(ti, t, p, dense),
        }
    }

    /// Measures `p` on target `ti`: the sparse row, then the dense row of the same shape (timed once per
    /// shape and reused across sparsity settings), unless dense is off or beyond `--dense-max-seq`.
    pub fn run(&mut self, ti: usize, t: &Target, p: &Problem) -> Vec<Row> {
        let sparse = guarded(|| self.measure(ti, t, p, false));
        let mut rows = vec![self.row(p, t, false, sparse)];
        if !self.args.dense {
            return rows;
        }
        if self.args.dense_max_seq.is_some_and(|m| p.seq > m) {
            self.dense_skipped.insert(p.seq);
            return rows;
        }
        let key = (ti, Problem { local: 0, vert_stride: 0, ..*p });
        let dense = match self.dense.get(&key) {
            Some(m) => m.clone(),
            None => {
                let m = guarded(|| self.measure(ti, t, p, true));
                self.dense.insert(key, m.clone());
                m
            }
        };
        rows.push(self.row(p, t, true, dense));
        rows
    }
}
