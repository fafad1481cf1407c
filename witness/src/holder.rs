//! The owner's side of the lease (sans-IO): when to renew, and whether it
//! may still run its guest and release output.

use std::time::{Duration, Instant};

use crate::lease::Lease;
use crate::timing::Timing;

/// Where the owner stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It owns the guest: run and release output.
    Owner,
    /// Neither the witness nor the backup confirmed it recently enough: it
    /// must pause its guest and hold output (self-fencing). It may own the
    /// guest again after a renewal succeeds.
    SelfFenced {
        /// Since when, by its own clock.
        since: Instant,
    },
    /// Another owner took the guest over: stop for good.
    Superseded(Box<Lease>),
}

/// The owner's lease: renewals sent and confirmed, and confirmations from
/// the backup (an acknowledged epoch shows the backup heard the owner
/// after that epoch was sealed).
///
/// Invariant: `may_run` says [`Standing::Owner`] only while, by this
/// side's clock, less than `Timing::owner_valid` has passed since the
/// sending of a renewal that succeeded or since the sealing of an epoch the
/// backup acknowledged. The backup takes over only after `Timing::taker_wait`
/// of both silence from the owner and an unchanged lease by its own clock,
/// which with clock rates within the drift allowance is later in real time.
#[derive(Debug)]
pub struct LeaseHolder {
    timing: Timing,
    generation: u64,
    /// Deadline from the witness: last successful renewal's send + validity.
    witness_until: Option<Instant>,
    /// Deadline from the backup: last acknowledged epoch's seal + validity.
    backup_until: Option<Instant>,
    /// A renewal sent and not answered, with its send time.
    in_flight: Option<Instant>,
    next_renewal: Instant,
    superseded: Option<Lease>,
    fenced_since: Option<Instant>,
}

impl LeaseHolder {
    /// The owner of `generation`, whose acquiring write was sent at
    /// `acquired_sent_at` and succeeded.
    #[must_use]
    pub fn new(timing: Timing, generation: u64, acquired_sent_at: Instant) -> Self {
        Self {
            timing,
            generation,
            witness_until: Some(acquired_sent_at + timing.owner_valid()),
            backup_until: None,
            in_flight: None,
            next_renewal: acquired_sent_at + timing.renew_every(),
            superseded: None,
            fenced_since: None,
        }
    }

    /// The generation it owns.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True when a renewal is due: send it now (the time passed in is its
    /// send time) and report [`on_renewed`](Self::on_renewed) or
    /// [`on_renewal_failed`](Self::on_renewal_failed).
    pub fn poll_renewal(&mut self, now: Instant) -> bool {
        if self.superseded.is_some() || self.in_flight.is_some() || now < self.next_renewal {
            return false;
        }
        self.in_flight = Some(now);
        true
    }

    /// The renewal sent at `sent_at` succeeded.
    pub fn on_renewed(&mut self, sent_at: Instant) {
        self.in_flight = None;
        self.witness_until = later(self.witness_until, sent_at + self.timing.owner_valid());
        self.next_renewal = sent_at + self.timing.renew_every();
    }

    /// The renewal sent at `sent_at` failed (the witness unreachable): try
    /// again soon.
    pub fn on_renewal_failed(&mut self, sent_at: Instant) {
        self.in_flight = None;
        self.next_renewal = sent_at + self.timing.retry_every();
    }

    /// The witness names another owner (a renewal lost its
    /// compare-and-swap to `current`).
    pub fn on_superseded(&mut self, current: Lease) {
        self.in_flight = None;
        self.superseded = Some(current);
    }

    /// The backup acknowledged an epoch sealed at `sealed_at`: it heard
    /// this owner after that.
    pub fn on_backup_heard(&mut self, sealed_at: Instant) {
        self.backup_until = later(self.backup_until, sealed_at + self.timing.owner_valid());
    }

    /// Whether it may run and release output at `now`.
    pub fn may_run(&mut self, now: Instant) -> Standing {
        if let Some(l) = &self.superseded {
            return Standing::Superseded(Box::new(l.clone()));
        }
        let valid = [self.witness_until, self.backup_until].into_iter().flatten().any(|until| now < until);
        if valid {
            self.fenced_since = None;
            Standing::Owner
        } else {
            Standing::SelfFenced { since: *self.fenced_since.get_or_insert(now) }
        }
    }

    /// When to look again: the next renewal or the end of validity.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.superseded.is_some() {
            return None;
        }
        let renewal = if self.in_flight.is_some() { None } else { Some(self.next_renewal) };
        [renewal, self.witness_until.max(self.backup_until)].into_iter().flatten().min()
    }

    /// How long the lease still holds at `now` (zero when fenced).
    #[must_use]
    pub fn remaining(&self, now: Instant) -> Duration {
        self.witness_until.max(self.backup_until).map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }
}

fn later(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.max(b)))
}
