use std::collections::VecDeque;
use std::fmt::{Debug, Display, Formatter};

use super::min_max::MinMax;
use crate::{Duration, Instant};

/// Delivery-rate samples in the manner of the BBR draft
/// (draft-cheng-iccrg-delivery-rate-estimation): each acknowledgement
/// measures the bytes delivered between the send of the newest packet it
/// acknowledges and now, over the longer of the send and the ack interval,
/// so that however many packets one ACK frame covers, the sample is the
/// path's rate and not one packet over the gap between ACKs.
#[derive(Clone, Debug, Default)]
pub(crate) struct BandwidthEstimation {
    /// Bytes acknowledged so far.
    delivered: u64,
    /// When `delivered` last grew.
    delivered_time: Option<Instant>,
    /// Send time of the packet whose acknowledgement made the last sample.
    first_sent_time: Option<Instant>,
    /// The delivery state at each send instant of packets not yet
    /// acknowledged (packets sent in one batch share an instant), oldest
    /// first.
    sent: VecDeque<SendState>,
    /// Of the packets the current ACK frame acknowledges, the newest's.
    newest_acked: Option<SendState>,
    max_filter: MinMax,
    acked_at_last_window: u64,
}

/// What was delivered when a packet was sent.
#[derive(Clone, Copy, Debug)]
struct SendState {
    time: Instant,
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
}

/// Send instants remembered at most (a bound for packets never
/// acknowledged nor overtaken, which pruning would otherwise keep).
const MAX_SEND_STATES: usize = 1 << 16;

impl BandwidthEstimation {
    pub(crate) fn on_sent(&mut self, now: Instant, _bytes: u64) {
        if self.sent.back().is_some_and(|s| s.time == now) {
            return;
        }
        if self.sent.is_empty() {
            // Nothing in flight: the next sample's interval starts now,
            // not at the last acknowledgement before the quiet time.
            self.delivered_time = Some(now);
            self.first_sent_time = Some(now);
        }
        if self.sent.len() == MAX_SEND_STATES {
            self.sent.pop_front();
        }
        self.sent.push_back(SendState {
            time: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_sent_time: self.first_sent_time.unwrap_or(now),
        });
    }

    pub(crate) fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _round: u64,
        _app_limited: bool,
    ) {
        self.delivered += bytes;
        self.delivered_time = Some(now);
        let i = self.sent.partition_point(|s| s.time < sent);
        if let Some(state) = self.sent.get(i).filter(|s| s.time == sent) {
            if self.newest_acked.is_none_or(|n| n.time < state.time) {
                self.newest_acked = Some(*state);
            }
        }
    }

    pub(crate) fn bytes_acked_this_window(&self) -> u64 {
        self.delivered - self.acked_at_last_window
    }

    /// Ends an ACK frame: one rate sample from its newest packet, into the
    /// max filter unless the sender was application-limited (then only
    /// when it raises the estimate, which an application-limited sender
    /// can only have underestimated). Samples over less than `min_rtt`
    /// are discarded (acknowledgements compressed in time overstate the
    /// rate). `in_flight`: the bytes still unacknowledged.
    pub(crate) fn end_acks(&mut self, current_round: u64, app_limited: bool, min_rtt: Duration, in_flight: u64) {
        self.acked_at_last_window = self.delivered;
        let Some(p) = self.newest_acked.take() else {
            return;
        };
        // Older send instants can only be acknowledged out of order now;
        // their samples would be older than this one. With nothing in
        // flight, none is left.
        while self.sent.front().is_some_and(|s| s.time < p.time || in_flight == 0) {
            self.sent.pop_front();
        }
        self.first_sent_time = Some(p.time);
        let Some(delivered_time) = self.delivered_time else {
            return;
        };
        let send_elapsed = p.time.saturating_duration_since(p.first_sent_time);
        let ack_elapsed = delivered_time.saturating_duration_since(p.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        if interval < min_rtt {
            return;
        }
        let Some(rate) = Self::bw_from_delta(self.delivered - p.delivered, interval) else {
            return;
        };
        if !app_limited || rate > self.max_filter.get() {
            self.max_filter.update_max(current_round, rate);
        }
    }

    /// A rate taken as a sample of round `round` (a path measured before).
    pub(crate) fn seed(&mut self, round: u64, rate: u64) {
        self.max_filter.update_max(round, rate);
    }

    pub(crate) fn get_estimate(&self) -> u64 {
        self.max_filter.get()
    }

    pub(crate) const fn bw_from_delta(bytes: u64, delta: Duration) -> Option<u64> {
        let window_duration_ns = delta.as_nanos();
        if window_duration_ns == 0 {
            return None;
        }
        let b_ns = bytes * 1_000_000_000;
        let bytes_per_second = b_ns / (window_duration_ns as u64);
        Some(bytes_per_second)
    }
}

