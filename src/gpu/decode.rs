//! Host side of the decode kernels (`shaders/decode_split.wgsl`, `shaders/decode_combine.wgsl`): the
//! workgroup shape for a row count ([`AttendPlan`]), both pipelines, and encoding one call's
//! [`WorkList`] (written into buffers reused from call to call, `decode/buffers.rs`) as one compute
//! pass: the split pass, then the combine pass when the list split a family.

use super::forward::read_buffer;
use super::shaders::Kernel;
use super::timing::time_encoded;
use super::{TensorView, Timing, WgpuContext};
use crate::error::{Error, Result};
use crate::inference::WorkList;
use crate::inference::{WorkEntry, WorkItem};
use crate::plan::{DType, DeviceCaps};
use buffers::{BindKey, CallBuffers, HostBuffers, PartBuffers, PartContents, UploadSet};
use std::fmt;
use std::sync::Mutex;
use wgpu::util::DeviceExt;

mod buffers;

/// 16-byte words of K (and of V) one invocation of the split kernel loads per chunk (`MAX_NL`).
const MAX_LOADS: u32 = 16;
/// Outputs (16-byte words of a row of O) one invocation of the split kernel holds (`MAX_NA`).
const MAX_ACC: u32 = 16;
/// Rows an item may have (the entries' 64-bit row masks).
pub const MAX_ROWS: u32 = 64;
/// Invocations of the split kernel's workgroup (fewer where the device allows fewer).
const SPLIT_WORKGROUP: u32 = 128;

/// The split kernel's workgroup shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttendPlan {
    /// Query rows per work item (`group * n_tok`).
    pub rows: u32,
    /// Query tokens per work item.
    pub n_tok: u32,
    /// Keys staged per step (divides the block size).
    pub tile_kv: u32,
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Workgroup memory in bytes.
    pub workgroup_bytes: u32,
    /// 16-byte words of K (and of V) each invocation loads per step.
    pub loads: u32,
    /// Outputs (16-byte words of a row of O) each invocation accumulates.
    pub accumulators: u32,
    /// Invocations sharing one output, each over every `key_splits`-th key.
    pub key_splits: u32,
    /// The narrow kernel (`decode_split_narrow.wgsl`: at most 4 rows, Q/K/V/O in registers; `loads` is
    /// then its keys per invocation per step).
    pub narrow: bool,
}

impl fmt::Display for AttendPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.narrow {
            return write!(
                f,
                "narrow: {} rows ({} tokens) x {} keys per step, {} invocations (K/V/O in registers, {} keys \
                 each per step), {} B workgroup memory",
                self.rows, self.n_tok, self.tile_kv, self.workgroup_size, self.loads, self.workgroup_bytes
            );
        }
        write!(
            f,
            "{} rows ({} tokens) x {} keys per step, {} invocations ({} x 16 B loads of K and V each, {} outputs, \
             {} key splits), {} B workgroup memory",
            self.rows,
            self.n_tok,
            self.tile_kv,
            self.workgroup_size,
            self.loads,
            self.accumulators,
            self.key_splits,
            self.workgroup_bytes
        )
    }
}

