//! The lease's timing: how long an owner may trust a renewal, how long a
//! taker must wait.

use std::time::Duration;

/// Lease timing. Each side measures only on its own monotonic clock; the
/// clocks may run at rates that differ from real time by the factor
/// `1 + drift` either way.
///
/// The argument: the owner trusts a renewal (or an acknowledged epoch)
/// for [`owner_valid`](Self::owner_valid) = lease / (1 + drift) of its own
/// clock, at most `lease` of real time, counted from an instant (the
/// renewal's sending, the epoch's sealing) before anything the taker can
/// observe of it. The taker waits [`taker_wait`](Self::taker_wait) =
/// lease × (1 + drift) + margin of its own clock, at least `lease` of real
/// time, counted from its own observation (the lease unchanged, the owner
/// last heard), and then swaps the lease only if it is still the one it
/// observed. So by the time a takeover can succeed the owner has stopped
/// releasing output, and a renewal sent after the taker's observation
/// changes the lease and makes the takeover fail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// The lease period (default 500 ms).
    pub lease: Duration,
    /// The clock rate error allowed each side (default 1%: a thousand
    /// times what crystal oscillators drift).
    pub drift: f64,
    /// Added to the taker's wait for scheduling and request latency
    /// (default 20 ms).
    pub margin: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self { lease: Duration::from_millis(500), drift: 0.01, margin: Duration::from_millis(20) }
    }
}

impl Timing {
    /// How long the owner trusts a confirmation, by its own clock.
    #[must_use]
    pub fn owner_valid(&self) -> Duration {
        self.lease.div_f64(1.0 + self.drift)
    }

    /// How long a taker waits, by its own clock, for a lease of `lease`.
    #[must_use]
    pub fn taker_wait(&self, lease: Duration) -> Duration {
        lease.mul_f64(1.0 + self.drift) + self.margin
    }

    /// How often the owner renews: three times a lease period, so that one
    /// slow or lost renewal does not end it.
    #[must_use]
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// How often a taker reads the lease while it waits, so that a renewal
    /// in the meantime shows.
    #[must_use]
    pub fn read_every(&self) -> Duration {
        self.lease / 4
    }

    /// How soon a failed renewal is tried again.
    #[must_use]
    pub fn retry_every(&self) -> Duration {
        (self.lease / 10).max(Duration::from_millis(10))
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease < Duration::from_millis(30) {
            return Err(format!("the lease must be at least 30 ms, got {:?}", self.lease));
        }
        if !(0.0..=0.5).contains(&self.drift) {
            return Err(format!("clock drift must be in 0..=0.5, got {}", self.drift));
        }
        Ok(())
    }
}
