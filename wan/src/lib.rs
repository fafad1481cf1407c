//! The replication protocol of remus.
//!
//! - [`encoding`]: how a dirty page crosses the wire (`Zero`, `Ref`, `Xor`,
//!   `Raw`), and the sender's [`PageEncoder`] that picks among them.
//! - [`frame`]: the versioned, length-prefixed, checksummed frame and the
//!   [`Message`]s it carries.
//! - [`SenderCore`] / [`ReceiverCore`]: the protocol as sans-IO state
//!   machines (no sockets, no clock), tested on a virtual clock.
//! - [`tls`] and [`driver`]: QUIC with quinn and mutual TLS with rustls.
//!
//! Invariant: the backup acknowledges epoch `N` only after `N` and every
//! epoch before it are durably committed; the primary releases output of
//! `N` only on that acknowledgement. A page is sent as a reference (or an
//! XOR base) only to content the primary believes the backup holds; when
//! the backup's GC deletes such content it says so (`Forget`), and an
//! epoch that still names it is refused with the exact list (`Missing`)
//! and sent again in full, never committed with a dangling reference.

pub mod budget;
mod codec;
pub mod driver;
pub mod encoding;
mod error;
pub mod fec;
pub mod frame;
mod link_parity;
mod liveness;
mod rate_cap;
mod receiver;
mod sender;
pub mod tls;

pub use codec::{Reader, Writer};
pub use driver::{Congestion, MAX_HOLDS};
pub use encoding::{decompress_page, EncoderConfig, EncodingMix, PageEncoder, PageEncoding, PageRecord, SharedFrames};
pub use error::{CommitError, DecodeError, LinkError, ProtocolError, Side, StreamError};
pub use frame::{EpochHeader, FrameReader, Message, MAX_CHUNK_LIST};
pub use liveness::{Liveness, Silence, PHI_THRESHOLD};
pub use receiver::{ReceivedEpoch, ReceiverCore, ReceiverEvent, MAX_GROUP};
pub use sender::{SenderConfig, SenderCore, SenderEvent, Transmit};

/// The earlier of two optional deadlines.
fn earliest(a: Option<std::time::Instant>, b: Option<std::time::Instant>) -> Option<std::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests;