impl AttendPlan {
    /// The split kernel of this plan and its override constants at `head_dim` for `dtype` storage.
    pub(crate) fn split_kernel(&self, dtype: DType, head_dim: u32) -> (Kernel, Vec<(&'static str, u32)>) {
        let (d, half) = (("D", head_dim), ("HALF", (dtype == DType::F16) as u32));
        if self.narrow {
            let red = (self.tile_kv * self.workgroup_size / (self.tile_kv / self.loads)).max(4 * self.workgroup_size);
            (Kernel::DecodeSplitNarrow, vec![d, ("R", self.rows), ("BK", self.tile_kv), half, ("RED", red)])
        } else {
            let constants = vec![
                d,
                ("R", self.rows),
                ("BK", self.tile_kv),
                ("WG", self.workgroup_size),
                half,
                ("NL", self.loads),
                ("NA", self.accumulators),
                ("KS", self.key_splits),
            ];
            (Kernel::DecodeSplit, constants)
        }
    }
}

/// Elements of `dtype` in one 16-byte word.
fn word_elems(dtype: DType) -> u32 {
    (16 / dtype.size()) as u32
}

/// Workgroup bytes of the split kernel: Q rows (f32), padded K and plain V chunks (16-byte words), scores,
/// and a flags word per row.
fn split_bytes(rows: u32, tile_kv: u32, head_dim: u32, dtype: DType) -> u32 {
    let w = head_dim / word_elems(dtype);
    4 * rows * head_dim + 16 * tile_kv * (2 * w + 1) + 4 * rows * tile_kv + 4 * rows
}

/// [`plan_attend_for`] f32 storage: whether a row count fits, for any storage type (f32 words hold the
/// fewest elements, so what fits for f32 fits for f16).
pub fn plan_attend(
    caps: &DeviceCaps,
    head_dim: u32,
    group: u32,
    n_tok_choices: &[u32],
    block_size: u32,
) -> Result<AttendPlan> {
    plan_attend_for(caps, DType::F32, head_dim, group, n_tok_choices, block_size)
}

/// Invocations of the combine kernel (at least [`MAX_ROWS`]).
const COMBINE_WORKGROUP: u32 = 256;
/// Invocations of the narrow kernel.
const NARROW_WORKGROUP: u32 = 128;
/// Rows the narrow kernel takes (the lanes of a vec4).
const NARROW_ROWS: u32 = 4;
/// Keys per invocation per step of the narrow kernel (K/V words held in registers).
const NARROW_KEYS: u32 = 8;

/// The narrow kernel's plan for `rows` rows, where it applies: at most 4 rows, 16-byte words per key row
/// dividing its 128 invocations, and a key step (a multiple of the key groups) dividing the block.
fn plan_narrow(
    caps: &DeviceCaps,
    dtype: DType,
    head_dim: u32,
    rows: u32,
    n_tok: u32,
    block_size: u32,
) -> Option<AttendPlan> {
    let w = head_dim / word_elems(dtype);
    if rows == 0 || rows > NARROW_ROWS || w == 0 || NARROW_WORKGROUP % w != 0 || caps.max_invocations < NARROW_WORKGROUP
    {
        return None;
    }
    let groups = NARROW_WORKGROUP / w;
    let tile_kv = [64u32, 32, 16, 8, 4, 2]
        .into_iter()
        .find(|&t| block_size % t == 0 && t % groups == 0 && t / groups <= NARROW_KEYS)?;
    let red = (tile_kv * w).max(4 * NARROW_WORKGROUP);
    // The reduction buffer and the chunk's scores (vec4s), and the 4 rows' flags words.
    let bytes = 16 * (red + tile_kv) + 4 * NARROW_ROWS;
    (bytes <= caps.max_workgroup_storage).then_some(AttendPlan {
        rows,
        n_tok,
        tile_kv,
        workgroup_size: NARROW_WORKGROUP,
        workgroup_bytes: bytes,
        loads: tile_kv / groups,
        accumulators: 2 * rows,
        key_splits: 1,
        narrow: true,
    })
}

/// The widest item (first of `n_tok_choices` that fits) and the largest key chunk that fit the device,
/// for `dtype` storage: the narrow kernel where it applies, else the general one.
pub fn plan_attend_for(
    caps: &DeviceCaps,
    dtype: DType,
    head_dim: u32,
    group: u32,
    n_tok_choices: &[u32],
    block_size: u32,
) -> Result<AttendPlan> {
    let wg = SPLIT_WORKGROUP.min(caps.max_invocations.max(8));
    let w = head_dim / word_elems(dtype);
    for &n_tok in n_tok_choices {
        let rows = group * n_tok;
        if let Some(plan) = plan_narrow(caps, dtype, head_dim, rows, n_tok, block_size) {
            return Ok(plan);
        }
        let n_out = rows * w;
        let accumulators = n_out.div_ceil(wg);
        if rows == 0 || rows > MAX_ROWS || accumulators > MAX_ACC {
            continue;
        }
        for tile_kv in [64u32, 32, 16, 8] {
            let bytes = split_bytes(rows, tile_kv, head_dim, dtype);
            let loads = (tile_kv * w).div_ceil(wg);
            if tile_kv > block_size || block_size % tile_kv != 0 || wg % tile_kv != 0 || loads > MAX_LOADS {
                continue;
            }
            if bytes > caps.max_workgroup_storage {
                continue;
            }
            // Key splits leave their partial sums in the K (two words each) and V (one word) chunks.
            let mut key_splits = if accumulators == 1 { (wg / n_out).max(1) } else { 1 };
            while key_splits > 1
                && (2 * (key_splits - 1) * n_out > tile_kv * (w + 1) || (key_splits - 1) * n_out > tile_kv * w)
            {
                key_splits -= 1;
            }
            return Ok(AttendPlan {
                rows,
                n_tok,
                tile_kv,
                workgroup_size: wg,
                workgroup_bytes: bytes,
                loads,
                accumulators,
                key_splits,
                narrow: false,
            });
        }
    }
    let n_tok = n_tok_choices.last().copied().unwrap_or(1);
    let rows = group * n_tok;
    if rows > MAX_ROWS || (rows * w).div_ceil(wg) > MAX_ACC {
        return Err(Error::Shape(format!(
            "{group} query heads per KV head x {n_tok} query tokens = {rows} rows per work item exceeds the decode \
             kernel's {} (at most {MAX_ROWS}, and rows * head_dim <= {} elements)",
            MAX_ROWS.min(wg * MAX_ACC / w.max(1)),
            wg * MAX_ACC * word_elems(dtype)
        )));
    }
    Err(Error::DeviceLimit {
        what: format!("the decode kernel at head_dim {head_dim}, {rows} rows"),
        limit: "max_compute_workgroup_storage_size",
        needed: split_bytes(rows, 8, head_dim, dtype) as u64,
        max: caps.max_workgroup_storage as u64,
    })
}

/// `AttendParams` of `shaders/shared/decode.wgsl`, padded to 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    num_heads: u32,
    n_tok: u32,
    block_size: u32,
    causal: u32,
    scale_log2: f32,
    q_off: u32,
    q_stride: u32,
    o_off: u32,
    o_stride: u32,
    k_off: u32,
    v_off: u32,
    kv_tok_stride: u32,
    lse_off: u32,
    lse_head_stride: u32,
    n_items: u32,
    neg_inf: f32,
    key_shift: u32,
    n_families: u32,
    pad: [u32; 2],
}

