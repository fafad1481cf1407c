//! Who runs a guest: a lease on a witness, so that a failover needs a
//! majority of three (owner, taker, witness) and two copies of a guest
//! never release output at once.
//!
//! - [`Lease`] is a small record per guest (generation, owner, lease
//!   period) kept on a witness that changes it only by compare-and-swap:
//!   an S3 object swapped with `If-None-Match: *` / `If-Match: <etag>`
//!   ([`S3Leases`]), or a file of a `remus witness` process for sites
//!   without S3 ([`WitnessServer`], reached by [`RemoteLeases`]).
//! - [`LeaseHolder`] is the owner's side: it renews the lease and counts
//!   each acknowledged epoch as a confirmation from the backup; when
//!   neither confirmed it within the lease period it must pause its guest
//!   and hold output ([`Standing::SelfFenced`]); when another owner took
//!   over it stops for good ([`Standing::Superseded`]).
//! - [`Claimant`] is the taker's side: only after a lease period (with
//!   allowances for clock drift) of silence from the owner *and* of an
//!   unchanged lease does it try to swap in the next generation.
//!
//! [`Timing`] states the argument that makes the two sides' decisions
//! exclusive; `tests.rs` checks it by simulation with drifting clocks,
//! slow and lost requests and partitions, and `tests/s3.rs` checks that
//! the S3 server's conditional put lets exactly one of many racing takers
//! win.

mod claimant;
mod holder;
mod lease;
mod remote;
mod timing;

pub use claimant::{Claimant, Takeover};
pub use holder::{LeaseHolder, Standing};
pub use lease::{unix_ms, Lease, LeaseStore, MemoryLeases, S3Leases, Tagged, WitnessError, LEASE_FORMAT};
pub use remote::{RemoteLeases, WitnessDir, WitnessServer, MAX_MESSAGE};
pub use timing::Timing;

#[cfg(test)]
mod tests;
