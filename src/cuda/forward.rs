//! Host side of the CUDA forward kernel: the tile lists uploaded once per op, launches on host slices,
//! on cudarc slices and on raw device pointers the caller owns, and CUDA-event timing. Every launch clears
//! the non-finite flag, runs the tensor-core kernel and then the exact kernel, which redoes the op only
//! when the flag was set ([`super::exact`]).

use super::compile::{KernelKey, S2_FORWARD_SRC};
use super::context::{cuda_err, CudaContext};
use super::exact::{Exact, ExactParams, Pass};
use super::plan::{deal_items, is_wgmma, wgmma_smem_bytes, WARPS, WGMMA_Q_BUFS, WGMMA_STAGES, WGMMA_WARPS};
use crate::error::{Error, Result};
use crate::gpu::Timing;
use crate::layout::Layout;
use crate::plan::{DType, DispatchPlan, MergeQPlan, Shape};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Mutex};

/// A tensor in CUDA memory the caller owns: `[batch, seq, heads, head_dim]` elements of the op's dtype
/// starting at `ptr`, consecutive tokens `token_stride` elements apart (`None`: `heads * head_dim`,
/// contiguous) and consecutive sequences `seq_len * token_stride` apart. `ptr` must be 16-byte aligned
/// and the stride a multiple of 8 elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaTensor {
    /// Device address of the first element.
    pub ptr: CUdeviceptr,
    /// Elements from one token to the next; `None` means contiguous.
    pub token_stride: Option<u64>,
}

impl CudaTensor {
    /// A contiguous tensor at `ptr`.
    pub fn new(ptr: CUdeviceptr) -> Self {
        Self { ptr, token_stride: None }
    }
    /// A view whose tokens are `token_stride` elements apart (e.g. one of Q, K, V in a packed QKV buffer).
    pub fn strided(ptr: CUdeviceptr, token_stride: u64) -> Self {
        Self { ptr, token_stride: Some(token_stride) }
    }
}

/// An opaque `CUtensorMap` as the kernels declare it (`struct TensorMap`, 64-byte aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TensorMap([u64; 16]);

/// The kernel's parameter block; mirrors `struct Params` in `shaders/cuda/s2_forward.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Params {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    row_ptr: u64,
    entries: u64,
    flag: u64,
    sched: u64,
    cta_ptr: u64,
    q_tok: i64,
    q_batch: i64,
    kv_tok: i64,
    kv_batch: i64,
    o_tok: i64,
    o_batch: i64,
    lse_batch: i64,
    seq_len: u32,
    num_heads: u32,
    kv_group: u32,
    heads_per_pattern: u32,
    tiles: u32,
    block_size: u32,
    causal: u32,
    scale_log2: f32,
}

/// What a launch passes: `Params` and the kernel's trailing tensor maps (the wgmma kernel's; zero for mma.sync),
/// laid out as the kernel's flat struct (the maps start at the next 64-byte boundary either way).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct LaunchParams {
    p: Params,
    k_map: TensorMap,
    v_map: TensorMap,
}

// SAFETY: plain-old-data with the C layout the kernel declares.
unsafe impl DeviceRepr for LaunchParams {}

/// A wgmma kernel's TMA tensor map of a `[batch][seq][heads][head_dim]` tensor of 16-bit elements at `ptr`, tokens
/// and sequences `tok` / `batch` elements apart, read in boxes of 64 columns x `rows` tokens of one head, stored
/// 128-byte swizzled (the layout the kernels' descriptors read), rows past the end zero-filled.
pub(super) fn tile_tensor_map(
    ptr: u64,
    shape: &Shape,
    heads: u32,
    tok: i64,
    batch: i64,
    rows: u32,
) -> Result<TensorMap> {
    use cudarc::driver::sys;
    let dims = [shape.head_dim as u64, heads as u64, shape.seq_len as u64, shape.batch as u64];
    let strides = [shape.head_dim as u64 * 2, tok as u64 * 2, batch as u64 * 2];
    let boxes = [64u32, 1, rows, 1];
    let steps = [1u32; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays outlive the call and have the rank's lengths; the map is written by the driver.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Cuda(format!("cuTensorMapEncodeTiled: {r:?}")));
    }
    // SAFETY: written by the driver on success; both types are 16 u64 words.
    Ok(TensorMap(unsafe { map.assume_init() }.opaque))
}

