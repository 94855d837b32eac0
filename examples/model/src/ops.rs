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
/// Matmul workgroup: 64 columns times 4 slices of K.
const MATMUL_WG: u32 = 256;
/// Rows per matmul workgroup for chunks of rows (prefill).
pub(super) const MATMUL_TM: u32 = 8;

/// The model's pipelines.
pub(super) struct Pipelines {
    pub embed: wgpu::ComputePipeline,
    pub norm: wgpu::ComputePipeline,
    /// Matmuls by rows per workgroup: `[1, MATMUL_TM]` (a decode step, a prefill chunk).
    pub matmul: [wgpu::ComputePipeline; 2],
    pub rope: wgpu::ComputePipeline,
    pub swiglu: wgpu::ComputePipeline,
    pub argmax: wgpu::ComputePipeline,
    /// f32 activations into the prefill attention's storage type, and back.
    pub pack: wgpu::ComputePipeline,
    pub unpack: wgpu::ComputePipeline,
}

impl Pipelines {
    /// Pipelines for weights stored as `weights` and a prefill attention in `attention`.
    pub fn new(ctx: &WgpuContext, weights: DType, attention: DType) -> Result<Self> {
        let f16 = u32::from(weights == DType::F16);
        let a16 = u32::from(attention == DType::F16);
        let cast = |src: u32, dst: u32| pipeline(ctx, Kernel::Cast, &[("WG", WG), ("SRC_F16", src), ("DST_F16", dst)]);
        Ok(Self {
            embed: pipeline(ctx, Kernel::Embed, &[("WG", WG), ("W_F16", f16)])?,
            norm: pipeline(ctx, Kernel::RmsNorm, &[("W_F16", f16)])?,
            matmul: [
                pipeline(ctx, Kernel::Matmul, &[("TM", 1), ("W_F16", f16), ("WG", MATMUL_WG)])?,
                pipeline(ctx, Kernel::Matmul, &[("TM", MATMUL_TM), ("W_F16", f16), ("WG", MATMUL_WG)])?,
            ],
            rope: pipeline(ctx, Kernel::Rope, &[("WG", WG)])?,
            swiglu: pipeline(ctx, Kernel::Swiglu, &[("WG", WG)])?,
            argmax: pipeline(ctx, Kernel::Argmax, &[])?,
            pack: cast(0, a16)?,
            unpack: cast(a16, 0)?,
        })
    }
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

/// Records one recorded-op dispatch: `params` (up to 8 words) into its slot of `staging`, `groups`
/// workgroups (spread over x and y when more than one dimension takes).
pub(super) fn dispatch(
    ctx: &WgpuContext,
    encoder: &mut wgpu::CommandEncoder,
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
    let mut pass = encoder
        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("s2attn model"), timestamp_writes: None });
    pass.set_pipeline(&op.pipeline);
    pass.set_bind_group(0, &op.group, &[]);
    pass.dispatch_workgroups(x as u32, y as u32, 1);
    Ok(())
}

/// Workgroups of an element-wise kernel over `n` invocations.
pub(super) fn elementwise(n: u64) -> (u64, u32) {
    (n.div_ceil(WG as u64), 1)
}

/// Workgroups of a matmul producing `[m, n]` with `tm` rows per workgroup.
pub(super) fn matmul_groups(m: u32, n: u32, tm: u32) -> (u64, u32) {
    ((n as u64).div_ceil(64), m.div_ceil(tm))
}
