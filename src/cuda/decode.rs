//! [`CudaDecode`]: the CUDA decode kernel (`shaders/cuda/s2_decode.cu`: the split pass, whose last item of
//! each split family merges the family's partials by LSE, one launch per call part; the tensor-core form
//! for up to 16 rows at head dims 64 and 128, else the narrow form for up to 4 rows, else the general
//! one) over the host-built
//! [`WorkList`]s of [`crate::Decode`], reading a [`crate::KvCache`] whose pools live in CUDA memory.
//! Compiled by NVRTC per (dtype, head dim, rows, key step); launches on host queries and CUDA-event timing.

use super::compile::KernelKey;
use super::context::{cuda_err, CudaContext};
use crate::error::{Error, Result};
use crate::gpu::Timing;
use crate::inference::WorkList;
use crate::plan::DType;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use std::fmt;
use std::sync::Arc;

const S2_DECODE_SRC: &str = include_str!("../../shaders/cuda/s2_decode.cu");
/// Threads of the split CTA.
const THREADS: u32 = 128;
/// Rows the narrow split kernel takes.
const NARROW_ROWS: u32 = 4;
/// Keys per thread per step of the narrow kernel (K/V words in registers).
const NARROW_KEYS: u32 = 8;
/// Rows an item may have (the entries' 64-bit row masks).
const MAX_ROWS: u32 = 64;
/// Rows the tensor-core kernel takes (one m16n8k16 tile of rows).
const MMA_ROWS: u32 = 16;
/// Keys of one tensor-core chunk (one mma k-step of P V).
const MMA_KEYS: u32 = 16;
/// Depths of each warp's cp.async ring in the tensor-core kernel, deepest first: the deepest whose shared
/// memory fits the device (3 on Hopper and A100: two chunks in flight per warp; 2 on GPUs of ~100 KiB).
const MMA_STAGES: [u32; 2] = [3, 2];

/// The form of the split kernel a [`CudaDecode`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// Any rows: K/V staged in shared memory, scores and P V in f32 FMAs.
    General,
    /// At most 4 rows: Q, K, V and O in registers.
    Narrow,
    /// At most 16 rows, head dim 64 or 128, sm_80 or newer: `mma.sync` over per-warp cp.async rings of
    /// `stages` slots.
    TensorCore { stages: u32 },
}

/// One part of a call: a work list and the K/V pools of its KV cache segment.
pub struct DecodePart<'a> {
    /// The part's work list.
    pub list: &'a WorkList,
    /// K pool bytes.
    pub k: &'a CudaSlice<u8>,
    /// V pool bytes.
    pub v: &'a CudaSlice<u8>,
}

/// Mirrors `struct Params` in `shaders/cuda/s2_decode.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Params {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    items: u64,
    entries: u64,
    part_o: u64,
    part_lse: u64,
    families: u64,
    done: u64,
    n_items: u32,
    num_heads: u32,
    n_tok: u32,
    block_size: u32,
    causal: u32,
    scale_log2: f32,
    kv_tok_stride: u32,
    lse_head_stride: u32,
    key_shift: u32,
}

// SAFETY: plain-old-data with the C layout the kernel declares.
unsafe impl DeviceRepr for Params {}

/// Device copies of one call part's work list (items and combine records, entries) with the tags of the
/// list they were made from, and its split families' done counts.
#[derive(Default)]
struct HeldPart {
    items: Option<CudaSlice<u32>>,
    families: Option<CudaSlice<u32>>,
    entries: Option<CudaSlice<u32>>,
    done: Option<CudaSlice<u32>>,
    items_tag: Option<u64>,
    entries_tag: Option<u64>,
}

/// What a [`CudaDecode`] keeps from call to call: each part's device copies, the partials, and how many
/// work list uploads it made. Every call runs on the context's one stream, so a call reusing a buffer runs
/// after the last one that read it.
#[derive(Default)]
struct Held {
    parts: Vec<HeldPart>,
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
    uploads: u64,
}

/// Writes `words` (at least one word) at the start of `slot`, replacing it with a larger buffer where it is
/// too small.
fn put(stream: &Arc<CudaStream>, slot: &mut Option<CudaSlice<u32>>, words: &[u32]) -> Result<()> {
    let words: &[u32] = if words.is_empty() { &[0; 4] } else { words };
    match slot {
        Some(b) if b.len() >= words.len() => {
            let mut view = b.slice_mut(0..words.len());
            stream.memcpy_htod(words, &mut view).map_err(cuda_err("uploading the decode work list"))
        }
        _ => {
            let b = stream
                .alloc_zeros::<u32>(words.len().next_power_of_two())
                .map_err(cuda_err("allocating the decode work list"))?;
            *slot = Some(b);
            put(stream, slot, words)
        }
    }
}

