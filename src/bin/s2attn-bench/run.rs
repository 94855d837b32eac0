//! Measuring for `s2attn-bench`: opening every device the command line asks for, fresh random inputs,
//! timing the sparse op and the dense op of the same shape with `Attention::time_forward`, and checking each
//! configuration against the f64 oracle at a small sequence length.

use crate::grid::{Args, Precision, Problem};
use crate::report::{self, Row};
use s2attn::cpu::{attention_reference, rel_l2_error, Reference};
use s2attn::gpu::WgpuContext;
use s2attn::{Attention, Backend, Context, ContextOptions, Element, Layout, Shape, Timing};
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

/// Relative error the oracle check must stay under for a storage type (f16/bf16 outputs are rounded).
pub fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-4,
        Precision::F16 => 2e-3,
        Precision::Bf16 => 1.6e-2,
    }
}

/// Element types the benchmark generates.
trait Sample: Element + Send {
    /// Rounds an f32 to this type.
    fn quantize(x: f32) -> Self;
}
impl Sample for f32 {
    fn quantize(x: f32) -> Self {
        x
    }
}
impl Sample for half::f16 {
    fn quantize(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}
impl Sample for half::bf16 {
    fn quantize(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// `n` values uniform in [-1, 1) from a xorshift stream, filled on every core (large tensors are GBs).
fn random<T: Sample>(n: usize, seed: u64) -> Vec<T> {
    let mut out = vec![T::quantize(0.0); n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(16);
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut x = (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(i as u64 * 2 + 1) | 1;
                for v in part {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *v = T::quantize((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0);
                }
            });
        }
    });
    out
}

/// Q, K, V in the problem's storage type.
enum Inputs {
    F32([Vec<f32>; 3]),
    F16([Vec<half::f16>; 3]),
    Bf16([Vec<half::bf16>; 3]),
}

impl Inputs {
    fn new(dtype: Precision, nq: usize, nkv: usize, seed: u64) -> Self {
        fn three<T: Sample>(nq: usize, nkv: usize, seed: u64) -> [Vec<T>; 3] {
            [random(nq, seed), random(nkv, seed.wrapping_add(1)), random(nkv, seed.wrapping_add(2))]
        }
        match dtype {
            Precision::F32 => Inputs::F32(three(nq, nkv, seed)),
            Precision::F16 => Inputs::F16(three(nq, nkv, seed)),
            Precision::Bf16 => Inputs::Bf16(three(nq, nkv, seed)),
        }
    }
    fn time(&self, op: &Attention, warmup: u32, iters: u32) -> s2attn::Result<Timing> {
        match self {
            Inputs::F32([q, k, v]) => op.time_forward(q, k, v, warmup, iters),
            Inputs::F16([q, k, v]) => op.time_forward(q, k, v, warmup, iters),
            Inputs::Bf16([q, k, v]) => op.time_forward(q, k, v, warmup, iters),
        }
    }
    /// Runs the op and returns (out, lse) widened to f64.
    fn forward(&self, op: &Attention) -> s2attn::Result<(Vec<f64>, Vec<f64>)> {
        fn widen<T: Element>(o: s2attn::Output<T>) -> (Vec<f64>, Vec<f64>) {
            (o.out.into_iter().map(|x| x.to_f32() as f64).collect(), o.lse.into_iter().map(|x| x as f64).collect())
        }
        Ok(match self {
            Inputs::F32([q, k, v]) => widen(op.forward(q, k, v)?),
            Inputs::F16([q, k, v]) => widen(op.forward(q, k, v)?),
            Inputs::Bf16([q, k, v]) => widen(op.forward(q, k, v)?),
        })
    }
    /// The same values as f32, for the oracle.
    fn to_f32(&self) -> [Vec<f32>; 3] {
        fn w<T: Element>(x: &[Vec<T>; 3]) -> [Vec<f32>; 3] {
            [0, 1, 2].map(|i| x[i].iter().map(|v| v.to_f32()).collect())
        }
        match self {
            Inputs::F32(x) => x.clone(),
            Inputs::F16(x) => w(x),
            Inputs::Bf16(x) => w(x),
        }
    }
}

/// The oracle's answer for one checked configuration, with the inputs it was computed from.
struct Oracle {
    inputs: Inputs,
    reference: Reference,
}

/// A sparse or dense configuration, as far as the oracle check is concerned.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct CheckKey {
    dense: bool,
    problem: Problem,
}

