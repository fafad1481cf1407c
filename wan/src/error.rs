//! Errors of the replication protocol.

use remus_types::{ChunkId, EpochId};

/// Why bytes from the wire could not be decoded. Every decoder returns one
/// of these for bad input; none panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Input ended inside a structure.
    #[error("truncated input")]
    Truncated,
    /// A frame did not start with the magic.
    #[error("bad frame magic")]
    BadMagic,
    /// A frame of a protocol version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks {ours})", ours = crate::frame::VERSION)]
    UnsupportedVersion(u8),
    /// A frame whose checksum does not match its bytes.
    #[error("frame checksum mismatch")]
    ChecksumMismatch,
    /// A length beyond the allowed bound.
    #[error("length {len} exceeds the limit {max}")]
    TooLarge {
        /// Length found.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// An unknown discriminant.
    #[error("unknown {what} kind {kind}")]
    UnknownKind {
        /// What was being decoded.
        what: &'static str,
        /// The discriminant found.
        kind: u8,
    },
    /// Bytes left over after a complete structure.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// Content that is well-formed but inconsistent.
    #[error("corrupt: {0}")]
    Corrupt(&'static str),
    /// A referenced base page is unknown to the receiver.
    #[error("base page {0} is not held")]
    MissingBase(ChunkId),
    /// A decoded page does not hash to its announced hash.
    #[error("page {pfn}: content does not match its hash")]
    HashMismatch {
        /// Guest page number.
        pfn: u64,
    },
}

/// Protocol violations found by the sans-IO cores.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Undecodable input.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message that is not allowed in the current state.
    #[error("unexpected {0}")]
    Unexpected(&'static str),
    /// The peer reported an error during the session (retryable: the
    /// primary reconnects and resends what is unacknowledged).
    #[error("peer error: {0}")]
    Peer(String),
    /// The backup refused this primary at Hello (another instance, fenced,
    /// already connected): retrying cannot help.
    #[error("refused by the backup: {0}")]
    Refused(String),
    /// An epoch stream that does not add up (count, order, guest).
    #[error("epoch {epoch}: {reason}")]
    BadEpoch {
        /// The epoch.
        epoch: EpochId,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Why the backup's replica did not commit a group of epochs (nothing of
/// it was written either way).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The epochs name chunks the replica does not hold, as references or
    /// XOR bases (its GC deleted them): the primary is told which, and
    /// sends the epochs again without them, on the same connection.
    #[error("{} referenced chunks are not held", .0.len())]
    Missing(Vec<ChunkId>),
    /// Any other failure (a full disk, say): the connection is closed and
    /// the primary resends on its next one.
    #[error("{0}")]
    Failed(String),
}

/// Errors of the QUIC driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// TLS material missing or unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// Socket set-up failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection broke.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer violated the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer reported an error and closed.
    #[error("peer error: {0}")]
    Peer(String),
    /// The local side shut down.
    #[error("closed")]
    Closed,
}
