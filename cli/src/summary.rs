//! How a primary's statistics are shown: the progress line and the run
//! summary that `demo` and `protect` print.

use remus_node::stats::{ms, percentile, PrimaryStats};
use remus_types::PAGE_SIZE;

/// The run summary (`--json` prints it as one object; fields are
/// documented in docs/cli.md).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Epochs sealed.
    pub epochs: u64,
    /// Epochs acknowledged by the backup.
    pub epochs_committed: u64,
    /// Seconds protected.
    pub seconds: f64,
    /// Achieved epochs per second.
    pub hz: f64,
    /// Pause percentiles and maximum, ms.
    pub pause_ms_p50: f64,
    /// 99th percentile pause, ms.
    pub pause_ms_p99: f64,
    /// Longest pause, ms.
    pub pause_ms_max: f64,
    /// Median epoch length, ms (longer than the configured one while the
    /// backup lagged).
    pub epoch_ms_p50: f64,
    /// Epochs the guest was held still in (throttled) because output
    /// waited past the target even with the longest epochs.
    pub throttled_epochs: u64,
    /// Longest epoch length, ms.
    pub epoch_ms_max: f64,
    /// Dirty pages sealed.
    pub dirty_pages: u64,
    /// Mean dirty pages per epoch.
    pub dirty_pages_per_epoch: f64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Wire bytes per dirty page (4096 would be raw copy).
    pub wire_bytes_per_dirty_page: f64,
    /// Wire bytes over raw page bytes.
    pub wire_ratio: f64,
    /// Bytes of epochs sent again after a reconnect or a refusal (part of
    /// `wire_bytes`).
    pub resent_bytes: u64,
    /// Epochs sent again.
    pub resent_epochs: u64,
    /// Parity datagrams sent beside the epochs (not part of `wire_bytes`).
    pub parity_bytes: u64,
    /// Parity left out because the link was saturated.
    pub parity_dropped_bytes: u64,
    /// Connection losses.
    pub disconnects: u64,
    /// Milliseconds from the start until the backup committed this run's
    /// first epoch (the whole memory) and an epoch whose output was held
    /// (after those released ahead): protected from then on (absent if it
    /// never did).
    pub protected_ms: Option<f64>,
    /// The first epoch this run sealed (1 for a new guest; after the
    /// committed one when a restarted primary continued the history).
    pub first_epoch: u64,
    /// The guest's generation on the witness (absent without one).
    pub generation: Option<u64>,
    /// Times the primary fenced itself (its lease unconfirmed).
    pub self_fences: u64,
    /// Time spent self-fenced, ms.
    pub self_fenced_ms: f64,
    /// CPU time this process used (user and system, every thread), s.
    pub cpu_seconds: f64,
    /// Of `cpu_seconds`, what an in-process guest's own execution used
    /// (the built-in workload's writes), s; 0 for a QEMU guest.
    pub guest_cpu_seconds: f64,
    /// The most memory this process held resident, MiB.
    pub peak_resident_mib: f64,
    /// Encoding mix, pages.
    pub encoding: EncodingSummary,
    /// Seal-to-ack latency percentiles, ms.
    pub commit_ms_p50: f64,
    /// 99th percentile seal-to-ack latency, ms.
    pub commit_ms_p99: f64,
    /// Seal-to-ack latency of the epochs sealed once the guest was
    /// protected (steady state: none waited behind the first copy), ms.
    pub protected_commit_ms_p50: f64,
    /// 99th percentile of the above, ms.
    pub protected_commit_ms_p99: f64,
    /// How long output was held, each acknowledged epoch's (seal to ack,
    /// or 0 for an epoch released at its seal), ms.
    pub output_ms_p50: f64,
    /// 99th percentile of the above, ms.
    pub output_ms_p99: f64,
    /// Epochs whose output was released at their seals: a new guest's
    /// first copy, before the backup held it ([protect]
    /// release-first-copy).
    pub released_ahead_epochs: u64,
    /// Backup's time to decode, verify and durably commit a commit group, ms.
    pub backup_commit_ms_p50: f64,
    /// 99th percentile of the above, ms.
    pub backup_commit_ms_p99: f64,
    /// Output lines released after ack.
    pub output_lines_released: u64,
    /// Held chunks forgotten because the backup's GC deleted them.
    pub chunks_forgotten: u64,
    /// Epochs refused by the backup for naming chunks it no longer held.
    pub refusals: u64,
    /// Restores checked against the primary's own memory root.
    pub restores_verified: u64,
    /// Restores that failed or differed.
    pub restores_failed: u64,
    /// Epochs restored.
    pub restored_epochs: Vec<u64>,
    /// Seconds per restore.
    pub restore_seconds: Vec<f64>,
    /// Whether dirty tracking was exact (write-protect scanning).
    pub exact_tracking: bool,
    /// Each far backup's link (none without far backups).
    pub far: Vec<FarSummary>,
}

