//! The model kernels' host side: the compiled pipelines, bound operations (a pipeline, a bind group made
//! once, and a slot in the shared params buffer) and recording a dispatch. All params of one submit are
//! staged on the host and written with one `queue.write_buffer` before it, so steady-state steps create
//! nothing.

use crate::shaders::{pipeline, Kernel};
use s2attn::gpu::WgpuContext;
use s2attn::DType;
use s2attn::{Error, Result};

/// Bytes between params slots (every device's uniform offset alignment divides 256).
const SLOT_BYTES: u64 = 256;
/// Bytes bound of a params slot (the largest params struct: 8 words).
const PARAM_BYTES: u64 = 32;
/// Workgroup size of the element-wise kernels.
const WG: u32 = 64;
/// Matmul workgroup (chunks of rows): 64 columns times 4 slices of K.
const MATMUL_WG: u32 = 256;
/// Rows per matmul workgroup for chunks of rows (prefill).
const MATMUL_TM: u32 = 8;
/// Columns per workgroup of `matmul.wgsl` (chunks of rows).
const MATMUL_COLS: u32 = 64;
/// Rows and columns per workgroup of the cooperative-matrix matmul.
const COOP_TILE: u32 = 128;
/// Subgroup size the cooperative-matrix matmul is written for (8 subgroups of it per workgroup).
const COOP_SUBGROUP: u32 = 32;
/// One-row matmul workgroup: `TN` 16-byte words along N times `256 / TN` slices of K.
const MATVEC_WG: u32 = 256;
/// 16-byte words of a weight row per one-row matmul workgroup, by pipeline: the widest that leaves at
/// least `MATVEC_MIN_GROUPS` workgroups is used (longer runs of a row per workgroup read faster; more
/// workgroups keep more loads in flight).
const MATVEC_TN: [u32; 3] = [2, 4, 8];
/// Workgroups a one-row matmul should have at least, where the narrowest rows still give them.
const MATVEC_MIN_GROUPS: u64 = 256;
/// Weight rows an invocation of the one-row matmul loads per loop step.
const MATVEC_ROWS: u32 = 4;

/// The model's pipelines.
pub(super) struct Pipelines {
    pub embed: wgpu::ComputePipeline,
    pub norm: wgpu::ComputePipeline,
    /// One-row matmuls (a decode step) by the `MATVEC_TN` entry they were made with.
    pub matvec: [wgpu::ComputePipeline; 3],
    /// The chunk-of-rows matmul (a prefill chunk).
    pub matmul: wgpu::ComputePipeline,
    /// Whether chunks of rows run on the cooperative-matrix matmul (else on `matmul.wgsl`).
    pub chunk_coop: bool,
    /// Columns in a 16-byte word of weights.
    word_cols: u32,
    pub rope: wgpu::ComputePipeline,
    pub swiglu: wgpu::ComputePipeline,
    pub argmax: wgpu::ComputePipeline,
    /// f32 activations into the prefill attention's storage type, and back.
    pub pack: wgpu::ComputePipeline,
    pub unpack: wgpu::ComputePipeline,
}

impl Pipelines {
    /// Pipelines for weights stored as `weights` and a prefill attention in `attention`. Chunks of rows
    /// run on cooperative matrices where the weights and the attention are f16 and the device has
    /// 16x16x16 f16 matrices, f16 shader arithmetic and a subgroup size fixed at 32 (their activations
    /// are then rounded to f16, as the attention's operands are); on `matmul.wgsl` elsewhere.
    pub fn new(ctx: &WgpuContext, weights: DType, attention: DType) -> Result<Self> {
        let f16 = u32::from(weights == DType::F16);
        let chunk_coop = weights == DType::F16 && attention == DType::F16 && coop_matmul_runs(ctx);
        let matvec = |tn: u32| {
            pipeline(ctx, Kernel::Matvec, &[("TN", tn), ("ROWS", MATVEC_ROWS), ("W_F16", f16), ("WG", MATVEC_WG)])
        };
        let chunk = match chunk_coop {
            true => pipeline(ctx, Kernel::MatmulCoop, &[("W_F16", 1)])?,
            false => pipeline(ctx, Kernel::Matmul, &[("TM", MATMUL_TM), ("W_F16", f16), ("WG", MATMUL_WG)])?,
        };
        let a16 = u32::from(attention == DType::F16);
        let cast = |src: u32, dst: u32| pipeline(ctx, Kernel::Cast, &[("WG", WG), ("SRC_F16", src), ("DST_F16", dst)]);
        Ok(Self {
            embed: pipeline(ctx, Kernel::Embed, &[("WG", WG), ("W_F16", f16)])?,
            norm: pipeline(ctx, Kernel::RmsNorm, &[("W_F16", f16)])?,
            matvec: [matvec(MATVEC_TN[0])?, matvec(MATVEC_TN[1])?, matvec(MATVEC_TN[2])?],
            matmul: chunk,
            chunk_coop,
            // A 16-byte word holds 8 f16 or 4 f32.
            word_cols: if weights == DType::F16 { 8 } else { 4 },
            rope: pipeline(ctx, Kernel::Rope, &[("WG", WG)])?,
            swiglu: pipeline(ctx, Kernel::Swiglu, &[("WG", WG)])?,
            argmax: pipeline(ctx, Kernel::Argmax, &[])?,
            pack: cast(0, a16)?,
            unpack: cast(a16, 0)?,
        })
    }

