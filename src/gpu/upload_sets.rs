//! Sets of small device buffers an op fills with `queue.write_buffer` (parameters, work lists, page
//! offsets) for work it records into a caller's encoder.
//!
//! Such a write lands at the next submit, ahead of every command of it, so one buffer cannot serve two
//! calls recorded before that submit with different contents: the first call's dispatches would read the
//! second's. [`UploadSets`] keeps several sets. A call takes a set that already holds its contents
//! (recorded work may still read it: same bytes), else one that no recorded work reads any more, else a
//! new one. A set is in use from the call that takes it until the work recorded with it has run on the
//! GPU, or its encoder was dropped unsubmitted: the encoder reports both (`on_submitted_work_done`, whose
//! callback is dropped with an unsubmitted encoder). A token loop that submits and waits each step keeps
//! reusing one set; calls recorded together, or submitted without waiting, take one set each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// The most sets an op keeps: calls whose work has not run yet beyond this many are refused.
const MAX_SETS: usize = 64;

/// One set and the count of recorded calls that read it.
struct Slot<T> {
    value: T,
    users: Arc<AtomicUsize>,
}

/// The error of a call past [`MAX_SETS`] calls in flight.
pub(crate) fn too_many(what: &str) -> Error {
    Error::Unsupported(format!(
        "{what}: {MAX_SETS} calls recorded whose work has not run yet; submit their encoders and let the device \
         finish (poll or wait) before recording more"
    ))
}

/// Ends one recorded call's use of a set when dropped: when its work has run (the callback ran) or its
/// encoder was dropped unsubmitted (the callback was dropped unrun).
struct Release(Arc<AtomicUsize>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A set taken for one call.
pub(crate) struct Taken<'a, T> {
    /// Index of the set (stable: sets are never removed), for caches keyed by set.
    pub index: usize,
    /// The set.
    pub value: &'a mut T,
    /// Whether it already holds the call's contents (nothing to write).
    pub holds: bool,
}

/// Sets of upload buffers, taken per recorded call.
pub(crate) struct UploadSets<T> {
    slots: Vec<Slot<T>>,
}

impl<T> UploadSets<T> {
    /// No sets yet.
    pub(crate) fn new() -> Self {
        Self { slots: Vec::new() }
    }

    /// Sets created so far.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// How many calls could take a set now whatever their contents (idle sets and room for new ones), so
    /// that a caller can check before changing anything that its next takes will succeed.
    pub(crate) fn available(&self) -> usize {
        let idle = self.slots.iter().filter(|s| s.users.load(Ordering::Acquire) == 0).count();
        idle + (MAX_SETS - self.slots.len())
    }

    /// Set `index` (as [`Taken::index`] named it).
    pub(crate) fn get(&self, index: usize) -> &T {
        &self.slots[index].value
    }

    /// Takes a set for a call recorded into `encoder`: one that `holds` the call's contents, else one no
    /// recorded work reads, else a new one from `make`. The caller writes the contents unless
    /// [`Taken::holds`]. `what` names the op in the error past [`MAX_SETS`] calls in flight.
    pub(crate) fn take(
        &mut self,
        encoder: &wgpu::CommandEncoder,
        what: &str,
        holds: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> Result<Taken<'_, T>> {
        let idle = |s: &Slot<T>| s.users.load(Ordering::Acquire) == 0;
        let (index, holds) = if let Some(i) = self.slots.iter().position(|s| holds(&s.value)) {
            (i, true)
        } else if let Some(i) = self.slots.iter().position(idle) {
            (i, false)
        } else if self.slots.len() < MAX_SETS {
            self.slots.push(Slot { value: make(), users: Arc::new(AtomicUsize::new(0)) });
            (self.slots.len() - 1, false)
        } else {
            return Err(too_many(what));
        };
        let slot = &mut self.slots[index];
        slot.users.fetch_add(1, Ordering::AcqRel);
        let release = Release(slot.users.clone());
        encoder.on_submitted_work_done(move || drop(release));
        Ok(Taken { index, value: &mut slot.value, holds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_shared_by_contents_reused_once_idle_and_released_by_dropped_encoders() {
        let ctx = crate::gpu::WgpuContext::with_options(&crate::context::ContextOptions::default())
            .expect("a wgpu adapter (lavapipe in CI)");
        let device = ctx.device();
        let mut sets: UploadSets<u32> = UploadSets::new();
        let enc = |_: ()| device.create_command_encoder(&Default::default());
        // Two different contents recorded into one encoder: two sets; the same contents again: shared.
        let e1 = enc(());
        assert_eq!(sets.take(&e1, "t", |&v| v == 1, || 1).map(|t| (t.index, t.holds)).ok(), Some((0, false)));
        assert_eq!(sets.take(&e1, "t", |&v| v == 2, || 2).map(|t| (t.index, t.holds)).ok(), Some((1, false)));
        assert_eq!(sets.take(&e1, "t", |&v| v == 1, || 9).map(|t| (t.index, t.holds)).ok(), Some((0, true)));
        // While e1 is alive both sets are in use: new contents need a third set.
        let e2 = enc(());
        assert_eq!(sets.take(&e2, "t", |&v| v == 3, || 3).map(|t| t.index).ok(), Some(2));
        // Dropping the encoders unsubmitted releases their sets.
        drop((e1, e2));
        let e3 = enc(());
        assert_eq!(sets.take(&e3, "t", |&v| v == 4, || 4).map(|t| (t.index, t.holds)).ok(), Some((0, false)));
        assert_eq!(sets.len(), 3);
        assert_eq!(sets.available(), MAX_SETS - 1, "e3 holds one of the three");
        // A submitted encoder's sets come back once its work has run.
        ctx.queue().submit([e3.finish()]);
        ctx.wait().ok();
        let e4 = enc(());
        assert_eq!(sets.take(&e4, "t", |&v| v == 5, || 5).map(|t| t.index).ok(), Some(0));
    }
}
