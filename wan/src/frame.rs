//! Frames: the unit of every stream between primary and backup.
//!
//! Layout:
//! ```text
//! 0..4    magic  b"RMUS"
//! 4       version (1)
//! 5       message kind
//! 6..8    reserved, zero
//! 8..12   payload length, u32 LE, at most MAX_PAYLOAD
//! 12..16  crc32 (IEEE) of bytes 0..12 followed by the payload
//! 16..    payload
//! ```
//! A control stream (bidirectional, one per connection) carries Hello,
//! Welcome, Ack, Heartbeat and Error; each epoch travels on a
//! unidirectional stream of its own: EpochBegin, Pages*, DeviceState,
//! EpochEnd.

use remus_types::{ChunkId, EpochId, GuestId};

use crate::codec::{Reader, Writer};
use crate::encoding::PageRecord;
use crate::error::DecodeError;

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"RMUS";
/// Protocol version spoken by this build.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Largest device-state blob accepted.
pub const MAX_DEVICE_STATE: usize = MAX_PAYLOAD - 8;

/// First frame of an epoch stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochHeader {
    /// Guest the epoch belongs to.
    pub guest: GuestId,
    /// The epoch.
    pub epoch: EpochId,
    /// Wall-clock time of its pause, ns since the Unix epoch.
    pub time_unix_ns: u64,
    /// Guest memory size in pages.
    pub page_count: u64,
    /// How long the guest was paused.
    pub pause_ns: u64,
    /// Number of page records that follow.
    pub records: u32,
}

