//! When a silent peer counts as lost: a failure detector that adapts to
//! how regularly the peer has been heard, so that a lossy or busy link
//! (a heartbeat retransmitted a round trip late, a burst of jitter) does
//! not fool it, while a peer that is really gone is declared lost within a
//! bounded time.
//!
//! It is phi accrual (Hayashibara et al., 2004) with a normal model of the
//! gaps between signs of life: phi is `-log10` of the probability that a
//! gap at least as long as the current silence occurs. The peer is
//! suspected when the silence exceeds `floor` (the configured timeout: a
//! peer is never declared lost sooner) and phi exceeds [`PHI_THRESHOLD`],
//! and always once it exceeds `ceiling`. Every decision carries its
//! evidence ([`Silence`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Suspicion level at which the peer counts as lost: a gap this long
/// would happen once in 10^8 gaps of the observed distribution.
pub const PHI_THRESHOLD: f64 = 8.0;
/// Gaps kept for the distribution.
const WINDOW: usize = 200;
/// Standard deviation assumed at least, as a fraction of the mean: a
/// perfectly regular peer (a timer on an idle host) is not suspected the
/// moment it is a millisecond late.
const MIN_STD_FRACTION: f64 = 0.25;
/// Round trips of silence always tolerated: a retransmitted heartbeat
/// arrives about one round trip late, two when its retransmission is lost
/// too.
const RTT_MULTIPLE: u32 = 3;

/// Why a peer was (or was not yet) declared lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Silence {
    /// Time since the peer was last heard.
    pub silent_for: Duration,
    /// The silence after which it counts as lost, as things stand.
    pub timeout: Duration,
    /// Suspicion level now.
    pub phi: f64,
    /// Mean gap between signs of life.
    pub mean_gap: Duration,
    /// Their standard deviation.
    pub std_gap: Duration,
    /// Gaps observed.
    pub samples: usize,
    /// Round-trip time of the link, as last measured.
    pub rtt: Duration,
}

impl std::fmt::Display for Silence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "silent for {} ms (timeout {} ms; phi {:.1}; gaps {:.1} ± {:.1} ms over {}; rtt {:.1} ms)",
            self.silent_for.as_millis(),
            self.timeout.as_millis(),
            self.phi,
            self.mean_gap.as_secs_f64() * 1e3,
            self.std_gap.as_secs_f64() * 1e3,
            self.samples,
            self.rtt.as_secs_f64() * 1e3
        )
    }
}

/// The detector of one peer.
#[derive(Debug, Clone)]
pub struct Liveness {
    floor: Duration,
    ceiling: Duration,
    rtt: Duration,
    gaps: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last: Instant,
}

impl Liveness {
    /// A detector that never suspects before `floor` of silence and always
    /// after `ceiling`; the peer counts as heard at `now`.
    #[must_use]
    pub fn new(now: Instant, floor: Duration, ceiling: Duration) -> Self {
        Self { floor, ceiling: ceiling.max(floor), rtt: Duration::ZERO, gaps: VecDeque::new(), sum: 0.0, sum_sq: 0.0, last: now }
    }

    /// A sign of life at `now`.
    pub fn heard(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        if gap <= 0.0 {
            return;
        }
        if self.gaps.len() == WINDOW {
            let old = self.gaps.pop_front().expect("full");
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.gaps.push_back(gap);
        self.sum += gap;
        self.sum_sq += gap * gap;
    }

    /// The link's round-trip time, as measured by the transport.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = rtt;
    }

    fn mean_std(&self) -> (f64, f64) {
        let n = self.gaps.len();
        if n == 0 {
            return (0.0, 0.0);
        }
        let mean = self.sum / n as f64;
        let var = (self.sum_sq / n as f64 - mean * mean).max(0.0);
        (mean, var.sqrt().max(mean * MIN_STD_FRACTION))
    }

    /// Silence after which the peer counts as lost, as things stand.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        let (mean, std) = self.mean_std();
        let adaptive = Duration::from_secs_f64(mean + phi_to_sigmas(PHI_THRESHOLD) * std);
        adaptive.max(self.floor).max(self.rtt * RTT_MULTIPLE).min(self.ceiling)
    }

    /// When the peer counts as lost if it is not heard before.
    #[must_use]
    pub fn deadline(&self) -> Instant {
        self.last + self.timeout()
    }

    /// True when the peer counts as lost at `now`.
    #[must_use]
    pub fn is_lost(&self, now: Instant) -> bool {
        now >= self.deadline()
    }

    /// The evidence at `now`.
    #[must_use]
    pub fn silence(&self, now: Instant) -> Silence {
        let (mean, std) = self.mean_std();
        let silent_for = now.saturating_duration_since(self.last);
        Silence {
            silent_for,
            timeout: self.timeout(),
            phi: phi(silent_for.as_secs_f64(), mean, std),
            mean_gap: Duration::from_secs_f64(mean),
            std_gap: Duration::from_secs_f64(std),
            samples: self.gaps.len(),
            rtt: self.rtt,
        }
    }
}

/// One side's heartbeats and its watch on the peer while connected, as
/// the sender and the receiver core both keep them: when the next
/// heartbeat is due, and the [`Liveness`] of the peer (none while idle,
/// and none again once the peer counted as lost, so that is said once).
#[derive(Debug, Clone, Default)]
pub(crate) struct Pulse {
    period: Duration,
    next_heartbeat: Option<Instant>,
    liveness: Option<Liveness>,
}