/// The address of `slot` holding at least `len` zero-initialised elements (a larger buffer, zeroed, where it
/// is too small).
fn grown<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<u64> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        let b = stream.alloc_zeros::<T>(len.next_power_of_two()).map_err(cuda_err("allocating the decode partials"))?;
        *slot = Some(b);
    }
    Ok(slot.as_ref().map_or(0, |b| b.device_ptr(stream).0))
}

/// The decode kernel for one (dtype, head dim, rows, key step).
pub struct CudaDecode {
    ctx: CudaContext,
    held: std::sync::Mutex<Held>,
    split: CudaFunction,
    rows: u32,
    tile_kv: u32,
    smem: u32,
    form: Form,
    head_dim: u32,
    num_heads: u32,
    dtype: DType,
}

impl fmt::Display for CudaDecode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form = match self.form {
            Form::General => String::new(),
            Form::Narrow => " narrow (Q/K/V/O in registers)".into(),
            Form::TensorCore { stages } => {
                format!(" tensor-core (mma.sync m16n8k16, a {stages}-slot cp.async ring per warp)")
            }
        };
        write!(
            f,
            "CUDA s2_decode{form} ({}): {} rows x {} keys per step, {THREADS} threads, {} B shared memory, 16 B loads",
            self.dtype, self.rows, self.tile_kv, self.smem
        )
    }
}

/// Dynamic shared bytes of the general split kernel: K (padded) and V steps, Q rows, scores, key-split
/// partials.
fn split_smem(rows: u32, tile_kv: u32, head_dim: u32) -> u32 {
    let w = head_dim / 8;
    let n_out = rows * w;
    let ks = if n_out <= THREADS { (THREADS / n_out).max(1) } else { 1 };
    16 * tile_kv * (2 * w + 1) + 4 * rows * head_dim + 4 * rows * tile_kv + 4 * 9 * (ks - 1) * n_out
}

/// Static shared bytes of the fused combine (`combine_family`, `finish_split`): per thread a maximum, a sum,
/// flags and a float4; per row an LSE; the last-item flag.
fn combine_smem(rows: u32) -> u32 {
    THREADS * (3 * 4 + 16) + 4 * rows + 4
}

impl CudaDecode {
    /// The narrow kernel's key step for `rows` rows, where it applies (at most 4 rows, the words of a
    /// key row dividing the CTA, a step of whole key groups dividing the block).
    fn narrow_tile(rows: u32, head_dim: u32, block_size: u32) -> Option<u32> {
        let w = head_dim / 8;
        if rows > NARROW_ROWS || THREADS % w != 0 {
            return None;
        }
        let groups = THREADS / w;
        [64u32, 32, 16, 8, 4, 2]
            .into_iter()
            .find(|&t| block_size % t == 0 && t % groups == 0 && t / groups <= NARROW_KEYS)
    }

    /// The ring depth and dynamic shared bytes (the warps' rings) of the tensor-core kernel where it
    /// applies: at most 16 rows, head dim 64 or 128, pages of whole 16-key chunks, compute capability 8.0
    /// or newer, the rings and the static pieces within `max_smem` bytes.
    fn tensor_core_smem(
        arch: (i32, i32),
        rows: u32,
        head_dim: u32,
        block_size: u32,
        max_smem: u32,
    ) -> Option<(u32, u32)> {
        let warps = THREADS / 32;
        // A scalar chunk's probabilities, the warps' row statistics, the combine.
        let fixed = warps * MMA_ROWS * MMA_KEYS * 4 + 3 * warps * MMA_ROWS * 4 + combine_smem(rows);
        let shape = arch.0 >= 8 && rows <= MMA_ROWS && matches!(head_dim, 64 | 128) && block_size % MMA_KEYS == 0;
        MMA_STAGES
            .into_iter()
            .map(|stages| (stages, stages * warps * 2 * MMA_KEYS * head_dim * 2))
            .find(|&(_, rings)| shape && rings + fixed <= max_smem)
    }

