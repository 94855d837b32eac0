//! Host side of the CUDA backward (`shaders/cuda/s2_backward.cu`): the plan (tiles, shared memory), the
//! two kernels (dQ pass with D fused, then the dK/dV pass over the column lists: on `wgmma` with TMA loads on
//! sm_90, else on `mma.sync`), the row and column lists, the wgmma pass's schedule and the D / LSE scratch on the
//! device, launches on host slices, and CUDA-event timing. Every run clears
//! the non-finite flag, runs both passes and then the exact kernel, which redoes dQ, dK and dV only when a
//! pass flagged a non-finite gradient ([`super::exact`]).
//! [`crate::AttentionGrad`] runs it on a CUDA [`crate::Context`].

use super::compile::{KernelKey, S2_FORWARD_SRC};
use super::context::{cuda_err, CudaContext};
use super::exact::{Exact, ExactParams, Pass};
use super::forward::{tile_tensor_map, TensorMap};
use super::plan::{arch_of, WGMMA_WARPS};
use crate::error::{Error, Result};
use crate::gpu::Timing;
use crate::layout::Layout;
use crate::plan::{
    BackwardPlan, ColumnPlan, DType, DeviceCaps, DispatchPlan, KernelVariant, MergeQPlan, QueryEntry, Shape,
};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig};
use cudarc::driver::{PushKernelArg, ValidAsZeroBits};
use std::sync::{Arc, Mutex};

/// The backward kernels' source; compiled after the forward's, whose primitives it uses.
const S2_BACKWARD_SRC: &str = include_str!("../../shaders/cuda/s2_backward.cu");

/// Head dimensions the CUDA backward is built for (dK and dV of 16 keys x head_dim stay in registers).
pub const CUDA_BACKWARD_HEAD_DIMS: &[u32] = &[32, 64, 96, 128];

/// Query rows per step of the dK/dV pass (its column plan's tile) and per CTA of the dQ pass.
const TILE_Q: u32 = 64;
/// Warps of the dQ pass: 16 query rows each.
const DQ_WARPS: u32 = TILE_Q / 16;
/// Query rows per work item of the wgmma dQ pass (`BLOCK_Q`: two consumer warpgroups of 64 rows).
const WGMMA_DQ_TILE: u32 = 128;
/// K/V ring stages (`DQ_STAGES`) and Q/dO buffers (`DQ_QBUFS`) of the wgmma dQ pass.
const WGMMA_DQ_STAGES: u32 = 2;
const WGMMA_DQ_QBUFS: u32 = 2;
/// Keys per tile of the wgmma dK/dV pass (`KT` in `s2_backward.cu`); a work item holds up to two tiles.
const WGMMA_KEY_TILE: u32 = 64;
/// Q / dO ring stages of the wgmma dK/dV pass (`BW_STAGES`).
const WGMMA_BWD_STAGES: u32 = 3;
/// A wgmma dK/dV work item's missing second key tile (`NO_TILE`).
const NO_TILE: u32 = u32::MAX;

/// Shared memory of the wgmma dQ pass: its Q and dO buffers, the K/V ring (128-byte swizzled), the mbarriers and
/// 1 KB of alignment slack.
fn wgmma_dq_smem_bytes(head_dim: u32) -> u32 {
    let tiles = (2 * WGMMA_DQ_QBUFS * WGMMA_DQ_TILE + 2 * WGMMA_DQ_STAGES * 64) * head_dim * 2;
    tiles + 8 * 2 * (WGMMA_DQ_STAGES + WGMMA_DQ_QBUFS) + 1024
}

/// Shared memory of the wgmma dK/dV pass: the item's two K and V tiles, the ring of Q and dO tiles (all 128-byte
/// swizzled), each warpgroup's 16-bit staging of its dK and dV, the ring's LSE and D rows, its mbarriers and 1 KB of
/// alignment slack.
fn wgmma_dkdv_smem_bytes(head_dim: u32) -> u32 {
    let tiles = (2 * 2 * WGMMA_KEY_TILE + 2 * WGMMA_BWD_STAGES * TILE_Q + 2 * 2 * WGMMA_KEY_TILE) * head_dim * 2;
    tiles + WGMMA_BWD_STAGES * 2 * TILE_Q * 4 + 8 * (2 * WGMMA_BWD_STAGES + 2) + 1024
}
/// The kernels' parameter block; mirrors `struct BwdParams` in `shaders/cuda/s2_backward.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Params {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    d_o: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    lse: u64,
    lse2: u64,
    delta: u64,
    row_ptr: u64,
    row_entries: u64,
    col_ptr: u64,
    col_entries: u64,
    flag: u64,
    q_tok: i64,
    q_batch: i64,
    kv_tok: i64,
    kv_batch: i64,
    lse_batch: i64,
    seq_len: u32,
    seq_pad: u32,
    num_heads: u32,
    kv_group: u32,
    heads_per_pattern: u32,
    q_tiles: u32,
    kv_blocks: u32,
    block_size: u32,
    causal: u32,
    scale_log2: f32,
    scale: f32,
    sched: u64,
    dq_sched: u64,
    items: u32,
    dq_items: u32,
    key_tiles: u32,
    q_map: TensorMap,
    do_map: TensorMap,
    k_map: TensorMap,
    v_map: TensorMap,
}

