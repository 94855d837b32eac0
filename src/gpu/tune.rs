//! The coop kernel's autotuning target on a wgpu device ([`crate::plan::TuneTarget`]): names the adapter
//! and driver for the tuning cache and times a candidate plan on random f16 data of the problem's class
//! (batch 1, at most [`crate::plan::TUNE_MAX_SEQ`] tokens).

use super::{GpuForward, WgpuContext};
use crate::error::Result;
use crate::layout::Layout;
use crate::plan::{DispatchPlan, Shape, TuneTarget, TUNE_MAX_SEQ};

/// Times forward plans for one (layout, shape) on one device.
pub(crate) struct ForwardTuner<'a> {
    ctx: &'a WgpuContext,
    layout: &'a Layout,
    shape: Shape,
    data: Vec<u8>,
}

impl<'a> ForwardTuner<'a> {
    pub(crate) fn new(ctx: &'a WgpuContext, layout: &'a Layout, shape: Shape) -> Self {
        Self { ctx, layout, shape, data: Vec::new() }
    }
}

impl TuneTarget for ForwardTuner<'_> {
    fn device_key(&self) -> String {
        let i = &self.ctx.capabilities().info;
        format!("{} ({:?}) {} {}", i.name, i.backend, i.driver, i.driver_info)
    }

    fn subgroup_sizes(&self) -> (u32, u32) {
        let i = &self.ctx.capabilities().info;
        (i.subgroup_min_size, i.subgroup_max_size)
    }

    fn subgroup_barriers(&self) -> bool {
        self.ctx.capabilities().features.contains(wgpu::Features::SUBGROUP_BARRIER)
    }

    fn measure(&mut self, plan: &DispatchPlan) -> Result<f64> {
        let shape = Shape { batch: 1, seq_len: self.shape.seq_len.min(TUNE_MAX_SEQ), ..self.shape };
        let row = shape.seq_len as usize * shape.head_dim as usize * shape.dtype.size() as usize;
        let q_bytes = row * self.layout.num_heads() as usize;
        let kv_bytes = row * self.layout.num_kv_heads() as usize;
        // Q, K and V are slices of one buffer at different offsets: random f16 values in [-1, 1) (never
        // zeros, which matrix units run faster on), and never K = Q (a self-similar score matrix).
        let (k_at, v_at) = (row / 2 + 16, row + 32);
        if self.data.len() < q_bytes.max(v_at + kv_bytes) {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            self.data = (0..q_bytes.max(v_at + kv_bytes) / 2)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let v = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    half::f16::from_f32(v).to_le_bytes()
                })
                .collect();
        }
        let mergeq = self.layout.mergeq(shape.seq_len, plan.tile_q);
        let forward = GpuForward::new(self.ctx, self.layout, shape, plan.clone(), mergeq)?;
        let (q, k, v) = (&self.data[..q_bytes], &self.data[k_at..][..kv_bytes], &self.data[v_at..][..kv_bytes]);
        Ok(forward.time(q, k, v, 2, 5)?.median_ms())
    }
}
