//! The CUDA planner: picks the kernel flavour (`mma.sync` everywhere from sm_80, or Hopper's `wgmma` on
//! sm_90), its query tile (MergeQ), key chunk, warps and shared memory for a problem and a device. Pure
//! arithmetic on [`DeviceCaps`] plus the compute capability registered for the device's name, so it is
//! tested without a GPU.

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::plan::{DType, DeviceCaps, DispatchPlan, KernelVariant, Shape};
use std::collections::HashMap;
use std::sync::Mutex;

/// Compute capability per device name, registered when a [`super::CudaContext`] opens (one name is one
/// chip, so one capability), for the planner, which sees devices only through [`DeviceCaps`].
static ARCHS: Mutex<Option<HashMap<String, (i32, i32)>>> = Mutex::new(None);

/// Records that devices named `name` have compute capability `arch`.
pub(crate) fn register_arch(name: &str, arch: (i32, i32)) {
    ARCHS.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(name.to_string(), arch);
}

pub(crate) fn arch_of(caps: &DeviceCaps) -> Option<(i32, i32)> {
    ARCHS.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|m| m.get(&caps.name).copied())
}

/// The first word of a wgmma plan's `reason`.
pub(crate) const WGMMA_TAG: &str = "wgmma";

/// Whether `plan` runs the wgmma flavour (how [`super::CudaForward`] tells the flavours apart).
pub(crate) fn is_wgmma(plan: &DispatchPlan) -> bool {
    plan.variant == KernelVariant::CudaWgmma
}

/// K/V ring depth of the wgmma kernel (`STAGES` in `s2_forward.cu`).
pub(crate) const WGMMA_STAGES: u32 = 4;
/// Q buffers of the wgmma kernel (`Q_BUFS` in `s2_forward.cu`): 2, so that the persistent kernel's producer stages
/// the next tile's Q while the consumers finish this one.
pub(crate) const WGMMA_Q_BUFS: u32 = 2;

/// A persistent kernel's work items dealt to `ctas` CTAs: the items in their own order (`costs[w]` is item w's
/// estimated time), each to the CTA with the least work so far (the lowest index among equals), as a CTA that
/// takes the next item when it finishes one would get them. Returns the items CTA by CTA, each CTA's in
/// ascending order, and `ctas + 1` offsets: CTA c runs `sched[cta_ptr[c]..cta_ptr[c + 1]]`. Against dealing
/// item w to CTA w % ctas, the CTAs finish closer together where items differ in length and there are few per
/// CTA (the forward at 16k tokens: ~31 tiles a CTA, the longest 10x the shortest).
pub(crate) fn deal_items(costs: &[u64], ctas: u32) -> (Vec<u32>, Vec<u32>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let ctas = ctas.max(1) as usize;
    let mut per_cta: Vec<Vec<u32>> = vec![Vec::new(); ctas];
    let mut load: BinaryHeap<Reverse<(u64, usize)>> = (0..ctas).map(|c| Reverse((0, c))).collect();
    for (w, &cost) in costs.iter().enumerate() {
        if let Some(Reverse((t, c))) = load.pop() {
            per_cta[c].push(w as u32);
            load.push(Reverse((t + cost, c)));
        }
    }
    let mut cta_ptr = Vec::with_capacity(ctas + 1);
    cta_ptr.push(0);
    let mut sched = Vec::with_capacity(costs.len());
    for items in per_cta {
        sched.extend(items);
        cta_ptr.push(sched.len() as u32);
    }
    (sched, cta_ptr)
}

/// Shared memory of the wgmma kernel: `q_bufs` padded Q tiles, a ring of `stages` K and V chunks in the
/// 128-byte-swizzled layout, the ring's mbarriers (8 bytes each: full and empty per stage and per Q buffer) and
/// 1 KB of alignment slack.
pub(crate) fn wgmma_smem_bytes(head_dim: u32, stages: u32, q_bufs: u32) -> u32 {
    // + 1 KB: the kernel aligns its buffers to 1024 bytes (128-byte swizzle atoms) inside the allocation.
    (q_bufs * 128 * (head_dim + 8) + stages * 2 * 64 * head_dim) * 2 + 8 * 2 * (stages + q_bufs) + 1024
}

