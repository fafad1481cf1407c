//! What a primary observes as it runs: pauses, wire bytes, acknowledgement
//! latency, output released. Updated by the runtime, read by whoever
//! presents it.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use remus_types::{ChunkId, EpochId};
use remus_wan::EncodingMix;

/// Percentile of a sample (nearest rank), in the sample's unit.
#[must_use]
pub fn percentile(values: &[u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Nanoseconds as milliseconds.
#[must_use]
pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// What the primary observed, updated as the run goes.
#[derive(Debug)]
pub struct PrimaryStats {
    /// When protection started.
    pub started: Instant,
    /// The round-trip time to the backup, as of its last acknowledgement.
    pub path_rtt: std::time::Duration,
    /// Pause of each sealed epoch, ns.
    pub pauses_ns: Vec<u64>,
    /// Dirty pages sealed.
    pub dirty_pages: u64,
    /// Epoch length chosen after each seal (longer while the backup lags).
    pub periods_ns: Vec<u64>,
    /// Epochs sealed.
    pub sealed: EpochId,
    /// Seal instant of each unacknowledged epoch.
    pub sealed_at: HashMap<EpochId, Instant>,
    /// Memory root of each sealed epoch.
    pub roots: BTreeMap<EpochId, ChunkId>,
    /// Bytes of epochs put on the wire (resends included).
    pub wire_bytes: u64,
    /// Dirty pages put on the wire (resends included).
    pub wire_pages: u64,
    /// Bytes of epochs sent again after a reconnect or a refusal.
    pub resent_bytes: u64,
    /// Epochs sent again.
    pub resent_epochs: u64,
    /// Parity sent beside the epochs (not part of `wire_bytes`).
    pub parity_bytes: u64,
    /// Parity left out on a saturated link.
    pub parity_dropped_bytes: u64,
    /// Encodings chosen.
    pub mix: EncodingMix,
    /// Highest acknowledged epoch.
    pub acked: EpochId,
    /// Seal-to-ack latency of each acknowledged epoch, ns.
    pub commit_ns: Vec<u64>,
    /// The same, of the epochs sealed once the guest was protected (its
    /// first epoch, the whole memory, committed): steady state, without
    /// the epochs that waited behind the first copy.
    pub protected_commit_ns: Vec<u64>,
    /// How long each acknowledged epoch's output was held: its
    /// seal-to-ack latency, or 0 for an epoch released ahead.
    pub output_ns: Vec<u64>,
    /// The last epoch whose output was released at its seal (a new
    /// guest's first copy, whose epochs from the first on were all
    /// released so; 0: none).
    pub released_ahead: EpochId,
    /// Output lines released (after their epoch was acknowledged, or at
    /// its seal for an epoch released ahead).
    pub output_released: u64,
    /// Connection losses seen.
    pub disconnects: u64,
    /// Chunks the backup deleted (GC) that the encoder counted as held.
    pub chunks_forgotten: u64,
    /// Epochs the backup refused for naming chunks it no longer held (each
    /// sent again with the unacknowledged ones after it).
    pub refusals: u64,
    /// Time the last epoch was sealed.
    pub last_seal: Option<Instant>,
    /// The committed epoch this run continued the guest's history after
    /// (0 for a new guest).
    pub continued_from: EpochId,
    /// The generation owned on the witness (none without a witness).
    pub generation: Option<u64>,
    /// Times the primary fenced itself (lease unconfirmed: guest held
    /// still, output held).
    pub self_fences: u64,
    /// Time spent self-fenced, ns.
    pub self_fenced_ns: u64,
    /// When the newest epoch's seal began (the guest paused).
    pub last_seal_started: Option<Instant>,
    /// The epoch the guest was handed over at (a planned move), and when
    /// the backup said so.
    pub handed_over: Option<EpochId>,
    /// When the backup said it took the guest over.
    pub handed_over_at: Option<Instant>,
    /// When the backup committed this run's first epoch (the whole
    /// memory) and an epoch whose output was held (after any released
    /// ahead): the guest is protected from then on.
    pub protected_at: Option<Instant>,
    /// Each far backup's link, in the order configured.
    pub far: Vec<crate::fanout::FarStats>,
    /// Epochs the guest was held still in because the backup could not
    /// keep output under the target even with the longest epochs.
    pub throttled_epochs: u64,
    /// CPU time of the guest's own execution in this process (see
    /// `remus_capture::Pause::cpu_time`), as of the last seal.
    pub guest_cpu: std::time::Duration,
}

impl Default for PrimaryStats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            path_rtt: std::time::Duration::ZERO,
            pauses_ns: Vec::new(),
            dirty_pages: 0,
            periods_ns: Vec::new(),
            sealed: EpochId(0),
            sealed_at: HashMap::new(),
            roots: BTreeMap::new(),
            wire_bytes: 0,
            wire_pages: 0,
            resent_bytes: 0,
            parity_bytes: 0,
            parity_dropped_bytes: 0,
            resent_epochs: 0,
            mix: EncodingMix::default(),
            acked: EpochId(0),
            commit_ns: Vec::new(),
            protected_commit_ns: Vec::new(),
            output_ns: Vec::new(),
            released_ahead: EpochId(0),
            output_released: 0,
            disconnects: 0,
            chunks_forgotten: 0,
            refusals: 0,
            last_seal: None,
            continued_from: EpochId(0),
            generation: None,
            self_fences: 0,
            self_fenced_ns: 0,
            last_seal_started: None,
            handed_over: None,
            handed_over_at: None,
            protected_at: None,
            far: Vec::new(),
            throttled_epochs: 0,
            guest_cpu: std::time::Duration::ZERO,
        }
    }
}

impl PrimaryStats {
    /// Epochs per second achieved so far.
    #[must_use]
    pub fn hz(&self) -> f64 {
        let end = self.last_seal.unwrap_or(self.started);
        let secs = end.duration_since(self.started).as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            (self.sealed.0 - self.continued_from.0) as f64 / secs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 99.0), 0);
        assert_eq!(percentile(&[7], 1.0), 7);
    }
}
