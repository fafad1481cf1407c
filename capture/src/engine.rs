//! The epoch engine: a sans-IO state machine in the spirit of raft-rs
//! `RawNode` and quinn-proto's `Connection`. It owns no thread, no clock
//! and no socket: the driver passes time in ([`EpochEngine::handle_timeout`]
//! with the instant, [`EpochEngine::poll_timeout`] for when to call next)
//! and acknowledgements in ([`EpochEngine::handle_ack`]), and does the I/O
//! with what comes out (checkpoints to send, output to release).
//!
//! Per epoch the engine has the guest pause, seals the epoch's output
//! while the guest is paused (so everything the guest emitted before the
//! pause belongs to this epoch or an earlier one), takes the pages it
//! wrote, and has it resume at once (speculative execution): the sequence
//! of [`checkpoint`] over the guest's narrow capabilities
//! ([`crate::guest`]).
//!
//! Ordering rule, owned here and nowhere else: output the guest produced
//! during epoch `N` is released by [`EpochEngine::handle_ack`] for an ack
//! of some `M >= N`, and only there; never before, never twice. Acks may
//! arrive late, repeated or out of order (a reconnect replays the backup's
//! committed epoch): an ack of `M` implies every epoch `<= M`, an ack at
//! or below the highest seen releases nothing, and an ack beyond the last
//! sealed epoch counts only up to it (the open epoch's output is not
//! sealed, so it cannot have been acknowledged).
//!
//! The one exception, asked for with [`EpochEngine::releasing_ahead`]
//! for a guest with no history: until the backup has caught up with this
//! run's first copy (its first epoch, the whole memory, before which no
//! backup can resume the guest at all, and the epochs sealed while it
//! crossed the path), each epoch's output is released when it is sealed
//! and its checkpoint says so ([`Checkpoint::released_ahead`]), for the
//! backup to refuse a failover while its newest committed epoch is one of
//! those (the output of later ones may be out). Caught up: an
//! acknowledgement comes within [`Cadence::caught_up`] of its epoch's
//! seal, or [`CATCH_UP`] has passed since the first one (a link that
//! never catches up). From then on the rule above holds
//! without exception: no later epoch is released ahead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use remus_types::{Checkpoint, EpochId, GuestId, PagePool};

use crate::guest::{checkpoint, ProtectedGuest, Scratch};
use crate::{Cadence, CadenceConfig, CaptureError, OutputBuffer};

/// The longest a guest released ahead goes on so after its first epoch
/// is acknowledged, waiting for the backup to catch up with the epochs
/// sealed while that first copy crossed the path; then it is protected
/// (and what still lags is left to longer epochs and the throttle).
pub const CATCH_UP: Duration = Duration::from_millis(500);

/// Where the engine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Sealing an epoch every period.
    Running,
    /// Asked to stop: the next seal is the last, with the guest held still.
    Stopping,
    /// The last epoch is sealed; only acknowledgements remain.
    Sealed,
}

/// Drives a [`ProtectedGuest`] epoch by epoch.
pub struct EpochEngine<G> {
    guest: G,
    id: GuestId,
    /// The period, adapted to how far acknowledgements lag.
    cadence: Cadence,
    /// When the next epoch is due; `None` once the last one is sealed.
    due: Option<Instant>,
    phase: Phase,
    next: EpochId,
    acked: EpochId,
    output: Arc<OutputBuffer<Vec<u8>>>,
    scratch: Scratch,
    /// Held still by the driver ([`EpochEngine::set_fenced`]).
    fenced: bool,
    /// Throttle credit: each epoch adds the cadence's throttle, and an
    /// epoch that brings it to 1 is one the guest is held still in.
    credit: f64,
    /// Epochs the guest was held still in by the throttle.
    throttled: u64,
    /// Release output at the seal until the backup caught up.
    release_ahead: bool,
    /// This run's first epoch.
    first: EpochId,
    /// When the first epoch was acknowledged.
    first_ack: Option<Instant>,
    /// Output released at seals, for the driver to take.
    ahead: Vec<Vec<u8>>,
}