impl Pulse {
    /// Heartbeats every `period` from `now`, and a watch on a peer heard
    /// at `now` (see [`Liveness::new`] for `floor` and `ceiling`).
    pub(crate) fn start(now: Instant, period: Duration, floor: Duration, ceiling: Duration) -> Self {
        Self { period, next_heartbeat: Some(now + period), liveness: Some(Liveness::new(now, floor, ceiling)) }
    }

    /// A sign of life other than a message: the peer's packets are
    /// arriving, or the link measured `rtt`.
    pub(crate) fn activity(&mut self, now: Instant, packets_arrived: bool, rtt: Duration) {
        if let Some(l) = self.liveness.as_mut() {
            l.set_rtt(rtt);
        }
        if packets_arrived {
            self.heard(now);
        }
    }

    /// A sign of life from the peer at `now`.
    pub(crate) fn heard(&mut self, now: Instant) {
        if let Some(l) = self.liveness.as_mut() {
            l.heard(now);
        }
    }

    /// When [`Pulse::tick`] is next due.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        crate::earliest(self.next_heartbeat, self.liveness.as_ref().map(Liveness::deadline))
    }

    /// At `now`: whether a heartbeat is due (the next one is then
    /// scheduled), and the evidence when the peer has just counted as lost
    /// (it is watched no more).
    pub(crate) fn tick(&mut self, now: Instant) -> (bool, Option<Silence>) {
        let beat = self.next_heartbeat.is_some_and(|t| now >= t);
        if beat {
            self.next_heartbeat = Some(now + self.period);
        }
        let lost = self.liveness.as_ref().filter(|l| l.is_lost(now)).map(|l| l.silence(now));
        if lost.is_some() {
            self.liveness = None;
        }
        (beat, lost)
    }
}

/// Phi of a gap `t` under a normal distribution of gaps (the logistic
/// approximation of its tail that Akka and Cassandra use).
fn phi(t: f64, mean: f64, std: f64) -> f64 {
    if std <= 0.0 {
        return if t > mean { f64::INFINITY } else { 0.0 };
    }
    let y = (t - mean) / std;
    let e = (-y * (1.5976 + 0.070_566 * y * y)).exp();
    let p_later = if t > mean { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
    -p_later.max(f64::MIN_POSITIVE).log10()
}

/// Standard deviations above the mean at which phi reaches `level`.
fn phi_to_sigmas(level: f64) -> f64 {
    // phi is increasing in y: bisect.
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if phi(mid, 0.0, 1.0) < level {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn regular(start: Instant, every: Duration, n: u32, floor: Duration) -> (Liveness, Instant) {
        let mut l = Liveness::new(start, floor, floor * 20);
        let mut t = start;
        for _ in 0..n {
            t += every;
            l.heard(t);
        }
        (l, t)
    }

    #[test]
    fn phi_grows_with_silence_and_the_threshold_matches_it() {
        assert!(phi(0.05, 0.05, 0.01) < 1.0);
        assert!(phi(0.08, 0.05, 0.01) > phi(0.06, 0.05, 0.01));
        let z = phi_to_sigmas(PHI_THRESHOLD);
        assert!((phi(z, 0.0, 1.0) - PHI_THRESHOLD).abs() < 1e-6);
        assert!((5.0..6.5).contains(&z), "{z}");
    }

    #[test]
    fn a_regular_peer_is_lost_after_the_floor_not_before() {
        let t0 = Instant::now();
        let (l, t) = regular(t0, 50 * MS, 100, 500 * MS);
        assert_eq!(l.timeout(), 500 * MS);
        assert!(!l.is_lost(t + 499 * MS));
        assert!(l.is_lost(t + 500 * MS));
        let ev = l.silence(t + 500 * MS);
        assert!(ev.phi > PHI_THRESHOLD, "{ev}");
        assert_eq!(ev.samples, 100);
    }

    #[test]
    fn a_peer_heard_irregularly_gets_a_longer_timeout_up_to_the_ceiling() {
        // Heartbeats every 50 ms, but one in five arrives 450 ms late (a
        // retransmission on a lossy long path).
        let t0 = Instant::now();
        let floor = 500 * MS;
        let mut l = Liveness::new(t0, floor, 4 * floor);
        let mut t = t0;
        for i in 0..100 {
            t += if i % 5 == 0 { 450 * MS } else { 50 * MS };
            l.heard(t);
        }
        let timeout = l.timeout();
        assert!(timeout > floor, "{timeout:?}");
        assert!(!l.is_lost(t + floor), "a gap of the kind seen before is not a loss");
        assert!(l.is_lost(t + 4 * floor), "the ceiling bounds the wait");
        // Many wildly irregular gaps: the ceiling still holds.
        for i in 0..200 {
            t += if i % 2 == 0 { 10 * MS } else { 1900 * MS };
            l.heard(t);
        }
        assert_eq!(l.timeout(), 4 * floor);
    }

    #[test]
    fn a_long_round_trip_raises_the_timeout() {
        let t0 = Instant::now();
        let (mut l, _) = regular(t0, 50 * MS, 50, 500 * MS);
        l.set_rtt(300 * MS);
        assert_eq!(l.timeout(), 900 * MS);
    }

    #[test]
    fn the_evidence_reads_well() {
        let t0 = Instant::now();
        let (l, t) = regular(t0, 50 * MS, 10, 500 * MS);
        let s = l.silence(t + 600 * MS).to_string();
        assert!(s.starts_with("silent for 600 ms (timeout 500 ms; phi "), "{s}");
        assert!(s.contains("over 10"), "{s}");
    }
}
