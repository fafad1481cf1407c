//! Errors of the store, with a small closed [`ErrorKind`] that retry logic
//! can match.

use remus_types::{ChunkId, EpochId, FormatError, GuestId};

/// Coarse class of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Stored bytes fail their checksum or hash.
    Corrupt,
    /// The disk is full.
    NoSpace,
    /// The request conflicts with what is stored (order, instance).
    Conflict,
    /// Something asked for is not there.
    NotFound,
    /// Any other I/O or database failure.
    Io,
    /// A remote service (S3) is unreachable or refused us: retry later.
    Unavailable,
    /// The configuration does not fit what is stored (an encryption key
    /// missing, or one where none was expected): retrying will not help.
    Config,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Db(rocksdb::Error),
    /// A chunk's bytes do not hash to its id.
    #[error("chunk {0} is corrupt: content does not match its hash")]
    ChunkCorrupt(ChunkId),
    /// A chunk referenced by the log is missing.
    #[error("chunk {0} is missing")]
    ChunkMissing(ChunkId),
    /// An epoch offered for commit names chunks that are not stored (GC
    /// deleted them after they were sent); nothing of its group was
    /// written. `ids` lists every one the epoch names.
    #[error("{guest}: epoch {epoch} names {} chunks that are not stored (first {})", ids.len(), ids.first().map(ChunkId::to_hex).unwrap_or_default())]
    Unstored {
        /// Guest.
        guest: GuestId,
        /// The epoch.
        epoch: EpochId,
        /// The chunks it names that are not stored.
        ids: Vec<ChunkId>,
    },
    /// A chunk offered for commit does not hash to the id it was offered
    /// under; nothing of its group was written.
    #[error("{guest}: epoch {epoch} offers chunk {id}{} with content that does not match it; nothing of the epoch was stored", .pfn.map(|p| format!(" for page {p}")).unwrap_or_default())]
    Mismatch {
        /// Guest.
        guest: GuestId,
        /// The epoch.
        epoch: EpochId,
        /// The id offered.
        id: ChunkId,
        /// The first page the epoch names it for, if any.
        pfn: Option<u64>,
    },
    /// A stored record fails its checks: `record` says which (and where),
    /// `cause` how, from the closed set every format of remus shares.
    #[error("corrupt {record}: {cause}")]
    Corrupt {
        /// The record: kind and location, e.g. `guest-1 epoch 5 manifest`.
        record: String,
        /// What is wrong with it.
        cause: FormatError,
    },
    /// An I/O failure outside the database: a restore's output file, say.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The failure.
        cause: std::io::Error,
    },
    /// The epoch does not follow the guest's head.
    #[error("{guest}: epoch {epoch} does not follow the committed head {head}")]
    OutOfOrder {
        /// Guest.
        guest: GuestId,
        /// Epoch offered.
        epoch: EpochId,
        /// Current head.
        head: EpochId,
    },
    /// No such epoch.
    #[error("{guest}: no committed epoch {epoch}")]
    NoEpoch {
        /// Guest.
        guest: GuestId,
        /// Epoch asked for.
        epoch: EpochId,
    },
    /// No such guest.
    #[error("{0}: no history in this store")]
    NoGuest(GuestId),
    /// A local pack file failed.
    #[error("pack file {}: {op}: {cause}", path.display())]
    Pack {
        /// The file.
        path: std::path::PathBuf,
        /// What was being done.
        op: &'static str,
        /// The failure.
        cause: std::io::Error,
    },
    /// An encryption key is missing, unreadable, or not wanted here.
    #[error("{0}")]
    Keys(String),
    /// The S3 tier failed.
    #[error(transparent)]
    S3(#[from] crate::s3::S3Error),
}

impl StoreError {
    /// A damaged `record`.
    #[must_use]
    pub fn corrupt(record: impl Into<String>, cause: FormatError) -> Self {
        Self::Corrupt { record: record.into(), cause }
    }

    /// A damaged record of free-form layout (`why` says what is wrong).
    #[must_use]
    pub fn malformed(record: impl Into<String>, why: impl Into<String>) -> Self {
        Self::corrupt(record, FormatError::Malformed(why.into()))
    }

    /// Names where a damaged record was found (`where_` goes before the
    /// record's own name); other errors pass unchanged.
    #[must_use]
    pub fn at(self, where_: impl std::fmt::Display) -> Self {
        match self {
            Self::Corrupt { record, cause } => Self::Corrupt { record: format!("{where_} {record}"), cause },
            e => e,
        }
    }

    /// The error's class.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Db(e) if e.to_string().contains("No space left") => ErrorKind::NoSpace,
            Self::Db(_) => ErrorKind::Io,
            Self::Pack { cause, .. } if cause.raw_os_error() == Some(libc::ENOSPC) => ErrorKind::NoSpace,
            Self::Pack { .. } => ErrorKind::Io,
            Self::ChunkCorrupt(_) | Self::Corrupt { .. } | Self::Mismatch { .. } => ErrorKind::Corrupt,
            Self::Io { cause, .. } if cause.raw_os_error() == Some(libc::ENOSPC) => ErrorKind::NoSpace,
            Self::Io { .. } => ErrorKind::Io,
            Self::OutOfOrder { .. } => ErrorKind::Conflict,
            Self::ChunkMissing(_) | Self::Unstored { .. } | Self::NoEpoch { .. } | Self::NoGuest(_) => ErrorKind::NotFound,
            Self::S3(crate::s3::S3Error::NotFound(_) | crate::s3::S3Error::NoSuchBucket(_)) => ErrorKind::NotFound,
            Self::S3(crate::s3::S3Error::Exists(_) | crate::s3::S3Error::Conflict(_) | crate::s3::S3Error::Locked { .. }) => {
                ErrorKind::Conflict
            }
            Self::S3(_) => ErrorKind::Unavailable,
            Self::Keys(_) => ErrorKind::Config,
        }
    }
}

// The message names the cause: a field, not a `source()`, so a chained
// print says it once.
impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        Self::Db(e)
    }
}