impl Display for BandwidthEstimation {
    fn fmt(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} MB/s",
            self.get_estimate() as f32 / (1024 * 1024) as f32
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKET: u64 = 1200;

    /// A path of `rate` bytes/s and `rtt` whose receiver acknowledges
    /// `per_ack` packets at once, the sender pacing `per_send` packets a
    /// batch: the estimate after `rounds` round trips of sending without
    /// pause.
    fn estimate(rate: u64, rtt: Duration, per_ack: u64, per_send: u64, rounds: u64) -> u64 {
        let mut bw = BandwidthEstimation::default();
        let start = Instant::now();
        let spacing = Duration::from_nanos(PACKET * per_send * 1_000_000_000 / rate);
        let batches = rounds * (rtt.as_nanos() as u64 / spacing.as_nanos() as u64);
        // (arrival at the receiver, send time) of packets not yet acknowledged.
        let mut pending: Vec<Instant> = Vec::new();
        let mut acks: VecDeque<(Instant, Vec<Instant>)> = VecDeque::new();
        for b in 0..batches {
            let now = start + spacing * b as u32;
            while acks.front().is_some_and(|(at, _)| *at <= now) {
                let (at, sent) = acks.pop_front().unwrap();
                for s in sent {
                    bw.on_ack(at, s, PACKET, 0, false);
                }
                bw.end_acks(b / 10, false, rtt, 1);
            }
            for _ in 0..per_send {
                bw.on_sent(now, PACKET);
                pending.push(now);
                if pending.len() as u64 == per_ack {
                    acks.push_back((now + rtt, std::mem::take(&mut pending)));
                }
            }
        }
        bw.get_estimate()
    }

    #[test]
    fn batched_acknowledgements_measure_the_path_rate() {
        let rate = 100_000_000;
        let rtt = Duration::from_millis(100);
        for (per_ack, per_send) in [(1, 1), (2, 1), (64, 1), (256, 10), (10, 64)] {
            let e = estimate(rate, rtt, per_ack, per_send, 6);
            assert!(
                e > rate * 9 / 10 && e < rate * 11 / 10,
                "{per_ack} packets an ACK, {per_send} a send: {e} B/s for a {rate} B/s path"
            );
        }
    }

    #[test]
    fn a_quiet_time_is_not_taken_for_a_slow_path() {
        let mut bw = BandwidthEstimation::default();
        let rtt = Duration::from_millis(100);
        let t0 = Instant::now();
        // A first flight, acknowledged.
        for i in 0..10u32 {
            bw.on_sent(t0 + Duration::from_micros(12 * i as u64), PACKET);
        }
        for i in 0..10u32 {
            bw.on_ack(t0 + rtt, t0 + Duration::from_micros(12 * i as u64), PACKET, 0, true);
        }
        bw.end_acks(1, true, rtt, 0);
        // Ten seconds of nothing, then a burst of 1000 packets at 100 MB/s:
        // in its first round trip it shows what it delivered over that
        // round trip (1.2 MB in 112 ms), not over the quiet time.
        let t1 = t0 + Duration::from_secs(10);
        for i in 0..1000u32 {
            bw.on_sent(t1 + Duration::from_micros(12 * i as u64), PACKET);
        }
        for i in 0..1000u32 {
            let sent = t1 + Duration::from_micros(12 * i as u64);
            bw.on_ack(sent + rtt, sent, PACKET, 0, false);
            bw.end_acks(2, false, rtt, (999 - i as u64) * PACKET);
        }
        let e = bw.get_estimate();
        let round = 1000 * PACKET * 1_000_000 / 112_000;
        assert!(e > round * 9 / 10 && e < round * 11 / 10, "{e} B/s after a quiet time, {round} B/s delivered in its round trip");
    }
}
