//! A bandwidth cap on the link: a congestion controller that wraps
//! another and never lets more than `rate × RTT` bytes be in flight.
//! quinn paces at window / RTT, so the sending rate stays at or below the
//! cap while the wrapped controller still reacts to congestion below it.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};
use quinn_proto::RttEstimator;

/// Window below which the cap never goes: a few packets, so that a link
/// with a very low cap or a tiny RTT still moves. Where rate × RTT is
/// below it (1 MB/s at 6 ms) the cap is looser than configured.
const MIN_WINDOW: u64 = 4 * 1500;

/// Builds capped controllers around those of `inner`.
pub(crate) struct CappedFactory {
    pub(crate) inner: Arc<dyn ControllerFactory + Send + Sync>,
    /// Bytes per second.
    pub(crate) rate: u64,
}

impl ControllerFactory for CappedFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Capped { inner: Arc::clone(&self.inner).build(now, current_mtu), rate: self.rate, rtt: None })
    }
}

struct Capped {
    inner: Box<dyn Controller>,
    rate: u64,
    rtt: Option<Duration>,
}

impl Capped {
    fn cap(&self) -> u64 {
        // Before the first sample, a tenth of a second's worth.
        let rtt = self.rtt.unwrap_or(Duration::from_millis(100));
        let cap = u64::try_from(u128::from(self.rate) * rtt.as_micros() / 1_000_000).unwrap_or(u64::MAX);
        cap.max(MIN_WINDOW)
    }
}

impl Controller for Capped {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.rtt = Some(rtt.get());
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window().min(self.cap())
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self { inner: self.inner.clone_box(), rate: self.rate, rtt: self.rtt })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().min(self.cap())
    }

    /// The wrapped controller's state: what a reader of the link's
    /// controller wants (BBR's estimates for the path trace and for the
    /// next connection's Careful Resume) lies there; the cap holds only
    /// the configured rate and the last RTT.
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self.inner.into_any()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_controller_shows_the_controller_it_wraps() {
        let inner: Arc<dyn ControllerFactory + Send + Sync> = Arc::new(quinn::congestion::BbrConfig::default());
        let capped = Arc::new(CappedFactory { inner, rate: 1 << 20 }).build(Instant::now(), 1200);
        assert!(capped.window() <= (1 << 20) / 10 + MIN_WINDOW, "capped before any RTT sample: {}", capped.window());
        assert!(capped.clone_box().into_any().downcast::<quinn::congestion::Bbr>().is_ok(), "BBR's state is readable through the cap");
    }
}