/// What a far backup's link did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FarSummary {
    /// Its address.
    pub backup: String,
    /// Highest epoch it acknowledged.
    pub epochs_committed: u64,
    /// Bytes put on the wire to it (resends included).
    pub wire_bytes: u64,
    /// Bytes sent to it again after a reconnect or a refusal.
    pub resent_bytes: u64,
    /// Epochs merged into a later one while its link was behind (not kept
    /// there).
    pub merged_epochs: u64,
    /// Connection losses.
    pub disconnects: u64,
}

/// Page counts per encoding.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EncodingSummary {
    /// Zero pages.
    pub zero: u64,
    /// References to held pages.
    pub reference: u64,
    /// XOR deltas.
    pub xor: u64,
    /// zstd pages.
    pub raw_zstd: u64,
    /// Plain pages.
    pub raw_plain: u64,
}

impl Summary {
    /// Builds the summary from the primary's statistics.
    #[must_use]
    pub fn from_stats(s: &PrimaryStats, exact_tracking: bool) -> Self {
        let end = s.last_seal.unwrap_or(s.started);
        let m = s.mix;
        Self {
            epochs: s.sealed.0,
            epochs_committed: s.acked.0,
            seconds: end.duration_since(s.started).as_secs_f64(),
            hz: s.hz(),
            pause_ms_p50: ms(percentile(&s.pauses_ns, 50.0)),
            pause_ms_p99: ms(percentile(&s.pauses_ns, 99.0)),
            pause_ms_max: ms(s.pauses_ns.iter().copied().max().unwrap_or(0)),
            epoch_ms_p50: ms(percentile(&s.periods_ns, 50.0)),
            epoch_ms_max: ms(s.periods_ns.iter().copied().max().unwrap_or(0)),
            throttled_epochs: s.throttled_epochs,
            dirty_pages: s.dirty_pages,
            dirty_pages_per_epoch: match s.sealed.0 - s.continued_from.0 {
                0 => 0.0,
                n => s.dirty_pages as f64 / n as f64,
            },
            wire_bytes: s.wire_bytes,
            wire_bytes_per_dirty_page: if s.wire_pages == 0 { 0.0 } else { s.wire_bytes as f64 / s.wire_pages as f64 },
            wire_ratio: if s.wire_pages == 0 { 0.0 } else { s.wire_bytes as f64 / (s.wire_pages * PAGE_SIZE as u64) as f64 },
            resent_bytes: s.resent_bytes,
            resent_epochs: s.resent_epochs,
            parity_bytes: s.parity_bytes,
            parity_dropped_bytes: s.parity_dropped_bytes,
            disconnects: s.disconnects,
            protected_ms: s.protected_at.map(|t| t.duration_since(s.started).as_secs_f64() * 1e3),
            first_epoch: s.continued_from.0 + 1,
            generation: s.generation,
            self_fences: s.self_fences,
            self_fenced_ms: ms(s.self_fenced_ns),
            cpu_seconds: remus_sys::cpu_time().as_secs_f64(),
            guest_cpu_seconds: s.guest_cpu.as_secs_f64(),
            peak_resident_mib: remus_sys::peak_resident_bytes() as f64 / f64::from(1 << 20),
            encoding: EncodingSummary { zero: m.zero, reference: m.reference, xor: m.xor, raw_zstd: m.raw_zstd, raw_plain: m.raw_plain },
            commit_ms_p50: ms(percentile(&s.commit_ns, 50.0)),
            commit_ms_p99: ms(percentile(&s.commit_ns, 99.0)),
            protected_commit_ms_p50: ms(percentile(&s.protected_commit_ns, 50.0)),
            protected_commit_ms_p99: ms(percentile(&s.protected_commit_ns, 99.0)),
            output_ms_p50: ms(percentile(&s.output_ns, 50.0)),
            output_ms_p99: ms(percentile(&s.output_ns, 99.0)),
            // Only a new guest releases ahead, from its first epoch on.
            released_ahead_epochs: s.released_ahead.0.saturating_sub(s.continued_from.0),
            backup_commit_ms_p50: 0.0,
            backup_commit_ms_p99: 0.0,
            output_lines_released: s.output_released,
            chunks_forgotten: s.chunks_forgotten,
            refusals: s.refusals,
            restores_verified: 0,
            restores_failed: 0,
            restored_epochs: Vec::new(),
            restore_seconds: Vec::new(),
            exact_tracking,
            far: s
                .far
                .iter()
                .map(|f| FarSummary {
                    backup: f.addr.map(|a| a.to_string()).unwrap_or_default(),
                    epochs_committed: f.acked.0,
                    wire_bytes: f.wire_bytes,
                    resent_bytes: f.resent_bytes,
                    merged_epochs: f.merged.load(std::sync::atomic::Ordering::Relaxed),
                    disconnects: f.disconnects,
                })
                .collect(),
        }
    }