/// Head dimensions the CUDA kernel is built for.
pub const CUDA_HEAD_DIMS: &[u32] = &[32, 64, 96, 128, 256];

/// Warps per CTA of the mma.sync kernel with tiles of up to 128 rows: each owns `tile_q / WARPS`
/// consecutive query rows (256-row tiles take twice as many).
pub(crate) const WARPS: u32 = 4;
/// Consumer warps per CTA of the wgmma kernel: two warpgroups, each owning 64 consecutive query rows; the
/// CTA has one more warpgroup, the producer (its 4 warps load Q with cp.async, one thread K and V by TMA;
/// setmaxnreg moves the rest of its registers to the consumers).
pub(crate) const WGMMA_WARPS: u32 = 8;

/// CTAs below which a 128-row tile leaves the GPU underfilled and 64-row tiles are used instead (about
/// two CTAs on each of an H100's 132 SMs).
const FEW_CTAS: u64 = 264;

/// Shared memory of the mma.sync kernel: the Q tile plus two stages of K and V chunks, rows padded by 8
/// elements.
pub(crate) fn smem_bytes(tile_q: u32, tile_kv: u32, head_dim: u32) -> u32 {
    (tile_q + 4 * tile_kv) * (head_dim + 8) * 2
}

/// Plans the CUDA forward kernel for `shape` on a device with `caps`.
///
/// Query tiles are 128 rows (MergeQ: two 64-token blocks, or eight 16-token blocks, share each K/V load)
/// unless the grid would be too small to fill the GPU or the head dimension needs the registers (256);
/// key chunks are 64 keys (or the block size when smaller), halved until the shared memory fits. On
/// sm_90 the 128 x 64 tiles of head dim 128 can run on `wgmma` (two warpgroups of 64 rows); elsewhere
/// on `mma.sync` (four warps). wgmma is taken wherever it applies (sm_90, head dim 128, 128 x 64 tiles).
pub fn plan_forward(shape: &Shape, layout: &Layout, caps: &DeviceCaps) -> Result<DispatchPlan> {
    match shape.dtype {
        DType::F16 | DType::BF16 => {}
        DType::F32 => {
            return Err(Error::Unsupported(
                "f32 has no tensor-core CUDA kernel: use f16 or bf16 on the CUDA backend, or f32 on the wgpu \
                 backend (Backend::Wgpu)"
                    .into(),
            ))
        }
    }
    let d = shape.head_dim;
    if !CUDA_HEAD_DIMS.contains(&d) {
        return Err(Error::HeadDim { got: d, what: "the CUDA mma kernel", supported: CUDA_HEAD_DIMS });
    }
    let bs = layout.block_size();
    let heads = layout.num_heads() as u64 * shape.batch as u64;
    let mut tile_q = if d > 128 { 64 } else { 128 };
    if tile_q == 128 && (shape.seq_len as u64).div_ceil(128) * heads < FEW_CTAS {
        tile_q = 64;
    }
    let warps = WARPS;
    let mut tile_kv = bs.min(64);
    if tile_q / warps > 16 && d > 128 {
        return Err(Error::Unsupported(format!("head_dim {d} takes tiles of at most {} rows", 16 * warps)));
    }
    while smem_bytes(tile_q, tile_kv, d) > caps.max_workgroup_storage && tile_kv > 16 {
        tile_kv /= 2;
    }
    let bytes = smem_bytes(tile_q, tile_kv, d);
    if bytes > caps.max_workgroup_storage {
        return Err(Error::DeviceLimit {
            what: format!("the CUDA kernel at head_dim {d}"),
            limit: "max shared memory per block (opt-in)",
            needed: bytes as u64,
            max: caps.max_workgroup_storage as u64,
        });
    }
    let tiles = shape.seq_len.div_ceil(tile_q);
    if tiles > caps.max_dispatch {
        return Err(Error::DeviceLimit {
            what: format!("{tiles} query tiles of {tile_q} rows"),
            limit: "max grid dimension x",
            needed: tiles as u64,
            max: caps.max_dispatch as u64,
        });
    }
    if layout.num_heads() > 65_535 || shape.batch > 65_535 {
        return Err(Error::Shape("heads and batch must each be at most 65535 (CUDA grid y and z)".into()));
    }
    // Head dim 64 on wgmma gave wrong results on the H100 (shaders/cuda/NOTES.md, v2): not taken until fixed.
    let eligible = tile_q == 128 && tile_kv == 64 && d == 128;
    let hopper = arch_of(caps) == Some((9, 0));
    let merged = if tile_q > bs {
        format!("MergeQ: {} blocks of {bs} per tile", tile_q / bs)
    } else {
        format!("tile within a block of {bs}")
    };
    // wgmma where it applies: measured 1.25-1.29x faster than mma.sync at every paper point on the H200
    // (shaders/cuda/NOTES.md).
    let wgmma_bytes = wgmma_smem_bytes(d, WGMMA_STAGES, WGMMA_Q_BUFS);
    if eligible && hopper && wgmma_bytes <= caps.max_workgroup_storage {
        return Ok(DispatchPlan {
            variant: KernelVariant::CudaWgmma,
            tile_q,
            tile_kv,
            workgroup_size: (WGMMA_WARPS + 4) * 32,
            workgroup_bytes: wgmma_bytes,
            reason: format!(
                "{WGMMA_TAG} m64n{tile_kv}k16 / m64n{d}k16, warp specialised: producer warpgroup (K/V by TMA \
                 from one thread, 128B-swizzled, {WGMMA_STAGES}-stage mbarrier ring; Q by 4 cp.async warps) + 2 \
                 consumer warpgroups x 64 rows (S of the next chunk issued before P V, ping-pong), persistent; {merged}"
            ),
        });
    }
    Ok(DispatchPlan {
        variant: KernelVariant::CudaMma,
        tile_q,
        tile_kv,
        workgroup_size: warps * 32,
        workgroup_bytes: bytes,
        reason: format!("mma.sync m16n8k16, {} rows per warp, 2-stage cp.async K/V; {merged}", tile_q / warps),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::S2Config;

    #[test]
    fn dealt_items_are_a_permutation_in_order_per_cta_and_balanced() {
        // Costs like a head's tiles at 16k (longest first, 10x spread), 32 heads, over 132 CTAs.
        let costs: Vec<u64> = (0..32).flat_map(|_| (0..128u64).rev().map(|t| 4 + t / 4)).collect();
        let (sched, ptr) = deal_items(&costs, 132);
        assert_eq!(ptr.len(), 133);
        assert_eq!(*ptr.last().unwrap() as usize, costs.len());
        let mut seen = vec![false; costs.len()];
        for &w in &sched {
            assert!(!seen[w as usize], "item {w} dealt twice");
            seen[w as usize] = true;
        }
        let loads: Vec<u64> = (0..132)
            .map(|c| {
                let items = &sched[ptr[c] as usize..ptr[c + 1] as usize];
                assert!(items.windows(2).all(|p| p[0] < p[1]), "CTA {c}'s items out of order");
                assert!(!items.is_empty(), "CTA {c} has no item");
                items.iter().map(|&w| costs[w as usize]).sum()
            })
            .collect();
        let ideal = costs.iter().sum::<u64>() as f64 / 132.0;
        let round_robin = (0..132).map(|c| costs.iter().skip(c).step_by(132).sum::<u64>()).max().unwrap();
        let dealt = *loads.iter().max().unwrap();
        assert!((dealt as f64) < ideal * 1.02, "dealt {dealt} against an ideal {ideal}");
        assert!(dealt < round_robin, "dealt {dealt}, round robin {round_robin}");
    }

    #[test]
    fn dealing_fewer_items_than_ctas_leaves_the_rest_empty() {
        let (sched, ptr) = deal_items(&[5, 1, 3], 4);
        assert_eq!(sched, vec![0, 1, 2]);
        assert_eq!(ptr, vec![0, 1, 2, 3, 3]);
    }

    fn h100() -> DeviceCaps {
        DeviceCaps {
            name: "test".into(),
            backend: "cuda".into(),
            max_workgroup_storage: 227 * 1024,
            max_invocations: 1024,
            max_storage_binding: 80 << 30,
            max_buffer: 80 << 30,
            max_dispatch: i32::MAX as u32,
            ..DeviceCaps::default()
        }
    }

    #[test]
    fn paper_shape_merges_two_blocks() {
        let layout = Layout::s2(S2Config::new(32, 64, 16, 16)).unwrap();
        let plan = plan_forward(&Shape::new(1, 16384, 128, DType::F16), &layout, &h100()).unwrap();
        assert_eq!((plan.tile_q, plan.tile_kv, plan.workgroup_size), (128, 64, 128));
        assert!(plan.workgroup_bytes <= 227 * 1024 / 2, "two CTAs per SM must fit: {}", plan.workgroup_bytes);
    }

    #[test]
    fn hopper_takes_wgmma_for_eligible_tiles_only() {
        let caps = DeviceCaps { name: "planner-test sm_90 device".into(), ..h100() };
        register_arch(&caps.name, (9, 0));
        let layout = Layout::s2(S2Config::new(32, 64, 16, 16)).unwrap();
        let plan = plan_forward(&Shape::new(1, 16384, 128, DType::BF16), &layout, &caps).unwrap();
        assert!(is_wgmma(&plan), "{plan}");
        if is_wgmma(&plan) {
            assert_eq!(plan.workgroup_bytes, wgmma_smem_bytes(128, WGMMA_STAGES, WGMMA_Q_BUFS));
            assert!(plan.workgroup_bytes <= 227 * 1024, "{plan}");
        }
        let small = Layout::s2(S2Config::new(32, 16, 16, 16)).unwrap();
        let plan = plan_forward(&Shape::new(1, 16384, 128, DType::F16), &small, &caps).unwrap();
        assert_eq!(plan.workgroup_size, WARPS * 32, "16-token blocks give 16-key chunks: mma.sync, {plan}");
    }

    #[test]
    fn small_grids_take_smaller_tiles_and_small_blocks_small_chunks() {
        let layout = Layout::s2(S2Config::new(2, 16, 4, 4)).unwrap();
        let plan = plan_forward(&Shape::new(1, 1000, 64, DType::BF16), &layout, &h100()).unwrap();
        assert_eq!((plan.tile_q, plan.tile_kv), (64, 16));
    }

    #[test]
    fn f32_and_odd_head_dims_are_refused() {
        let layout = Layout::s2(S2Config::new(2, 64, 4, 4)).unwrap();
        assert!(matches!(
            plan_forward(&Shape::new(1, 128, 64, DType::F32), &layout, &h100()),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            plan_forward(&Shape::new(1, 128, 80, DType::F16), &layout, &h100()),
            Err(Error::HeadDim { .. })
        ));
    }

    #[test]
    fn chunks_shrink_to_fit_small_shared_memory() {
        let layout = Layout::s2(S2Config::new(32, 64, 4, 4)).unwrap();
        let caps = DeviceCaps { max_workgroup_storage: 99 * 1024, ..h100() };
        let plan = plan_forward(&Shape::new(4, 8192, 256, DType::F16), &layout, &caps).unwrap();
        assert!(plan.workgroup_bytes <= 99 * 1024 && plan.tile_kv < 64, "{plan}");
    }
}