struct HostBuffers {
    q: CudaSlice<u8>,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
    o: CudaSlice<u8>,
    lse: CudaSlice<f32>,
}

/// One planned CUDA forward op: the compiled kernel, the tile lists on the device, and (after the first
/// host-slice call) device copies of the inputs, reused by later calls.
pub struct CudaForward {
    ctx: CudaContext,
    shape: Shape,
    num_heads: u32,
    num_kv_heads: u32,
    base: Params,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
    func: CudaFunction,
    /// The wgmma kernel, which loads K/V by TMA: the tensor maps are encoded into the parameters at each launch.
    tma: bool,
    /// The exact kernel, run after the tensor-core one (a no-op unless the latter flagged a non-finite output),
    /// and its parameters but for the tensors and the flag (boxed: the op stays small to move).
    exact: Box<(Exact, ExactParams)>,
    /// The tile offsets and lists and the wgmma kernel's dealt work items; owned here, read by the kernel
    /// through the addresses in `base`.
    _lists: Box<[CudaSlice<u32>; 4]>,
    host: Mutex<Option<HostBuffers>>,
}

impl std::fmt::Debug for CudaForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaForward").field("shape", &self.shape).field("grid", &self.grid).finish()
    }
}

impl CudaForward {
    /// Compiles (or fetches) the kernel `plan` names and uploads the tile lists of `mergeq`.
    pub fn new(
        ctx: &CudaContext,
        layout: &Layout,
        shape: Shape,
        plan: &DispatchPlan,
        mergeq: Arc<MergeQPlan>,
    ) -> Result<Self> {
        if mergeq.tile_q() != plan.tile_q || mergeq.seq_len() != shape.seq_len {
            return Err(Error::Shape(format!(
                "MergeQ plan is for {} tokens in tiles of {}, the dispatch plan for {} in tiles of {}",
                mergeq.seq_len(),
                mergeq.tile_q(),
                shape.seq_len,
                plan.tile_q
            )));
        }
        let bf16 = match shape.dtype {
            DType::F16 => 0,
            DType::BF16 => 1,
            DType::F32 => return Err(Error::Unsupported("f32 has no CUDA kernel".into())),
        };
        if plan.tile_kv == 0 || layout.block_size() % plan.tile_kv != 0 {
            return Err(Error::Shape(format!(
                "key chunk {} does not divide block size {}",
                plan.tile_kv,
                layout.block_size()
            )));
        }
        let wgmma = is_wgmma(plan);
        // The wgmma kernel's WARPS counts its consumer warps; the CTA has a producer warpgroup more.
        let warps = if wgmma { WGMMA_WARPS } else { plan.workgroup_size / 32 };
        if wgmma && plan.workgroup_size != (WGMMA_WARPS + 4) * 32 {
            return Err(Error::Shape(format!(
                "the wgmma kernel runs 12 warps, the plan asks for {}",
                plan.workgroup_size
            )));
        }
        if warps != WARPS && warps != 2 * WARPS {
            return Err(Error::Shape(format!("the CUDA kernels run 4 or 8 warps, the plan asks for {warps}")));
        }
        let rows_per_warp = plan.tile_q / warps;
        let min_blocks = if wgmma || warps > WARPS {
            1
        } else if rows_per_warp > 16 || shape.head_dim > 128 {
            2
        } else {
            3
        };
        let defines = [
            ("HEAD_DIM", shape.head_dim as i64),
            ("BLOCK_Q", plan.tile_q as i64),
            ("BLOCK_K", plan.tile_kv as i64),
            ("WARPS", warps as i64),
            ("IS_BF16", bf16),
            ("MIN_BLOCKS", min_blocks),
            ("USE_WGMMA", wgmma as i64),
        ];
        let mut key = KernelKey::new("s2_forward.cu", ctx.arch(), &defines);
        // The wgmma kernel loads K/V by TMA (128-byte swizzle): the host encodes the tensor maps at each launch.
        let tma = wgmma;
        let smem =
            if wgmma { wgmma_smem_bytes(shape.head_dim, WGMMA_STAGES, WGMMA_Q_BUFS) } else { plan.workgroup_bytes };
        key.arch_specific = wgmma;
        let func = ctx.kernel(&key, S2_FORWARD_SRC, "s2_forward", smem)?;
        let stream = ctx.stream();
        let row_ptr = stream.clone_htod(mergeq.row_ptr()).map_err(cuda_err("uploading the tile offsets"))?;
        let mut words: Vec<u32> = mergeq.gpu_entries().iter().flatten().copied().collect();
        if words.is_empty() {
            words.extend([0, 0]);
        }
        let entries = stream.clone_htod(&words).map_err(cuda_err("uploading the tile lists"))?;
        // The wgmma kernel is persistent: a 1-D grid of one CTA per SM (at most one per work item), each walking the
        // work items dealt to it. An item's cost: its tile's chunks (a list entry is block_size / tile_kv of them)
        // and about two chunks' worth for its Q load and epilogue.
        let items = mergeq.tiles() * layout.num_heads() * shape.batch;
        let ctas = if wgmma { items.min(ctx.multiprocessors().max(1)).max(1) } else { 1 };
        let (sched, cta_ptr) = if wgmma {
            let chunks_per_entry = (layout.block_size() / plan.tile_kv).max(1) as u64;
            let (tiles, row_ptr) = (mergeq.tiles(), mergeq.row_ptr());
            let per_b = tiles * layout.num_heads();
            let heads_per_pattern = layout.num_heads() / layout.num_patterns();
            let costs: Vec<u64> = (0..items)
                .map(|w| {
                    // item_of in s2_forward.cu: tile fastest (reversed), then head, then batch.
                    let r = w % per_b;
                    let (head, tile) = (r / tiles, tiles - 1 - r % tiles);
                    let slot = ((head / heads_per_pattern) * tiles + tile) as usize;
                    2 + chunks_per_entry * (row_ptr[slot + 1] - row_ptr[slot]) as u64
                })
                .collect();
            deal_items(&costs, ctas)
        } else {
            (vec![0], vec![0, 0])
        };
        let sched = stream.clone_htod(&sched).map_err(cuda_err("uploading the work items"))?;
        let cta_ptr = stream.clone_htod(&cta_ptr).map_err(cuda_err("uploading the work items"))?;
        let lists = {
            let (r, _r) = row_ptr.device_ptr(stream);
            let (e, _e) = entries.device_ptr(stream);
            let (w, _w) = sched.device_ptr(stream);
            let (c, _c) = cta_ptr.device_ptr(stream);
            (r, e, w, c)
        };
        let (h, hk, d) = (layout.num_heads() as i64, layout.num_kv_heads() as i64, shape.head_dim as i64);
        let seq = shape.seq_len as i64;
        let base = Params {
            row_ptr: lists.0,
            entries: lists.1,
            sched: lists.2,
            cta_ptr: lists.3,
            q_tok: h * d,
            q_batch: seq * h * d,
            kv_tok: hk * d,
            kv_batch: seq * hk * d,
            o_tok: h * d,
            o_batch: seq * h * d,
            lse_batch: h * seq,
            seq_len: shape.seq_len,
            num_heads: layout.num_heads(),
            kv_group: layout.num_heads() / layout.num_kv_heads(),
            heads_per_pattern: layout.num_heads() / layout.num_patterns(),
            tiles: mergeq.tiles(),
            block_size: layout.block_size(),
            causal: layout.causal() as u32,
            scale_log2: shape.softmax_scale() * std::f32::consts::LOG2_E,
            ..Params::default()
        };
        let exact = Exact::new(ctx, &shape, Pass::Forward)?;
        let exact_base = ExactParams {
            row_ptr: base.row_ptr,
            row_entries: base.entries,
            lse_batch: base.lse_batch,
            batch: shape.batch,
            seq_len: base.seq_len,
            num_heads: base.num_heads,
            kv_group: base.kv_group,
            heads_per_pattern: base.heads_per_pattern,
            q_tiles: base.tiles,
            tile_q: plan.tile_q,
            block_size: base.block_size,
            causal: base.causal,
            scale_log2: base.scale_log2,
            scale: shape.softmax_scale(),
            ..ExactParams::default()
        };
        let grid = if wgmma { (ctas, 1, 1) } else { (mergeq.tiles(), layout.num_heads(), shape.batch) };
        Ok(Self {
            ctx: ctx.clone(),
            shape,
            num_heads: layout.num_heads(),
            num_kv_heads: layout.num_kv_heads(),
            base,
            grid,
            threads: plan.workgroup_size,
            smem,
            func,
            tma,
            exact: Box::new((exact, exact_base)),
            _lists: Box::new([row_ptr, entries, sched, cta_ptr]),
            host: Mutex::default(),
        })
    }

