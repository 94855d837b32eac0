//! `MultiDevice`: one attention call planned across several devices (adapters and backends, of any vendor)
//! in one process.
//!
//! Heads are independent in attention, and S2's sharding keeps each KV head's work separate, so the call is
//! split by whole KV groups: each device gets a contiguous range of KV heads (with their query heads) sized
//! in proportion to its measured speed on this problem class, all devices run concurrently, and the outputs
//! are gathered into the caller's `[batch, seq, heads, head_dim]` layout. Speeds are measured once per
//! problem class and cached (or set by the caller). A device that fails makes the whole call fail with an
//! error naming it; [`MultiDevice::without`] re-plans on the others.

use crate::attention::{Attention, Element, Output};
use crate::context::{Context, ContextOptions};
use crate::error::{Error, Result};
use crate::gpu::WgpuContext;
use crate::layout::Layout;
use crate::plan::{DType, Shape};
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the speed of a device is measured for: kernels of the same class run at similar rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ProblemClass {
    head_dim: u32,
    dtype: DType,
    block_size: u32,
    group: u32,
}

impl ProblemClass {
    fn of(layout: &Layout, shape: &Shape) -> Self {
        Self {
            head_dim: shape.head_dim,
            dtype: shape.dtype,
            block_size: layout.block_size(),
            group: layout.num_heads() / layout.num_kv_heads(),
        }
    }
}

struct Member {
    ctx: Context,
    name: String,
    fail: AtomicBool,
}

/// Several devices that run one attention call together.
///
/// Build it from contexts opened once and kept: sets share their members' devices (`Context` is `Clone`), and
/// opening and dropping many devices on one GPU from parallel threads deadlocked NVIDIA's 580 Linux driver in
/// testing (tests/multi.rs opens its two devices once for all its tests).
pub struct MultiDevice {
    members: Vec<Arc<Member>>,
    /// Query-key pairs per millisecond, per device, per problem class.
    speeds: Mutex<HashMap<ProblemClass, Vec<f64>>>,
    skipped: Vec<String>,
}

impl fmt::Debug for MultiDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.members.iter().map(|m| &m.name)).finish()
    }
}

/// One device's share of a call.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// Index of the device in the set.
    pub device: usize,
    /// Its adapter name and backend.
    pub device_name: String,
    /// The KV heads it computes (with their query heads).
    pub kv_heads: Range<u32>,
    /// The query rows it computes (all of them in a split by heads).
    pub rows: Range<u32>,
    /// Predicted kernel time from the measured speed, in milliseconds.
    pub expected_ms: f64,
}

/// How a call is divided among devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// By whole KV groups: each device computes all rows of some heads.
    Heads,
    /// By query rows (sequence parallel, causal layouts): each device computes all heads of a range of
    /// rows, reading only the keys up to its last row.
    Rows,
}

/// Query rows per unit of a split by rows: a multiple of every kernel's query tile.
const ROW_UNIT: u32 = 128;

/// A call split across devices: inspect [`MultiPlan::assignments`], run with [`MultiDevice::forward`].
pub struct MultiPlan {
    split: Split,
    assignments: Vec<Assignment>,
    ops: Vec<Attention>,
    layout: Layout,
    shape: Shape,
}

impl MultiPlan {
    /// Whether the call is split by heads or by query rows.
    pub fn split(&self) -> Split {
        self.split
    }
    /// Which heads run where, and the time expected on each device.
    pub fn assignments(&self) -> &[Assignment] {
        &self.assignments
    }
    /// The predicted time of the whole call: the slowest device's share.
    pub fn expected_ms(&self) -> f64 {
        self.assignments.iter().map(|a| a.expected_ms).fold(0.0, f64::max)
    }
    /// The per-device ops (in assignment order), e.g. to time each share alone.
    pub fn ops(&self) -> &[Attention] {
        &self.ops
    }
}

impl fmt::Display for MultiPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.assignments {
            writeln!(
                f,
                "device {} {}: kv heads {}..{} ({} query heads), rows {}..{}, expected {:.3} ms",
                a.device,
                a.device_name,
                a.kv_heads.start,
                a.kv_heads.end,
                (a.kv_heads.end - a.kv_heads.start) * self.layout.num_heads() / self.layout.num_kv_heads(),
                a.rows.start,
                a.rows.end,
                a.expected_ms
            )?;
        }
        write!(f, "expected {:.3} ms (the slowest share)", self.expected_ms())
    }
}