    /// The `MATVEC_TN` entry of the one-row matmul producing `n` columns.
    fn matvec_index(&self, n: u32) -> usize {
        let groups = |tn: u32| (n as u64).div_ceil((tn * self.word_cols) as u64);
        (0..MATVEC_TN.len()).rev().find(|&i| groups(MATVEC_TN[i]) >= MATVEC_MIN_GROUPS).unwrap_or(0)
    }

    /// The matmul pipeline of row mode `mode` (`0`: one row, `1`: a chunk) producing `n` columns.
    pub fn matmul_for(&self, mode: usize, n: u32) -> &wgpu::ComputePipeline {
        match mode {
            0 => &self.matvec[self.matvec_index(n)],
            _ => &self.matmul,
        }
    }

    /// Workgroups of [`Pipelines::matmul_for`]`(mode, n)` producing `[m, n]`.
    pub fn matmul_groups(&self, mode: usize, m: u32, n: u32) -> (u64, u32) {
        match mode {
            0 => self.matvec_groups(self.matvec_index(n), n),
            _ if self.chunk_coop => ((n as u64).div_ceil(COOP_TILE as u64), m.div_ceil(COOP_TILE)),
            _ => ((n as u64).div_ceil(MATMUL_COLS as u64), m.div_ceil(MATMUL_TM)),
        }
    }

    /// Workgroups of one-row matmul `matvec[index]` producing `n` columns.
    fn matvec_groups(&self, index: usize, n: u32) -> (u64, u32) {
        ((n as u64).div_ceil((MATVEC_TN[index] * self.word_cols) as u64), 1)
    }
}

/// Whether the cooperative-matrix matmul runs on `ctx`: 16x16x16 f16 matrices, f16 arithmetic, subgroups
/// of exactly `COOP_SUBGROUP` invocations, and its 256-invocation workgroup.
fn coop_matmul_runs(ctx: &WgpuContext) -> bool {
    let caps = ctx.caps();
    let info = &ctx.capabilities().info;
    let fixed = info.subgroup_min_size == COOP_SUBGROUP && info.subgroup_max_size == COOP_SUBGROUP;
    caps.coop_f16_16x16 && caps.shader_f16 && caps.subgroups && fixed && caps.max_invocations >= 8 * COOP_SUBGROUP
}

/// A pipeline with its bind group and params slot.
pub(super) struct Bound {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    slot: usize,
}

/// Makes [`Bound`] ops over one shared params buffer, handing out slots.
pub(super) struct Binder<'a> {
    ctx: &'a WgpuContext,
    params: &'a wgpu::Buffer,
    slots: usize,
}

impl<'a> Binder<'a> {
    pub fn new(ctx: &'a WgpuContext, params: &'a wgpu::Buffer) -> Self {
        Self { ctx, params, slots: 0 }
    }

    /// Slots handed out so far.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Binds `buffers` at bindings 1.. after the params at binding 0.
    pub fn bind(&mut self, pipeline: &wgpu::ComputePipeline, buffers: &[&wgpu::Buffer]) -> Result<Bound> {
        let slot = self.slots;
        if (slot as u64 + 1) * SLOT_BYTES > self.params.size() {
            return Err(Error::Shape(format!("model params buffer holds {} slots", self.params.size() / SLOT_BYTES)));
        }
        self.slots += 1;
        let params = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.params,
            offset: slot as u64 * SLOT_BYTES,
            size: wgpu::BufferSize::new(PARAM_BYTES),
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: params }];
        entries.extend(
            buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() }),
        );
        let group = self.ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("s2attn model"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Ok(Bound { pipeline: pipeline.clone(), group, slot })
    }
}

/// The params buffer of `slots` slots.
pub(super) fn params_buffer(ctx: &WgpuContext, slots: usize) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("s2attn model params"),
        size: slots as u64 * SLOT_BYTES,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Words of the staged params of every slot.
pub(super) fn staging_words(slots: usize) -> usize {
    slots * (SLOT_BYTES / 4) as usize
}