/// Where one call reads K and V: buffers (pools or packed tensors) and element offsets.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvSource<'a> {
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub k_off: u64,
    pub v_off: u64,
}

/// One call: its softmax scale and its parts, each a work list with the K/V it reads (one part per KV
/// cache segment; partial slots of different parts do not overlap).
#[derive(Clone, Debug)]
pub(crate) struct Call<'a> {
    pub scale: f32,
    /// The most entries any call of this op can hold per part (a KV cache segment's pages; 0 when
    /// unknown): caps the geometric growth of the reused buffers.
    pub max_entries: u64,
    /// The most partial slots any call of this op writes (0 when unknown).
    pub max_slots: u64,
    pub parts: Vec<(&'a WorkList, KvSource<'a>)>,
}

/// What one call reads and writes besides K and V.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowIo<'a> {
    /// Q rows (`[tokens, heads, head_dim]`, strided views allowed).
    pub q: TensorView<'a>,
    /// O rows, as Q.
    pub o: TensorView<'a>,
    /// LSE buffer and first element.
    pub lse: (&'a wgpu::Buffer, u64),
    /// Packed query tokens (rows of Q and O).
    pub tokens: u64,
    /// LSE elements the call writes from its first element.
    pub lse_len: u64,
}

/// Both decode pipelines for one (dtype, head_dim, plan), and the buffers their calls reuse.
pub(crate) struct GpuAttend {
    ctx: WgpuContext,
    dtype: DType,
    head_dim: u32,
    num_heads: u32,
    plan: AttendPlan,
    split: wgpu::ComputePipeline,
    combine: wgpu::ComputePipeline,
    buffers: Mutex<CallBuffers>,
    /// The host path's staging, locked for a whole host call.
    host: Mutex<HostBuffers>,
}