impl MultiDevice {
    /// Opens every wgpu adapter the machine has (each API of each GPU is a device), plus the CUDA device
    /// when built with the `cuda` feature and one is present. Devices that fail to open are left out and
    /// listed by [`MultiDevice::skipped`].
    pub fn open_all() -> Result<Self> {
        let mut contexts = Vec::new();
        let mut skipped = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for a in WgpuContext::adapters() {
            if seen.insert((a.name.clone(), a.backend.clone())) {
                match Context::with_options(&ContextOptions::wgpu(Some(&a.backend), Some(&a.name))) {
                    Ok(c) => contexts.push(c),
                    Err(e) => skipped.push(format!("{} ({}): {e}", a.name, a.backend)),
                }
            }
        }
        #[cfg(feature = "cuda")]
        match Context::with_options(&ContextOptions { backend: crate::Backend::Cuda, ..Default::default() }) {
            Ok(c) => contexts.push(c),
            Err(e) => skipped.push(format!("cuda: {e}")),
        }
        if contexts.is_empty() {
            return Err(Error::NoAdapter(format!("no device could be opened: [{}]", skipped.join("; "))));
        }
        let mut set = Self::new(contexts)?;
        set.skipped = skipped;
        Ok(set)
    }

    /// Devices [`MultiDevice::open_all`] saw but could not open, with the reason.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Uses the given devices.
    pub fn new(contexts: Vec<Context>) -> Result<Self> {
        if contexts.is_empty() {
            return Err(Error::NoAdapter("a multi-device set needs at least one device".into()));
        }
        let members = contexts
            .into_iter()
            .map(|ctx| {
                let name = format!("{} ({})", ctx.adapter_name(), ctx.backend_name());
                Arc::new(Member { ctx, name, fail: AtomicBool::new(false) })
            })
            .collect();
        Ok(Self { members, speeds: Mutex::default(), skipped: Vec::new() })
    }

    /// Device names (`adapter (backend)`), in index order.
    pub fn device_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The set without device `index`, for re-planning after it failed. Measured speeds are kept.
    pub fn without(&self, index: usize) -> Result<Self> {
        if index >= self.members.len() {
            return Err(Error::Shape(format!("no device {index} in a set of {}", self.members.len())));
        }
        self.subset(&(0..self.members.len()).filter(|&i| i != index).collect::<Vec<_>>())
    }