/// Everything that crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary → backup, first on the control stream.
    Hello {
        /// The protected guest.
        guest: GuestId,
        /// Identifies this run of the primary: a backup keeps history for
        /// one instance of a guest and refuses another.
        instance: u64,
        /// Its memory size in pages.
        page_count: u64,
    },
    /// Backup → primary: what it has committed for that guest.
    Welcome {
        /// The guest.
        guest: GuestId,
        /// Last committed epoch (0 when none).
        committed: EpochId,
        /// Hash of that epoch's manifest (zero when none).
        head: ChunkId,
    },
    /// Opens an epoch stream.
    EpochBegin(EpochHeader),
    /// A batch of page records.
    Pages(Vec<PageRecord>),
    /// The guest's device state at the pause.
    DeviceState(Vec<u8>),
    /// Closes an epoch stream.
    EpochEnd {
        /// The epoch.
        epoch: EpochId,
        /// The primary's [`MemoryDigest`](remus_types::MemoryDigest) root at this epoch.
        memory_root: ChunkId,
    },
    /// Backup → primary: every epoch up to `epoch` is durably committed.
    Ack {
        /// The epoch.
        epoch: EpochId,
        /// Hash of its manifest.
        manifest: ChunkId,
    },
    /// Liveness, both ways; carries the sender's latest epoch.
    Heartbeat {
        /// Primary: last sealed epoch; backup: last committed.
        epoch: EpochId,
    },
    /// A fatal error; the sender closes after it.
    Error(String),
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => 1,
            Self::Welcome { .. } => 2,
            Self::EpochBegin(_) => 3,
            Self::Pages(_) => 4,
            Self::DeviceState(_) => 5,
            Self::EpochEnd { .. } => 6,
            Self::Ack { .. } => 7,
            Self::Heartbeat { .. } => 8,
            Self::Error(_) => 9,
        }
    }

    /// Appends this message as one frame to `out`.
    ///
    /// # Panics
    /// If the payload exceeds [`MAX_PAYLOAD`] (a sender bug: batches are
    /// sized below it).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[VERSION, self.kind(), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut w = Writer::with(std::mem::take(out));
        match self {
            Self::Hello { guest, instance, page_count } => {
                w.u64(guest.0);
                w.u64(*instance);
                w.u64(*page_count);
            }
            Self::Welcome { guest, committed, head } => {
                w.u64(guest.0);
                w.u64(committed.0);
                w.bytes(&head.0);
            }
            Self::EpochBegin(h) => {
                w.u64(h.guest.0);
                w.u64(h.epoch.0);
                w.u64(h.time_unix_ns);
                w.u64(h.page_count);
                w.u64(h.pause_ns);
                w.u32(h.records);
            }
            Self::Pages(records) => {
                w.u32(u32::try_from(records.len()).expect("batch size"));
                for r in records {
                    r.encode(&mut w);
                }
            }
            Self::DeviceState(b) => w.blob(b),
            Self::EpochEnd { epoch, memory_root } => {
                w.u64(epoch.0);
                w.bytes(&memory_root.0);
            }
            Self::Ack { epoch, manifest } => {
                w.u64(epoch.0);
                w.bytes(&manifest.0);
            }
            Self::Heartbeat { epoch } => w.u64(epoch.0),
            Self::Error(m) => w.blob(&m.as_bytes()[..m.len().min(4096)]),
        }
        *out = w.into_inner();
        let len = out.len() - start - HEADER_LEN;
        assert!(len <= MAX_PAYLOAD, "frame payload {len} exceeds MAX_PAYLOAD");
        out[start + 8..start + 12].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[start..start + 12]);
        crc.update(&out[start + HEADER_LEN..]);
        let sum = crc.finalize();
        out[start + 12..start + 16].copy_from_slice(&sum.to_le_bytes());
    }

    /// Encodes into a fresh buffer.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` when more
    /// bytes are needed, else the message and the bytes it used.
    ///
    /// # Errors
    /// A [`DecodeError`] for a bad magic, version, checksum, length or body.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        if buf.len() < HEADER_LEN {
            if !MAGIC.starts_with(&buf[..buf.len().min(4)]) {
                return Err(DecodeError::BadMagic);
            }
            return Ok(None);
        }
        if buf[..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if buf[4] != VERSION {
            return Err(DecodeError::UnsupportedVersion(buf[4]));
        }
        let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge { len, max: MAX_PAYLOAD });
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = &buf[HEADER_LEN..HEADER_LEN + len];
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[..12]);
        crc.update(payload);
        if crc.finalize().to_le_bytes() != buf[12..16] {
            return Err(DecodeError::ChecksumMismatch);
        }
        let msg = Self::decode_payload(buf[5], payload)?;
        Ok(Some((msg, HEADER_LEN + len)))
    }

    fn decode_payload(kind: u8, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let msg = match kind {
            1 => Self::Hello { guest: GuestId(r.u64()?), instance: r.u64()?, page_count: r.u64()? },
            2 => Self::Welcome { guest: GuestId(r.u64()?), committed: EpochId(r.u64()?), head: r.hash()? },
            3 => Self::EpochBegin(EpochHeader {
                guest: GuestId(r.u64()?),
                epoch: EpochId(r.u64()?),
                time_unix_ns: r.u64()?,
                page_count: r.u64()?,
                pause_ns: r.u64()?,
                records: r.u32()?,
            }),
            4 => {
                let n = r.u32()? as usize;
                // Each record takes at least 9 bytes: bound the allocation.
                if n > r.remaining() / 9 {
                    return Err(DecodeError::Corrupt("record count exceeds frame"));
                }
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(PageRecord::decode(&mut r)?);
                }
                Self::Pages(records)
            }
            5 => Self::DeviceState(r.blob(MAX_DEVICE_STATE)?.to_vec()),
            6 => Self::EpochEnd { epoch: EpochId(r.u64()?), memory_root: r.hash()? },
            7 => Self::Ack { epoch: EpochId(r.u64()?), manifest: r.hash()? },
            8 => Self::Heartbeat { epoch: EpochId(r.u64()?) },
            9 => Self::Error(String::from_utf8_lossy(r.blob(4096)?).into_owned()),
            k => return Err(DecodeError::UnknownKind { what: "message", kind: k }),
        };
        if !r.is_empty() {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        Ok(msg)
    }
}

/// Accumulates stream bytes and yields whole frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    pos: usize,
}

