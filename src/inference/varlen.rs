//! Variable-length attention: several sequences of different lengths packed into one call, with
//! separate cumulative offsets for queries and keys ([`SeqLens`], FlashAttention's `cu_seqlens_q` /
//! `cu_seqlens_k`). Each sequence's queries are its last tokens (chunked prefill: a chunk of new queries
//! at the end of a longer KV history), and the layout's blocks count from the sequence's start.
//!
//! Runs on the decode kernels: one family per (sequence, KV head, tile of query tokens) whose rows are the
//! group's query heads times the tile's tokens, its entries the blocks of the packed K/V those rows attend.

use super::worklist::{RowShape, SplitPolicy, WorkItem, WorkList, WorkListBuilder};
use crate::attention::{Element, Output};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::gpu::decode::{plan_attend_for, Call, GpuAttend, KvSource, RowIo};
use crate::gpu::{TensorView, WgpuContext};
use crate::layout::Layout;
use crate::plan::{DType, PORTABLE_HEAD_DIMS};
use std::ops::Range;

/// Validated cumulative sequence offsets: sequence `i` owns query rows `cu_q[i]..cu_q[i + 1]` and key
/// rows `cu_k[i]..cu_k[i + 1]` of the packed tensors, and has at least as many keys as queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLens {
    cu_q: Vec<u32>,
    cu_k: Vec<u32>,
}

impl SeqLens {
    /// From cumulative offsets (`n + 1` each, starting at 0, non-decreasing).
    pub fn new(cu_seqlens_q: &[u32], cu_seqlens_k: &[u32]) -> Result<Self> {
        for (name, cu) in [("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)] {
            if cu.len() < 2 || cu[0] != 0 {
                return Err(Error::Shape(format!("{name} must start at 0 and hold n + 1 >= 2 offsets, got {cu:?}")));
            }
            if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
                return Err(Error::Shape(format!("{name} decreases at index {}: {} < {}", i + 1, cu[i + 1], cu[i])));
            }
        }
        if cu_seqlens_q.len() != cu_seqlens_k.len() {
            return Err(Error::Shape(format!(
                "cu_seqlens_q has {} offsets, cu_seqlens_k {}: both need one per sequence plus one",
                cu_seqlens_q.len(),
                cu_seqlens_k.len()
            )));
        }
        let lens = Self { cu_q: cu_seqlens_q.to_vec(), cu_k: cu_seqlens_k.to_vec() };
        for i in 0..lens.len() {
            let (q, k) = (lens.q_range(i).len(), lens.k_range(i).len());
            if q > k {
                return Err(Error::Shape(format!(
                    "sequence {i} has {q} queries but {k} keys: queries are the last tokens of their KV history"
                )));
            }
        }
        Ok(lens)
    }

    /// From per-sequence query and key counts.
    pub fn from_lens(q_lens: &[u32], k_lens: &[u32]) -> Result<Self> {
        let cumulate = |name: &str, lens: &[u32]| -> Result<Vec<u32>> {
            let mut cu = vec![0u32];
            for &l in lens {
                let next = cu[cu.len() - 1]
                    .checked_add(l)
                    .ok_or_else(|| Error::Shape(format!("{name}: the total exceeds 2^32 tokens")))?;
                cu.push(next);
            }
            Ok(cu)
        };
        Self::new(&cumulate("q_lens", q_lens)?, &cumulate("k_lens", k_lens)?)
    }

    /// Sequences.
    pub fn len(&self) -> usize {
        self.cu_q.len() - 1
    }
    /// Whether there is no sequence (never true for a validated value).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Query rows of sequence `i` in the packed Q.
    pub fn q_range(&self, i: usize) -> Range<u32> {
        self.cu_q[i]..self.cu_q[i + 1]
    }
    /// Key rows of sequence `i` in the packed K and V.
    pub fn k_range(&self, i: usize) -> Range<u32> {
        self.cu_k[i]..self.cu_k[i + 1]
    }
    /// Query rows in all.
    pub fn total_q(&self) -> u32 {
        self.cu_q[self.len()]
    }
    /// Key rows in all.
    pub fn total_k(&self) -> u32 {
        self.cu_k[self.len()]
    }
    /// Cumulative query offsets.
    pub fn cu_seqlens_q(&self) -> &[u32] {
        &self.cu_q
    }
    /// Cumulative key offsets.
    pub fn cu_seqlens_k(&self) -> &[u32] {
        &self.cu_k
    }
}

/// Variable-length attention for one layout, head dim and dtype: packed Q `[total_q, heads, head_dim]`,
/// K and V `[total_k, kv_heads, head_dim]` → O `[total_q, heads, head_dim]` and LSE `[heads, total_q]`.
pub struct VarlenAttention {
    ctx: WgpuContext,
    layout: Layout,
    head_dim: u32,
    dtype: DType,
    scale: f32,
    policy: SplitPolicy,
    kernel: GpuAttend,
}