    /// The context the op runs on.
    pub fn context(&self) -> &CudaContext {
        &self.ctx
    }

    fn elems(&self, heads: u32) -> usize {
        self.shape.batch as usize * self.shape.seq_len as usize * heads as usize * self.shape.head_dim as usize
    }

    fn lse_elems(&self) -> usize {
        self.shape.batch as usize * self.num_heads as usize * self.shape.seq_len as usize
    }

    /// Checks a caller's tensor and returns its token stride in elements.
    fn check_tensor(&self, name: &'static str, t: &CudaTensor, heads: u32) -> Result<i64> {
        let row = heads as u64 * self.shape.head_dim as u64;
        let stride = t.token_stride.unwrap_or(row);
        if stride < row {
            return Err(Error::Shape(format!(
                "{name}: token_stride {stride} is smaller than heads * head_dim = {row}"
            )));
        }
        if stride % 8 != 0 || t.ptr % 16 != 0 {
            return Err(Error::Shape(format!(
                "{name}: the kernel loads 16-byte vectors, so the pointer must be 16-byte aligned and token_stride a \
                 multiple of 8 elements (got pointer {:#x}, stride {stride})",
                t.ptr
            )));
        }
        Ok(stride as i64)
    }

    /// Clears the stream's non-finite flag, launches the tensor-core kernel, then the exact kernel (which
    /// returns at once unless the first flagged a non-finite output).
    fn launch(&self, stream: &CudaStream, params: &Params) -> Result<()> {
        let (exact, exact_base) = &*self.exact;
        let flag = exact.clear(stream)?;
        let params = &Params { flag, ..*params };
        let mut lp = LaunchParams { p: *params, k_map: TensorMap::default(), v_map: TensorMap::default() };
        if self.tma {
            let (hk, tok, batch) = (self.num_kv_heads, params.kv_tok, params.kv_batch);
            lp.k_map = tile_tensor_map(params.k, &self.shape, hk, tok, batch, 64)?;
            lp.v_map = tile_tensor_map(params.v, &self.shape, hk, tok, batch, 64)?;
        }
        let cfg = LaunchConfig { grid_dim: self.grid, block_dim: (self.threads, 1, 1), shared_mem_bytes: self.smem };
        let mut args = stream.launch_builder(&self.func);
        args.arg(&lp);
        // SAFETY: `params` points at buffers checked for size and alignment by every caller, the tile lists
        // are owned by `self`, and the launch shape matches the kernel's compile-time configuration.
        unsafe { args.launch(cfg) }.map_err(cuda_err("launching s2_forward"))?;
        let ep = ExactParams {
            q: params.q,
            k: params.k,
            v: params.v,
            out: params.o,
            out_lse: params.lse,
            flag,
            q_tok: params.q_tok,
            q_batch: params.q_batch,
            kv_tok: params.kv_tok,
            kv_batch: params.kv_batch,
            o_tok: params.o_tok,
            o_batch: params.o_batch,
            ..*exact_base
        };
        // SAFETY: the same buffers as the launch above, on the same stream, with the flag just cleared.
        unsafe { exact.launch(stream, &ep) }
    }