// SAFETY: plain-old-data with the C layout the kernels declare.
unsafe impl DeviceRepr for Params {}

/// Shared memory of either pass: `rows` resident rows (Q and dO, or K and V) and two stages of `step`
/// staged rows (K and V, or Q and dO), padded by 8 elements, plus the dK/dV pass's LSE and D stages.
fn smem_bytes(rows: u32, step: u32, head_dim: u32, stats: bool) -> u32 {
    (2 * rows + 4 * step) * (head_dim + 8) * 2 + if stats { 4 * step * 4 } else { 0 }
}

/// Plans the CUDA backward on a device with `caps`: the dQ pass in query tiles of 64 rows (four warps) and key
/// chunks of `min(64, block)`; the dK/dV pass in query steps of 64 rows, on sm_90 at head dims 64 and 128 with
/// blocks of 64 keys or more on `wgmma` (pairs of 64-key tiles, one per consumer warpgroup, sharing the steps),
/// elsewhere on `mma.sync` in key tiles of `min(64, block)` (16 keys a warp).
pub fn plan_backward_cuda(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Result<BackwardPlan> {
    let max_smem = caps.max_workgroup_storage;
    if !matches!(shape.dtype, DType::F16 | DType::BF16) {
        return Err(Error::Unsupported("the CUDA backward runs f16 and bf16; use those, or f32 on wgpu".into()));
    }
    let d = shape.head_dim;
    if !CUDA_BACKWARD_HEAD_DIMS.contains(&d) {
        return Err(Error::HeadDim { got: d, what: "the CUDA backward", supported: CUDA_BACKWARD_HEAD_DIMS });
    }
    let chunk = layout.block_size().min(64);
    let plan = |tile_q, tile_kv, warps: u32, bytes, reason: String| -> Result<DispatchPlan> {
        if bytes > max_smem {
            return Err(Error::DeviceLimit {
                what: format!("the CUDA backward at head_dim {d}"),
                limit: "max shared memory per block (opt-in)",
                needed: bytes as u64,
                max: max_smem as u64,
            });
        }
        Ok(DispatchPlan {
            variant: KernelVariant::CudaMma,
            tile_q,
            tile_kv,
            workgroup_size: warps * 32,
            workgroup_bytes: bytes,
            reason,
        })
    };
    let wgmma_bytes = wgmma_dkdv_smem_bytes(d);
    let wgmma = arch_of(caps) == Some((9, 0))
        && (d == 64 || d == 128)
        && layout.block_size() >= WGMMA_KEY_TILE
        && wgmma_bytes.max(wgmma_dq_smem_bytes(d)) <= max_smem;
    let dkdv = if wgmma {
        DispatchPlan {
            variant: KernelVariant::CudaWgmma,
            tile_q: TILE_Q,
            tile_kv: WGMMA_KEY_TILE,
            workgroup_size: (WGMMA_WARPS + 4) * 32,
            workgroup_bytes: wgmma_bytes,
            reason: format!(
                "wgmma m64n64k16 (S^T, dP^T) / m64n{d}k16 (dV, dK), warp specialised: producer thread (two K/V \
                 tiles, Q/dO by TMA, 128B-swizzled, {WGMMA_BWD_STAGES}-stage mbarrier ring) + 2 consumer warpgroups, \
                 one per key tile of a pair whose column lists mostly agree, each Q/dO step read once for both; \
                 persistent, GQA summed in the CTA"
            ),
        }
    } else {
        plan(
            TILE_Q,
            chunk,
            chunk / 16,
            smem_bytes(chunk, TILE_Q, d, true),
            "mma.sync m16n8k16, 16 keys per warp, 2-stage cp.async Q/dO, GQA summed in the CTA".into(),
        )?
    };
    let dq = if wgmma {
        DispatchPlan {
            variant: KernelVariant::CudaWgmma,
            tile_q: WGMMA_DQ_TILE,
            tile_kv: 64,
            workgroup_size: (WGMMA_WARPS + 4) * 32,
            workgroup_bytes: wgmma_dq_smem_bytes(d),
            reason: format!(
                "wgmma m64n64k16 (S, dP) / m64n{d}k16 (dQ), warp specialised: producer thread (Q/dO tiles, \
                 {WGMMA_DQ_STAGES}-stage K/V ring by TMA, 128B-swizzled) + 2 consumer warpgroups x 64 rows; \
                 persistent, D fused"
            ),
        }
    } else {
        plan(
            TILE_Q,
            chunk,
            DQ_WARPS,
            smem_bytes(TILE_Q, chunk, d, false),
            "mma.sync m16n8k16, 16 rows per warp, 2-stage cp.async K/V, D fused".into(),
        )?
    };
    Ok(BackwardPlan { dq, dkdv })
}

/// The wgmma dK/dV pass's work items: `[(batch * kv_heads + kv_head) * key_tiles + tile, partner]`, two key tiles
/// of one KV head and sequence (the partner [`NO_TILE`] for a KV head's odd tile out), one per consumer warpgroup,
/// which walk the union of their column lists and read each Q / dO step once for both. A KV head's tiles are paired
/// by the column lists of its first query head: sorted by last query tile, then first, and neighbours paired, so
/// that two stripe blocks `vert_stride` apart (their lists agree but for the first one's first `local` tiles) or two
/// neighbouring local blocks (all but one tile each) share an item and the pass, bound by its Q / dO reads, reads
/// about half the tiles it would with one key tile per item. Items go one KV head of one sequence after another and
/// within it longest walk first (the union over the GQA group), so the long stripe items start first and the short
/// ones fill in behind them, while the CTAs running at once read the same heads' Q and dO from L2.
fn wgmma_schedule(layout: &Layout, shape: &Shape, columns: &ColumnPlan, key_tiles: u32) -> Vec<[u32; 2]> {
    let (heads, kv_heads) = (layout.num_heads(), layout.num_kv_heads());
    let (group, per_pattern) = (heads / kv_heads, heads / layout.num_patterns());
    let column = |head: u32, kt: u32| columns.column(head / per_pattern, kt * WGMMA_KEY_TILE / layout.block_size());
    let per_head: Vec<Vec<[u32; 2]>> = (0..kv_heads)
        .map(|kvh| {
            let first = kvh * group;
            let span = |kt: u32| {
                let c = column(first, kt);
                (c.last().map_or(0, |e| e.q_tile), c.first().map_or(0, |e| e.q_tile), kt)
            };
            let mut tiles: Vec<u32> = (0..key_tiles).collect();
            tiles.sort_by_key(|&kt| span(kt));
            let mut pairs: Vec<(u32, [u32; 2])> = tiles
                .chunks(2)
                .map(|pair| {
                    let partner = pair.get(1).copied().unwrap_or(NO_TILE);
                    let cost = (first..first + group)
                        .map(|h| {
                            let other = if partner == NO_TILE { &[][..] } else { column(h, partner) };
                            union_len(column(h, pair[0]), other)
                        })
                        .sum();
                    (cost, [pair[0], partner])
                })
                .collect();
            pairs.sort_by_key(|&(cost, _)| std::cmp::Reverse(cost));
            pairs.into_iter().map(|(_, pair)| pair).collect()
        })
        .collect();
    (0..shape.batch)
        .flat_map(|b| per_head.iter().zip(0..).map(move |(pairs, kvh)| (b * kv_heads + kvh, pairs)))
        .flat_map(|(head, pairs)| pairs.iter().map(move |&[kt, partner]| [head * key_tiles + kt, partner]))
        .collect()
}

/// Reverses every other round of `ctas` items, where CTA `c` takes items `c`, `c + ctas`, ...: in a list sorted
/// longest first (per KV head), a CTA that took one of a round's longer items takes one of the next round's shorter
/// ones. The rounds keep their items (the CTAs running at once still read the same heads), and the CTAs' loads
/// even out: for the paper's layout, the longest CTA's walk over the mean goes from 14% / 8% / 6% with plain rounds
/// to 4% / 2% / 2.5% at 16k / 64k / 128k tokens on 132 CTAs.
fn snake_rounds<T>(items: &mut [T], ctas: usize) {
    for round in items.chunks_mut(ctas.max(1)).skip(1).step_by(2) {
        round.reverse();
    }
}

/// The number of distinct query tiles in two ascending column lists (the steps of their merged walk).
fn union_len(a: &[QueryEntry], b: &[QueryEntry]) -> u32 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() || j < b.len() {
        let (qa, qb) = (a.get(i).map_or(u32::MAX, |e| e.q_tile), b.get(j).map_or(u32::MAX, |e| e.q_tile));
        i += (qa <= qb) as usize;
        j += (qb <= qa) as usize;
        n += 1;
    }
    n
}