    /// The set of the devices at `indices` (in that order), keeping their measured speeds.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        if indices.is_empty() || indices.iter().any(|&i| i >= self.members.len()) {
            return Err(Error::Shape(format!("device subset {indices:?} of a set of {}", self.members.len())));
        }
        let members = indices.iter().map(|&i| self.members[i].clone()).collect();
        let speeds = self.lock_speeds().iter().map(|(k, v)| (*k, indices.iter().map(|&i| v[i]).collect())).collect();
        Ok(Self { members, speeds: Mutex::new(speeds), skipped: self.skipped.clone() })
    }

    /// Makes device `index` fail its next calls (`true`) or work again (`false`): for testing fault handling.
    pub fn inject_failure(&self, index: usize, fail: bool) {
        if let Some(m) = self.members.get(index) {
            m.fail.store(fail, Ordering::Relaxed);
        }
    }

    fn lock_speeds(&self) -> std::sync::MutexGuard<'_, HashMap<ProblemClass, Vec<f64>>> {
        self.speeds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Overrides the speeds (query-key pairs per millisecond, one per device) used for problems of the
    /// class of (`layout`, `shape`).
    pub fn set_speeds(&self, layout: &Layout, shape: &Shape, speeds: Vec<f64>) -> Result<()> {
        if speeds.len() != self.members.len() || speeds.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return Err(Error::Shape(format!(
                "{} speeds given for {} devices (each finite and >= 0)",
                speeds.len(),
                self.members.len()
            )));
        }
        if speeds.iter().all(|&s| s == 0.0) {
            return Err(Error::Shape("at least one device needs a positive speed".into()));
        }
        self.lock_speeds().insert(ProblemClass::of(layout, shape), speeds);
        Ok(())
    }

    /// Speeds for the class of (`layout`, `shape`): measured once on a probe problem of one KV head at up to
    /// 4096 tokens, then cached. A device that cannot run the probe gets speed 0 (no work).
    pub fn speeds(&self, layout: &Layout, shape: &Shape) -> Result<Vec<f64>> {
        let class = ProblemClass::of(layout, shape);
        if let Some(s) = self.lock_speeds().get(&class) {
            return Ok(s.clone());
        }
        let probe_layout = layout.kv_head_range(0..1)?;
        let probe_shape = Shape { batch: 1, seq_len: shape.seq_len.min(4096), ..*shape };
        let pairs = probe_layout.active_pairs(probe_shape.seq_len) as f64;
        let n = |h: u32| (probe_shape.seq_len * h * shape.head_dim) as usize;
        let speeds: Vec<f64> = self
            .members
            .iter()
            .map(|m| {
                let run = || -> Result<f64> {
                    let op = Attention::new(&m.ctx, &probe_layout, probe_shape)?;
                    let ms = match shape.dtype {
                        DType::F32 => {
                            let x = probe_data::<f32>(n(probe_layout.num_heads()));
                            op.time_forward(&x, &x[..n(1)], &x[..n(1)], 1, 3)?.median_ms()
                        }
                        DType::F16 => {
                            let x = probe_data::<half::f16>(n(probe_layout.num_heads()));
                            op.time_forward(&x, &x[..n(1)], &x[..n(1)], 1, 3)?.median_ms()
                        }
                        DType::BF16 => {
                            let x = probe_data::<half::bf16>(n(probe_layout.num_heads()));
                            op.time_forward(&x, &x[..n(1)], &x[..n(1)], 1, 3)?.median_ms()
                        }
                    };
                    Ok(pairs / ms.max(1e-6))
                };
                run().unwrap_or(0.0)
            })
            .collect();
        if speeds.iter().all(|&s| s == 0.0) {
            return Err(Error::Unsupported("no device of the set can run this problem".into()));
        }
        self.lock_speeds().insert(class, speeds.clone());
        Ok(speeds)
    }

    /// Splits the call of `layout` at `shape` across the devices in proportion to their speeds: by whole KV
    /// groups, or, for causal layouts on wgpu devices, by query rows when that balances better (few KV
    /// groups, long sequences). Builds each device's op.
    pub fn plan(&self, layout: &Layout, shape: Shape) -> Result<MultiPlan> {
        shape.validate(layout)?;
        let speeds = self.speeds(layout, &shape)?;
        // Fastest devices first; each takes a contiguous run of units (possibly none).
        let mut order: Vec<usize> = (0..self.members.len()).filter(|&i| speeds[i] > 0.0).collect();
        order.sort_by(|&a, &b| speeds[b].total_cmp(&speeds[a]));
        let order_speeds: Vec<f64> = order.iter().map(|&i| speeds[i]).collect();
        let makespan = |cost: &[f64], runs: &[Range<usize>]| {
            runs.iter().zip(&order_speeds).map(|(r, s)| cost[r.clone()].iter().sum::<f64>() / s).fold(0.0, f64::max)
        };

        // Split granularity by heads: one KV head, unless a pattern spans several KV heads (whole patterns).
        let group = layout.num_heads() / layout.num_kv_heads();
        let per_pattern = layout.num_heads() / layout.num_patterns();
        let unit = if layout.num_patterns() == 1 { 1 } else { (per_pattern / group).max(1) };
        let head_cost: Vec<f64> = (0..layout.num_kv_heads() / unit)
            .map(|u| {
                let sub = layout.kv_head_range(u * unit..(u + 1) * unit)?;
                Ok(sub.active_pairs(shape.seq_len) as f64 * shape.batch as f64)
            })
            .collect::<Result<_>>()?;
        let head_runs = partition(&head_cost, &order_speeds);
        let mut split = Split::Heads;
        let all_wgpu = self.members.iter().all(|m| m.ctx.wgpu().is_some());
        let row_cost = if layout.causal() && all_wgpu { row_unit_costs(layout, &shape) } else { Vec::new() };
        let row_runs = partition(&row_cost, &order_speeds);
        if row_cost.len() > 1 && makespan(&row_cost, &row_runs) < 0.97 * makespan(&head_cost, &head_runs) {
            split = Split::Rows;
        }
        let mut assignments = Vec::new();
        let mut ops = Vec::new();
        let runs = if split == Split::Heads { &head_runs } else { &row_runs };
        for (slot, run) in runs.iter().enumerate() {
            if run.is_empty() {
                continue;
            }
            let device = order[slot];
            let member = &self.members[device];
            let failed =
                |e: Error| Error::DeviceFailed { index: device, device: member.name.clone(), message: e.to_string() };
            let (kv_heads, rows, op, cost) = match split {
                Split::Heads => {
                    let kv_heads = run.start as u32 * unit..run.end as u32 * unit;
                    let sub = layout.kv_head_range(kv_heads.clone())?;
                    let op = Attention::new(&member.ctx, &sub, shape).map_err(failed)?;
                    (kv_heads, 0..shape.seq_len, op, head_cost[run.clone()].iter().sum::<f64>())
                }
                Split::Rows => {
                    let rows = run.start as u32 * ROW_UNIT..(run.end as u32 * ROW_UNIT).min(shape.seq_len);
                    let prefix = Shape { seq_len: rows.end, ..shape };
                    let mut op = Attention::new(&member.ctx, layout, prefix).map_err(failed)?;
                    op.restrict_to_rows_from(rows.start).map_err(failed)?;
                    (0..layout.num_kv_heads(), rows, op, row_cost[run.clone()].iter().sum::<f64>())
                }
            };
            let expected_ms = cost / speeds[device];
            assignments.push(Assignment { device, device_name: member.name.clone(), kv_heads, rows, expected_ms });
            ops.push(op);
        }
        Ok(MultiPlan { split, assignments, ops, layout: layout.clone(), shape })
    }

    /// Runs `plan` on host slices in `[batch, seq, heads, head_dim]` layout: each device's share
    /// concurrently, the results gathered into one output. Any device's failure fails the call, naming it.
    pub fn forward<T: Element + Send + Sync>(&self, plan: &MultiPlan, q: &[T], k: &[T], v: &[T]) -> Result<Output<T>> {
        let (layout, shape) = (&plan.layout, &plan.shape);
        let (h_n, hk_n, d) = (layout.num_heads() as usize, layout.num_kv_heads() as usize, shape.head_dim as usize);
        let tokens = shape.batch as usize * shape.seq_len as usize;
        let group = h_n / hk_n;
        for (name, len, heads) in [("q", q.len(), h_n), ("k", k.len(), hk_n), ("v", v.len(), hk_n)] {
            if len != tokens * heads * d {
                return Err(Error::Length {
                    tensor: name,
                    got: len,
                    expected: tokens * heads * d,
                    layout: format!("[batch {}, seq {}, heads {heads}, head_dim {d}]", shape.batch, shape.seq_len),
                });
            }
        }
        let seq = shape.seq_len as usize;
        // Heads `hr` of tokens 0..rows of every sequence: the share's own `[batch, rows, heads, d]` tensor.
        let gather = |x: &[T], heads: usize, hr: Range<usize>, rows: usize| -> Vec<T> {
            x.chunks_exact(seq * heads * d)
                .flat_map(|sequence| sequence[..rows * heads * d].chunks_exact(heads * d))
                .flat_map(|token| token[hr.start * d..hr.end * d].iter().copied())
                .collect()
        };
        let results: Vec<Result<Output<T>>> = std::thread::scope(|s| {
            let handles: Vec<_> = plan
                .assignments
                .iter()
                .zip(&plan.ops)
                .map(|(a, op)| {
                    let member = &self.members[a.device];
                    let kv = a.kv_heads.start as usize..a.kv_heads.end as usize;
                    let qh = kv.start * group..kv.end * group;
                    let rows = a.rows.end as usize;
                    let (qp, kp, vp) =
                        (gather(q, h_n, qh, rows), gather(k, hk_n, kv.clone(), rows), gather(v, hk_n, kv, rows));
                    s.spawn(move || {
                        if member.fail.load(Ordering::Relaxed) {
                            return Err(Error::Device("injected failure".into()));
                        }
                        op.forward(&qp, &kp, &vp)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::Device("device thread panicked".into()))))
                .collect()
        });
        let mut out = vec![<T as bytemuck::Zeroable>::zeroed(); tokens * h_n * d];
        let mut lse = vec![f32::NEG_INFINITY; tokens * h_n];
        for (a, result) in plan.assignments.iter().zip(results) {
            let part = result.map_err(|e| Error::DeviceFailed {
                index: a.device,
                device: a.device_name.clone(),
                message: e.to_string(),
            })?;
            let (h0, hs) = (a.kv_heads.start as usize * group, (a.kv_heads.end - a.kv_heads.start) as usize * group);
            let (r0, r1) = (a.rows.start as usize, a.rows.end as usize);
            for b in 0..shape.batch as usize {
                for t in r0..r1 {
                    let src = &part.out[((b * r1 + t) * hs) * d..][..hs * d];
                    out[((b * seq + t) * h_n + h0) * d..][..hs * d].copy_from_slice(src);
                }
                for h in 0..hs {
                    let src = &part.lse[(b * hs + h) * r1 + r0..(b * hs + h) * r1 + r1];
                    lse[(b * h_n + h0 + h) * seq + r0..(b * h_n + h0 + h) * seq + r1].copy_from_slice(src);
                }
            }
        }
        Ok(Output { out, lse })
    }
}

