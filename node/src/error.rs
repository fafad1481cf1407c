//! Errors of the runtimes.
//!
//! Each message is complete (it names its cause), so a cause is a field
//! to match on, not a `source()`: printed through a chain, nothing is said
//! twice.

use std::path::PathBuf;
use std::time::Duration;

use remus_capture::CaptureError;
use remus_restore::RestoreError;
use remus_store::s3::S3Error;
use remus_store::StoreError;
use remus_types::EpochId;
use remus_wan::LinkError;
use remus_witness::{Lease, WitnessError};

/// Why a runtime could not start, went on failing, or stopped badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The guest could not start.
    #[error("starting the {kind} guest: {cause}")]
    GuestStart {
        /// `arena` or `QEMU`.
        kind: &'static str,
        /// Why.
        cause: CaptureError,
    },
    /// A checkpoint failed (the guest is resumed regardless).
    #[error("checkpoint: {0}")]
    Checkpoint(CaptureError),
    /// TLS material, the endpoint or the replication link failed.
    #[error("replication link: {0}")]
    Link(LinkError),
    /// The backup could not listen on its address.
    #[error("listening on {addr}: {cause}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        cause: LinkError,
    },
    /// The link ended while the engine still had epochs for it.
    #[error("replication link stopped")]
    LinkStopped,
    /// Stopping, the backup did not acknowledge every sealed epoch in
    /// time: their output was never released (but for a first copy's
    /// epochs released at their seals).
    #[error("the backup did not acknowledge epochs {first}..={last} within {drain:?}; {}", unreleased(*first, *last, *released_ahead))]
    Unacknowledged {
        /// First unacknowledged epoch.
        first: EpochId,
        /// Last sealed epoch.
        last: EpochId,
        /// The last epoch whose output was released at its seal (0: none).
        released_ahead: EpochId,
        /// How long the runtime waited.
        drain: Duration,
    },
    /// A file the runtime writes (output log, recorded roots, live VM
    /// files) or a thread it needs could not be made.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        cause: std::io::Error,
    },
    /// A runtime thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    /// The store failed (opening it, reading it).
    #[error("store {}: {cause}", path.display())]
    Store {
        /// The store directory.
        path: PathBuf,
        /// Why.
        cause: StoreError,
    },
    /// The S3 uploader could not start (its configuration, say).
    #[error("starting the s3 uploader: {0}")]
    Uploader(S3Error),
    /// A restore for failover failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// A failed-over QEMU guest could not be resumed.
    #[error("resuming the guest: {0}")]
    Resume(CaptureError),
    /// The epoch to fail over from is not a QEMU guest's (no VM files).
    #[error("not a QEMU guest")]
    NotAVm,
    /// A failed-over guest's machine, as its primary described it, is not
    /// one this host runs.
    #[error("the guest's machine is refused: {0}")]
    UntrustedVm(String),
    /// The witness could not be read or written.
    #[error("{0}")]
    Witness(WitnessError),
    /// Another node owns the guest (it failed over there): this one may
    /// not run it.
    #[error("{} is owned by {} in generation {} since {}{}; it is not started here", .0.guest, .0.owner, .0.generation, rfc3339(.0.since_unix_ms), from_epoch(.0.from_epoch))]
    Owned(Box<Lease>),
    /// The guest's lease keeps being renewed by another primary on this
    /// node.
    #[error("another primary of {} holds its lease (generation {}, owner {}) and keeps renewing it; it is not started twice", .0.guest, .0.generation, .0.owner)]
    Running(Box<Lease>),
    /// The guest was taken over by another node while this primary ran.
    #[error(
        "{} was taken over by {} in generation {} at {}; this primary stopped with its guest held still, and no output after epoch {} was released",
        lease.guest, lease.owner, lease.generation, rfc3339(lease.since_unix_ms), acked.0
    )]
    Superseded {
        /// The lease as the new owner took it.
        lease: Box<Lease>,
        /// The last epoch whose output this primary released.
        acked: EpochId,
    },
}

fn rfc3339(unix_ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms))
}

fn from_epoch(e: Option<u64>) -> String {
    e.map_or(String::new(), |e| format!(" (failed over from epoch {e})"))
}

impl From<LinkError> for NodeError {
    fn from(e: LinkError) -> Self {
        Self::Link(e)
    }
}

impl NodeError {
    /// An I/O failure while doing `what`.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |cause| Self::Io { what, cause }
    }
}

/// What became of the output of unacknowledged epochs `first..=last`.
fn unreleased(first: EpochId, last: EpochId, released_ahead: EpochId) -> String {
    const AHEAD: &str = "released at their seals (the first copy: the guest was not yet protected)";
    if released_ahead < first {
        "their output was never released".into()
    } else if released_ahead >= last {
        format!("their output was {AHEAD}")
    } else {
        format!("the output of {first}..={released_ahead} was {AHEAD}, of {}..={last} never released", released_ahead.next())
    }
}