    /// Runs on caller-owned device memory: `q`, `k`, `v`, `out` as [`CudaTensor`]s of the op's dtype and
    /// `lse` an f32 `[batch, heads, seq]` buffer, on `stream` (which must belong to this op's context;
    /// `None`: the op's own stream). Nothing is waited for.
    ///
    /// # Safety
    /// Each pointer must address device memory of this context that holds the whole tensor its view
    /// describes (`out` and `lse` writable), and stay valid until the work on the stream has finished.
    pub unsafe fn forward_device(
        &self,
        stream: Option<&CudaStream>,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: &CudaTensor,
        lse: CUdeviceptr,
    ) -> Result<()> {
        let stream = stream.unwrap_or(self.ctx.stream());
        if stream.context() != self.ctx.cudarc() {
            return Err(Error::Cuda("the stream belongs to another CUDA context than the op".into()));
        }
        if lse % 4 != 0 {
            return Err(Error::Shape(format!("lse pointer {lse:#x} is not 4-byte aligned")));
        }
        let q_tok = self.check_tensor("q", q, self.num_heads)?;
        let k_tok = self.check_tensor("k", k, self.num_kv_heads)?;
        let v_tok = self.check_tensor("v", v, self.num_kv_heads)?;
        let o_tok = self.check_tensor("out", out, self.num_heads)?;
        if k_tok != v_tok {
            return Err(Error::Shape(format!("k and v must share a token stride (got {k_tok} and {v_tok})")));
        }
        let seq = self.shape.seq_len as i64;
        let params = Params {
            q: q.ptr,
            k: k.ptr,
            v: v.ptr,
            o: out.ptr,
            lse,
            q_tok,
            q_batch: q_tok * seq,
            kv_tok: k_tok,
            kv_batch: k_tok * seq,
            o_tok,
            o_batch: o_tok * seq,
            ..self.base
        };
        self.launch(stream, &params)
    }