/// A finished measurement (before it becomes a row).
#[derive(Clone)]
struct Measured {
    variant: &'static str,
    timing: Timing,
    check: Option<(f64, u32)>,
}

/// What Q/K/V depend on: (batch, seq, heads, kv_heads, head_dim, dtype).
type InputKey = (u32, u32, u32, u32, u32, Precision);

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
    inputs: Option<(InputKey, Inputs)>,
    oracles: HashMap<CheckKey, Arc<Oracle>>,
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
        let variant = m.as_ref().map_or("unplanned", |m| m.variant);
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

    fn inputs(&mut self, p: &Problem) -> &Inputs {
        let key = (p.batch, p.seq, p.heads, p.kv_heads, p.head_dim, p.dtype);
        if self.inputs.as_ref().is_none_or(|(k, _)| *k != key) {
            self.inputs = None; // free the previous set first: at 128k they are GBs
            self.seed = self.seed.wrapping_add(0x1000);
            let tokens = p.batch as usize * p.seq as usize;
            let nq = tokens * p.heads as usize * p.head_dim as usize;
            let nkv = tokens * p.kv_heads as usize * p.head_dim as usize;
            self.inputs = Some((key, Inputs::new(p.dtype, nq, nkv, self.seed)));
        }
        match &self.inputs {
            Some((_, i)) => i,
            None => unreachable!("inputs were just generated"),
        }
    }

    /// Error against the oracle of `p`'s layout at `min(seq, --check-seq)` tokens, batch 1.
    fn check(&mut self, ti: usize, t: &Target, p: &Problem, dense: bool) -> Option<Result<(f64, u32), String>> {
        let cs = p.seq.min(self.args.check_seq);
        if cs == 0 {
            return None;
        }
        let small = Problem { batch: 1, seq: cs, ..*p };
        let key = CheckKey { dense, problem: small };
        if let Some(r) = self.checks.get(&(ti, key)) {
            return Some(r.clone());
        }
        let result = guarded(|| {
            let layout = Self::layout(&small, dense).map_err(|e| e.to_string())?;
            let op = Attention::new(&t.ctx, &layout, Shape::new(1, cs, p.head_dim, p.dtype.dtype()))
                .map_err(|e| e.to_string())?;
            let oracle = match self.oracles.get(&key) {
                Some(o) => o.clone(),
                None => {
                    let nq = (cs * p.heads * p.head_dim) as usize;
                    let nkv = (cs * p.kv_heads * p.head_dim) as usize;
                    self.seed = self.seed.wrapping_add(0x1000);
                    let inputs = Inputs::new(p.dtype, nq, nkv, self.seed);
                    let [q, k, v] = inputs.to_f32();
                    let scale = 1.0 / (p.head_dim as f64).sqrt();
                    let reference = attention_reference(&layout, 1, cs, p.head_dim, scale, &q, &k, &v);
                    let o = Arc::new(Oracle { inputs, reference });
                    self.oracles.insert(key, o.clone());
                    o
                }
            };
            let (out, lse) = oracle.inputs.forward(&op).map_err(|e| e.to_string())?;
            let e_out = rel_l2_error(out, &oracle.reference.out);
            let e_lse = rel_l2_error(lse, &oracle.reference.lse);
            Ok((e_out.max(e_lse), cs))
        });
        self.checks.insert((ti, key), result.clone());
        Some(result)
    }

    fn measure(&mut self, ti: usize, t: &Target, p: &Problem, dense: bool) -> Result<Measured, String> {
        let (warmup, iters) = (self.args.warmup, self.args.iters);
        let layout = Self::layout(p, dense).map_err(|e| e.to_string())?;
        let shape = Shape::new(p.batch, p.seq, p.head_dim, p.dtype.dtype());
        let op = Attention::new(&t.ctx, &layout, shape).map_err(|e| e.to_string())?;
        if self.args.verbose {
            eprintln!("  plan {}: {}", if dense { "dense" } else { "sparse" }, op.explain());
        }
        let variant = op.plan().variant.name();
        let timing = guarded(|| self.inputs(p).time(&op, warmup, iters).map_err(|e| e.to_string()))?;
        let check = match self.check(ti, t, p, dense) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => return Err(format!("oracle check: {e}")),
        };
        Ok(Measured { variant, timing, check })
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