impl GpuAttend {
    pub(crate) fn new(
        ctx: &WgpuContext,
        dtype: DType,
        head_dim: u32,
        num_heads: u32,
        plan: AttendPlan,
    ) -> Result<Self> {
        let d = ("D", head_dim);
        let (kernel, constants) = plan.split_kernel(dtype, head_dim);
        let split = ctx.pipeline(kernel, dtype, &constants)?;
        let n4 = plan.rows * head_dim / 4;
        let combine = ctx.pipeline(
            Kernel::DecodeCombine,
            dtype,
            &[
                d,
                ("R", plan.rows),
                ("WG", COMBINE_WORKGROUP),
                ("LL", (COMBINE_WORKGROUP / plan.rows).min(16)),
                ("N4", n4),
                ("SL", (COMBINE_WORKGROUP / n4).max(1)),
            ],
        )?;
        let buffers = Mutex::new(CallBuffers::new(ctx));
        let host = Mutex::new(HostBuffers::new(ctx));
        Ok(Self { ctx: ctx.clone(), dtype, head_dim, num_heads, plan, split, combine, buffers, host })
    }

    pub(crate) fn plan(&self) -> &AttendPlan {
        &self.plan
    }

    /// Calls so far that wrote their work items to the device (see [`crate::Decode::work_list_uploads`]).
    pub(crate) fn item_uploads(&self) -> u64 {
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).item_uploads
    }

    /// Device buffers created so far (constant once the calls stop growing).
    pub(crate) fn buffers_created(&self) -> usize {
        self.buffers.lock().unwrap_or_else(|e| e.into_inner()).created
            + self.host.lock().unwrap_or_else(|e| e.into_inner()).created
    }

    /// Checks a Q/O view of `tokens` rows; returns (offset, token stride) in vec4 units.
    fn view(&self, name: &'static str, view: &TensorView<'_>, tokens: u64) -> Result<(u32, u32)> {
        let row = self.num_heads as u64 * self.head_dim as u64;
        let stride = view.token_stride.unwrap_or(row);
        if stride < row || view.offset % 4 != 0 || stride % 4 != 0 {
            return Err(Error::Shape(format!(
                "{name}: offset {} and token_stride {stride} must be multiples of 4 elements, the stride at least \
                 heads * head_dim = {row}",
                view.offset
            )));
        }
        let needed = (view.offset + (tokens.max(1) - 1) * stride + row) * self.dtype.size();
        self.bindable(name, view.buffer, needed)?;
        Ok((vec4(name, view.offset)?, vec4(name, stride)?))
    }

    fn bindable(&self, name: &'static str, buffer: &wgpu::Buffer, needed: u64) -> Result<()> {
        super::forward::check_binding(&self.ctx, name, buffer, needed)
    }

    /// Grows an upload set's buffers to hold `call` (capped by its bound); returns the buffers created.
    fn reserve_set(&self, set: &mut UploadSet, call: &Call<'_>) -> usize {
        let ctx = &self.ctx;
        let mut created = 0;
        while set.parts.len() < call.parts.len() {
            set.parts.push(PartBuffers::new(ctx, std::mem::size_of::<Params>() as u64));
            created += PartBuffers::BUFFERS;
        }
        let (item, entry) = (std::mem::size_of::<WorkItem>() as u64, std::mem::size_of::<WorkEntry>() as u64);
        // Entries of one part are at most its pool's pages; families too (each holds a page); items at
        // most entries plus families.
        let bound = call.max_entries;
        for ((list, _), part) in call.parts.iter().zip(&mut set.parts) {
            let grown = [
                part.items.reserve(ctx, list.items().len() as u64 * item, 2 * bound * item),
                part.entries.reserve(ctx, list.entries().len() as u64 * entry, bound * entry),
                part.families.reserve(ctx, list.split_families().len() as u64 * item, bound * item),
            ];
            let n = grown.iter().filter(|&&g| g).count();
            if n > 0 {
                part.held = None;
                created += n;
            }
        }
        created
    }

    /// Grows the partials to hold `call` (partial slots are at most the items of all parts); forgets the
    /// cached bind groups when `created` (this call's new buffers so far) or a partial buffer is new.
    fn reserve_partials(&self, held: &mut CallBuffers, call: &Call<'_>, mut created: usize) {
        let ctx = &self.ctx;
        let slots = call.parts.iter().map(|(list, _)| list.partial_slots().end).max().unwrap_or(0) as u64;
        let slot_bound = call.max_slots;
        let rows = self.plan.rows as u64;
        let o_row = rows * self.head_dim as u64 * 4;
        created += held.part_o.reserve(ctx, slots * o_row, slot_bound * o_row) as usize;
        created += held.part_lse.reserve(ctx, slots * rows * 4, slot_bound * rows * 4) as usize;
        if created > 0 {
            held.created += created;
            held.forget_binds();
        }
    }

    /// Records a call into `encoder` as one compute pass: the split pass of every part, then the combine
    /// pass of every part that split a family. The work list goes into an upload set of its own until the
    /// recorded work has run (`gpu/upload_sets.rs`), so calls may share an encoder.
    pub(crate) fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        call: &Call<'_>,
        io: &RowIo<'_>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let (q_off, q_stride) = self.view("q", &io.q, io.tokens)?;
        let (o_off, o_stride) = self.view("out", &io.o, io.tokens)?;
        self.bindable("lse", io.lse.0, (io.lse.1 + io.lse_len) * 4)?;
        let lse_off = u32::try_from(io.lse.1).map_err(|_| Error::Shape("lse offset exceeds u32".into()))?;
        // Check every part before writing anything.
        let mut params = Vec::with_capacity(call.parts.len());
        for (list, kv) in &call.parts {
            let shape = list.shape();
            if shape.rows() != self.plan.rows {
                return Err(Error::Shape(format!(
                    "work list of {} rows on a kernel planned for {}",
                    shape.rows(),
                    self.plan.rows
                )));
            }
            self.bindable("k", kv.k, 0)?;
            self.bindable("v", kv.v, 0)?;
            // K and V are read in 16-byte words: offsets and the token stride in whole words.
            let word = word_elems(self.dtype) as u64;
            if kv.k_off % word != 0 || kv.v_off % word != 0 || (shape.kv_tok_stride as u64 * 4) % word != 0 {
                return Err(Error::Shape(format!(
                    "k/v: offsets ({}, {}) and token stride ({}) must be multiples of {word} elements (16 bytes)",
                    kv.k_off,
                    kv.v_off,
                    shape.kv_tok_stride as u64 * 4
                )));
            }
            params.push(Params {
                num_heads: self.num_heads,
                n_tok: shape.n_tok,
                block_size: shape.block_size,
                causal: shape.causal as u32,
                scale_log2: call.scale * std::f32::consts::LOG2_E,
                q_off,
                q_stride,
                o_off,
                o_stride,
                k_off: vec4("k", kv.k_off)?,
                v_off: vec4("v", kv.v_off)?,
                kv_tok_stride: shape.kv_tok_stride,
                lse_off,
                lse_head_stride: shape.lse_head_stride,
                n_items: list.items().len() as u32,
                neg_inf: f32::NEG_INFINITY,
                key_shift: list.key_shift(),
                n_families: list.split_families().len() as u32,
                pad: [0; 2],
            });
        }
        let contents: Vec<PartContents> = call
            .parts
            .iter()
            .zip(&params)
            .map(|((list, _), params)| PartContents {
                params: bytemuck::bytes_of(params).to_vec(),
                items_tag: list.items_tag(),
                entries_tag: list.upload_tag(),
            })
            .collect();
        let mut guard = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let held = &mut *guard;
        held.parts_seen = held.parts_seen.max(call.parts.len());
        let taken = held.uploads.take(
            || self.ctx.wait(),
            encoder,
            "decode",
            |set| set.holds(&contents),
            || UploadSet { parts: Vec::new() },
        )?;
        let (set_index, holds) = (taken.index, taken.holds);
        let set = taken.value;
        let created = if holds { 0 } else { self.reserve_set(set, call) };
        if !holds {
            let queue = self.ctx.queue();
            let mut items_written = false;
            for (((list, _), params), (part, contents)) in
                call.parts.iter().zip(&params).zip(set.parts.iter_mut().zip(contents))
            {
                // A list patched from the last step's keeps its entries, and a step that only moved its key
                // shift its items too: their device copies may still be in place.
                let same_entries = part.held.as_ref().is_some_and(|h| h.entries_tag == contents.entries_tag);
                let same_items = part.held.as_ref().is_some_and(|h| h.items_tag == contents.items_tag);
                let entries: &[u8] = if same_entries { &[] } else { bytemuck::cast_slice(list.entries()) };
                let (items, families): (&[u8], &[u8]) = match same_items {
                    true => (&[], &[]),
                    false => (bytemuck::cast_slice(list.items()), bytemuck::cast_slice(list.split_families())),
                };
                items_written |= !same_items;
                for (buffer, bytes) in [
                    (&part.params, bytemuck::bytes_of(params)),
                    (part.items.get(), items),
                    (part.entries.get(), entries),
                    (part.families.get(), families),
                ] {
                    if !bytes.is_empty() {
                        queue.write_buffer(buffer, 0, bytes);
                    }
                }
                part.held = Some(contents);
            }
            held.item_uploads += items_written as u64;
        }
        self.reserve_partials(held, call, created);
        // Per part: (split bind group, items), (combine bind group, split families).
        let mut groups = Vec::with_capacity(call.parts.len());
        for (i, (list, kv)) in call.parts.iter().enumerate() {
            let families = list.split_families();
            let key = BindKey {
                set: set_index,
                part: i,
                buffers: [io.q.buffer, io.o.buffer, io.lse.0, kv.k, kv.v].map(|b| b.clone()),
            };
            let (split, combine) = held.binds(key, |held| self.bind_groups(held, set_index, i, io, kv));
            groups.push((
                (split, list.items().len() as u32),
                (!families.is_empty()).then_some((combine, families.len() as u32)),
            ));
        }
        drop(guard);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("s2attn decode"),
            timestamp_writes: timestamps,
        });
        pass.set_pipeline(&self.split);
        for ((split, n), _) in &groups {
            pass.set_bind_group(0, split, &[]);
            self.dispatch(&mut pass, *n);
        }
        if groups.iter().any(|(_, c)| c.is_some()) {
            pass.set_pipeline(&self.combine);
            for (combine, n) in groups.iter().filter_map(|(_, c)| c.as_ref()) {
                pass.set_bind_group(0, combine, &[]);
                self.dispatch(&mut pass, *n);
            }
        }
        Ok(())
    }

    /// The split and combine bind groups of part `i` of upload set `set` on the caller's buffers.
    fn bind_groups(
        &self,
        held: &CallBuffers,
        set: usize,
        i: usize,
        io: &RowIo<'_>,
        kv: &KvSource<'_>,
    ) -> (wgpu::BindGroup, wgpu::BindGroup) {
        let part = &held.uploads.get(set).parts[i];
        let (part_o, part_lse) = (held.part_o.get(), held.part_lse.get());
        let bind = |pipeline: &wgpu::ComputePipeline, entries: &[(u32, &wgpu::Buffer)]| {
            let entries: Vec<wgpu::BindGroupEntry> = entries
                .iter()
                .map(|&(binding, b)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() })
                .collect();
            self.ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("s2attn decode"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        };
        let split = bind(
            &self.split,
            &[
                (0, &part.params),
                (1, io.q.buffer),
                (2, kv.k),
                (3, kv.v),
                (4, io.o.buffer),
                (5, part.items.get()),
                (6, part.entries.get()),
                (7, part_o),
                (8, part_lse),
                (9, io.lse.0),
            ],
        );
        let combine = bind(
            &self.combine,
            &[(0, &part.params), (4, io.o.buffer), (5, part.families.get()), (7, part_o), (8, part_lse), (9, io.lse.0)],
        );
        (split, combine)
    }

    /// One workgroup per item, folded into a second dimension past the per-dimension limit.
    fn dispatch(&self, pass: &mut wgpu::ComputePass<'_>, n: u32) {
        let x = n.clamp(1, self.ctx.caps().max_dispatch.max(1));
        pass.dispatch_workgroups(x, n.div_ceil(x).max(1), 1);
    }

    /// Runs `list` on host data: uploads Q (raw bytes of the dtype), runs, reads back `(out, lse)`; the
    /// staging buffers are reused from call to call.
    pub(crate) fn run_host(&self, call: &Call<'_>, q: &[u8], tokens: u64, lse_len: u64) -> Result<(Vec<u8>, Vec<f32>)> {
        let device = self.ctx.device();
        let o_bytes = q.len() as u64;
        let lse_bytes = lse_len * 4;
        // Held until the readback: another host call on this op would overwrite Q before this one's submit.
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
        let h = &mut *host;
        h.created += [
            h.q.reserve(&self.ctx, o_bytes, 0),
            h.out.reserve(&self.ctx, o_bytes, 0),
            h.lse.reserve(&self.ctx, lse_bytes, 0),
            h.readback.reserve(&self.ctx, o_bytes + lse_bytes, 0),
        ]
        .iter()
        .filter(|&&c| c)
        .count();
        let (q_buf, out, lse, readback) = (h.q.get(), h.out.get(), h.lse.get(), h.readback.get());
        // Q's bytes padded to whole words (f16 rows are whole vec4s, so this only guards odd inputs).
        if q.len() % 4 == 0 {
            self.ctx.queue().write_buffer(q_buf, 0, q);
        } else {
            let mut padded = q.to_vec();
            padded.resize(q.len().next_multiple_of(4), 0);
            self.ctx.queue().write_buffer(q_buf, 0, &padded);
        }
        let mut encoder = device.create_command_encoder(&Default::default());
        let io = RowIo { q: TensorView::new(q_buf), o: TensorView::new(out), lse: (lse, 0), tokens, lse_len };
        self.encode(&mut encoder, call, &io, None)?;
        encoder.copy_buffer_to_buffer(out, 0, readback, 0, o_bytes);
        encoder.copy_buffer_to_buffer(lse, 0, readback, o_bytes, lse_bytes);
        self.ctx.queue().submit([encoder.finish()]);
        let bytes = read_buffer(&self.ctx, readback, o_bytes + lse_bytes)?;
        let (o, l) = bytes.split_at(o_bytes as usize);
        Ok((o.to_vec(), bytemuck::pod_collect_to_vec(l)))
    }

    /// Times `list` on device-resident Q: `warmup` untimed calls, then `iters` timed ones (GPU timestamps
    /// around each pass where the device has them, else the wall clock around each waited submit).
    pub(crate) fn time(
        &self,
        call: &Call<'_>,
        q: &[u8],
        tokens: u64,
        lse_len: u64,
        warmup: u32,
        iters: u32,
    ) -> Result<Timing> {
        if iters == 0 {
            return Err(Error::Shape("timing needs iters >= 1".into()));
        }
        let q_buf = upload(&self.ctx, "s2attn decode q", q);
        let out = scratch(&self.ctx, "s2attn decode out", q.len() as u64, wgpu::BufferUsages::empty());
        let lse = scratch(&self.ctx, "s2attn decode lse", lse_len * 4, wgpu::BufferUsages::empty());
        let io = RowIo { q: TensorView::new(&q_buf), o: TensorView::new(&out), lse: (&lse, 0), tokens, lse_len };
        time_encoded(&self.ctx, warmup, iters, |encoder, stamps| {
            let writes = stamps.map(|s| wgpu::ComputePassTimestampWrites {
                query_set: s.set,
                beginning_of_pass_write_index: Some(s.begin),
                end_of_pass_write_index: Some(s.end),
            });
            self.encode(encoder, call, &io, writes)
        })
    }
}

/// `x` elements as vec4 units in u32.
fn vec4(name: &str, x: u64) -> Result<u32> {
    if x % 4 != 0 {
        return Err(Error::Shape(format!("{name}: offset {x} must be a multiple of 4 elements")));
    }
    u32::try_from(x / 4).map_err(|_| Error::Shape(format!("{name}: offset/stride {x} exceeds 2^34 elements")))
}

/// A storage buffer holding `bytes` (padded to 4 bytes, at least 16).
pub(crate) fn upload(ctx: &WgpuContext, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let mut contents = bytes.to_vec();
    contents.resize(bytes.len().next_multiple_of(4).max(16), 0);
    ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: &contents,
        usage: wgpu::BufferUsages::STORAGE,
    })
}

/// An uninitialised buffer of `size` bytes (at least 16): storage unless `usage` says `MAP_READ`.
fn scratch(ctx: &WgpuContext, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    let usage = if usage.contains(wgpu::BufferUsages::MAP_READ) {
        usage | wgpu::BufferUsages::COPY_DST
    } else {
        usage | wgpu::BufferUsages::STORAGE
    };
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.next_multiple_of(4).max(16),
        usage,
        mapped_at_creation: false,
    })
}
