//! Frames: the unit of every stream between primary and backup.
//!
//! Layout:
//! ```text
//! 0..4    magic  b"RMUS"
//! 4       version (4)
//! 5       message kind
//! 6..8    reserved, zero
//! 8..12   payload length, u32 LE, at most MAX_PAYLOAD
//! 12..16  crc32 (IEEE) of bytes 0..12 followed by the payload
//! 16..    payload
//! ```
//! A control stream (bidirectional, one per connection) carries Hello,
//! Welcome (preceded by Holds frames when the Hello asked for them), Ack,
//! Heartbeat, Error and Missing (preceded by Forget frames when its list
//! is too long for one); each epoch travels on a
//! unidirectional stream of its own: EpochBegin, Pages*, DeviceState,
//! EpochEnd; the backup sends what its GC deleted as Forget frames on
//! unidirectional streams of their own.
//!
//! Payloads (little-endian; `list` is `count u32 | hash[32] × count`, at
//! most [`MAX_CHUNK_LIST`] hashes, and must fill the payload exactly):
//! ```text
//! 1  Hello       guest u64 | instance u64 | page_count u64 | generation u64 | continues u64 | continues_manifest[32]
//!                | wants_holds u8                       (generation and continues since version 3,
//!                                                        wants_holds since version 6)
//! 2  Welcome     guest u64 | committed u64 | head[32]
//! 3  EpochBegin  guest u64 | epoch u64 | time u64 | page_count u64 | pause_ns u64 | records u32 | round u32
//!                | follows u64 | released_ahead u8     (follows since version 4, released_ahead since 7)
//! 4  Pages       count u32 | page record × count      (encoding.rs)
//! 5  DeviceState len u32 | bytes
//! 6  EpochEnd    epoch u64 | memory_root[32]
//! 7  Ack         epoch u64 | manifest[32]
//! 8  Heartbeat   epoch u64
//! 9  Error       len u32 | utf-8 (at most 4096 bytes)
//! 10 Forget      list                                  (since version 2)
//! 11 Missing     round u32 | epoch u64 | list          (since version 2)
//! 12 Handover    epoch u64                             (since version 3)
//! 13 Holds       list                                  (since version 6)
//! ```
//! Version 7 marks an epoch whose output the primary released when it
//! sealed it, before any backup committed it (a new guest's first copy):
//! the backup records it in the epoch's manifest and does not fail the
//! guest over while its newest committed epoch is one of those.
//! Version 6 lets a primary whose encoder knows nothing of what the
//! backup holds (a new run: restarted, or protecting a guest that failed
//! over or moved) ask for it: before the Welcome, the backup lists the
//! chunks of the guest's memory at its head that the guest may name by
//! hash there, and the primary sends those pages by reference.
//! Version 5 lets the primary send Handover as soon as it has sealed the
//! epoch (the backup takes over once that epoch is committed and answers
//! with Handover after its Ack); before, only after the Ack.
//! Version 2 added Forget, Missing and EpochBegin's `round`; version 3
//! Hello's `generation`; version 4 EpochBegin's `follows`; both ends
//! must speak the same version (a frame of another is refused with
//! [`FormatError::UnsupportedVersion`]).

use remus_types::format::{self, FormatError};
use remus_types::{ChunkId, EpochId, GuestId};