    /// Runs on contiguous cudarc buffers (of any element type whose size matches the op's dtype, e.g.
    /// `CudaSlice<u16>` or `CudaSlice<half::f16>`, or raw bytes, `CudaSlice<u8>`), on `q`'s stream, recording reads and writes so that
    /// cudarc orders later work on them.
    pub fn forward_slices<T, L>(
        &self,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<L>,
    ) -> Result<()> {
        let size = self.shape.dtype.size() as usize;
        let check = |name: &'static str, bytes: usize, elems: usize, elem: usize| {
            let t = std::mem::size_of::<T>();
            if name != "lse" && t != elem && t != 1 {
                return Err(Error::DType {
                    tensor: name,
                    expected: self.shape.dtype.name(),
                    got: "an element of another size",
                });
            }
            if bytes < elems * elem {
                return Err(Error::BufferTooSmall { tensor: name, got: bytes as u64, needed: (elems * elem) as u64 });
            }
            Ok(())
        };
        check("q", q.num_bytes(), self.elems(self.num_heads), size)?;
        check("k", k.num_bytes(), self.elems(self.num_kv_heads), size)?;
        check("v", v.num_bytes(), self.elems(self.num_kv_heads), size)?;
        check("out", out.num_bytes(), self.elems(self.num_heads), size)?;
        if std::mem::size_of::<L>() != 4 {
            return Err(Error::DType { tensor: "lse", expected: "f32", got: "an element of another size" });
        }
        check("lse", lse.num_bytes(), self.lse_elems(), 4)?;
        let stream = q.stream().clone();
        let (qp, _q) = q.device_ptr(&stream);
        let (kp, _k) = k.device_ptr(&stream);
        let (vp, _v) = v.device_ptr(&stream);
        let (op, _o) = out.device_ptr_mut(&stream);
        let (lp, _l) = lse.device_ptr_mut(&stream);
        // SAFETY: every buffer was checked to hold its whole tensor; cudarc keeps them alive and ordered
        // through the events the guards above record when they drop, after the launch.
        unsafe {
            self.forward_device(
                Some(&stream),
                &CudaTensor::new(qp),
                &CudaTensor::new(kp),
                &CudaTensor::new(vp),
                &CudaTensor::new(op),
                lp,
            )
        }
    }

    /// Uploads `q`, `k`, `v` (raw bytes of the op's dtype) into the op's reusable device buffers, with the
    /// outputs poisoned (all bits set: NaN) so that an unwritten element cannot pass for a result.
    fn with_host_buffers<R>(
        &self,
        q: &[u8],
        k: &[u8],
        v: &[u8],
        f: impl FnOnce(&mut HostBuffers) -> Result<R>,
    ) -> Result<R> {
        let size = self.shape.dtype.size() as usize;
        for (name, got, want) in [
            ("q", q.len(), self.elems(self.num_heads) * size),
            ("k", k.len(), self.elems(self.num_kv_heads) * size),
            ("v", v.len(), self.elems(self.num_kv_heads) * size),
        ] {
            if got != want {
                return Err(Error::Length {
                    tensor: name,
                    got: got / size,
                    expected: want / size,
                    layout: format!("{:?}", self.shape),
                });
            }
        }
        let stream = self.ctx.stream();
        let mut guard = self.host.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let alloc = |n: usize| stream.alloc_zeros::<u8>(n).map_err(cuda_err("allocating device buffers"));
            *guard = Some(HostBuffers {
                q: alloc(q.len())?,
                k: alloc(k.len())?,
                v: alloc(v.len())?,
                o: alloc(q.len())?,
                lse: stream.alloc_zeros::<f32>(self.lse_elems()).map_err(cuda_err("allocating device buffers"))?,
            });
        }
        let Some(bufs) = guard.as_mut() else { return Err(Error::Cuda("device buffers missing".into())) };
        stream.memcpy_htod(q, &mut bufs.q).map_err(cuda_err("copying q to the device"))?;
        stream.memcpy_htod(k, &mut bufs.k).map_err(cuda_err("copying k to the device"))?;
        stream.memcpy_htod(v, &mut bufs.v).map_err(cuda_err("copying v to the device"))?;
        poison(stream, &mut bufs.o)?;
        poison(stream, &mut bufs.lse)?;
        f(bufs)
    }

    /// Runs on host bytes (the op's dtype) and returns the output bytes and the LSE.
    pub fn run_host(&self, q: &[u8], k: &[u8], v: &[u8]) -> Result<(Vec<u8>, Vec<f32>)> {
        self.with_host_buffers(q, k, v, |b| {
            let stream = self.ctx.stream();
            let HostBuffers { q, k, v, o, lse } = b;
            self.forward_slices::<u8, f32>(q, k, v, o, lse)?;
            self.ctx.finish(stream, "running s2_forward")?;
            let out = stream.clone_dtoh(o).map_err(cuda_err("copying the output back"))?;
            let lse = stream.clone_dtoh(lse).map_err(cuda_err("copying the LSE back"))?;
            stream.synchronize().map_err(cuda_err("copying the output back"))?;
            Ok((out, lse))
        })
    }

    /// Times `iters` launches with CUDA events after `warmup` untimed ones, inputs uploaded once.
    pub fn time(&self, q: &[u8], k: &[u8], v: &[u8], warmup: u32, iters: u32) -> Result<Timing> {
        self.with_host_buffers(q, k, v, |b| {
            let stream = self.ctx.stream();
            let (qp, _q) = b.q.device_ptr(stream);
            let (kp, _k) = b.k.device_ptr(stream);
            let (vp, _v) = b.v.device_ptr(stream);
            let (op, _o) = b.o.device_ptr_mut(stream);
            let (lp, _l) = b.lse.device_ptr_mut(stream);
            let (q, k, v, o) = (CudaTensor::new(qp), CudaTensor::new(kp), CudaTensor::new(vp), CudaTensor::new(op));
            // SAFETY: the op's own buffers, sized for the shape when they were allocated.
            let run = || unsafe { self.forward_device(Some(stream), &q, &k, &v, &o, lp) };
            self.ctx.time_events("running s2_forward", warmup, iters, run)
        })
    }
}

fn poison<T>(stream: &Arc<CudaStream>, buf: &mut CudaSlice<T>) -> Result<()> {
    let bytes = buf.num_bytes();
    let (ptr, _g) = buf.device_ptr_mut(stream);
    // SAFETY: `ptr` addresses `bytes` bytes of this live allocation, on its own stream.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
        .map_err(cuda_err("poisoning the outputs"))
}
