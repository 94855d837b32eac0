//! CPU code: the f64 oracle every kernel is judged against, and CPU twins of the GPU stages.
//!
//! As in vello, each GPU stage has a CPU twin of the same name that follows the same algorithm (here:
//! the same MergeQ tile walk and the same online softmax), so a planning bug shows up on the CPU without a
//! GPU, and a kernel bug shows up as a disagreement between the kernel and its twin.

mod backward;
mod forward;
mod forward_coop;
mod reference;
mod tiles;
mod varlen;

pub use backward::{attention_backward_reference, backward_coop, backward_portable, BackwardInputs, CoopBackward};
pub use forward::forward_portable;
pub use forward_coop::{forward_coop, CoopKernel};
pub use reference::{attention_reference, rel_l2_error, Reference};
pub use varlen::{attend_worklist, varlen_reference};

/// `x` stored as f16 and read back: where the coop kernels' twins round what the kernels round.
pub(crate) fn to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}
