//! The store of remus: a content-addressed log of every committed epoch.
//!
//! Pages are chunks named by their blake3; each epoch adds only the chunks
//! it introduced, its page-index entries and a [`Manifest`] hash-chained to
//! its parent. See [`Store`] for the RocksDB layout and the commit rule
//! (one atomic, synced write batch per epoch).

mod chain;
mod db;
mod error;
mod gc;
mod manifest;
mod packs;
mod retention;
pub mod s3;
mod verify;

pub use db::{decode_chunk_value, CommitOutcome, EpochCommit, Fence, Head, Store, StoreOptions, StoredChunk};
pub use error::{ErrorKind, StoreError};

/// The pages an epoch wrote: each page number with the content id it
/// took, ascending page number.
pub type PageList = Vec<(remus_types::Pfn, remus_types::ChunkId)>;
pub use chain::{Bridge, ChainBreak, ChainWalk};
pub use manifest::{page_delta_hash, Manifest, MANIFEST_LEN};
pub use retention::{GcReport, KeepRule, RetentionPolicy, ThinReport};
pub use verify::{damaged_guests, Damage, VerifyReport};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_retention;
