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
//! reusing one set; calls recorded together, or submitted without waiting, take one set each. A loop that
//! never waits is held back at [`MAX_SETS`] sets in use: the next call waits for the submitted work (which
//! frees its sets) and fails only when encoders not yet submitted hold every set.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[cfg(doc)]
use super::WgpuContext;
use crate::error::{Error, Result};

/// The most sets an op keeps: past this many calls whose work has not run yet, a call waits for the
/// submitted work, and is refused if unsubmitted encoders still hold every set.
const MAX_SETS: usize = 64;

/// One set and the count of recorded calls that read it.
struct Slot<T> {
    value: T,
    users: Arc<AtomicUsize>,
}

/// The error of a call past [`MAX_SETS`] calls recorded into encoders not yet submitted.
fn too_many(what: &str) -> Error {
    Error::Unsupported(format!(
        "{what}: {MAX_SETS} calls recorded into encoders not yet submitted (or dropped); submit them before \
         recording more"
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

    /// How many calls could take a set now whatever their contents (idle sets and room for new ones).
    fn available(&self) -> usize {
        let idle = self.slots.iter().filter(|s| s.users.load(Ordering::Acquire) == 0).count();
        idle + (MAX_SETS - self.slots.len())
    }

    /// Makes sure `calls` more calls can take a set whatever their contents, so that a caller can check
    /// before changing anything that its next takes will succeed: if too few sets are free, runs `wait`
    /// (which waits for the submitted work, so frees the sets it held: [`WgpuContext::wait`], whose
    /// [`Error::Timeout`] it passes on); fails, naming `what`, if encoders not yet submitted still hold too
    /// many.
    pub(crate) fn make_room(&self, wait: impl FnOnce() -> Result<()>, what: &str, calls: usize) -> Result<()> {
        if self.available() < calls {
            wait()?;
            if self.available() < calls {
                return Err(too_many(what));
            }
        }
        Ok(())
    }

    /// Set `index` (as [`Taken::index`] named it).
    pub(crate) fn get(&self, index: usize) -> &T {
        &self.slots[index].value
    }

    /// Takes a set for a call recorded into `encoder`: one that `holds` the call's contents, else one no
    /// recorded work reads, else a new one from `make`; with [`MAX_SETS`] sets in use, it first runs `wait`
    /// (see [`UploadSets::make_room`], whose errors name `what`). The caller writes the contents unless
    /// [`Taken::holds`].
    pub(crate) fn take(
        &mut self,
        wait: impl FnOnce() -> Result<()>,
        encoder: &wgpu::CommandEncoder,
        what: &str,
        holds: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> Result<Taken<'_, T>> {
        let (index, holds) = match self.slots.iter().position(|s| holds(&s.value)) {
            Some(i) => (i, true),
            None => {
                self.make_room(wait, what, 1)?;
                match self.slots.iter().position(|s| s.users.load(Ordering::Acquire) == 0) {
                    Some(i) => (i, false),
                    None => {
                        self.slots.push(Slot { value: make(), users: Arc::new(AtomicUsize::new(0)) });
                        (self.slots.len() - 1, false)
                    }
                }
            }
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
    use crate::gpu::WgpuContext;
    use std::cell::RefCell;

    fn context() -> WgpuContext {
        WgpuContext::with_options(&crate::context::ContextOptions::default()).expect("a wgpu adapter (lavapipe in CI)")
    }

    #[test]
    fn sets_are_shared_by_contents_reused_once_idle_and_released_by_dropped_encoders() {
        let ctx = context();
        let device = ctx.device();
        let mut sets: UploadSets<u32> = UploadSets::new();
        let enc = |_: ()| device.create_command_encoder(&Default::default());
        let mut take = |e: &wgpu::CommandEncoder, v: u32| {
            sets.take(|| ctx.wait(), e, "t", |&x| x == v, || v).map(|t| (t.index, t.holds)).ok()
        };
        // Two different contents recorded into one encoder: two sets; the same contents again: shared.
        let e1 = enc(());
        assert_eq!(take(&e1, 1), Some((0, false)));
        assert_eq!(take(&e1, 2), Some((1, false)));
        assert_eq!(take(&e1, 1), Some((0, true)));
        // While e1 is alive both sets are in use: new contents need a third set.
        let e2 = enc(());
        assert_eq!(take(&e2, 3), Some((2, false)));
        // Dropping the encoders unsubmitted releases their sets.
        drop((e1, e2));
        let e3 = enc(());
        assert_eq!(take(&e3, 4), Some((0, false)));
        // A submitted encoder's sets come back once its work has run.
        ctx.queue().submit([e3.finish()]);
        ctx.wait().ok();
        let e4 = enc(());
        assert_eq!(take(&e4, 5), Some((0, false)));
        assert_eq!(sets.len(), 3);
        assert_eq!(sets.available(), MAX_SETS - 1, "e4 holds one of the three");
    }

    #[test]
    fn past_the_cap_a_call_waits_for_submitted_work_and_fails_only_on_unsubmitted_encoders() {
        let ctx = context();
        let device = ctx.device();
        let mut sets: UploadSets<u32> = UploadSets::new();
        // Every set held by an encoder of its own.
        let pending: RefCell<Vec<wgpu::CommandEncoder>> = RefCell::new(Vec::new());
        for v in 0..MAX_SETS as u32 {
            let e = device.create_command_encoder(&Default::default());
            assert!(sets.take(|| ctx.wait(), &e, "t", |&x| x == v, || v).is_ok());
            pending.borrow_mut().push(e);
        }
        assert_eq!((sets.len(), sets.available()), (MAX_SETS, 0));
        // The sets' encoders not yet submitted: waiting frees none, and the call is refused by name.
        let e = device.create_command_encoder(&Default::default());
        match sets.take(|| ctx.wait(), &e, "probe", |&x| x == 1000, || 0) {
            Err(Error::Unsupported(m)) => assert!(m.contains("probe") && m.contains("not yet submitted"), "{m}"),
            other => panic!("expected a refusal, got {:?}", other.map(|t| t.index)),
        }
        assert!(matches!(sets.make_room(|| ctx.wait(), "probe", 1), Err(Error::Unsupported(_))));
        // Submitted (as a token loop that never waits leaves them): the call waits for their work and
        // takes a freed set instead of failing.
        let submit_then_wait = || {
            ctx.queue().submit(pending.borrow_mut().drain(..).map(|e| e.finish()));
            ctx.wait()
        };
        let taken = sets.take(submit_then_wait, &e, "probe", |&x| x == 1000, || 0).map(|t| (t.index, t.holds));
        assert_eq!(taken.ok(), Some((0, false)));
        assert_eq!(sets.len(), MAX_SETS, "no set past the cap");
        assert_eq!(sets.available(), MAX_SETS - 1);
        // A wait that fails (a timeout) fails the call with its error.
        let held: Vec<wgpu::CommandEncoder> = (1..MAX_SETS as u32)
            .map(|v| {
                let e = device.create_command_encoder(&Default::default());
                assert!(sets.take(|| ctx.wait(), &e, "t", |&x| x == 2000 + v, || 0).is_ok());
                e
            })
            .collect();
        let timeout = || Err(Error::Timeout(std::time::Duration::from_millis(1)));
        assert!(matches!(sets.make_room(timeout, "probe", 1), Err(Error::Timeout(_))));
        drop((held, e));
        assert!(sets.make_room(|| ctx.wait(), "probe", MAX_SETS).is_ok(), "dropped encoders free their sets");
    }
}