impl<G: ProtectedGuest> EpochEngine<G> {
    /// An engine for `guest` whose output is held in `output`, sealing an
    /// epoch every `period` from `now` on; the first sealed epoch is 1.
    pub fn new(id: GuestId, guest: G, output: Arc<OutputBuffer<Vec<u8>>>, period: Duration, now: Instant) -> Self {
        let cadence = Cadence::new(CadenceConfig::fixed(period));
        Self {
            guest,
            id,
            cadence,
            due: Some(now + period),
            phase: Phase::Running,
            next: EpochId(1),
            acked: EpochId(0),
            output,
            scratch: Scratch::default(),
            fenced: false,
            credit: 0.0,
            throttled: 0,
            release_ahead: false,
            first: EpochId(1),
            first_ack: None,
            ahead: Vec::new(),
        }
    }

    /// Holds the guest still (from the next pause on) while `fenced`, or
    /// lets it run again (as far as the throttle lets it).
    pub fn set_fenced(&mut self, fenced: bool) {
        self.fenced = fenced;
        self.guest.hold(fenced);
    }

    /// The round-trip time of the path to the backup, as the transport
    /// measures it (see [`Cadence::set_path_rtt`](crate::Cadence::set_path_rtt)).
    pub fn set_path_rtt(&mut self, rtt: Duration) {
        self.cadence.set_path_rtt(rtt);
    }

    /// Epochs the guest was held still in by the throttle so far.
    pub fn throttled_epochs(&self) -> u64 {
        self.throttled
    }

    /// The same engine continuing a history whose last committed epoch is
    /// `committed` (written by an earlier run of the primary): the first
    /// epoch it seals is the one after, and everything the guest emitted
    /// so far belongs to that one.
    #[must_use]
    pub fn after(mut self, committed: EpochId) -> Self {
        assert_eq!(self.next, EpochId(1), "only before the first seal");
        self.next = committed.next();
        self.first = self.next;
        self.acked = committed;
        self.output.open_at(self.next);
        self
    }

    /// Releases each epoch's output when it is sealed, until the backup
    /// has caught up with this run's first copy (see the module's
    /// ordering rule): for a guest with no history, whose output would
    /// otherwise wait for a whole first copy to cross the path although no
    /// backup could resume it before that copy is committed. The
    /// checkpoints of those epochs say so; the driver takes their output
    /// with
    /// [`take_released_ahead`](Self::take_released_ahead).
    #[must_use]
    pub fn releasing_ahead(mut self) -> Self {
        self.release_ahead = true;
        self
    }