/// The wgmma dQ pass's work items, `(batch * heads + head) * q_tiles + tile`, one head of one sequence after
/// another (its K and V stay in L2), within it the longest row list first.
fn wgmma_dq_schedule(layout: &Layout, shape: &Shape, mergeq: &MergeQPlan) -> Vec<u32> {
    let (heads, tiles) = (layout.num_heads(), mergeq.tiles());
    let per_pattern = heads / layout.num_patterns();
    let ptr = mergeq.row_ptr();
    longest_first_by_head((0..shape.batch * heads * tiles).map(|x| {
        let slot = ((x / tiles % heads / per_pattern) * tiles + x % tiles) as usize;
        (x / tiles, ptr[slot + 1] - ptr[slot])
    }))
}

/// Item indices `0..n`, given each one's `(head, cost)` in index order, sorted by head, then by cost, largest first
/// (ties in index order).
fn longest_first_by_head(keys: impl Iterator<Item = (u32, u32)>) -> Vec<u32> {
    let mut items: Vec<((u32, u32), u32)> = keys.zip(0..).collect();
    items.sort_by_key(|&((head, cost), _)| (head, std::cmp::Reverse(cost)));
    items.into_iter().map(|(_, item)| item).collect()
}

/// One compiled kernel and its launch shape.
struct Launch {
    func: CudaFunction,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
}

