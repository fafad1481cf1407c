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
