//! The epoch engine, a small state machine in the spirit of raft-rs
//! `RawNode`: [`EpochEngine::seal`] pauses the guest, takes everything the
//! epoch changed and resumes it at once (speculative execution);
//! [`EpochEngine::ack`] advances on the backup's acknowledgement.
//!
//! Ordering rule: output the guest produced during epoch `N` is released
//! by `ack(M)` only for `M >= N`; nothing is released for an epoch the
//! backup has not durably committed. Acks may arrive late or be skipped
//! (an ack of `M` implies every epoch `<= M`).

use std::sync::Arc;

use remus_types::{now_unix_nanos, Checkpoint, EpochId, GuestId};

use crate::{CaptureError, OutputBuffer};

/// A guest that can be checkpointed: the hypervisor or process boundary.
pub trait ProtectedGuest: Send {
    /// Memory size in pages.
    fn page_count(&self) -> u64;

    /// Pauses the guest, seals `epoch` (its output included), fills `cp`
    /// with the pages written since the previous checkpoint, the device
    /// state and the pause duration, and resumes the guest.
    ///
    /// # Errors
    /// Any failure to pause, track or copy; the guest is resumed regardless.
    fn checkpoint(&mut self, epoch: EpochId, cp: &mut Checkpoint) -> Result<(), CaptureError>;

    /// True when dirty pages are found exactly by write-protect scanning
    /// (false: by hashing every page).
    fn exact_tracking(&self) -> bool;

    /// Holds the guest still from the next checkpoint on (it is not
    /// resumed after it), so that checkpoint is its final state.
    fn quiesce(&mut self);
}

impl<G: ProtectedGuest + ?Sized> ProtectedGuest for Box<G> {
    fn page_count(&self) -> u64 {
        (**self).page_count()
    }

    fn checkpoint(&mut self, epoch: EpochId, cp: &mut Checkpoint) -> Result<(), CaptureError> {
        (**self).checkpoint(epoch, cp)
    }

    fn exact_tracking(&self) -> bool {
        (**self).exact_tracking()
    }

    fn quiesce(&mut self) {
        (**self).quiesce();
    }
}

/// Drives a [`ProtectedGuest`] epoch by epoch.
pub struct EpochEngine<G> {
    guest: G,
    id: GuestId,
    next: EpochId,
    acked: EpochId,
    output: Arc<OutputBuffer<Vec<u8>>>,
}

impl<G: ProtectedGuest> EpochEngine<G> {
    /// An engine for `guest` whose output is held in `output`; the first
    /// sealed epoch is 1.
    pub fn new(id: GuestId, guest: G, output: Arc<OutputBuffer<Vec<u8>>>) -> Self {
        Self { guest, id, next: EpochId(1), acked: EpochId(0), output }
    }

    /// Seals the current epoch and returns its checkpoint.
    ///
    /// # Errors
    /// What the guest's checkpoint returned.
    pub fn seal(&mut self) -> Result<Checkpoint, CaptureError> {
        let mut cp = Checkpoint { guest: self.id, time_unix_ns: now_unix_nanos(), ..Checkpoint::default() };
        self.guest.checkpoint(self.next, &mut cp)?;
        self.next = self.next.next();
        Ok(cp)
    }

    /// Records that the backup durably committed every epoch `<= epoch` and
    /// returns the output those epochs produced, in order.
    pub fn ack(&mut self, epoch: EpochId) -> Vec<Vec<u8>> {
        if epoch > self.acked {
            self.acked = epoch;
        }
        self.output.release(self.acked)
    }

    /// Highest acknowledged epoch.
    pub fn acked(&self) -> EpochId {
        self.acked
    }

    /// The next epoch to be sealed.
    pub fn next_epoch(&self) -> EpochId {
        self.next
    }

    /// The guest.
    pub fn guest(&self) -> &G {
        &self.guest
    }

    /// The guest, mutably.
    pub fn guest_mut(&mut self) -> &mut G {
        &mut self.guest
    }
}