struct HostBuffers {
    inputs: [CudaSlice<u8>; 5],
    lse: CudaSlice<f32>,
    grads: [CudaSlice<u8>; 3],
}

/// One planned CUDA backward: both kernels, the lists and the scratch on the device, and (after the first
/// host-slice call) device copies of the inputs and gradients, reused by later calls.
pub struct CudaBackward {
    ctx: CudaContext,
    shape: Shape,
    heads: u32,
    kv_heads: u32,
    base: Params,
    kernels: [Launch; 2],
    /// Whether both passes run on wgmma (their launches carry the TMA maps of Q, dO, K and V).
    wgmma: bool,
    /// Query rows per tile of the dQ pass's row lists (which the exact kernel walks too).
    dq_tile: u32,
    /// The exact kernel, run after both passes (a no-op unless they flagged a non-finite gradient).
    exact: Exact,
    /// Row and column lists, the wgmma pass's schedule and the D / LSE scratch, read by the kernels through `base`.
    _owned: ([CudaSlice<u32>; 6], [CudaSlice<f32>; 2]),
    host: Mutex<Option<HostBuffers>>,
}

impl std::fmt::Debug for CudaBackward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackward").field("shape", &self.shape).finish()
    }
}

fn upload(stream: &Arc<CudaStream>, words: &[u32]) -> Result<CudaSlice<u32>> {
    let words: &[u32] = if words.is_empty() { &[0, 0] } else { words };
    stream.clone_htod(words).map_err(cuda_err("uploading the backward's lists"))
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    stream.alloc_zeros::<T>(n.max(1)).map_err(cuda_err("allocating the backward's buffers"))
}

