//! The taker's side of the lease (sans-IO): when a backup whose primary
//! went silent may take the guest over.

use std::time::{Duration, Instant};

use crate::lease::Tagged;
use crate::timing::Timing;

/// What the taker should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// Read the lease (nothing observed yet, or it is time to look again).
    Read,
    /// Nothing before this instant.
    Wait(Instant),
    /// Swap in generation `generation` if the lease is still `expected`
    /// (`None`: still absent).
    Attempt {
        /// The tag the lease must still have.
        expected: Option<String>,
        /// The generation to take.
        generation: u64,
        /// The lease was released by its owner, so it is taken without
        /// waiting a lease period out.
        released: bool,
    },
}

/// The taker's view: the lease as last observed (and since when, by its
/// clock, unchanged) and when it last heard the owner.
///
/// Invariant: it proposes an attempt only after `Timing::taker_wait` (of
/// the lease period the lease itself names) both of silence from the
/// owner and of an unchanged lease, each measured from its own
/// observation; or at once when the lease it read was released by its
/// owner (the swap still needs that very version, so a lease renewed or
/// taken since is not taken).
#[derive(Clone, Debug)]
pub struct Claimant {
    timing: Timing,
    observed: Option<Observed>,
    last_heard: Instant,
    next_read: Option<Instant>,
}

#[derive(Clone, Debug)]
struct Observed {
    tag: Option<String>,
    generation: u64,
    lease: Duration,
    since: Instant,
    released: bool,
}

impl Claimant {
    /// A taker that last heard the owner at `last_heard`.
    #[must_use]
    pub fn new(timing: Timing, last_heard: Instant) -> Self {
        Self { timing, observed: None, last_heard, next_read: None }
    }

    /// The owner was heard (a message, a packet) at `now`.
    pub fn on_owner_heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// A read of the lease answered at `now`: `lease` is what the witness
    /// holds (`None`: no lease yet).
    pub fn observe(&mut self, now: Instant, lease: Option<&Tagged>) {
        let tag = lease.map(|t| t.tag.clone());
        let same = self.observed.as_ref().is_some_and(|o| o.tag == tag);
        if !same {
            let (generation, lease_ms, released) =
                lease.map_or((0, 0, false), |t| (t.lease.generation, t.lease.lease_ms, t.lease.released));
            let lease = Duration::from_millis(lease_ms).max(self.timing.lease);
            self.observed = Some(Observed { tag, generation, lease, since: now, released });
        }
        self.next_read = Some(now + self.timing.read_every());
    }

    /// A swap failed: the lease changed; read it again.
    pub fn on_lost(&mut self) {
        self.observed = None;
        self.next_read = None;
    }

    /// What to do at `now`.
    #[must_use]
    pub fn poll(&self, now: Instant) -> Takeover {
        let Some(o) = &self.observed else { return Takeover::Read };
        if o.released {
            return Takeover::Attempt { expected: o.tag.clone(), generation: o.generation + 1, released: true };
        }
        let wait = self.timing.taker_wait(o.lease);
        let ready = (o.since + wait).max(self.last_heard + wait);
        if now >= ready {
            return Takeover::Attempt { expected: o.tag.clone(), generation: o.generation + 1, released: false };
        }
        match self.next_read {
            Some(r) if r <= now => Takeover::Read,
            Some(r) => Takeover::Wait(r.min(ready)),
            None => Takeover::Read,
        }
    }
}
