//! What one guest may use of a backup: store bytes (its kept epochs'
//! charge, [`remus_store::Store::usage`]) and the rate at which its
//! epochs are committed. Over the byte quota, its commits are refused
//! with the reason (the primary tries again later, and nothing committed
//! is touched); over the rate, its commits wait, which the primary sees
//! as a slower backup and answers with longer epochs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use remus_types::GuestId;

/// Limits on each guest of a backup (the same for every guest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestQuota {
    /// Bytes a guest's kept epochs may charge to the store (`None`: no
    /// limit). A commit group that starts under it is taken whole.
    pub store_bytes: Option<u64>,
    /// Epochs a second a guest's commits may average, with a second's
    /// worth as burst (`None`: no limit).
    pub epoch_hz: Option<u32>,
}

/// A token bucket of `hz` epochs a second holding at most one second's.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    #[must_use]
    pub fn full(hz: u32, now: Instant) -> Self {
        Self { tokens: f64::from(hz), at: now }
    }

    /// Takes `n` epochs at `now`: how long the commit must wait first
    /// (zero while the bucket holds them).
    pub fn take(&mut self, hz: u32, n: u64, now: Instant) -> Duration {
        let hz = f64::from(hz.max(1));
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * hz).min(hz);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        // Paid for by the wait: the bucket is empty when it ends.
        let wait = Duration::from_secs_f64(-self.tokens / hz);
        self.tokens = 0.0;
        self.at = now + wait;
        wait
    }
}

/// The rate buckets of every guest.
#[derive(Debug, Default)]
pub struct Rates(Mutex<HashMap<GuestId, Bucket>>);

impl Rates {
    /// How long a commit of `n` epochs of `guest` must wait under `hz`.
    pub fn wait(&self, guest: GuestId, hz: u32, n: u64) -> Duration {
        let now = Instant::now();
        self.0.lock().entry(guest).or_insert_with(|| Bucket::full(hz, now)).take(hz, n, now)
    }
}

/// Bytes in a short human form (KiB, MiB, GiB).
#[must_use]
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n => format!("{:.1} KiB", n as f64 / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_a_second_through_then_paces_to_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(40, t0);
        assert_eq!(b.take(40, 40, t0), Duration::ZERO, "a second's burst");
        assert_eq!(b.take(40, 20, t0), Duration::from_millis(500), "then 20 epochs wait half a second");
        // The wait paid for them: 20 more right after it wait another half.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(b.take(40, 20, later), Duration::from_millis(500));
        // Idle for long, it fills to a second's worth and no more.
        let idle = later + Duration::from_secs(60);
        assert_eq!(b.take(40, 40, idle), Duration::ZERO);
        assert!(b.take(40, 1, idle) > Duration::ZERO);
        // Offered at 80 Hz: by any time T no more than a second's burst
        // and 40 a second pass, and 440 take 10 s.
        let mut b = Bucket::full(40, t0);
        let mut waited = Duration::ZERO;
        for i in 0..440u64 {
            let offered = Duration::from_micros(i * 12_500) + waited;
            let wait = b.take(40, 1, t0 + offered);
            waited += wait;
            let passed_at = (offered + wait).as_secs_f64();
            assert!((i + 1) as f64 <= 40.0 + 40.0 * passed_at + 1e-6, "epoch {i} passed at {passed_at} s");
        }
        let end = (Duration::from_micros(439 * 12_500) + waited).as_secs_f64();
        assert!((end - 10.0).abs() < 0.013, "440 epochs at 40 Hz from a full bucket end at 10 s, not {end}");
    }
}