    /// Compiles (or fetches) the kernels for items of `rows` query rows over `block_size`-key pages: the
    /// tensor-core split kernel where it applies, else the narrow one, else the general one (each with the
    /// fused combine).
    pub fn new(
        ctx: &CudaContext,
        dtype: DType,
        head_dim: u32,
        num_heads: u32,
        rows: u32,
        block_size: u32,
    ) -> Result<Self> {
        if dtype == DType::F32 {
            return Err(Error::Unsupported("the CUDA decode kernel takes f16 or bf16 KV caches".into()));
        }
        if head_dim % 8 != 0 || head_dim > 256 {
            return Err(Error::HeadDim {
                got: head_dim,
                what: "the CUDA decode kernel",
                supported: &[32, 64, 96, 128, 256],
            });
        }
        if rows == 0 || rows > MAX_ROWS || (rows * head_dim / 8).div_ceil(THREADS) > 16 {
            return Err(Error::Shape(format!("{rows} rows per work item exceed the CUDA decode kernel's {MAX_ROWS}")));
        }
        let caps = ctx.caps();
        let tile_kv = [64u32, 32, 16, 8]
            .into_iter()
            .find(|&t| {
                block_size % t == 0
                    && (t * head_dim / 8).div_ceil(THREADS) <= 16
                    && split_smem(rows, t, head_dim) + combine_smem(rows) <= caps.max_workgroup_storage
            })
            .ok_or_else(|| Error::DeviceLimit {
                what: format!("the CUDA decode kernel at head_dim {head_dim}, {rows} rows"),
                limit: "shared memory per block",
                needed: (split_smem(rows, 8, head_dim) + combine_smem(rows)) as u64,
                max: caps.max_workgroup_storage as u64,
            })?;
        let (form, tile_kv, smem) = match (
            Self::tensor_core_smem(ctx.arch(), rows, head_dim, block_size, caps.max_workgroup_storage),
            Self::narrow_tile(rows, head_dim, block_size),
        ) {
            (Some((stages, smem)), _) => (Form::TensorCore { stages }, MMA_KEYS, smem),
            (None, Some(t)) => (Form::Narrow, t, 16 * ((t * head_dim / 8).max(2 * THREADS) + t)),
            (None, None) => (Form::General, tile_kv, split_smem(rows, tile_kv, head_dim)),
        };
        let bf16 = (dtype == DType::BF16) as i64;
        let stages = match form {
            Form::TensorCore { stages } => stages,
            _ => 0,
        };
        let kernel = |pass: i64, entry: &str, smem: u32| -> Result<CudaFunction> {
            let defines = [
                ("HEAD_DIM", head_dim as i64),
                ("ROWS", rows as i64),
                ("BK", tile_kv as i64),
                ("NT", THREADS as i64),
                ("IS_BF16", bf16),
                ("PASS", pass),
                ("STAGES", stages as i64),
            ];
            let key = KernelKey::new("s2_decode.cu", ctx.arch(), &defines);
            ctx.kernel(&key, S2_DECODE_SRC, entry, smem)
        };
        let split = match form {
            Form::General => kernel(0, "s2_decode_split", smem)?,
            // Static shared memory: no dynamic bytes at launch.
            Form::Narrow => kernel(1, "s2_decode_narrow", 0)?,
            Form::TensorCore { .. } => kernel(2, "s2_decode_mma", smem)?,
        };
        let held = std::sync::Mutex::new(Held::default());
        Ok(Self { ctx: ctx.clone(), held, split, rows, tile_kv, smem, form, head_dim, num_heads, dtype })
    }

    /// Dynamic shared bytes of a launch (the narrow kernel's are static).
    fn launch_smem(&self) -> u32 {
        if self.form == Form::Narrow {
            0
        } else {
            self.smem
        }
    }

    /// Split-pass CTAs one SM holds at once (the driver's occupancy of the compiled kernel).
    pub fn resident_per_sm(&self) -> Result<u32> {
        let smem = self.launch_smem() as usize;
        let n = self
            .split
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
            .map_err(cuda_err("querying the CUDA decode kernel's occupancy"))?;
        Ok(n.max(1))
    }