use crate::codec::{Reader, Writer};
use crate::encoding::PageRecord;
use crate::error::DecodeError;

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"RMUS";
/// Protocol version spoken by this build.
pub const VERSION: u8 = 7;
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Largest device-state blob accepted.
pub const MAX_DEVICE_STATE: usize = MAX_PAYLOAD - 8;
/// Most chunk hashes in one Forget, Missing or Holds frame (2 MiB of hashes);
/// longer lists are split over several frames.
pub const MAX_CHUNK_LIST: usize = 1 << 16;

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
    /// The refusal round this encoding belongs to: 0 on a fresh
    /// connection, then the round of the last [`Message::Missing`] the
    /// primary had handled when it encoded the epoch. The backup drops
    /// epochs of an earlier round (they may name chunks it lacks; the
    /// primary sends them again).
    pub round: u32,
    /// The epoch this one follows in this backup's history: `epoch − 1`,
    /// or earlier when the primary merged the epochs between into this
    /// one (a backup that fell behind catching up: they are never kept
    /// there). Less than `epoch`.
    pub follows: EpochId,
    /// The primary released this epoch's output when it sealed it
    /// ([`remus_types::Checkpoint::released_ahead`]).
    pub released_ahead: bool,
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
        /// The generation it owns on the witness (0 without one): a
        /// backup refuses a primary of an older generation than its
        /// history's, and lets a new instance of a newer one continue it.
        generation: u64,
        /// A guest protected again after failing over: the last epoch of
        /// its history and that epoch's manifest, kept by another backup
        /// (epoch 0: none). A backup that holds no history of the guest
        /// continues that chain.
        continues: (EpochId, ChunkId),
        /// The primary knows nothing of what the backup holds: it asks
        /// for [`Message::Holds`] before the Welcome.
        wants_holds: bool,
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
    /// Backup → primary: chunks the backup deleted (GC). The primary no
    /// longer counts them as held, so it sends their content again rather
    /// than a reference. Advisory: an epoch encoded before it arrived may
    /// still name them, and is then refused with [`Message::Missing`].
    Forget(Vec<ChunkId>),
    /// Backup → primary: epoch `epoch`, the next to commit, was refused
    /// because it names chunks the backup does not hold (`chunks`; more
    /// may have come in Forget frames just before). The backup dropped
    /// every uncommitted epoch it had received; the primary forgets these
    /// chunks and everything first sent after `epoch - 1`, and sends every
    /// epoch from `epoch` on again, encoded for `round`.
    Missing {
        /// The refusal round (1, 2, … per connection).
        round: u32,
        /// The refused epoch: the backup's committed epoch plus one.
        epoch: EpochId,
        /// Chunks it named that the backup does not hold.
        chunks: Vec<ChunkId>,
    },
    /// Backup → primary, before the Welcome when the Hello asked: chunks
    /// of the guest's memory at the backup's head that the guest may name
    /// by hash there (one or more frames). The primary counts them as
    /// held; one the backup deletes later comes in a Forget, and one named
    /// anyway is refused with Missing.
    Holds(Vec<ChunkId>),
    /// Primary → backup, once every epoch is acknowledged and the last was
    /// sealed with the guest held still: take the guest over from `epoch`
    /// now (a planned move). Backup → primary: it has (the guest is
    /// fenced here and resuming); the primary stops for good.
    Handover {
        /// The last epoch, committed.
        epoch: EpochId,
    },
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
            Self::Forget(_) => 10,
            Self::Missing { .. } => 11,
            Self::Handover { .. } => 12,
            Self::Holds(_) => 13,
        }
    }

    /// Appends this message as one frame to `out`.
    ///
    /// # Panics
    /// If the payload exceeds [`MAX_PAYLOAD`] or a chunk list exceeds
    /// [`MAX_CHUNK_LIST`] (sender bugs: batches and lists are split below
    /// them).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let mut prefix = format::prefix(&MAGIC, VERSION);
        prefix[5] = self.kind();
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&[0; HEADER_LEN - format::PREFIX_LEN]);
        let mut w = Writer::with(std::mem::take(out));
        match self {
            Self::Hello { guest, instance, page_count, generation, continues, wants_holds } => {
                w.u64(guest.0);
                w.u64(*instance);
                w.u64(*page_count);
                w.u64(*generation);
                w.u64(continues.0 .0);
                w.bytes(&continues.1 .0);
                w.u8(u8::from(*wants_holds));
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
                w.u32(h.round);
                w.u64(h.follows.0);
                w.u8(u8::from(h.released_ahead));
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
            Self::Heartbeat { epoch } | Self::Handover { epoch } => w.u64(epoch.0),
            Self::Error(m) => w.blob(&m.as_bytes()[..m.len().min(4096)]),
            Self::Forget(chunks) | Self::Holds(chunks) => put_chunk_list(&mut w, chunks),
            Self::Missing { round, epoch, chunks } => {
                w.u32(*round);
                w.u64(epoch.0);
                put_chunk_list(&mut w, chunks);
            }
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
                return Err(bad_magic(buf));
            }
            return Ok(None);
        }
        format::check_prefix("protocol", &MAGIC, VERSION..=VERSION, buf)?;
        let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(FormatError::TooLarge { len, max: MAX_PAYLOAD }.into());
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = &buf[HEADER_LEN..HEADER_LEN + len];
        format::check_crc(&buf[12..16], &[&buf[..12], payload])?;
        let msg = Self::decode_payload(buf[5], payload)?;
        Ok(Some((msg, HEADER_LEN + len)))
    }

    fn decode_payload(kind: u8, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let msg = match kind {
            1 => Self::Hello {
                guest: GuestId(r.u64()?),
                instance: r.u64()?,
                page_count: r.u64()?,
                generation: r.u64()?,
                continues: (EpochId(r.u64()?), r.hash()?),
                wants_holds: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Corrupt("a Hello's wants_holds that is neither 0 nor 1")),
                },
            },
            2 => Self::Welcome { guest: GuestId(r.u64()?), committed: EpochId(r.u64()?), head: r.hash()? },
            3 => Self::EpochBegin(EpochHeader {
                guest: GuestId(r.u64()?),
                epoch: EpochId(r.u64()?),
                time_unix_ns: r.u64()?,
                page_count: r.u64()?,
                pause_ns: r.u64()?,
                records: r.u32()?,
                round: r.u32()?,
                follows: EpochId(r.u64()?),
                released_ahead: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Corrupt("an EpochBegin's released_ahead that is neither 0 nor 1")),
                },
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
            10 => Self::Forget(chunk_list(&mut r)?),
            11 => Self::Missing { round: r.u32()?, epoch: EpochId(r.u64()?), chunks: chunk_list(&mut r)? },
            12 => Self::Handover { epoch: EpochId(r.u64()?) },
            13 => Self::Holds(chunk_list(&mut r)?),
            k => return Err(DecodeError::UnknownKind { what: "message", kind: k }),
        };
        if !r.is_empty() {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        Ok(msg)
    }
}