impl CudaBackward {
    /// Compiles (or fetches) both kernels for `plan` and uploads `mergeq`'s row lists (dQ pass) and
    /// `columns` (dK/dV pass), both in tiles of `plan.dq.tile_q` rows.
    pub fn new(
        ctx: &CudaContext,
        layout: &Layout,
        shape: Shape,
        plan: &BackwardPlan,
        mergeq: &MergeQPlan,
        columns: &ColumnPlan,
    ) -> Result<Self> {
        if mergeq.tile_q() != plan.dq.tile_q || columns.tile_q() != TILE_Q || mergeq.seq_len() != shape.seq_len {
            return Err(Error::Shape(format!(
                "the CUDA backward walks row lists of {}-row tiles and column lists of {TILE_Q}",
                plan.dq.tile_q
            )));
        }
        if layout.num_heads() > 65_535 || shape.batch > 65_535 {
            return Err(Error::Shape("heads and batch must each be at most 65535 (CUDA grid y and z)".into()));
        }
        let bf16 = (shape.dtype == DType::BF16) as i64;
        let source = format!("{S2_FORWARD_SRC}\n#line 1 \"s2_backward.cu\"\n{S2_BACKWARD_SRC}");
        let seq = shape.seq_len;
        let kernel = |pass: i64, p: &DispatchPlan, rows: u32, step: u32, entry: &str, grid| -> Result<_> {
            let wgmma = p.variant == KernelVariant::CudaWgmma;
            let warps = if wgmma { WGMMA_WARPS } else { p.workgroup_size / 32 };
            let defines = [
                ("HEAD_DIM", shape.head_dim as i64),
                ("BLOCK_Q", rows as i64),
                ("BLOCK_K", step as i64),
                ("WARPS", warps as i64),
                ("IS_BF16", bf16),
                ("PASS", pass),
                ("USE_WGMMA", wgmma as i64),
                ("MIN_BLOCKS", 1),
            ];
            let mut key = KernelKey::new("s2_backward.cu", ctx.arch(), &defines);
            key.arch_specific = wgmma;
            let func = ctx.kernel(&key, &source, entry, p.workgroup_bytes)?;
            Ok(Launch { func, grid, threads: p.workgroup_size, smem: p.workgroup_bytes })
        };
        let (heads, kv_heads) = (layout.num_heads(), layout.num_kv_heads());
        // The wgmma passes are persistent: one CTA per SM, at most one per work item.
        let persistent_grid = |items: usize| (items.min(ctx.multiprocessors().max(1) as usize).max(1) as u32, 1, 1);
        let wgmma = plan.dkdv.variant == KernelVariant::CudaWgmma && plan.dq.variant == KernelVariant::CudaWgmma;
        let key_tiles = seq.div_ceil(WGMMA_KEY_TILE);
        let mut sched = if wgmma { wgmma_schedule(layout, &shape, columns, key_tiles) } else { Vec::new() };
        let dkdv = if wgmma {
            // The forward's wgmma configuration (8 consumer warps, 128 x 64 tiles) under the pass's own kernel.
            let grid = persistent_grid(sched.len());
            snake_rounds(&mut sched, grid.0 as usize);
            kernel(2, &plan.dkdv, 128, TILE_Q, "s2_backward_dkdv_wgmma", grid)?
        } else {
            let key_tile = plan.dkdv.workgroup_size / 32 * 16;
            let grid = (seq.div_ceil(key_tile), kv_heads, shape.batch);
            kernel(1, &plan.dkdv, key_tile, TILE_Q, "s2_backward_dkdv", grid)?
        };
        let dq_sched = if wgmma { wgmma_dq_schedule(layout, &shape, mergeq) } else { Vec::new() };
        let dq = if wgmma {
            let grid = persistent_grid(dq_sched.len());
            kernel(3, &plan.dq, WGMMA_DQ_TILE, 64, "s2_backward_dq_wgmma", grid)?
        } else {
            kernel(0, &plan.dq, TILE_Q, plan.dq.tile_kv, "s2_backward_dq", (mergeq.tiles(), heads, shape.batch))?
        };
        let kernels = [dq, dkdv];
        let stream = ctx.stream();
        let flat = |e: Vec<[u32; 2]>| e.into_iter().flatten().collect::<Vec<u32>>();
        let lists = [
            upload(stream, mergeq.row_ptr())?,
            upload(stream, &flat(mergeq.gpu_entries()))?,
            upload(stream, columns.col_ptr())?,
            upload(stream, &flat(columns.gpu_entries()))?,
            upload(stream, &sched.iter().flatten().copied().collect::<Vec<u32>>())?,
            upload(stream, &dq_sched)?,
        ];
        // Scratch rows for every row a dQ tile covers (a multiple of the dK/dV pass's 64-row steps too).
        let seq_pad = seq.div_ceil(plan.dq.tile_q) * plan.dq.tile_q;
        let stats = shape.batch as usize * heads as usize * seq_pad as usize;
        let scratch = [alloc::<f32>(stream, stats)?, alloc::<f32>(stream, stats)?];
        let ptr = |s: &CudaSlice<u32>| s.device_ptr(stream).0;
        let fptr = |s: &CudaSlice<f32>| s.device_ptr(stream).0;
        let (h, hk, d) = (heads as i64, kv_heads as i64, shape.head_dim as i64);
        let base = Params {
            lse2: fptr(&scratch[0]),
            delta: fptr(&scratch[1]),
            row_ptr: ptr(&lists[0]),
            row_entries: ptr(&lists[1]),
            col_ptr: ptr(&lists[2]),
            col_entries: ptr(&lists[3]),
            sched: ptr(&lists[4]),
            dq_sched: ptr(&lists[5]),
            items: sched.len() as u32,
            dq_items: dq_sched.len() as u32,
            key_tiles,
            q_tok: h * d,
            q_batch: seq as i64 * h * d,
            kv_tok: hk * d,
            kv_batch: seq as i64 * hk * d,
            lse_batch: h * seq as i64,
            seq_len: seq,
            seq_pad,
            num_heads: heads,
            kv_group: heads / kv_heads,
            heads_per_pattern: heads / layout.num_patterns(),
            q_tiles: mergeq.tiles(),
            kv_blocks: columns.kv_blocks(),
            block_size: layout.block_size(),
            causal: layout.causal() as u32,
            scale_log2: shape.softmax_scale() * std::f32::consts::LOG2_E,
            scale: shape.softmax_scale(),
            ..Params::default()
        };
        let exact = Exact::new(ctx, &shape, Pass::Backward)?;
        Ok(Self {
            ctx: ctx.clone(),
            shape,
            heads,
            kv_heads,
            base,
            kernels,
            wgmma,
            dq_tile: plan.dq.tile_q,
            exact,
            _owned: (lists, scratch),
            host: Mutex::default(),
        })
    }

