//! What a backup runtime reports as it runs: typed events for whoever
//! presents them (the command line prints them; tests wait on them).

use std::path::PathBuf;

use remus_types::{EpochId, GuestId};

/// Something the backup did that its operator must hear of.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BackupEvent {
    /// A primary went silent after `committed`; with failover set, its
    /// guest is now fenced and being brought back here.
    PrimaryLost {
        /// The guest.
        guest: GuestId,
        /// Its last committed epoch.
        committed: EpochId,
        /// Why it counts as lost.
        silence: remus_wan::Silence,
    },
    /// A guest failed over: its last committed epoch is here.
    FailedOver {
        /// The guest.
        guest: GuestId,
        /// The epoch it resumed from (or that was written out).
        epoch: EpochId,
        /// Where it is now.
        outcome: FailoverOutcome,
    },
    /// The primary handed the guest over (a planned move) at its last
    /// epoch, committed: it is taken over at once.
    HandedOver {
        /// The guest.
        guest: GuestId,
        /// The epoch.
        epoch: EpochId,
    },
    /// The primary went silent while the guest was not yet protected: its
    /// newest committed epoch here is one whose output the primary
    /// released when it sealed it (its first copy), so output of epochs
    /// this backup does not hold may have gone out. It is not failed over.
    NotProtected {
        /// The guest.
        guest: GuestId,
        /// Its last committed epoch.
        committed: EpochId,
    },
    /// The primary went silent but was heard again before the lease could
    /// be taken: no failover (it resumes replicating).
    TakeoverAbandoned {
        /// The guest.
        guest: GuestId,
    },
    /// The backup won the guest's lease for a new generation: the old
    /// primary has stopped releasing output, and the failover goes ahead.
    LeaseWon {
        /// The lease as taken.
        lease: Box<remus_witness::Lease>,
        /// How long after the primary was last heard.
        after: std::time::Duration,
        /// Its old owner had released it (a planned move): taken at once.
        released: bool,
    },
    /// The guest's old primary is fenced here (in memory and in the
    /// store): from now on it is refused.
    Fenced {
        /// The guest.
        guest: GuestId,
        /// The committed epoch the guest fails over from.
        epoch: EpochId,
    },
    /// A primary continues the guest's history here after `after`, an epoch
    /// another backup holds (a guest protected again after failing over or
    /// moving): nothing of its memory is here until its next commit. When
    /// this backup held the guest's history before, `elsewhere_from` is the
    /// first epoch it does not hold (it ran elsewhere since).
    Continued {
        /// The guest.
        guest: GuestId,
        /// The epoch its history continues after.
        after: EpochId,
        /// The first epoch it ran elsewhere, when it comes back here.
        elsewhere_from: Option<EpochId>,
    },
    /// A guest reached its store quota: its commits are refused until
    /// retention frees space or the quota is raised (once per time it is
    /// reached).
    QuotaExceeded {
        /// The guest.
        guest: GuestId,
        /// Bytes its kept epochs charge to the store.
        used: u64,
        /// Its quota.
        limit: u64,
    },
    /// A failover could not be completed.
    FailoverFailed {
        /// The guest.
        guest: GuestId,
        /// Why, with its causes.
        error: String,
    },
}

/// Where a failed-over guest is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FailoverOutcome {
    /// Its memory image (an arena guest), or a QEMU guest's files in a
    /// directory, not started.
    Written {
        /// The image file or the run directory.
        path: PathBuf,
    },
    /// A QEMU guest's files, ready for a primary runtime of its own to
    /// resume and protect it, replicating to `backup` (the presenter
    /// starts it: `remus protect qemu --resume-run-dir`).
    ReadyToProtect {
        /// The run directory holding memory, disk and device state.
        run_dir: PathBuf,
        /// Where the resumed guest replicates to.
        backup: std::net::SocketAddr,
        /// The manifest of the epoch it resumes from: its history there
        /// continues this chain.
        manifest: remus_types::ChunkId,
        /// The guest's lease, handed off for its new primary to adopt
        /// (generation, version), with a witness.
        lease: Option<(u64, String)>,
    },
    /// A QEMU guest running again here.
    Resumed {
        /// QEMU's process id.
        pid: u32,
        /// Its QMP socket.
        qmp: PathBuf,
        /// True when it resumed from the live files the backup kept
        /// current (no restore was needed).
        from_live: bool,
    },
}

impl BackupEvent {
    /// The event as a hook receives it: a JSON object with `event`,
    /// `role` ("backup") and `guest`, and what else it says.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Self::PrimaryLost { guest, committed, silence } => {
                json!({"event": "primary-lost", "role": "backup", "guest": guest.0, "committed": committed.0, "evidence": silence.to_string()})
            }
            Self::HandedOver { guest, epoch } => json!({"event": "move", "role": "backup", "guest": guest.0, "epoch": epoch.0}),
            Self::TakeoverAbandoned { guest } => json!({"event": "takeover-abandoned", "role": "backup", "guest": guest.0}),
            Self::NotProtected { guest, committed } => {
                json!({"event": "not-protected", "role": "backup", "guest": guest.0, "committed": committed.0})
            }
            Self::LeaseWon { lease, after, released } => json!({
                "event": "lease-won", "role": "backup", "guest": lease.guest.0, "generation": lease.generation,
                "node": lease.owner, "after_ms": after.as_millis() as u64, "released": released,
            }),
            Self::Fenced { guest, epoch } => json!({"event": "fence", "role": "backup", "guest": guest.0, "epoch": epoch.0}),
            Self::FailedOver { guest, epoch, outcome: FailoverOutcome::Written { path } } => json!({
                "event": "failover", "role": "backup", "guest": guest.0, "epoch": epoch.0, "image": path.display().to_string(),
            }),
            Self::FailedOver { guest, epoch, outcome: FailoverOutcome::ReadyToProtect { run_dir, backup, .. } } => json!({
                "event": "failover", "role": "backup", "guest": guest.0, "epoch": epoch.0, "run_dir": run_dir.display().to_string(),
                "protect_to": backup.to_string(),
            }),
            Self::FailedOver { guest, epoch, outcome: FailoverOutcome::Resumed { pid, qmp, from_live } } => json!({
                "event": "failover", "role": "backup", "guest": guest.0, "epoch": epoch.0, "resumed_pid": pid,
                "qmp": qmp.display().to_string(), "from_live": from_live,
            }),
            Self::Continued { guest, after, elsewhere_from } => json!({
                "event": "history-continued", "role": "backup", "guest": guest.0, "after": after.0,
                "elsewhere_from": elsewhere_from.map(|e| e.0),
            }),
            Self::QuotaExceeded { guest, used, limit } => {
                json!({"event": "quota-exceeded", "role": "backup", "guest": guest.0, "used_bytes": used, "limit_bytes": limit})
            }
            Self::FailoverFailed { guest, error } => {
                json!({"event": "failover-failed", "role": "backup", "guest": guest.0, "error": error})
            }
        }
    }
}