impl std::fmt::Debug for VarlenAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VarlenAttention").field("plan", self.kernel.plan()).finish()
    }
}

impl VarlenAttention {
    /// Plans and compiles the kernels for `layout` at `head_dim` in `dtype` (f32 or f16) on `ctx`.
    pub fn new(ctx: &Context, layout: &Layout, head_dim: u32, dtype: DType) -> Result<Self> {
        let ctx = ctx.require_wgpu("VarlenAttention::new")?.clone();
        if !PORTABLE_HEAD_DIMS.contains(&head_dim) {
            return Err(Error::HeadDim {
                got: head_dim,
                what: "the varlen WGSL kernel",
                supported: PORTABLE_HEAD_DIMS,
            });
        }
        if dtype == DType::BF16 {
            return Err(Error::Unsupported("bf16 has no WGSL kernel; use f16 or f32".into()));
        }
        let group = layout.num_heads() / layout.num_kv_heads();
        // As many query tokens per item as the 64 rows and the device's workgroup memory allow.
        let choices: Vec<u32> = [64u32, 32, 16, 8, 4, 2, 1].into_iter().filter(|&t| group * t <= 64).collect();
        let plan = plan_attend_for(ctx.caps(), dtype, head_dim, group, &choices, layout.block_size())?;
        let kernel = GpuAttend::new(&ctx, dtype, head_dim, layout.num_heads(), plan)?;
        Ok(Self {
            ctx,
            layout: layout.clone(),
            head_dim,
            dtype,
            scale: 1.0 / (head_dim as f32).sqrt(),
            policy: SplitPolicy::default(),
            kernel,
        })
    }

    /// Overrides the softmax scale.
    pub fn with_scale(mut self, scale: f32) -> Result<Self> {
        self.scale = super::checked_scale(scale)?;
        Ok(self)
    }