    /// The human-readable form.
    #[must_use]
    pub fn render(&self) -> String {
        let e = &self.encoding;
        let total = (e.zero + e.reference + e.xor + e.raw_zstd + e.raw_plain).max(1) as f64;
        let pct = |n: u64| 100.0 * n as f64 / total;
        let mut text = format!(
            "epochs            {} sealed, {} committed in {:.1} s ({:.1} Hz); {}\n\
             pause             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} tracking)\n\
             epoch length      p50 {:.1} ms, max {:.1} ms (longer while the backup lags); guest held still in {} epochs (throttled)\n\
             dirty pages       {} ({:.0} per epoch)\n\
             wire              {} bytes, {:.1} bytes per dirty page ({:.1}% of raw); resent {} bytes in {} epochs after {} disconnects; parity {} bytes ({} left out, link saturated)\n\
             encodings         zero {:.1}%, ref {:.1}%, xor {:.1}%, zstd {:.1}%, plain {:.1}%\n\
             commit latency    p50 {:.2} ms, p99 {:.2} ms (seal to ack; once protected p50 {:.2} ms, p99 {:.2} ms; backup commit p50 {:.2} ms, p99 {:.2} ms)\n\
             output released   {} lines, held p50 {:.2} ms, p99 {:.2} ms; {}\n\
             restores          {} verified byte-exact, {} failed (epochs {:?})",
            self.epochs,
            self.epochs_committed,
            self.seconds,
            self.hz,
            self.protected_ms.map_or_else(
                || "not protected: the backup never committed the first copy".to_string(),
                |ms| format!("protected after {ms:.0} ms (the backup committed the first copy, the whole memory)")
            ),
            self.pause_ms_p50,
            self.pause_ms_p99,
            self.pause_ms_max,
            if self.exact_tracking { "exact write-protect" } else { "page-hash" },
            self.epoch_ms_p50,
            self.epoch_ms_max,
            self.throttled_epochs,
            self.dirty_pages,
            self.dirty_pages_per_epoch,
            self.wire_bytes,
            self.wire_bytes_per_dirty_page,
            100.0 * self.wire_ratio,
            self.resent_bytes,
            self.resent_epochs,
            self.disconnects,
            self.parity_bytes,
            self.parity_dropped_bytes,
            pct(e.zero),
            pct(e.reference),
            pct(e.xor),
            pct(e.raw_zstd),
            pct(e.raw_plain),
            self.commit_ms_p50,
            self.commit_ms_p99,
            self.protected_commit_ms_p50,
            self.protected_commit_ms_p99,
            self.backup_commit_ms_p50,
            self.backup_commit_ms_p99,
            self.output_lines_released,
            self.output_ms_p50,
            self.output_ms_p99,
            match self.released_ahead_epochs {
                0 => "each after its epoch was acknowledged".to_string(),
                n => format!(
                    "{n} epochs at their seals (the first copy, until the backup caught up: not yet protected), the rest after their \
                     epochs were acknowledged"
                ),
            },
            self.restores_verified,
            self.restores_failed,
            self.restored_epochs,
        );
        for f in &self.far {
            text.push_str(&format!(
                "\nfar backup        {}: {} committed; wire {} bytes, resent {} bytes after {} disconnects; {} epochs merged while behind",
                f.backup, f.epochs_committed, f.wire_bytes, f.resent_bytes, f.disconnects, f.merged_epochs
            ));
        }
        if let Some(g) = self.generation {
            text.push_str(&format!(
                "\nwitness           generation {g}; self-fenced {} times ({:.0} ms in all)",
                self.self_fences, self.self_fenced_ms
            ));
        }
        text
    }
}

/// One progress line.
#[must_use]
pub fn progress_line(s: &PrimaryStats) -> String {
    format!(
        "epoch {:>6} | {:5.1} Hz | {:5.1} ms epochs | pause p99 {:5.2} ms | lag {:>3} epochs | wire {:6.1} B/page ({:4.1}% of raw) | released {:>6} lines",
        s.sealed.0,
        s.hz(),
        ms(s.periods_ns.last().copied().unwrap_or(0)),
        ms(percentile(&s.pauses_ns, 99.0)),
        s.sealed.0.saturating_sub(s.acked.0),
        if s.wire_pages == 0 { 0.0 } else { s.wire_bytes as f64 / s.wire_pages as f64 },
        if s.wire_pages == 0 { 0.0 } else { 100.0 * s.wire_bytes as f64 / (s.wire_pages * PAGE_SIZE as u64) as f64 },
        s.output_released,
    )
}