    fn elems(&self, heads: u32) -> usize {
        self.shape.batch as usize * self.shape.seq_len as usize * heads as usize * self.shape.head_dim as usize
    }

    /// Launches both passes on `stream` with the tensor addresses in `p`, the non-finite flag cleared before
    /// them, then the exact kernel (which returns at once unless a pass flagged a non-finite gradient).
    ///
    /// # Safety
    /// `p` must address live device buffers of this context sized for the op's shape.
    unsafe fn launch(&self, stream: &CudaStream, p: &Params) -> Result<()> {
        let flag = self.exact.clear(stream)?;
        let mut p = Params { flag, ..*p };
        if self.wgmma {
            let (h, hk) = (self.heads, self.kv_heads);
            p.q_map = tile_tensor_map(p.q, &self.shape, h, p.q_tok, p.q_batch, TILE_Q)?;
            p.do_map = tile_tensor_map(p.d_o, &self.shape, h, p.q_tok, p.q_batch, TILE_Q)?;
            p.k_map = tile_tensor_map(p.k, &self.shape, hk, p.kv_tok, p.kv_batch, WGMMA_KEY_TILE)?;
            p.v_map = tile_tensor_map(p.v, &self.shape, hk, p.kv_tok, p.kv_batch, WGMMA_KEY_TILE)?;
        }
        let p = &p;
        for k in &self.kernels {
            let cfg = LaunchConfig { grid_dim: k.grid, block_dim: (k.threads, 1, 1), shared_mem_bytes: k.smem };
            let mut args = stream.launch_builder(&k.func);
            args.arg(p);
            // SAFETY: forwarded to the caller; the lists and scratch are owned by `self`, and the launch
            // shape matches the kernels' compile-time configuration.
            unsafe { args.launch(cfg) }.map_err(cuda_err("launching the CUDA backward"))?;
        }
        let ep = ExactParams {
            q: p.q,
            k: p.k,
            v: p.v,
            o: p.o,
            d_o: p.d_o,
            dq: p.dq,
            dk: p.dk,
            dv: p.dv,
            lse: p.lse,
            lse2: p.lse2,
            delta: p.delta,
            row_ptr: p.row_ptr,
            row_entries: p.row_entries,
            col_ptr: p.col_ptr,
            col_entries: p.col_entries,
            flag,
            q_tok: p.q_tok,
            q_batch: p.q_batch,
            kv_tok: p.kv_tok,
            kv_batch: p.kv_batch,
            o_tok: p.q_tok,
            o_batch: p.q_batch,
            lse_batch: p.lse_batch,
            batch: self.shape.batch,
            seq_len: p.seq_len,
            seq_pad: p.seq_pad,
            num_heads: p.num_heads,
            kv_group: p.kv_group,
            heads_per_pattern: p.heads_per_pattern,
            q_tiles: p.q_tiles,
            tile_q: self.dq_tile,
            kv_blocks: p.kv_blocks,
            col_tile: TILE_Q,
            block_size: p.block_size,
            causal: p.causal,
            scale_log2: p.scale_log2,
            scale: p.scale,
            ..ExactParams::default()
        };
        // SAFETY: forwarded to the caller; the scratch the dQ pass wrote is `self`'s, the flag was just cleared.
        unsafe { self.exact.launch(stream, &ep) }
    }