fn put_chunk_list(w: &mut Writer, chunks: &[ChunkId]) {
    assert!(chunks.len() <= MAX_CHUNK_LIST, "chunk list of {} exceeds MAX_CHUNK_LIST", chunks.len());
    w.u32(chunks.len() as u32);
    for c in chunks {
        w.bytes(&c.0);
    }
}

/// A frame whose first bytes are not the magic.
fn bad_magic(buf: &[u8]) -> DecodeError {
    FormatError::BadMagic { expected: MAGIC, found: buf.iter().take(4).copied().collect() }.into()
}

/// A chunk list: the count is bounded before anything is allocated, and
/// the hashes must all be there.
fn chunk_list(r: &mut Reader<'_>) -> Result<Vec<ChunkId>, DecodeError> {
    let n = r.u32()? as usize;
    if n > MAX_CHUNK_LIST {
        return Err(FormatError::TooLarge { len: n, max: MAX_CHUNK_LIST }.into());
    }
    if n * 32 > r.remaining() {
        return Err(FormatError::Truncated { need: n * 32, have: r.remaining() }.into());
    }
    (0..n).map(|_| r.hash()).collect()
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
            (any::<[u64; 5]>(), hash(), any::<bool>()).prop_map(|(v, h, wants_holds)| Message::Hello {
                guest: GuestId(v[0]),
                instance: v[1],
                page_count: v[2],
                generation: v[3],
                continues: (EpochId(v[4]), h),
                wants_holds
            }),
            (any::<u64>(), any::<u64>(), hash()).prop_map(|(g, e, h)| Message::Welcome {
                guest: GuestId(g),
                committed: EpochId(e),
                head: h
            }),
            (any::<[u64; 6]>(), any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(v, records, round, released_ahead)| {
                Message::EpochBegin(EpochHeader {
                    guest: GuestId(v[0]),
                    epoch: EpochId(v[1]),
                    time_unix_ns: v[2],
                    page_count: v[3],
                    pause_ns: v[4],
                    records,
                    round,
                    follows: EpochId(v[5]),
                    released_ahead,
                })
            }),
            proptest::collection::vec(record(), 0..6).prop_map(Message::Pages),
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(Message::DeviceState),
            (any::<u64>(), hash()).prop_map(|(e, h)| Message::EpochEnd { epoch: EpochId(e), memory_root: h }),
            (any::<u64>(), hash()).prop_map(|(e, h)| Message::Ack { epoch: EpochId(e), manifest: h }),
            any::<u64>().prop_map(|e| Message::Heartbeat { epoch: EpochId(e) }),
            any::<u64>().prop_map(|e| Message::Handover { epoch: EpochId(e) }),
            "[a-z ]{0,40}".prop_map(Message::Error),
            proptest::collection::vec(hash(), 0..8).prop_map(Message::Forget),
            proptest::collection::vec(hash(), 0..8).prop_map(Message::Holds),
            (any::<u32>(), any::<u64>(), proptest::collection::vec(hash(), 0..8)).prop_map(|(round, e, chunks)| Message::Missing {
                round,
                epoch: EpochId(e),
                chunks
            }),
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
        fn garbage_payload_with_valid_header_is_an_error(kind in 0u8..14, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&frame(VERSION, kind, &payload));
        }

        #[test]
        fn any_flipped_bit_is_detected(msg in message(), pos in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let mut f = msg.to_bytes();
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            prop_assert!(Message::decode(&f).is_err() || Message::decode(&f).unwrap().is_none());
        }
    }

    /// A frame with a valid header and checksum around `payload`.
    fn frame(version: u8, kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC);
        f.extend_from_slice(&[version, kind, 0, 0]);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&f[..12]);
        crc.update(payload);
        f.extend_from_slice(&crc.finalize().to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn forget_and_missing_round_trip_and_bad_lists_are_refused() {
        let chunks: Vec<ChunkId> = (0..3u8).map(|i| ChunkId([i; 32])).collect();
        let forget = Message::Forget(chunks.clone());
        let missing = Message::Missing { round: 2, epoch: EpochId(41), chunks: chunks.clone() };
        for m in [&forget, &missing] {
            let f = m.to_bytes();
            assert_eq!(Message::decode(&f), Ok(Some((m.clone(), f.len()))));
            // A stream cut inside the frame waits for more bytes.
            assert_eq!(Message::decode(&f[..f.len() - 1]), Ok(None));
            // Any flipped payload byte fails the checksum.
            let mut bad = f.clone();
            bad[HEADER_LEN + 5] ^= 0x40;
            assert!(matches!(Message::decode(&bad), Err(DecodeError::Format(FormatError::ChecksumMismatch { .. }))));
        }
        // The largest list fits a frame.
        let most = Message::Forget(vec![ChunkId([7; 32]); MAX_CHUNK_LIST]);
        let f = most.to_bytes();
        assert!(f.len() <= HEADER_LEN + MAX_PAYLOAD);
        assert_eq!(Message::decode(&f).unwrap().unwrap().0, most);

        // Well-checksummed frames whose lists do not add up.
        let payload = forget.to_bytes()[HEADER_LEN..].to_vec();
        let short = &payload[..payload.len() - 1];
        assert!(
            matches!(Message::decode(&frame(VERSION, 10, short)), Err(DecodeError::Format(FormatError::Truncated { .. }))),
            "a hash cut short"
        );
        let mut long = payload.clone();
        long.push(0);
        assert_eq!(Message::decode(&frame(VERSION, 10, &long)), Err(DecodeError::Trailing(1)));
        let mut huge = payload.clone();
        huge[..4].copy_from_slice(&(MAX_CHUNK_LIST as u32 + 1).to_le_bytes());
        assert_eq!(
            Message::decode(&frame(VERSION, 10, &huge)),
            Err(DecodeError::Format(FormatError::TooLarge { len: MAX_CHUNK_LIST + 1, max: MAX_CHUNK_LIST }))
        );
        let mut overcount = payload.clone();
        overcount[..4].copy_from_slice(&4u32.to_le_bytes());
        assert!(
            matches!(Message::decode(&frame(VERSION, 10, &overcount)), Err(DecodeError::Format(FormatError::Truncated { .. }))),
            "count beyond the frame"
        );
        let m = missing.to_bytes();
        assert!(matches!(
            Message::decode(&frame(VERSION, 11, &m[HEADER_LEN..HEADER_LEN + 10])),
            Err(DecodeError::Format(FormatError::Truncated { .. }))
        ));
        // A version-1 peer's frame is refused by name.
        let old = Message::decode(&frame(1, 8, &7u64.to_le_bytes()));
        assert!(matches!(old, Err(DecodeError::Format(FormatError::UnsupportedVersion { found: 1, supported: VERSION, .. }))));
        assert_eq!(old.unwrap_err().to_string(), format!("unsupported protocol version 1 (this build reads {VERSION})"));
    }

    #[test]
    fn tampered_frames_give_exact_errors() {
        let f = Message::Heartbeat { epoch: EpochId(7) }.to_bytes();
        let mut bad = f.clone();
        bad[HEADER_LEN] ^= 1;
        assert!(matches!(Message::decode(&bad), Err(DecodeError::Format(FormatError::ChecksumMismatch { .. }))));
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(matches!(Message::decode(&bad), Err(DecodeError::Format(FormatError::BadMagic { .. }))));
        let mut bad = f.clone();
        bad[4] = 9;
        assert!(matches!(Message::decode(&bad), Err(DecodeError::Format(FormatError::UnsupportedVersion { found: 9, .. }))));
        let mut bad = f.clone();
        bad[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(Message::decode(&bad), Err(DecodeError::Format(FormatError::TooLarge { .. }))));
        assert_eq!(Message::decode(&f[..10]), Ok(None));
    }
}
