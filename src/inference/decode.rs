//! `Decode`: attention of the last few tokens of many sequences against their KV history in a
//! [`KvCache`], on the portable WGSL decode kernels.
//!
//! The host flattens the cache's page tables into a [`WorkList`] (like vLLM's per-call block tables):
//! one family per (sequence, KV head) whose rows are the query heads of that KV head's group times the
//! queried tokens, so a GQA group reads each page once; entries are the resident pages its rows attend.
//! A token loop's next step patches the last step's lists (`step_plan.rs`) until a sequence crosses a
//! block boundary: where every sequence grew by the same tokens, by the lists' key shift, one word of the
//! call's parameters that the kernels add (the device copy of the items serves again), else item by item;
//! per step the host touches neither pages nor, in the common case, items. Long families are split over
//! several workgroups ([`SplitPolicy`], flash-decoding, sized to the device's wave of resident workgroups)
//! and merged by their LSE: on wgpu in a combine pass after the split pass (WGSL has no device-scope fence
//! between workgroups), on CUDA by the last item of each family to finish, in the same launch.

use super::kv_cache::{KvCache, SeqId};
use super::pool_storage::PoolDevice;
use super::step_plan::{SeqState, StepPlan};
use super::worklist::{RowShape, SplitPolicy, WorkItem, WorkList, WorkListBuilder};
use crate::attention::{Element, Output};
use crate::error::{Error, Result};
use crate::gpu::decode::{plan_attend_for, Call, GpuAttend, KvSource, RowIo};
use crate::gpu::{TensorView, Timing, WgpuContext};
use crate::layout::Layout;
use crate::plan::DType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Families per (sequence, KV head) a call may split its query tokens into to run on the narrow decode
/// kernel (whose rows are few) rather than in one family on the general one.
const NARROW_FAMILIES: u32 = 4;

/// The decode op for one [`KvCache`]: Q `[sequences, q_len, heads, head_dim]` → O of the same shape and
/// LSE `[sequences, heads, q_len]`, the queried tokens being the last `q_len` of each sequence.
pub struct Decode {
    engine: Engine,
    layout: Layout,
    cache_id: u64,
    head_dim: u32,
    dtype: DType,
    scale: f32,
    policy: SplitPolicy,
    /// The last call's work lists per queried tokens, patched step to step.
    plans: Mutex<HashMap<u32, StepPlan>>,
    /// Work lists built so far (calls whose lists were not patched).
    builds: std::sync::atomic::AtomicU64,
    /// Families whose blocks those builds read from the page tables.
    page_walks: std::sync::atomic::AtomicU64,
}

/// The kernels of a [`Decode`], by queried tokens per sequence, on the cache's device.
enum Engine {
    Wgpu {
        ctx: WgpuContext,
        kernels: Mutex<HashMap<u32, Arc<GpuAttend>>>,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        ctx: crate::cuda::CudaContext,
        kernels: Mutex<HashMap<u32, Arc<crate::cuda::CudaDecode>>>,
    },
}

impl std::fmt::Debug for Decode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decode").field("head_dim", &self.head_dim).field("dtype", &self.dtype).finish()
    }
}

impl Decode {
    /// A decode op reading `cache`, with softmax scale `1/sqrt(head_dim)` and the default
    /// [`SplitPolicy`] (on CUDA: [`SplitPolicy::for_wave`] of the device's SMs times the kernel's
    /// occupancy). Compiles the single-token kernel: WGSL for a cache of wgpu buffers, CUDA for one in
    /// CUDA memory.
    pub fn new(cache: &KvCache) -> Result<Self> {
        let head_dim = cache.config().head_dim;
        let engine = match cache.device() {
            PoolDevice::Wgpu(ctx) => Engine::Wgpu { ctx: ctx.clone(), kernels: Mutex::default() },
            #[cfg(feature = "cuda")]
            PoolDevice::Cuda(ctx) => Engine::Cuda { ctx: ctx.clone(), kernels: Mutex::default() },
        };
        let op = Self {
            engine,
            layout: cache.layout().clone(),
            cache_id: cache.id(),
            head_dim,
            dtype: cache.config().dtype,
            scale: 1.0 / (head_dim as f32).sqrt(),
            policy: SplitPolicy::default(),
            plans: Mutex::default(),
            builds: Default::default(),
            page_walks: Default::default(),
        };
        op.plan_text(1)?;
        // On CUDA the single-token kernel's occupancy says exactly how many items run at once.
        #[cfg(feature = "cuda")]
        let op = match &op.engine {
            Engine::Cuda { ctx, .. } => {
                let wave = ctx.multiprocessors() * op.cuda_kernel(1)?.resident_per_sm()?;
                op.with_split_policy(SplitPolicy::for_wave(wave))
            }
            Engine::Wgpu { .. } => op,
        };
        Ok(op)
    }