    /// The kernel parameters of each part, with Q/O/LSE left for the caller, over the device copies of the
    /// parts' work lists and the partials in `held`: a list is uploaded only where its tags say its contents
    /// changed (a token loop's even steps move only the key shift, a parameter), buffers grow as needed, and
    /// the split families' done counts are zero (fresh, or left zero by the kernel's last call).
    fn prepare(
        &self,
        held: &mut Held,
        stream: &Arc<CudaStream>,
        parts: &[DecodePart<'_>],
        scale: f32,
    ) -> Result<Vec<Params>> {
        let slots = parts.iter().map(|p| p.list.partial_slots().end).max().unwrap_or(0).max(1) as usize;
        let rows = self.rows as usize;
        let part_o = grown(stream, &mut held.part_o, slots * rows * self.head_dim as usize)?;
        let part_lse = grown(stream, &mut held.part_lse, slots * rows)?;
        if held.parts.len() < parts.len() {
            held.parts.resize_with(parts.len(), HeldPart::default);
        }
        let mut params = Vec::new();
        let mut wrote = false;
        for (part, h) in parts.iter().zip(held.parts.iter_mut()) {
            let list = part.list;
            let shape = list.shape();
            if shape.rows() != self.rows {
                return Err(Error::Shape(format!("work list of {} rows on a kernel for {}", shape.rows(), self.rows)));
            }
            if shape.kv_tok_stride % 2 != 0 {
                return Err(Error::Shape("k/v token stride must be a multiple of 8 elements".into()));
            }
            if h.items_tag != Some(list.items_tag()) {
                h.items_tag = None;
                put(stream, &mut h.items, bytemuck::cast_slice(list.items()))?;
                put(stream, &mut h.families, bytemuck::cast_slice(list.split_families()))?;
                h.items_tag = Some(list.items_tag());
                wrote = true;
            }
            if h.entries_tag != Some(list.upload_tag()) {
                h.entries_tag = None;
                put(stream, &mut h.entries, bytemuck::cast_slice(list.entries()))?;
                h.entries_tag = Some(list.upload_tag());
            }
            let done = grown(stream, &mut h.done, list.split_families().len().max(1))?;
            let ptr = |b: &Option<CudaSlice<u32>>| b.as_ref().map_or(0, |b| b.device_ptr(stream).0);
            params.push(Params {
                k: part.k.device_ptr(stream).0,
                v: part.v.device_ptr(stream).0,
                entries: ptr(&h.entries),
                part_o,
                part_lse,
                num_heads: self.num_heads,
                n_tok: shape.n_tok,
                block_size: shape.block_size,
                causal: shape.causal as u32,
                scale_log2: scale * std::f32::consts::LOG2_E,
                kv_tok_stride: shape.kv_tok_stride,
                lse_head_stride: shape.lse_head_stride,
                key_shift: list.key_shift(),
                items: ptr(&h.items),
                n_items: list.items().len() as u32,
                families: ptr(&h.families),
                done,
                ..Params::default()
            });
        }
        held.uploads += u64::from(wrote);
        Ok(params)
    }

    /// Calls so far that uploaded work items (a part's items and combine records, where the list's tag
    /// differed from what its device copy held).
    pub(crate) fn work_list_uploads(&self) -> u64 {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).uploads
    }

    /// Launches every part's kernel (one launch per part) with `q`/`o`/`lse` addresses.
    ///
    /// # Safety
    /// The parameters must address live device buffers sized for the call.
    unsafe fn launch(&self, stream: &CudaStream, params: &[Params], io: (u64, u64, u64)) -> Result<()> {
        let max_x = self.ctx.caps().max_dispatch.clamp(1, 65_535);
        let grid = |n: u32| (n.clamp(1, max_x), n.div_ceil(max_x).max(1), 1);
        let smem = self.launch_smem();
        for p in params.iter().filter(|p| p.n_items > 0) {
            let p = Params { q: io.0, o: io.1, lse: io.2, ..*p };
            let cfg = LaunchConfig { grid_dim: grid(p.n_items), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem };
            let mut args = stream.launch_builder(&self.split);
            args.arg(&p);
            // SAFETY: forwarded to the caller; the launch shape matches the compiled configuration.
            unsafe { args.launch(cfg) }.map_err(cuda_err("launching the CUDA decode"))?;
        }
        Ok(())
    }

