//! The S3 tier: the history of every committed epoch, in any
//! S3-compatible bucket, enough to restore any epoch after the whole
//! backup site is lost.
//!
//! Layout under the prefix (formats in [`format`]):
//! - `packs/<blake3>`: chunk values packed to tens of MiB, named by their
//!   own hash;
//! - `index/<pack blake3>`: where each chunk sits in that pack;
//! - `segments/<guest>/<first>-<last>-<count>`: a run of epochs (manifests
//!   and page lists), one per guest per upload pass;
//! - `checkpoints/<guest>/<epoch>`: the whole page table at one epoch, where
//!   readers start;
//! - `bridges/<guest>/<first>-<last>`: what thinning left of a dropped run.
//!
//! With `s3.encryption-keys`, every object is sealed before it leaves
//! ([`seal`]): the bucket's owner sees sizes and key names, no content.
//!
//! Every put is conditional (`If-None-Match: *`): nothing is overwritten,
//! so two writers never clobber each other. [`Uploader`] moves committed
//! epochs there in the background; [`S3Tier`] reads them back for
//! restore and verify.

mod archive;
pub mod format;
mod history;
mod retention;
pub mod seal;
mod upload;
mod verify;

pub use archive::ArchiveReport;
pub use history::{ChunkLocations, Reach, S3Epoch, S3History, S3Tier, SegmentKey};
pub use remus_s3::{Listed, ListedVersion, S3Client, S3Config, S3Error};
pub use retention::S3RetentionReport;
pub use seal::Keyring;
pub use upload::{
    apply_retention, spread_limit, RetentionRun, UploadReport, Uploader, CHECKPOINT_PAGES, CHECKPOINT_SEGMENTS, MAX_PENDING, SPREAD_PACKS,
};

#[cfg(test)]
pub(crate) mod tests;
