//! Errors of the replication protocol.

use remus_types::{ChunkId, EpochId, FormatError};

/// Why bytes from the wire could not be decoded. Every decoder returns one
/// of these for bad input; none panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame's header or a length is wrong: bad magic, a protocol
    /// version this build does not speak, a checksum mismatch, input that
    /// ends inside a structure, or a length beyond its bound (the closed
    /// set every format of remus shares).
    #[error(transparent)]
    Format(#[from] FormatError),
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
    /// An epoch stream's data or parity is inconsistent (past its length).
    #[error(transparent)]
    Fec(#[from] crate::fec::FecError),
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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The epochs name chunks the replica does not hold, as references or
    /// XOR bases (its GC deleted them): the primary is told which, and
    /// sends the epochs again without them, on the same connection.
    #[error("{} referenced chunks are not held", .0.len())]
    Missing(Vec<ChunkId>),
    /// A page does not decode, or decodes to other content than its hash:
    /// the connection is closed and the primary resends on its next one.
    #[error("epoch {epoch}: page {pfn}: {cause}")]
    BadPage {
        /// The epoch.
        epoch: EpochId,
        /// The page.
        pfn: u64,
        /// What was wrong.
        cause: DecodeError,
    },
    /// The group is not one the replica can take (empty, or for a guest
    /// that was never welcomed).
    #[error("{0}")]
    Rejected(&'static str),
    /// The replica refuses the group by its own rule (a quota), saying
    /// why: the connection is closed and the primary tries again later.
    #[error("{0}")]
    Refused(String),
    /// The replica's storage failed (a full disk, say): the connection is
    /// closed and the primary resends on its next one.
    #[error("storage: {cause}")]
    Storage {
        /// True when the disk is full.
        no_space: bool,
        /// The storage's error.
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Which end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The protected guest's side.
    Primary,
    /// The replica's side.
    Backup,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
        })
    }
}

/// Why a QUIC stream could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading failed (reset, connection lost).
    #[error("read: {0}")]
    Read(quinn::ReadError),
    /// Reading a whole stream failed (or it was longer than allowed).
    #[error("read: {0}")]
    ReadToEnd(quinn::ReadToEndError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(quinn::WriteError),
    /// A stream could not be opened.
    #[error("open: {0}")]
    Open(quinn::ConnectionError),
    /// The stream was already finished or reset.
    #[error("finish: {0}")]
    Finish(quinn::ClosedStream),
    /// What arrived does not decode.
    #[error("decode: {0}")]
    Decode(DecodeError),
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
    Io(std::io::Error),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(String),
    /// A connection could not be started (bad address, no endpoint).
    #[error("connect: {0}")]
    Connecting(quinn::ConnectError),
    /// The connection broke.
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
    /// The peer violated the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer sent nothing (no heartbeat, no data) for its timeout.
    #[error("{side} {silence}")]
    Silent {
        /// Which peer.
        side: Side,
        /// The evidence.
        silence: Box<crate::liveness::Silence>,
    },
    /// The peer finished its control stream in the middle of a session.
    #[error("{0} closed the control stream")]
    ControlClosed(Side),
    /// A stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The replica refused a primary at Hello (the reason is sent to it).
    #[error("refused: {0}")]
    Refused(String),
    /// The replica could not commit (nothing of the group was written).
    #[error("commit of epoch {epoch} failed: {cause}")]
    Commit {
        /// The last epoch of the group.
        epoch: EpochId,
        /// Why.
        cause: CommitError,
    },
    /// A task of the driver ended abnormally.
    #[error("driver task: {0}")]
    Task(tokio::task::JoinError),
    /// The local side shut down.
    #[error("closed")]
    Closed,
}

// Where the message names the cause (`"read: {0}"`), the cause is a field,
// not a `source()`, so a chained print says it once.
macro_rules! from_cause {
    ($($enum:ident :: $variant:ident ($cause:ty)),* $(,)?) => {$(
        impl From<$cause> for $enum {
            fn from(e: $cause) -> Self {
                Self::$variant(e)
            }
        }
    )*};
}

from_cause!(
    StreamError::Read(quinn::ReadError),
    StreamError::ReadToEnd(quinn::ReadToEndError),
    StreamError::Write(quinn::WriteError),
    StreamError::Open(quinn::ConnectionError),
    StreamError::Finish(quinn::ClosedStream),
    StreamError::Decode(DecodeError),
    LinkError::Io(std::io::Error),
    LinkError::Connecting(quinn::ConnectError),
    LinkError::Connection(quinn::ConnectionError),
    LinkError::Task(tokio::task::JoinError),
);