    /// Enqueues a call on `stream` over device queries and outputs at `io` (the addresses of Q, O and the
    /// LSE) and returns without waiting; the work lists' device copies stay for the next call.
    ///
    /// # Safety
    /// `io` must address live device buffers sized for the call (Q and O `[tokens, heads, head_dim]` of the
    /// dtype, the LSE as the work lists index it, f32), alive until the stream has run the call.
    pub(crate) unsafe fn enqueue(
        &self,
        stream: &Arc<CudaStream>,
        parts: &[DecodePart<'_>],
        scale: f32,
        io: (u64, u64, u64),
    ) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.launch_held(stream, parts, scale, io, false) }
    }

    /// [`CudaDecode::prepare`] and [`CudaDecode::launch`] under the lock of the device copies; with
    /// `zero_counts`, the split families' done counts are zeroed first whatever the last call left.
    ///
    /// # Safety
    /// As [`CudaDecode::enqueue`].
    unsafe fn launch_held(
        &self,
        stream: &Arc<CudaStream>,
        parts: &[DecodePart<'_>],
        scale: f32,
        io: (u64, u64, u64),
        zero_counts: bool,
    ) -> Result<()> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let params = self.prepare(&mut held, stream, parts, scale)?;
        if zero_counts {
            for done in held.parts.iter_mut().take(parts.len()).filter_map(|h| h.done.as_mut()) {
                stream.memset_zeros(done).map_err(cuda_err("zeroing the decode done counts"))?;
            }
        }
        // SAFETY: forwarded to the caller; the device copies stay while the lock is held, and a later call
        // that replaces one frees it in stream order, after this launch.
        unsafe { self.launch(stream, &params, io) }
    }

    fn io(&self, stream: &Arc<CudaStream>, q: &[u8], lse_len: u64) -> Result<[CudaSlice<u8>; 3]> {
        let q_dev = stream.clone_htod(q).map_err(cuda_err("uploading the decode queries"))?;
        let mut o = stream.alloc_zeros::<u8>(q.len().max(16)).map_err(cuda_err("allocating the decode output"))?;
        let mut lse =
            stream.alloc_zeros::<u8>((lse_len as usize * 4).max(16)).map_err(cuda_err("allocating the LSE"))?;
        // Poison the outputs so that a row the kernels miss shows.
        for buf in [&mut o, &mut lse] {
            let bytes = buf.num_bytes();
            let (ptr, _g) = cudarc::driver::DevicePtrMut::device_ptr_mut(buf, stream);
            // SAFETY: `ptr` addresses `bytes` bytes of this live allocation, on its own stream.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
                .map_err(cuda_err("poisoning the decode outputs"))?;
        }
        Ok([q_dev, o, lse])
    }

    /// Runs a call on host queries (`[tokens, heads, head_dim]` bytes of the dtype); returns (O bytes,
    /// LSE).
    pub fn run(&self, parts: &[DecodePart<'_>], scale: f32, q: &[u8], lse_len: u64) -> Result<(Vec<u8>, Vec<f32>)> {
        let stream = self.ctx.stream();
        let [q_dev, o, lse] = self.io(stream, q, lse_len)?;
        let io = (q_dev.device_ptr(stream).0, o.device_ptr(stream).0, lse.device_ptr(stream).0);
        // A host call starts from zeroed done counts whatever the last call left (`time` compares the timed
        // calls with one).
        // SAFETY: the I/O buffers above are alive and sized for the call.
        unsafe { self.launch_held(stream, parts, scale, io, true)? };
        self.ctx.finish(stream, "running the CUDA decode")?;
        let out = stream.clone_dtoh(&o).map_err(cuda_err("reading the decode output"))?;
        let lse = stream.clone_dtoh(&lse).map_err(cuda_err("reading the LSE"))?;
        stream.synchronize().map_err(cuda_err("reading the decode output"))?;
        Ok((out[..q.len()].to_vec(), bytemuck::pod_collect_to_vec(&lse[..lse_len as usize * 4])))
    }

    /// Times `iters` calls with CUDA events after `warmup` untimed ones, on work lists and queries
    /// uploaded once; checks that the last timed call's output is a fresh call's.
    pub fn time(
        &self,
        parts: &[DecodePart<'_>],
        scale: f32,
        q: &[u8],
        lse_len: u64,
        warmup: u32,
        iters: u32,
    ) -> Result<Timing> {
        let stream = self.ctx.stream();
        let [q_dev, o, lse] = self.io(stream, q, lse_len)?;
        let timing = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let params = self.prepare(&mut held, stream, parts, scale)?;
            let io = (q_dev.device_ptr(stream).0, o.device_ptr(stream).0, lse.device_ptr(stream).0);
            // SAFETY: as in `run`.
            let run = || unsafe { self.launch(stream, &params, io) };
            self.ctx.time_events("running the CUDA decode", warmup, iters, run)?
        };
        // The timed calls reused the done counts: the last one's output must be a fresh call's, bit for bit
        // (a count left over would have skipped combines and timed less work).
        let timed = stream.clone_dtoh(&o).map_err(cuda_err("reading the decode output"))?;
        let (fresh, _) = self.run(parts, scale, q, lse_len)?;
        if timed[..q.len()] != fresh[..] {
            return Err(Error::Cuda("the timed decode calls diverged from a fresh call".into()));
        }
        Ok(timing)
    }
}