/// Work of each `ROW_UNIT` rows of a causal call (query-key pairs over all heads and the batch), from the
/// block index: later rows attend more blocks.
fn row_unit_costs(layout: &Layout, shape: &Shape) -> Vec<f64> {
    let (bs, seq) = (layout.block_size(), shape.seq_len);
    let index = layout.index(seq);
    let mut cost = vec![0.0; seq.div_ceil(ROW_UNIT) as usize];
    for h in 0..layout.num_heads() {
        let p = layout.pattern_of_head(h);
        for qb in 0..index.q_blocks() {
            let rows = (bs.min(seq - qb * bs)) as f64;
            cost[(qb * bs / ROW_UNIT) as usize] += rows * (index.row(p, qb).len() as u32 * bs) as f64;
        }
    }
    cost.iter().map(|c| c * shape.batch as f64).collect()
}

/// Splits `cost` (in order) into one contiguous run per device (`speeds`, fastest first), minimising the
/// slowest device's time; runs may be empty. Exact dynamic programme over split points.
fn partition(cost: &[f64], speeds: &[f64]) -> Vec<Range<usize>> {
    let (n, m) = (cost.len(), speeds.len());
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(cost.iter().scan(0.0, |acc, c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    // best[j][i]: minimal makespan placing the first i units on the first j devices.
    let mut best = vec![vec![f64::INFINITY; n + 1]; m + 1];
    let mut cut = vec![vec![0usize; n + 1]; m + 1];
    best[0][0] = 0.0;
    for j in 1..=m {
        for i in 0..=n {
            for k in 0..=i {
                let t = best[j - 1][k].max((prefix[i] - prefix[k]) / speeds[j - 1]);
                if t < best[j][i] {
                    best[j][i] = t;
                    cut[j][i] = k;
                }
            }
        }
    }
    let mut runs = vec![0..0; m];
    let mut i = n;
    for j in (1..=m).rev() {
        let k = cut[j][i];
        runs[j - 1] = k..i;
        i = k;
    }
    runs
}

/// Deterministic non-zero probe inputs (speed probes need no fresh randomness, only non-trivial data).
fn probe_data<T: Element>(n: usize) -> Vec<T> {
    let mut s = 0x9e37_79b9u32;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            T::from_f32(s as f32 / u32::MAX as f32 - 0.5)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::partition;

    #[test]
    fn partition_balances_by_speed() {
        let runs = partition(&[1.0; 8], &[3.0, 1.0]);
        assert_eq!(runs, vec![0..6, 6..8]);
        // A device far slower than the work is worth gets nothing.
        let runs = partition(&[1.0; 2], &[100.0, 0.1]);
        assert_eq!(runs, vec![0..2, 2..2]);
        let runs = partition(&[1.0, 1.0, 1.0], &[1.0, 1.0]);
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), 3);
        assert!(runs.iter().all(|r| !r.is_empty()));
    }
}