/// A compute pass for a run of model dispatches (wgpu orders each dispatch after the writes it reads,
/// without a pass per dispatch).
pub(super) fn pass(encoder: &mut wgpu::CommandEncoder) -> wgpu::ComputePass<'_> {
    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("s2attn model"), timestamp_writes: None })
}

/// Records one bound-op dispatch into `pass`: `params` (up to 8 words) into its slot of `staging`,
/// `groups` workgroups (spread over x and y when more than one dimension takes).
pub(super) fn dispatch(
    ctx: &WgpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    staging: &mut [u32],
    op: &Bound,
    params: &[u32],
    groups: (u64, u32),
) -> Result<()> {
    let at = op.slot * (SLOT_BYTES / 4) as usize;
    staging[at..at + params.len()].copy_from_slice(params);
    let max = ctx.caps().max_dispatch.max(1) as u64;
    // Two-dimensional grids (matmul: column tiles by row tiles) are taken as they are; one-dimensional
    // ones spread over x and y.
    let (x, y) = if groups.1 > 1 { (groups.0, groups.1 as u64) } else { (groups.0.clamp(1, max), 0) };
    let y = if groups.1 > 1 { y } else { groups.0.div_ceil(x) };
    if x > max || y > max {
        return Err(Error::DeviceLimit {
            what: format!("a model kernel of {} x {} workgroups", groups.0, groups.1),
            limit: "max_compute_workgroups_per_dimension",
            needed: x.max(y),
            max,
        });
    }
    pass.set_pipeline(&op.pipeline);
    pass.set_bind_group(0, &op.group, &[]);
    pass.dispatch_workgroups(x as u32, y as u32, 1);
    Ok(())
}

/// Workgroups of an element-wise kernel over `n` invocations.
pub(super) fn elementwise(n: u64) -> (u64, u32) {
    (n.div_ceil(WG as u64), 1)
}

#[cfg(test)]
mod tests {
    //! The matmul kernels (one row, chunks of rows: on cooperative matrices for f16 weights where the
    //! device has them) against a CPU matmul on random inputs of odd sizes, f32 and f16 weights, uploaded
    //! as the model uploads them; outputs poisoned first, so a column left unwritten or one written past
    //! N shows.

    use super::*;
    use crate::transformer::{upload_weights, Tensor};
    use crate::weights::Rng;
    use s2attn::{Backend, Context, ContextOptions};
    use wgpu::util::DeviceExt;

    /// A wgpu context (lavapipe in CI; the wgpu backend where the default is CUDA).
    fn context() -> Context {
        let ctx = Context::new().unwrap_or_else(|e| panic!("no GPU adapter (lavapipe in CI): {e}"));
        if ctx.wgpu().is_some() {
            return ctx;
        }
        let mut options = ContextOptions::from_env().unwrap_or_else(|e| panic!("{e}"));
        options.backend = Backend::Wgpu;
        Context::with_options(&options).unwrap_or_else(|e| panic!("no wgpu adapter: {e}"))
    }