    /// Overrides when long KV histories are split over several workgroups.
    pub fn with_split_policy(mut self, policy: SplitPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The work list of a call whose K/V tokens lie `kv_token_stride` elements apart (`None`: contiguous).
    pub fn work_list(&self, lens: &SeqLens, kv_token_stride: Option<u64>) -> Result<WorkList> {
        let (h_n, hk_n) = (self.layout.num_heads(), self.layout.num_kv_heads());
        let group = h_n / hk_n;
        let (bs, d4) = (self.layout.block_size(), self.head_dim / 4);
        let stride = kv_token_stride.unwrap_or(hk_n as u64 * self.head_dim as u64);
        if stride % 4 != 0 || stride < hk_n as u64 * self.head_dim as u64 {
            return Err(Error::Shape(format!(
                "k/v token_stride {stride} must be a multiple of 4 and at least kv_heads * head_dim"
            )));
        }
        let max_k = (0..lens.len()).map(|i| lens.k_range(i).len() as u32).max().unwrap_or(0);
        if max_k > 0 {
            self.layout.check_seq_len(max_k)?;
        }
        let stride4 = stride / 4;
        if (lens.total_k() as u64 * stride4).max(lens.total_q() as u64 * h_n as u64) > u32::MAX as u64 {
            return Err(Error::Shape("the packed tensors exceed the kernel's 2^34-element addressing".into()));
        }
        let n_tok = self.kernel.plan().n_tok;
        let total_q = lens.total_q();
        let shape = RowShape {
            num_heads: h_n,
            group,
            n_tok,
            block_size: bs,
            causal: self.layout.causal(),
            kv_tok_stride: stride4 as u32,
            lse_head_stride: total_q,
        };
        let mut builder = WorkListBuilder::new(&self.layout, shape);
        for i in 0..lens.len() {
            let (q, k) = (lens.q_range(i), lens.k_range(i));
            let (q_len, k_len) = (q.len() as u32, k.len() as u32);
            for kvh in 0..hk_n {
                for t0 in (0..q_len).step_by(n_tok as usize) {
                    let n_valid = n_tok.min(q_len - t0);
                    let pos0 = k_len - q_len + t0;
                    let rows = WorkItem {
                        head0: kvh * group,
                        tok0: q.start + t0,
                        pos0,
                        n_valid,
                        kv_len: k_len,
                        lse0: kvh * group * total_q + q.start + t0,
                        ..WorkItem::default()
                    };
                    let last =
                        if self.layout.causal() { (pos0 + n_valid - 1) / bs + 1 } else { self.layout.blocks(k_len) };
                    let base = |kb: u32| ((k.start + kb * bs) as u64 * stride4 + (kvh * d4) as u64) as u32;
                    builder.family(rows, (0..last).map(|kb| (kb, base(kb))));
                }
            }
        }
        Ok(builder.finish(&self.policy, 0))
    }

    fn check<T: Element>(&self, lens: &SeqLens, q: &[T], k: &[T], v: &[T]) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType { tensor: "q", expected: self.dtype.name(), got: T::DTYPE.name() });
        }
        let d = self.head_dim as usize;
        for (name, got, tokens, heads) in [
            ("q", q.len(), lens.total_q(), self.layout.num_heads()),
            ("k", k.len(), lens.total_k(), self.layout.num_kv_heads()),
            ("v", v.len(), lens.total_k(), self.layout.num_kv_heads()),
        ] {
            let expected = tokens as usize * heads as usize * d;
            if got != expected {
                let layout = format!("[tokens {tokens}, heads {heads}, head_dim {d}]");
                return Err(Error::Length { tensor: name, got, expected, layout });
            }
        }
        Ok(())
    }

    /// Runs on host slices; see the type's docs for the shapes.
    pub fn forward<T: Element>(&self, lens: &SeqLens, q: &[T], k: &[T], v: &[T]) -> Result<Output<T>> {
        self.check(lens, q, k, v)?;
        if lens.total_q() == 0 {
            return Ok(Output { out: Vec::new(), lse: Vec::new() });
        }
        let list = self.work_list(lens, None)?;
        let upload = |name, x: &[T]| crate::gpu::decode::upload(&self.ctx, name, bytemuck::cast_slice(x));
        let (k_buf, v_buf) = (upload("s2attn varlen k", k), upload("s2attn varlen v", v));
        let call = Call {
            scale: self.scale,
            max_entries: 0,
            max_slots: 0,
            parts: vec![(&list, KvSource { k: &k_buf, v: &v_buf, k_off: 0, v_off: 0 })],
        };
        let tokens = lens.total_q() as u64;
        let lse_len = tokens * self.layout.num_heads() as u64;
        let (out, lse) = self.kernel.run_host(&call, bytemuck::cast_slice(q), tokens, lse_len)?;
        Ok(Output { out: bytemuck::pod_collect_to_vec(&out), lse })
    }

    /// Records a call into the caller's `encoder` on caller-owned buffers (strided views allowed; K and V
    /// must share a token stride). `lse` receives `[heads, total_q]` f32 from its first element. The work
    /// list goes into upload buffers of its own until the recorded work has run, so one encoder may hold
    /// several calls.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        lens: &SeqLens,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &TensorView<'_>,
        lse: (&wgpu::Buffer, u64),
    ) -> Result<()> {
        if k.token_stride != v.token_stride {
            return Err(Error::Shape(format!(
                "k and v token strides differ ({:?} vs {:?} elements)",
                k.token_stride, v.token_stride
            )));
        }
        let list = self.work_list(lens, k.token_stride)?;
        let row = self.layout.num_kv_heads() as u64 * self.head_dim as u64;
        let stride = k.token_stride.unwrap_or(row);
        for (name, view) in [("k", k), ("v", v)] {
            let needed = (view.offset + (lens.total_k().max(1) as u64 - 1) * stride + row) * self.dtype.size();
            if view.buffer.size() < needed {
                return Err(Error::BufferTooSmall { tensor: name, got: view.buffer.size(), needed });
            }
        }
        let kv = KvSource { k: k.buffer, v: v.buffer, k_off: k.offset, v_off: v.offset };
        let tokens = lens.total_q() as u64;
        let io = RowIo { q: *q, o: *out, lse, tokens, lse_len: tokens * self.layout.num_heads() as u64 };
        self.kernel.encode(
            encoder,
            &Call { scale: self.scale, max_entries: 0, max_slots: 0, parts: vec![(&list, kv)] },
            &io,
            None,
        )
    }
}

/// One-shot variable-length attention: plans, compiles (cached per context) and runs
/// [`VarlenAttention`] with the head dim implied by `q`'s length.
pub fn varlen_forward<T: Element>(
    ctx: &Context,
    layout: &Layout,
    lens: &SeqLens,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Result<Output<T>> {
    let per_dim = lens.total_q() as usize * layout.num_heads() as usize;
    if per_dim == 0 || q.len() % per_dim != 0 {
        return Err(Error::Shape(format!(
            "q has {} elements, not a positive multiple of total_q {} * heads {} (its head_dim is implied)",
            q.len(),
            lens.total_q(),
            layout.num_heads()
        )));
    }
    let head_dim = u32::try_from(q.len() / per_dim).map_err(|_| Error::Shape("head_dim exceeds u32".into()))?;
    VarlenAttention::new(ctx, layout, head_dim, T::DTYPE)?.forward(lens, q, k, v)
}