impl FrameReader {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if any.
    ///
    /// # Errors
    /// The [`DecodeError`] of a bad frame; the stream is then unusable.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        match Message::decode(&self.buf[self.pos..])? {
            Some((m, used)) => {
                self.pos += used;
                if self.pos > (1 << 20) {
                    self.buf.drain(..self.pos);
                    self.pos = 0;
                }
                Ok(Some(m))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet consumed.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::PageEncoding;
    use proptest::prelude::*;
    use remus_types::Pfn;

    fn hash() -> impl Strategy<Value = ChunkId> {
        any::<[u8; 32]>().prop_map(ChunkId)
    }

    fn record() -> impl Strategy<Value = PageRecord> {
        let enc = prop_oneof![
            Just(PageEncoding::Zero),
            Just(PageEncoding::Ref),
            (hash(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(base, delta)| PageEncoding::Xor { base, delta }),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(PageEncoding::RawZstd),
            proptest::collection::vec(any::<u8>(), 4096..=4096).prop_map(PageEncoding::RawPlain),
        ];
        (any::<u64>(), hash(), enc).prop_map(|(pfn, hash, encoding)| {
            let hash = if encoding == PageEncoding::Zero { remus_types::zero_page_hash() } else { hash };
            PageRecord { pfn: Pfn(pfn), hash, encoding }
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(g, i, p)| Message::Hello { guest: GuestId(g), instance: i, page_count: p }),
            (any::<u64>(), any::<u64>(), hash()).prop_map(|(g, e, h)| Message::Welcome { guest: GuestId(g), committed: EpochId(e), head: h }),
            (any::<[u64; 5]>(), any::<u32>()).prop_map(|(v, records)| Message::EpochBegin(EpochHeader {
                guest: GuestId(v[0]), epoch: EpochId(v[1]), time_unix_ns: v[2], page_count: v[3], pause_ns: v[4], records
            })),
            proptest::collection::vec(record(), 0..6).prop_map(Message::Pages),
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(Message::DeviceState),
            (any::<u64>(), hash()).prop_map(|(e, h)| Message::EpochEnd { epoch: EpochId(e), memory_root: h }),
            (any::<u64>(), hash()).prop_map(|(e, h)| Message::Ack { epoch: EpochId(e), manifest: h }),
            any::<u64>().prop_map(|e| Message::Heartbeat { epoch: EpochId(e) }),
            "[a-z ]{0,40}".prop_map(Message::Error),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(msgs in proptest::collection::vec(message(), 1..5), split in 1usize..64) {
            let mut wire = Vec::new();
            for m in &msgs { m.encode(&mut wire); }
            // Feed in arbitrary slices: framing must not depend on read sizes.
            let mut rd = FrameReader::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(split) {
                rd.push(chunk);
                while let Some(m) = rd.next_message().unwrap() { got.push(m); }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(rd.pending(), 0);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(buf in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Message::decode(&buf);
        }

        #[test]
        fn garbage_payload_with_valid_header_is_an_error(kind in 0u8..12, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut f = Vec::new();
            f.extend_from_slice(&MAGIC);
            f.extend_from_slice(&[VERSION, kind, 0, 0]);
            f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(&f[..12]);
            crc.update(&payload);
            f.extend_from_slice(&crc.finalize().to_le_bytes());
            f.extend_from_slice(&payload);
            let _ = Message::decode(&f);
        }

        #[test]
        fn any_flipped_bit_is_detected(msg in message(), pos in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let mut f = msg.to_bytes();
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            prop_assert!(Message::decode(&f).is_err() || Message::decode(&f).unwrap().is_none());
        }
    }

    #[test]
    fn tampered_frames_give_exact_errors() {
        let f = Message::Heartbeat { epoch: EpochId(7) }.to_bytes();
        let mut bad = f.clone();
        bad[HEADER_LEN] ^= 1;
        assert_eq!(Message::decode(&bad), Err(DecodeError::ChecksumMismatch));
        let mut bad = f.clone();
        bad[0] = b'X';
        assert_eq!(Message::decode(&bad), Err(DecodeError::BadMagic));
        let mut bad = f.clone();
        bad[4] = 9;
        assert_eq!(Message::decode(&bad), Err(DecodeError::UnsupportedVersion(9)));
        let mut bad = f.clone();
        bad[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(Message::decode(&bad), Err(DecodeError::TooLarge { .. })));
        assert_eq!(Message::decode(&f[..10]), Ok(None));
    }
}