    /// One matmul of `m` rows on the device (`kernel`: a one-row `matvec` entry, or `None` for the chunk
    /// kernel): `[m, n] (+)= x [m, k] · w [k, n]`, X rows `x_stride` apart from `x_off`, Y rows `y_stride`
    /// apart from `y_off` in a buffer that starts as `y0`. Returns the whole Y buffer.
    #[allow(clippy::too_many_arguments)]
    fn run(
        gpu: &WgpuContext,
        pipelines: &Pipelines,
        kernel: Option<usize>,
        weights: (DType, &[f32]),
        [m, k, n]: [u32; 3],
        x: &[f32],
        (x_off, x_stride): (u32, u32),
        (y_off, y_stride, accumulate): (u32, u32, bool),
        y0: &[f32],
    ) -> Vec<f32> {
        let w = upload_weights(gpu, weights.0, "test weights", weights.1, Tensor::Matrix(k as u64, n as u64))
            .expect("weights upload");
        let storage = |label, data: &[f32], usage| {
            gpu.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE | usage,
            })
        };
        let xb = storage("test x", x, wgpu::BufferUsages::empty());
        let yb = storage("test y", y0, wgpu::BufferUsages::COPY_SRC);
        let bytes = (y0.len() * 4) as u64;
        let read = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("test readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let params = params_buffer(gpu, 1);
        let mut binder = Binder::new(gpu, &params);
        let (pipeline, groups) = match kernel {
            Some(i) => (&pipelines.matvec[i], pipelines.matvec_groups(i, n)),
            None => (&pipelines.matmul, pipelines.matmul_groups(1, m, n)),
        };
        let op = binder.bind(pipeline, &[&xb, &w, &yb]).expect("bind");
        let mut staging = vec![0; staging_words(binder.slots())];
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        let p = [m, n, k, u32::from(accumulate), x_off, x_stride, y_off, y_stride];
        dispatch(gpu, &mut pass(&mut encoder), &mut staging, &op, &p, groups).expect("dispatch");
        encoder.copy_buffer_to_buffer(&yb, 0, &read, 0, bytes);
        gpu.queue().write_buffer(&params, 0, bytemuck::cast_slice(&staging));
        gpu.queue().submit([encoder.finish()]);
        bytemuck::pod_collect_to_vec(&gpu.read_buffer(&read, bytes).expect("readback"))
    }

    #[test]
    fn matmuls_match_a_cpu_matmul_at_odd_sizes() {
        let ctx = context();
        let gpu = ctx.wgpu().expect("a wgpu context");
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        // (m, k, n): N odd, below one word, a multiple of 8 with a partial last workgroup; K odd, 1, and
        // not a multiple of the slices or of the rows per loop step (or of a cooperative-matrix chunk);
        // M past one tile of chunk rows (of either chunk kernel), K over several chunks.
        let shapes = [
            (1, 37, 101),
            (1, 1, 3),
            (1, 131, 264),
            (1, 258, 9),
            (11, 37, 101),
            (8, 131, 72),
            (3, 1, 5),
            (70, 45, 131),
            (150, 77, 131),
            (130, 300, 40),
        ];
        // (weights, attention): the attention's storage type picks the cooperative-matrix chunk kernel
        // for f16 weights where the device has it.
        for (dtype, attention) in [(DType::F32, DType::F32), (DType::F16, DType::F32), (DType::F16, DType::F16)] {
            let pipelines = Pipelines::new(gpu, dtype, attention).expect("pipelines");
            if attention == DType::F16 && !pipelines.chunk_coop {
                eprintln!("no cooperative matrices on {}: chunks ran on matmul.wgsl", gpu.adapter_name());
            }
            let round = crate::weights::rounding(dtype);
            for (m, k, n) in shapes {
                let w: Vec<f32> = rng.vec((k * n) as usize).into_iter().map(round).collect();
                // One row: every width of the one-row kernel; more: the chunk kernel.
                let kernels: Vec<Option<usize>> =
                    if m == 1 { (0..MATVEC_TN.len()).map(Some).collect() } else { vec![None] };
                for (kernel, accumulate) in kernels.into_iter().flat_map(|k| [(k, false), (k, true)]) {
                    // X rows and Y rows strided, with room before and between them.
                    let (x_off, x_stride) = (3, k + 2);
                    let (y_off, y_stride) = (5, n + 3);
                    let x = rng.vec((x_off + m * x_stride) as usize);
                    let poison = f32::from_bits(0x7fc0_dead);
                    let mut y0 = vec![poison; (y_off + m * y_stride + 4) as usize];
                    let at = |r: u32, c: u32| (y_off + r * y_stride + c) as usize;
                    let init = rng.vec((m * n) as usize);
                    if accumulate {
                        for (i, v) in init.iter().enumerate() {
                            y0[at(i as u32 / n, i as u32 % n)] = *v;
                        }
                    }
                    let y = run(
                        gpu,
                        &pipelines,
                        kernel,
                        (dtype, &w),
                        [m, k, n],
                        &x,
                        (x_off, x_stride),
                        (y_off, y_stride, accumulate),
                        &y0,
                    );
                    let what = format!(
                        "{dtype} weights, {attention} attention, m {m} k {k} n {n}, kernel {kernel:?}, accumulate {accumulate}"
                    );
                    // The cooperative-matrix kernel rounds X to f16 (a relative 2^-11 per product).
                    let rel = if kernel.is_none() && pipelines.chunk_coop { 6e-4 } else { 1e-5 };
                    let mut expected = y0.clone();
                    for r in 0..m {
                        for c in 0..n {
                            let (mut sum, mut mag) = (0f64, 0f64);
                            for kk in 0..k {
                                let t =
                                    x[(x_off + r * x_stride + kk) as usize] as f64 * w[(kk * n + c) as usize] as f64;
                                (sum, mag) = (sum + t, mag + t.abs());
                            }
                            let base = if accumulate { init[(r * n + c) as usize] as f64 } else { 0.0 };
                            let (got, want) = (y[at(r, c)] as f64, base + sum);
                            assert!(
                                (got - want).abs() <= rel * (1.0 + mag),
                                "{what}: y[{r}, {c}] = {got}, expected {want}"
                            );
                            expected[at(r, c)] = y[at(r, c)];
                        }
                    }
                    // Nothing outside the output's rows and columns was written.
                    let same = y.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: a value outside Y's [m, n] changed");
                }
            }
        }
    }
}