    /// Output released by the seals since the last call, in order.
    pub fn take_released_ahead(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.ahead)
    }

    /// Takes checkpoint page buffers from `pool`, where whoever is done
    /// with a checkpoint hands its buffer back (the link, once the epoch
    /// is acknowledged).
    #[must_use]
    pub fn with_page_pool(mut self, pool: PagePool) -> Self {
        self.scratch.pool = pool;
        self
    }

    /// Lets the period adapt within `cfg` to how far acknowledgements lag
    /// (see [`Cadence`]); by default it is fixed.
    #[must_use]
    pub fn with_cadence(mut self, cfg: CadenceConfig) -> Self {
        self.cadence = Cadence::new(cfg);
        self
    }

    /// The current epoch length.
    pub fn period(&self) -> Duration {
        self.cadence.period()
    }

    /// How long the oldest unacknowledged output has waited, at `now`.
    pub fn output_delay(&self, now: Instant) -> Duration {
        self.cadence.output_delay(now)
    }

    /// When [`Self::handle_timeout`] is next due; `None` once the last
    /// epoch is sealed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }

    /// Seals the epoch when it is due at `now` (`unix_ns` is the wall
    /// clock at `now`, recorded in the checkpoint) and schedules the next
    /// one a period later; a late call does not make the next epochs come
    /// in a burst.
    ///
    /// # Errors
    /// What the guest's checkpoint returned.
    pub fn handle_timeout(&mut self, now: Instant, unix_ns: u64) -> Result<Option<Checkpoint>, CaptureError> {
        let Some(due) = self.due.filter(|d| now >= *d) else { return Ok(None) };
        let last = self.phase == Phase::Stopping;
        if last {
            self.guest.quiesce();
        }
        // The throttle: the guest is held still through the coming epoch
        // when this one brings the credit to a whole epoch.
        if !last && !self.fenced {
            self.credit += self.cadence.throttle();
            let hold = self.credit >= 1.0;
            if hold {
                self.credit -= 1.0;
                self.throttled += 1;
            } else if self.cadence.throttle() == 0.0 {
                self.credit = 0.0;
            }
            self.guest.hold(hold);
        }
        // [`CATCH_UP`] after the first acknowledgement, whether or not
        // more came since: the one place this limit is checked.
        if self.release_ahead && self.first_ack.is_some_and(|t| now.saturating_duration_since(t) >= CATCH_UP) {
            self.end_release_ahead();
        }
        let cp = self.seal(unix_ns)?;
        if last {
            self.phase = Phase::Sealed;
            self.due = None;
        } else {
            let pages = cp.pfns.len() as u64;
            let period =
                if cp.released_ahead { self.cadence.sealed_ahead(cp.epoch, pages, now) } else { self.cadence.sealed(cp.epoch, pages, now) };
            let next = due + period;
            self.due = Some(if next <= now { now + period } else { next });
        }
        Ok(Some(cp))
    }

    /// Asks for one last epoch, with the guest held still, at the next
    /// timeout: the backup then ends with exactly the guest's final state.
    pub fn stop(&mut self) {
        if self.phase == Phase::Running {
            self.phase = Phase::Stopping;
        }
    }

    /// Seals the current epoch at once, outside the schedule (for tests
    /// and benchmarks), and returns its checkpoint.
    ///
    /// # Errors
    /// What the guest's checkpoint returned.
    pub fn seal(&mut self, unix_ns: u64) -> Result<Checkpoint, CaptureError> {
        let mut cp = Checkpoint { guest: self.id, time_unix_ns: unix_ns, ..Checkpoint::default() };
        let epoch = self.next;
        let output = &self.output;
        checkpoint(&mut self.guest, epoch, &mut cp, &mut self.scratch, || output.seal(epoch))?;
        self.next = epoch.next();
        if self.release_ahead {
            cp.released_ahead = true;
            self.ahead.extend(self.output.release(epoch));
        }
        Ok(cp)
    }

    /// Records that the backup durably committed every epoch `<= epoch`
    /// and returns the output those epochs produced, in order: the one
    /// place output is released.
    pub fn handle_ack(&mut self, epoch: EpochId, now: Instant) -> Vec<Vec<u8>> {
        let sealed = self.sealed();
        let epoch = epoch.min(sealed);
        if epoch <= self.acked {
            return Vec::new();
        }
        self.acked = epoch;
        let sealed_at = self.cadence.acked(epoch, now);
        if self.release_ahead && epoch >= self.first {
            self.catching_up(sealed_at, now);
        }
        self.output.release(epoch)
    }

    /// An acknowledgement, at `now`, of an epoch sealed at `sealed_at`
    /// while releasing ahead: ends it once the backup has caught up (the
    /// epoch acknowledged within [`Cadence::caught_up`] of its seal). The
    /// other end, [`CATCH_UP`] after the first acknowledgement, is
    /// checked at each seal ([`Self::handle_timeout`]), where it takes
    /// effect either way.
    fn catching_up(&mut self, sealed_at: Option<Instant>, now: Instant) {
        self.first_ack.get_or_insert(now);
        // An epoch sealed outside the schedule ([`Self::seal`]) has no
        // instant: counted as caught up.
        let lag = sealed_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if lag <= self.cadence.caught_up() {
            self.end_release_ahead();
        }
    }

    /// From the next seal on, output is held for its acknowledgement.
    fn end_release_ahead(&mut self) {
        self.release_ahead = false;
        // What the backup has not caught up with yet, the first held
        // epochs will wait behind: from now on the cadence sees it.
        self.cadence.hold_released();
    }

    /// Highest acknowledged epoch.
    pub fn acked(&self) -> EpochId {
        self.acked
    }

    /// The last sealed epoch (0 before the first).
    pub fn sealed(&self) -> EpochId {
        EpochId(self.next.0 - 1)
    }

    /// True once the last epoch is sealed and acknowledged: nothing is
    /// left to release.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Sealed && self.acked == self.sealed()
    }

    /// True once the last epoch is sealed.
    pub fn all_sealed(&self) -> bool {
        self.phase == Phase::Sealed
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
