//! The two runtimes of remus, as a library: the primary and the backup.
//!
//! - [`primary::Primary`]: starts the guest, drives the
//!   [`EpochEngine`](remus_capture::EpochEngine) on a thread of its own
//!   (seal on its timer, release output when an acknowledgement is fed
//!   in), and the QUIC link that sends each checkpoint.
//! - [`backup::Backup`]: a store, a QUIC endpoint and the
//!   [`replica::StoreReplica`] that commits what arrives, composed of
//!   [`admission`] (who may replicate which guest, fencing),
//!   [`ingest`] (decode and verify every page against its hash),
//!   the store's atomic commit, and [`failover`] (hand back or resume the
//!   last committed epoch when a primary goes silent). It reports on a
//!   channel of typed [`events::BackupEvent`]s; it prints nothing.
//!
//! Invariants owned here: an epoch is acknowledged only after its commit
//! is durable; a commit group naming chunks the store does not hold is
//! refused whole, naming every such chunk; a failover hands back exactly
//! the last committed epoch and fences the old primary.

pub mod admission;
pub mod backup;
mod error;
pub mod events;
pub mod failover;
pub mod fanout;
pub mod hooks;
pub mod ingest;
pub mod lease;
pub mod primary;
pub mod quota;
pub mod replica;
pub mod stats;

pub use backup::{Backup, BackupOptions};
pub use error::NodeError;
pub use events::{BackupEvent, FailoverOutcome};
pub use failover::{FailoverAction, ResumeVm};
pub use fanout::Release;
pub use hooks::HookConfig;
pub use lease::WitnessOptions;
pub use primary::{GuestKind, Primary, PrimaryOptions};
pub use quota::GuestQuota;