    /// Overrides the softmax scale.
    pub fn with_scale(mut self, scale: f32) -> Result<Self> {
        self.scale = super::checked_scale(scale)?;
        Ok(self)
    }

    /// Overrides when long histories are split over several workgroups.
    pub fn with_split_policy(mut self, policy: SplitPolicy) -> Self {
        self.policy = policy;
        self.plans = Mutex::default();
        self
    }

    /// Calls so far whose work lists were built from the page tables. A call over the same sequences as
    /// the last one of its `q_len`, each longer by tokens that stay in its query blocks and without pages
    /// allocated or freed since, patches that call's lists instead: a token loop builds them about once per
    /// block of each sequence, not every step.
    pub fn work_list_builds(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Families (one KV head of one sequence, per group of queried tokens) whose KV blocks the builds so far
    /// read from the page tables. A build after the last call over the same sequences in the same order
    /// takes the blocks of every sequence that kept its pages and query blocks from that call's lists, so
    /// in a token loop only the sequences that crossed a block boundary walk their page tables.
    pub fn page_walks(&self) -> u64 {
        self.page_walks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls so far that wrote their work items to the device. A step of a token loop in which every
    /// sequence grew by the same tokens and stayed in its query blocks moves the lists by their key shift
    /// (one word of the call's parameters, [`WorkList::key_shift`](crate::inference::WorkList::key_shift)),
    /// and the device copy of the items serves again (on wgpu and on CUDA).
    pub fn work_list_uploads(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if let Engine::Cuda { kernels, .. } = &self.engine {
            let kernels = kernels.lock().unwrap_or_else(|e| e.into_inner());
            return kernels.values().map(|k| k.work_list_uploads()).sum();
        }
        self.sum_over_wgpu_kernels(|k| k.item_uploads())
    }

    /// Device buffers this op has created so far: constant over steady-state calls (the work list goes
    /// into reused buffers that grow geometrically, never past what the cache's pool can need).
    /// (wgpu buffers; the CUDA path's device copies are not counted: 0.)
    pub fn buffers_created(&self) -> usize {
        self.sum_over_wgpu_kernels(|k| k.buffers_created())
    }

    /// The sum of `count` over the wgpu kernels made so far (0 on CUDA).
    fn sum_over_wgpu_kernels<T: std::iter::Sum<T>>(&self, count: impl Fn(&GpuAttend) -> T) -> T {
        match &self.engine {
            Engine::Wgpu { kernels, .. } => {
                let kernels = kernels.lock().unwrap_or_else(|e| e.into_inner());
                kernels.values().map(|k| count(k)).sum()
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda { .. } => std::iter::empty().sum(),
        }
    }

    fn kernel(&self, q_len: u32) -> Result<Arc<GpuAttend>> {
        #[allow(irrefutable_let_patterns)]
        let Engine::Wgpu { ctx, kernels } = &self.engine
        else {
            return Err(Error::Unsupported("this Decode op runs on CUDA: no WGSL kernel".into()));
        };
        let mut kernels = kernels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = kernels.get(&q_len) {
            return Ok(k.clone());
        }
        let group = self.layout.num_heads() / self.layout.num_kv_heads();
        let plan_for = |choices: &[u32]| {
            plan_attend_for(ctx.caps(), self.dtype, self.head_dim, group, choices, self.layout.block_size())
        };
        // A short window whose rows exceed the narrow kernel's runs as up to `NARROW_FAMILIES` families
        // of fewer tokens on it (each reads the same KV blocks, mostly from cache) rather than as one
        // family on the general kernel, whose FMA work grows with the rows.
        let narrow = (1..=q_len)
            .rev()
            .take_while(|&n| q_len.div_ceil(n) <= NARROW_FAMILIES)
            .find_map(|n| plan_for(&[n]).ok().filter(|p| p.narrow));
        // Else all `q_len` tokens in one item where the device allows; else fewer per item (the work list
        // then gives each sequence and KV head several items), down to one token.
        let plan = match narrow {
            Some(plan) => plan,
            None => plan_for(&(1..=q_len).rev().collect::<Vec<u32>>())?,
        };
        let k = Arc::new(GpuAttend::new(ctx, self.dtype, self.head_dim, self.layout.num_heads(), plan)?);
        kernels.insert(q_len, k.clone());
        Ok(k)
    }

    #[cfg(feature = "cuda")]
    fn cuda_kernel(&self, q_len: u32) -> Result<Arc<crate::cuda::CudaDecode>> {
        let Engine::Cuda { ctx, kernels } = &self.engine else {
            return Err(Error::Unsupported("this Decode op runs on wgpu: no CUDA kernel".into()));
        };
        let mut kernels = kernels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = kernels.get(&q_len) {
            return Ok(k.clone());
        }
        let rows = self.layout.num_heads() / self.layout.num_kv_heads() * q_len;
        let k = Arc::new(crate::cuda::CudaDecode::new(
            ctx,
            self.dtype,
            self.head_dim,
            self.layout.num_heads(),
            rows,
            self.layout.block_size(),
        )?);
        kernels.insert(q_len, k.clone());
        Ok(k)
    }

    /// Query tokens per work item of a call querying `q_len` tokens per sequence: `q_len` on CUDA, the
    /// plan's choice on wgpu (fewer where the rows of `q_len` tokens do not fit the device).
    fn item_tokens(&self, q_len: u32) -> Result<u32> {
        #[cfg(feature = "cuda")]
        if let Engine::Cuda { .. } = &self.engine {
            return Ok(q_len);
        }
        Ok(self.kernel(q_len)?.plan().n_tok)
    }

    /// The kernel's plan, as text.
    fn plan_text(&self, q_len: u32) -> Result<String> {
        #[cfg(feature = "cuda")]
        if let Engine::Cuda { .. } = &self.engine {
            return Ok(self.cuda_kernel(q_len)?.to_string());
        }
        Ok(self.kernel(q_len)?.plan().to_string())
    }

    /// The parts of a CUDA call: each work list with its segment's K and V pools.
    #[cfg(feature = "cuda")]
    fn cuda_parts<'a>(cache: &'a KvCache, lists: &'a [(usize, WorkList)]) -> Result<Vec<crate::cuda::DecodePart<'a>>> {
        lists
            .iter()
            .map(|(segment, list)| {
                let (k, v) = cache.cuda_pools(*segment)?;
                Ok(crate::cuda::DecodePart { list, k, v })
            })
            .collect()
    }

    /// The work lists of a call querying the last `q_len` tokens of each of `seqs`: one per KV cache
    /// segment the sequences live in, as `(segment, list)`; rows are numbered by the sequences' positions
    /// in `seqs`, partial slots of different lists do not overlap.
    pub fn work_lists(&self, cache: &KvCache, seqs: &[SeqId], q_len: u32) -> Result<Vec<(usize, WorkList)>> {
        self.build_lists(cache, seqs, q_len, None).map(|(lists, _)| lists)
    }

    /// [`Decode::work_lists`], taking the entries of the families of every sequence `reuse` marks from the
    /// lists of an earlier call over the same sequences in the same order (`StepPlan::unchanged`) instead
    /// of walking its page tables; also returns the families that walked theirs.
    fn build_lists(
        &self,
        cache: &KvCache,
        seqs: &[SeqId],
        q_len: u32,
        reuse: Option<(&StepPlan, &[bool])>,
    ) -> Result<(Vec<(usize, WorkList)>, u64)> {
        self.check_cache(cache)?;
        if seqs.is_empty() {
            return Err(Error::Shape("seqs: a decode call needs at least one sequence".into()));
        }
        let window = cache.config().query_window;
        if q_len == 0 || q_len > window {
            return Err(Error::Shape(format!(
                "q_len {q_len}: a decode call queries 1..={window} tokens per sequence (the cache's query_window)"
            )));
        }
        let (h_n, hk_n) = (self.layout.num_heads(), self.layout.num_kv_heads());
        let group = h_n / hk_n;
        let bs = self.layout.block_size();
        let d4 = self.head_dim / 4;
        let n_tok = self.item_tokens(q_len)?;
        let shape = RowShape {
            num_heads: h_n,
            group,
            n_tok,
            block_size: bs,
            causal: true,
            kv_tok_stride: d4,
            lse_head_stride: q_len,
        };
        let segments = seqs.iter().map(|&s| cache.segment_of(s)).collect::<Result<Vec<usize>>>()?;
        let mut used = segments.clone();
        used.sort_unstable();
        used.dedup();
        let mut lists = Vec::with_capacity(used.len());
        let mut first_slot = 0;
        let mut walked = 0;
        for segment in used {
            let mut builder = WorkListBuilder::new(&self.layout, shape);
            // The earlier call's list of this segment, whose families come in the same order as these.
            let earlier = reuse
                .and_then(|(plan, same)| plan.lists.iter().find(|(s, _)| *s == segment).map(|(_, list)| (list, same)));
            let mut family = 0;
            for (si, &seq) in seqs.iter().enumerate().filter(|&(i, _)| segments[i] == segment) {
                let reused = earlier.filter(|(_, same)| same.get(si).copied().unwrap_or(false)).map(|(list, _)| list);
                let si = si as u32;
                for kvh in 0..hk_n {
                    let len = cache.resident(seq, kvh)?.0;
                    if len < q_len {
                        return Err(Error::Shape(format!(
                            "seqs[{si}] ({seq}) holds {len} tokens, fewer than the {q_len} queried"
                        )));
                    }
                    // One family per `n_tok` of the queried tokens (one in all unless the plan took fewer).
                    for t0 in (0..q_len).step_by(n_tok as usize) {
                        let (_, resident) = cache.resident(seq, kvh)?;
                        let rows = WorkItem {
                            head0: kvh * group,
                            tok0: si * q_len + t0,
                            pos0: len - q_len + t0,
                            n_valid: n_tok.min(q_len - t0),
                            kv_len: len,
                            lse0: (si * h_n + kvh * group) * q_len + t0,
                            ..WorkItem::default()
                        };
                        debug_assert!(
                            self.all_resident(cache, seq, kvh, &rows),
                            "{seq}: a page KV head {kvh} needs was evicted"
                        );
                        match reused {
                            Some(list) => builder.family_of_entries(rows, list.entries_of_family(family)),
                            None => {
                                walked += 1;
                                builder.family(rows, resident.map(|(kb, page)| (kb, page.index() * bs * d4)));
                            }
                        }
                        family += 1;
                    }
                }
            }
            let list = builder.finish(&self.policy, first_slot);
            first_slot = list.partial_slots().end;
            lists.push((segment, list));
        }
        Ok((lists, walked))
    }

    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        if cache.id() != self.cache_id {
            return Err(Error::Shape("cache: this Decode op was built for another KvCache".into()));
        }
        Ok(())
    }

    /// Runs `f` on the work lists of a call ([`Decode::work_lists`]), patched from the last call of the
    /// same `q_len` where that gives what a fresh build would ([`StepPlan::advance`]): in a token loop the
    /// host walks the page tables once per query block, not every step.
    fn with_lists<R>(
        &self,
        cache: &KvCache,
        seqs: &[SeqId],
        q_len: u32,
        f: impl FnOnce(&[(usize, WorkList)]) -> Result<R>,
    ) -> Result<R> {
        self.check_cache(cache)?;
        let states = seqs
            .iter()
            .map(|&s| cache.step_state(s).map(|(len, epoch)| SeqState { len, epoch }))
            .collect::<Result<Vec<_>>>()?;
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let bs = self.layout.block_size();
        let patched = plans.get_mut(&q_len).is_some_and(|p| p.advance(seqs, &states, q_len, bs));
        if !patched {
            // Sequences that kept their pages and query blocks take their families' entries from the last
            // call's lists; the others walk their page tables.
            let earlier = plans.remove(&q_len);
            let same = earlier.as_ref().and_then(|p| p.unchanged(seqs, &states, q_len, bs));
            let reuse = earlier.as_ref().zip(same.as_deref());
            let (lists, walked) = self.build_lists(cache, seqs, q_len, reuse)?;
            self.builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.page_walks.fetch_add(walked, std::sync::atomic::Ordering::Relaxed);
            plans.insert(q_len, StepPlan::new(seqs, states, lists));
        }
        let plan = plans.get(&q_len).ok_or_else(|| Error::Device("decode work lists went missing".into()))?;
        debug_assert!(
            self.work_lists(cache, seqs, q_len).is_ok_and(|fresh| fresh == plan.lists),
            "patched or partly reused decode work lists differ from a fresh build"
        );
        f(&plan.lists)
    }

    /// Whether every block the rows attend is resident (the eviction rule's promise).
    fn all_resident(&self, cache: &KvCache, seq: SeqId, kvh: u32, rows: &WorkItem) -> bool {
        let Ok(table) = cache.page_table(seq, kvh) else { return false };
        let group = self.layout.num_heads() / self.layout.num_kv_heads();
        let bs = self.layout.block_size();
        (0..group).all(|g| {
            let p = self.layout.pattern_of_head(kvh * group + g);
            (rows.pos0..rows.pos0 + rows.n_valid).all(|pos| {
                let qb = pos / bs;
                (0..=qb).all(|kb| !self.layout.block_active(p, qb, kb) || table.get(kb).is_some())
            })
        })
    }

    /// A human-readable account of a call: kernel shape, families, splits, blocks read.
    pub fn explain(&self, cache: &KvCache, seqs: &[SeqId], q_len: u32) -> Result<String> {
        let lists = self.work_lists(cache, seqs, q_len)?;
        let plan = self.plan_text(q_len)?;
        let sum = |f: &dyn Fn(&WorkList) -> usize| lists.iter().map(|(_, l)| f(l)).sum::<usize>();
        let bps: Vec<u32> = lists.iter().map(|(_, l)| l.blocks_per_split()).filter(|&b| b != u32::MAX).collect();
        let split = match bps.iter().max() {
            None => "no split".to_string(),
            Some(b) => format!(
                "split at <= {b} blocks into {} items, {} combined families",
                sum(&|l| l.items().len()),
                sum(&|l| l.split_families().len())
            ),
        };
        Ok(format!(
            "decode {} sequences x {q_len} tokens: {}; {} families in {} KV cache segments, {} KV blocks read, {split}",
            seqs.len(),
            plan,
            sum(&|l| l.families()),
            lists.len(),
            sum(&|l| l.entries().len())
        ))
    }

    fn q_len_of(&self, seqs: &[SeqId], q_elems: usize) -> Result<u32> {
        if seqs.is_empty() {
            return Err(Error::Shape("seqs: a decode call needs at least one sequence".into()));
        }
        let per = seqs.len() * self.layout.num_heads() as usize * self.head_dim as usize;
        let q_len = q_elems / per;
        if q_len == 0 || q_elems % per != 0 {
            return Err(Error::Length {
                tensor: "q",
                got: q_elems,
                expected: q_len.max(1) * per,
                layout: format!(
                    "[sequences {}, q_len, heads {}, head_dim {}]",
                    seqs.len(),
                    self.layout.num_heads(),
                    self.head_dim
                ),
            });
        }
        u32::try_from(q_len).map_err(|_| Error::Shape(format!("q_len {q_len} exceeds u32")))
    }

    fn check_dtype<T: Element>(&self) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType { tensor: "q", expected: self.dtype.name(), got: T::DTYPE.name() });
        }
        Ok(())
    }

    fn call<'a>(&self, cache: &'a KvCache, lists: &'a [(usize, WorkList)]) -> Result<Call<'a>> {
        let parts = lists
            .iter()
            .map(|(segment, list)| {
                let (k, v) = cache.pools(*segment)?;
                Ok((list, KvSource { k, v, k_off: 0, v_off: 0 }))
            })
            .collect::<Result<_>>()?;
        // Each list's split items use at most the policy's partial slots.
        let max_slots = self.policy.max_partial_slots() * cache.segments() as u64;
        Ok(Call { scale: self.scale, max_entries: cache.max_segment_pages() as u64, max_slots, parts })
    }

    /// Runs on host data: `q` is `[seqs.len(), q_len, heads, head_dim]` (q_len from its length).
    pub fn run<T: Element>(&self, cache: &KvCache, seqs: &[SeqId], q: &[T]) -> Result<Output<T>> {
        self.check_dtype::<T>()?;
        let q_len = self.q_len_of(seqs, q.len())?;
        let tokens = seqs.len() as u64 * q_len as u64;
        let lse_len = tokens * self.layout.num_heads() as u64;
        self.with_lists(cache, seqs, q_len, |lists| {
            #[cfg(feature = "cuda")]
            if let Engine::Cuda { .. } = &self.engine {
                let parts = Self::cuda_parts(cache, lists)?;
                let (out, lse) = self.cuda_kernel(q_len)?.run(&parts, self.scale, bytemuck::cast_slice(q), lse_len)?;
                return Ok(Output { out: bytemuck::pod_collect_to_vec(&out), lse });
            }
            let (out, lse) =
                self.kernel(q_len)?.run_host(&self.call(cache, lists)?, bytemuck::cast_slice(q), tokens, lse_len)?;
            Ok(Output { out: bytemuck::pod_collect_to_vec(&out), lse })
        })
    }

    /// Runs a call on CUDA device buffers (a cache in CUDA memory), enqueued on the context's stream without
    /// waiting: `q` and `out` hold `[seqs.len() * q_len]` token rows of `[heads, head_dim]` in the cache's
    /// dtype (any element type of its size, or bytes), `lse` receives `[seqs.len(), heads, q_len]` f32.
    /// The call reads the cache as the stream finds it, so appends enqueued before it
    /// ([`KvCache::append_cuda`]) are in; cudarc orders later work on `out` and `lse` after it. Fails with
    /// [`Error::Unsupported`] on a wgpu cache, and on buffers too small or of another element size.
    #[cfg(feature = "cuda")]
    pub fn run_cuda<T, L>(
        &self,
        cache: &KvCache,
        seqs: &[SeqId],
        q_len: u32,
        q: &impl cudarc::driver::DevicePtr<T>,
        out: &mut impl cudarc::driver::DevicePtrMut<T>,
        lse: &mut impl cudarc::driver::DevicePtrMut<L>,
    ) -> Result<()> {
        let ctx = self.cuda_ctx()?;
        let es = self.dtype.size() as usize;
        for (tensor, size) in [("q", std::mem::size_of::<T>()), ("lse", std::mem::size_of::<L>())] {
            let want = if tensor == "lse" { 4 } else { es };
            if size != want && !(tensor == "q" && size == 1) {
                let expected = if tensor == "lse" { "f32" } else { self.dtype.name() };
                return Err(Error::DType { tensor, expected, got: "an element of another size" });
            }
        }
        let tokens = seqs.len() as u64 * q_len as u64;
        let lse_len = tokens * self.layout.num_heads() as u64;
        let rows = (tokens * self.layout.num_heads() as u64 * self.head_dim as u64) as usize * es;
        for (tensor, got, needed) in
            [("q", q.num_bytes(), rows), ("out", out.num_bytes(), rows), ("lse", lse.num_bytes(), lse_len as usize * 4)]
        {
            if got < needed {
                return Err(Error::BufferTooSmall { tensor, got: got as u64, needed: needed as u64 });
            }
        }
        let stream = ctx.stream().clone();
        let (qp, _q) = q.device_ptr(&stream);
        let (op, _o) = out.device_ptr_mut(&stream);
        let (lp, _l) = lse.device_ptr_mut(&stream);
        // SAFETY: Q, O and the LSE were checked to hold the call's rows; their guards record the launch for
        // cudarc's ordering when they drop, after it.
        unsafe { self.run_cuda_raw(cache, seqs, q_len, qp, op, lp) }
    }

    /// [`Decode::run_cuda`] on raw device addresses (`CUdeviceptr`s of the cache's CUDA context, as a C
    /// caller holds them): `q` and `out` `[seqs.len() * q_len, heads, head_dim]` in the cache's dtype, `lse`
    /// `[seqs.len(), heads, q_len]` f32.
    ///
    /// # Safety
    /// The addresses must hold those tensors in live device memory of the cache's context, valid until the
    /// stream has run the call.
    #[cfg(feature = "cuda")]
    pub unsafe fn run_cuda_raw(
        &self,
        cache: &KvCache,
        seqs: &[SeqId],
        q_len: u32,
        q: u64,
        out: u64,
        lse: u64,
    ) -> Result<()> {
        let ctx = self.cuda_ctx()?;
        if seqs.is_empty() {
            return Err(Error::Shape("seqs: a decode call needs at least one sequence".into()));
        }
        if q == 0 || out == 0 || lse == 0 || q % 16 != 0 || out % 16 != 0 || lse % 4 != 0 {
            return Err(Error::Shape(
                "Decode::run_cuda: q and out must be device addresses on 16 bytes (the kernels' row loads), lse on 4"
                    .into(),
            ));
        }
        let stream = ctx.stream().clone();
        self.with_lists(cache, seqs, q_len, |lists| {
            let parts = Self::cuda_parts(cache, lists)?;
            let kernel = self.cuda_kernel(q_len)?;
            // SAFETY: the caller's promise for Q, O and the LSE.
            unsafe { kernel.enqueue(&stream, &parts, self.scale, (q, out, lse)) }
        })
    }

    /// The CUDA context of a `run_cuda` call; [`Error::Unsupported`] on a wgpu op.
    #[cfg(feature = "cuda")]
    fn cuda_ctx(&self) -> Result<&crate::cuda::CudaContext> {
        match &self.engine {
            Engine::Cuda { ctx, .. } => Ok(ctx),
            Engine::Wgpu { .. } => Err(Error::Unsupported("Decode::run_cuda: this Decode op runs on wgpu".into())),
        }
    }

    /// Times the kernels alone on device-resident `q` (as [`Decode::run`]): `warmup` untimed calls, then
    /// `iters` timed ones with GPU timestamps where the device has them.
    pub fn time<T: Element>(
        &self,
        cache: &KvCache,
        seqs: &[SeqId],
        q: &[T],
        warmup: u32,
        iters: u32,
    ) -> Result<Timing> {
        self.check_dtype::<T>()?;
        let q_len = self.q_len_of(seqs, q.len())?;
        let tokens = seqs.len() as u64 * q_len as u64;
        let lse_len = tokens * self.layout.num_heads() as u64;
        self.with_lists(cache, seqs, q_len, |lists| {
            #[cfg(feature = "cuda")]
            if let Engine::Cuda { .. } = &self.engine {
                let parts = Self::cuda_parts(cache, lists)?;
                return self.cuda_kernel(q_len)?.time(
                    &parts,
                    self.scale,
                    bytemuck::cast_slice(q),
                    lse_len,
                    warmup,
                    iters,
                );
            }
            self.kernel(q_len)?.time(&self.call(cache, lists)?, bytemuck::cast_slice(q), tokens, lse_len, warmup, iters)
        })
    }

    /// Records a call into the caller's `encoder` on caller-owned buffers: `q` and `out` hold
    /// `[seqs.len() * q_len]` token rows of `[heads, head_dim]`, `lse` receives `[seqs.len(), heads,
    /// q_len]` f32 from its first element. Nothing is submitted. The call's work list goes into upload
    /// buffers of its own until its work has run, so one encoder may hold several calls of this op and
    /// the [`KvCache::append_encoded`]s between them, each call reading the cache as it stood when
    /// recorded. Submit before host calls change the cache ([`KvCache::append`] writes land at the next
    /// submit, ahead of all recorded work). A loop that submits without waiting is held back at 64 calls
    /// whose work has not run: the next call waits for the submitted work (bounded by the context's wait
    /// timeout); calls recorded into encoders not yet submitted count too, and past 64 of those the call
    /// fails with [`Error::Unsupported`](crate::Error::Unsupported).
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        cache: &KvCache,
        seqs: &[SeqId],
        q_len: u32,
        q: &TensorView<'_>,
        out: &TensorView<'_>,
        lse: (&wgpu::Buffer, u64),
    ) -> Result<()> {
        let tokens = seqs.len() as u64 * q_len as u64;
        let io = RowIo { q: *q, o: *out, lse, tokens, lse_len: tokens * self.layout.num_heads() as u64 };
        self.with_lists(cache, seqs, q_len, |lists| {
            self.kernel(q_len)?.encode(encoder, &self.call(cache, lists)?, &io, None)
        })
    }
}