    /// Uploads host inputs (`q, k, v, out, lse, d_out` bytes, `lse` f32) into the op's own buffers, poisons
    /// the gradients, and calls `f` with the launch parameters addressing them.
    fn with_host_buffers<R>(
        &self,
        inputs: [&[u8]; 6],
        f: impl FnOnce(&Params, &HostBuffers) -> Result<R>,
    ) -> Result<R> {
        let stream = self.ctx.stream();
        let size = self.shape.dtype.size() as usize;
        let (q_bytes, kv_bytes) = (self.elems(self.heads) * size, self.elems(self.kv_heads) * size);
        let mut guard = self.host.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(HostBuffers {
                inputs: [
                    alloc(stream, q_bytes)?,
                    alloc(stream, kv_bytes)?,
                    alloc(stream, kv_bytes)?,
                    alloc(stream, q_bytes)?,
                    alloc(stream, q_bytes)?,
                ],
                lse: alloc(stream, inputs[4].len() / 4)?,
                grads: [alloc(stream, q_bytes)?, alloc(stream, kv_bytes)?, alloc(stream, kv_bytes)?],
            });
        }
        let Some(bufs) = guard.as_mut() else { return Err(Error::Cuda("device buffers missing".into())) };
        let [q, k, v, o, lse, d_o] = inputs;
        for (buf, data) in bufs.inputs.iter_mut().zip([q, k, v, o, d_o]) {
            stream.memcpy_htod(data, buf).map_err(cuda_err("copying an input to the device"))?;
        }
        let lse: Vec<f32> = bytemuck::pod_collect_to_vec(lse);
        stream.memcpy_htod(&lse, &mut bufs.lse).map_err(cuda_err("copying the LSE to the device"))?;
        for g in &mut bufs.grads {
            let bytes = g.num_bytes();
            let (ptr, _g) = g.device_ptr_mut(stream);
            // SAFETY: `ptr` addresses `bytes` bytes of this live allocation, on its own stream.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
                .map_err(cuda_err("poisoning the gradients"))?;
        }
        let a = |s: &CudaSlice<u8>| s.device_ptr(stream).0;
        let p = Params {
            q: a(&bufs.inputs[0]),
            k: a(&bufs.inputs[1]),
            v: a(&bufs.inputs[2]),
            o: a(&bufs.inputs[3]),
            d_o: a(&bufs.inputs[4]),
            lse: bufs.lse.device_ptr(stream).0,
            dq: a(&bufs.grads[0]),
            dk: a(&bufs.grads[1]),
            dv: a(&bufs.grads[2]),
            ..self.base
        };
        f(&p, bufs)
    }

    /// Runs both passes on host bytes (`q, k, v, out, lse, d_out`; lengths checked by the caller) and
    /// returns `[dq, dk, dv]` bytes.
    pub(crate) fn run_host(&self, inputs: [&[u8]; 6]) -> Result<[Vec<u8>; 3]> {
        self.with_host_buffers(inputs, |p, bufs| {
            let stream = self.ctx.stream();
            // SAFETY: the op's own buffers, sized for the shape when they were allocated.
            unsafe { self.launch(stream, p)? };
            self.ctx.finish(stream, "running the CUDA backward")?;
            let mut out = Vec::with_capacity(3);
            for g in &bufs.grads {
                out.push(stream.clone_dtoh(g).map_err(cuda_err("copying a gradient back"))?);
            }
            stream.synchronize().map_err(cuda_err("copying the gradients back"))?;
            let [dq, dk, dv]: [Vec<u8>; 3] = out.try_into().map_err(|_| Error::Cuda("gradients missing".into()))?;
            Ok([dq, dk, dv])
        })
    }

    /// Times `iters` backward passes (dQ start to dK/dV end) with CUDA events after `warmup` untimed ones,
    /// inputs uploaded once.
    pub(crate) fn time(&self, inputs: [&[u8]; 6], warmup: u32, iters: u32) -> Result<Timing> {
        self.with_host_buffers(inputs, |p, _| {
            let stream = self.ctx.stream();
            // SAFETY: the op's own buffers, sized for the shape when they were allocated.
            let run = || unsafe { self.launch(stream, p) };
            self.ctx.time_events("running the CUDA backward", warmup, iters, run)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::plan::register_arch;
    use crate::layout::S2Config;

    fn caps(name: &str) -> DeviceCaps {
        DeviceCaps {
            name: name.into(),
            backend: "cuda".into(),
            max_workgroup_storage: 227 * 1024,
            max_invocations: 1024,
            max_dispatch: i32::MAX as u32,
            ..DeviceCaps::default()
        }
    }

    #[test]
    fn hopper_takes_wgmma_for_head_dims_64_128_and_blocks_of_64_keys_or_more() {
        let hopper = caps("backward-planner-test sm_90 device");
        register_arch(&hopper.name, (9, 0));
        let ampere = caps("backward-planner-test sm_80 device");
        register_arch(&ampere.name, (8, 0));
        let shape = |d| Shape::new(1, 4096, d, DType::F16);
        for (block, d, on_hopper) in [(64, 128, true), (128, 64, true), (64, 96, false), (32, 128, false)] {
            let layout = Layout::s2(S2Config::new(8, block, 4, 4)).unwrap();
            let plan = plan_backward_cuda(&shape(d), &layout, &hopper).unwrap();
            assert_eq!(plan.dkdv.variant == KernelVariant::CudaWgmma, on_hopper, "block {block}, d {d}: {plan}");
            assert_eq!(plan.dq.variant, plan.dkdv.variant, "both passes on one kind of kernel: {plan}");
            if on_hopper {
                assert_eq!((plan.dkdv.tile_q, plan.dkdv.tile_kv, plan.dkdv.workgroup_size), (64, 64, 384));
                assert_eq!((plan.dq.tile_q, plan.dq.tile_kv, plan.dq.workgroup_size), (128, 64, 384));
                assert!(plan.dkdv.workgroup_bytes.max(plan.dq.workgroup_bytes) <= 227 * 1024, "{plan}");
            }
            let plan = plan_backward_cuda(&shape(d), &layout, &ampere).unwrap();
            assert_eq!((plan.dq.variant, plan.dkdv.variant), (KernelVariant::CudaMma, KernelVariant::CudaMma));
        }
    }

    #[test]
    fn wgmma_schedule_pairs_every_key_tile_once_head_by_head_longest_walks_first() {
        let layout = Layout::s2(S2Config::new(8, 64, 2, 4).kv_heads(4)).unwrap();
        let (batch, seq) = (2, 1000);
        let shape = Shape::new(batch, seq, 128, DType::F16);
        let columns = ColumnPlan::build(&layout.index(seq), 64, true, TILE_Q);
        let key_tiles = seq.div_ceil(WGMMA_KEY_TILE);
        let sched = wgmma_schedule(&layout, &shape, &columns, key_tiles);
        let head = |item: [u32; 2]| item[0] / key_tiles;
        let mut tiles: Vec<u32> = sched
            .iter()
            .flat_map(|&item| [Some(item[0]), (item[1] != NO_TILE).then(|| head(item) * key_tiles + item[1])])
            .flatten()
            .collect();
        tiles.sort_unstable();
        assert_eq!(tiles, (0..batch * 4 * key_tiles).collect::<Vec<_>>(), "every key tile once");
        assert_eq!(sched.len() as u32, batch * 4 * key_tiles.div_ceil(2), "pairs, one odd tile out per KV head");
        // Each item's walk, recomputed from the column plan: the query tiles either tile's list holds, for both
        // query heads of its KV head.
        let steps = |item: [u32; 2]| {
            let kvh = head(item) % 4;
            (0..2)
                .map(|hh| {
                    let pattern = (kvh * 2 + hh) / (8 / layout.num_patterns());
                    let mut q: Vec<u32> = [item[0] % key_tiles, item[1]]
                        .into_iter()
                        .filter(|&kt| kt != NO_TILE)
                        .flat_map(|kt| columns.column(pattern, kt).iter().map(|e| e.q_tile))
                        .collect();
                    q.sort_unstable();
                    q.dedup();
                    q.len() as u32
                })
                .sum::<u32>()
        };
        assert!(sched.windows(2).all(|w| head(w[0]) <= head(w[1])), "not one KV head after another");
        assert!(
            sched.windows(2).all(|w| head(w[0]) != head(w[1]) || steps(w[0]) >= steps(w[1])),
            "not longest first within a KV head"
        );
        assert!(steps(sched[0]) > steps(sched[sched.len() - 1]), "a stripe pair walks more than a local one");
    }

    #[test]
    fn snake_rounds_reverse_every_other_round_and_even_out_sorted_loads() {
        let mut items: Vec<u32> = (0..10).collect();
        snake_rounds(&mut items, 4);
        assert_eq!(items, [0, 1, 2, 3, 7, 6, 5, 4, 8, 9]);
        // Two heads' costs, each sorted longest first, on 8 CTAs taking items c, c + 8, ...
        let costs: Vec<u32> = (0..2).flat_map(|_| (1..=24).rev()).collect();
        let worst = |list: &[u32]| (0..8).map(|c| list.iter().skip(c).step_by(8).sum::<u32>()).max().unwrap();
        let mut snaked = costs.clone();
        snake_rounds(&mut snaked, 8);
        assert!(worst(&snaked) < worst(&costs), "{} against {}", worst(&snaked), worst(&costs));
    }

    #[test]
    fn wgmma_pairs_read_about_half_the_query_tiles_of_single_key_tiles() {
        // The paper's pattern at 16k tokens: every head's stripe blocks, local 16, vert_stride 16 and 64.
        for vs in [16, 64] {
            let layout = Layout::s2(S2Config::new(4, 64, 16, vs)).unwrap();
            let seq = 16384;
            let shape = Shape::new(1, seq, 128, DType::F16);
            let columns = ColumnPlan::build(&layout.index(seq), 64, true, TILE_Q);
            let key_tiles = seq.div_ceil(WGMMA_KEY_TILE);
            let sched = wgmma_schedule(&layout, &shape, &columns, key_tiles);
            let per_pattern = 4 / layout.num_patterns();
            let list = |kvh: u32, kt: u32| columns.column(kvh / per_pattern, kt);
            let paired: u32 = sched
                .iter()
                .map(|&[x, partner]| {
                    let (kvh, kt) = (x / key_tiles, x % key_tiles);
                    union_len(list(kvh, kt), if partner == NO_TILE { &[] } else { list(kvh, partner) })
                })
                .sum();
            let single: u32 = (0..4)
                .flat_map(|kvh| (0..key_tiles).map(move |kt| (kvh, kt)))
                .map(|(h, kt)| list(h, kt).len() as u32)
                .sum();
            let ratio = paired as f64 / single as f64;
            assert!((0.5..0.58).contains(&ratio), "vert_stride {vs}: pairs walk {paired} steps, single tiles {single}");
        }
    }
}
