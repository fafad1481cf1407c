//! Object formats of the S3 tier. Integers little-endian; every object
//! has a versioned magic and a checksum, and decoding is bounded.
//!
//! With `s3.encryption-keys` set, every object but a pack is stored
//! sealed in an envelope, and packs seal each value ([`super::seal`]).
//!
//! Pack (`packs/<id>`, id = blake3 of the whole object):
//! ```text
//! 0..4   b"RMPK", 4 version (1), 5..8 reserved
//! then per chunk: id [32] | len u32 | value [len]
//!        (value = codec u8 | bytes, exactly as in the `chunks` column
//!        family: whole, or a delta `3 | base id [32] | zstd frame of the
//!        content XOR the base's` over a chunk the tier holds)
//! ```
//! Sealed pack (version 2): no chunk id in the clear, each value sealed
//! under the pack's key with its offset as nonce:
//! ```text
//! 0..4   b"RMPK", 4 version (2), 5..8 reserved
//! 8      key id u32 | 12 salt [32]
//! 44     per chunk: len u32 | sealed value [len] (value, then a 16-byte tag)
//! ```
//! Pack index (`index/<pack id>`; version 2 for a sealed pack, with the
//! key id and salt after the count):
//! ```text
//! 0..4   b"RMPI", 4 version (1 or 2), 5..8 reserved
//! 8      pack id [32]
//! 40     pack length u64
//! 48     count u32
//! (v2)   key id u32 | salt [32]
//! then   per chunk: id [32] | value offset u64 | value length u32
//! end-4  crc32 of everything before
//! ```
//! Segment (`segments/<guest %016x>/<first %020>`, or with `-t<count>`
//! after it once thinning rewrote it with `count` epochs left): a run of
//! a guest's epochs, one object per guest per upload pass (so a 40 Hz
//! guest costs a put every `upload-interval-ms`, not one per epoch).
//! Segments cover disjoint spans of epochs, each from its `first` up to
//! the next segment's; `last` is the last epoch the pass that put it
//! covered:
//! ```text
//! 0..4   b"RMSG", 4 version (1), 5..8 reserved
//! 8      guest u64 | 16 first u64 | 24 last u64
//! 32     packs u32 | count u32
//! 40     packs holding the chunks its epochs name, when it was put: [32] each
//! then   per epoch, ascending: manifest [252] | pages u64 |
//!        per page written in it, ascending pfn: pfn u64 | hash [32]
//! end-4  crc32 of everything before
//! ```
//! Epoch (`epochs/<guest %016x>/<epoch %020>`), one per epoch as tiers
//! were written before segments; read as a segment of that one epoch,
//! never written:
//! ```text
//! 0..4   b"RMEP", 4 version (1), 5..8 reserved
//! 8      manifest [252]
//! 260    count u64
//! 268    per page written in the epoch, ascending pfn: pfn u64 | hash [32]
//! end-4  crc32 of everything before
//! ```
//! Checkpoint (`checkpoints/<guest %016x>/<epoch %020>`): the whole page
//! table at one kept epoch, so a reader starts there instead of at the
//! first epoch:
//! ```text
//! 0..4   b"RMCK", 4 version (1), 5..8 reserved
//! 8      manifest [252] of that epoch
//! 260    packs u32 | 264 count u64
//! 272    packs holding the table's chunks: [32] each
//! then   per page ever written, ascending pfn: pfn u64 | hash [32]
//! end-4  crc32 of everything before
//! ```
//! Bridge (`bridges/<guest %016x>/<first %020>-<last %020>`), left by
//! thinning in place of the dropped epochs first..=last:
//! ```text
//! 0..4   b"RMBR", 4 version (1), 5..8 reserved
//! 8      guest u64 | 16 first u64 | 24 last u64
//! 32     parent of the first dropped manifest [32]
//! 64     id of the last dropped manifest [32]
//! 96     count u64
//! 104    surviving page versions: pfn u64 | epoch u64 | hash [32]
//! end-4  crc32 of everything before
//! ```

use remus_types::format::{self, FormatError};
use remus_types::{ChunkId, EpochId, GuestId, Pfn};

use super::seal::{PackSeal, PackSealer};
use crate::chain::Bridge;
use crate::error::StoreError;
use crate::manifest::{Manifest, MANIFEST_LEN};

const PACK_MAGIC: [u8; 4] = *b"RMPK";
const INDEX_MAGIC: [u8; 4] = *b"RMPI";
const SEGMENT_MAGIC: [u8; 4] = *b"RMSG";
const EPOCH_MAGIC: [u8; 4] = *b"RMEP";
const CHECKPOINT_MAGIC: [u8; 4] = *b"RMCK";
const BRIDGE_MAGIC: [u8; 4] = *b"RMBR";
const VERSION: u8 = 1;
/// Version of sealed packs and of their indexes.
const SEALED: u8 = 2;

fn corrupt(what: &str, why: &str) -> StoreError {
    StoreError::malformed(what, why)
}

/// Checks magic, version and trailing crc; returns the body between.
fn open<'a>(b: &'a [u8], magic: [u8; 4], what: &'static str) -> Result<&'a [u8], StoreError> {
    Ok(format::open_trailed(what, &magic, VERSION, b).map_err(|cause| StoreError::corrupt(what, cause))?.1)
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn id_at(b: &[u8], at: usize) -> ChunkId {
    ChunkId(b[at..at + 32].try_into().expect("32 bytes"))
}

/// Where one chunk's value sits in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// Chunk id.
    pub id: ChunkId,
    /// Offset of its value in the pack.
    pub offset: u64,
    /// Length of its value (sealed: with its tag).
    pub len: u32,
    /// How the pack seals it (`None`: stored as it is).
    pub seal: Option<PackSeal>,
}

/// A pack being filled.
#[derive(Debug)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
    sealer: Option<PackSealer>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new(None)
    }
}

impl PackBuilder {
    /// An empty pack, sealing its values with `sealer` if given.
    #[must_use]
    pub fn new(sealer: Option<PackSealer>) -> Self {
        let bytes = match &sealer {
            None => format::prefix(&PACK_MAGIC, VERSION).to_vec(),
            Some(s) => [&format::prefix(&PACK_MAGIC, SEALED)[..], &s.seal.key.to_le_bytes(), &s.seal.salt].concat(),
        };
        Self { bytes, entries: Vec::new(), sealer }
    }

    /// Appends a chunk value (codec byte and bytes).
    pub fn push(&mut self, id: ChunkId, value: &[u8]) {
        let Some(sealer) = &self.sealer else {
            self.bytes.extend_from_slice(&id.0);
            self.bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
            let offset = self.bytes.len() as u64;
            self.bytes.extend_from_slice(value);
            self.entries.push(PackEntry { id, offset, len: value.len() as u32, seal: None });
            return;
        };
        let len = value.len() + super::seal::TAG_LEN;
        self.bytes.extend_from_slice(&(len as u32).to_le_bytes());
        let offset = self.bytes.len() as u64;
        sealer.seal_onto(&mut self.bytes, value);
        self.entries.push(PackEntry { id, offset, len: len as u32, seal: Some(sealer.seal) });
    }

    /// Bytes so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when no chunk was added.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Chunks so far.
    #[must_use]
    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// Closes the pack: its id, bytes and index object.
    #[must_use]
    pub fn finish(self) -> (ChunkId, Vec<u8>, Vec<u8>) {
        let id = remus_types::content_id(&self.bytes);
        let index = encode_index(&id, self.bytes.len() as u64, self.sealer.as_ref().map(|s| s.seal), &self.entries);
        (id, self.bytes, index)
    }
}

/// Encodes a pack index (of a pack sealed with `seal`, if given).
#[must_use]
pub fn encode_index(pack: &ChunkId, pack_len: u64, seal: Option<PackSeal>, entries: &[PackEntry]) -> Vec<u8> {
    let mut v = format::start_trailed(&INDEX_MAGIC, if seal.is_some() { SEALED } else { VERSION });
    v.extend_from_slice(&pack.0);
    v.extend_from_slice(&pack_len.to_le_bytes());
    v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    if let Some(s) = seal {
        v.extend_from_slice(&s.key.to_le_bytes());
        v.extend_from_slice(&s.salt);
    }
    for e in entries {
        v.extend_from_slice(&e.id.0);
        v.extend_from_slice(&e.offset.to_le_bytes());
        v.extend_from_slice(&e.len.to_le_bytes());
    }
    format::seal_trailed(v)
}

/// A decoded pack index.
#[derive(Debug, Clone)]
pub struct PackIndex {
    /// The pack it describes.
    pub pack: ChunkId,
    /// The pack's length.
    pub pack_len: u64,
    /// How the pack seals its values (`None`: stored as they are).
    pub seal: Option<PackSeal>,
    /// Its chunks.
    pub entries: Vec<PackEntry>,
}

/// Decodes a pack index.
///
/// # Errors
/// [`StoreError::Corrupt`] for any damage or an entry outside the pack.
pub fn decode_index(b: &[u8]) -> Result<PackIndex, StoreError> {
    let (version, body) = format::open_trailed("pack index", &INDEX_MAGIC, SEALED, b).map_err(|c| StoreError::corrupt("pack index", c))?;
    let head = if version == SEALED { 80 } else { 44 };
    if body.len() < head {
        return Err(StoreError::corrupt("pack index", FormatError::Truncated { need: head, have: body.len() }));
    }
    let pack = id_at(body, 0);
    let pack_len = u64_le(body, 32);
    let count = u32::from_le_bytes(body[40..44].try_into().expect("4 bytes")) as usize;
    let seal = (version == SEALED).then(|| PackSeal {
        key: u32::from_le_bytes(body[44..48].try_into().expect("4 bytes")),
        salt: body[48..80].try_into().expect("32 bytes"),
    });
    let rest = &body[head..];
    if rest.len() != count.checked_mul(44).ok_or_else(|| corrupt("pack index", "count"))? {
        return Err(corrupt("pack index", "length does not match its count"));
    }
    let mut entries = Vec::with_capacity(count);
    for e in rest.chunks_exact(44) {
        let entry = PackEntry { id: id_at(e, 0), offset: u64_le(e, 32), len: u32::from_le_bytes(e[40..44].try_into().expect("4")), seal };
        if entry.offset.checked_add(u64::from(entry.len)).is_none_or(|end| end > pack_len) {
            return Err(corrupt("pack index", "entry outside the pack"));
        }
        entries.push(entry);
    }
    Ok(PackIndex { pack, pack_len, seal, entries })
}

/// Checks a pack's header against its index's seal; its integrity as a
/// whole is its id.
///
/// # Errors
/// [`StoreError::Corrupt`].
pub fn check_pack_header(b: &[u8], seal: Option<PackSeal>) -> Result<(), StoreError> {
    let version = format::check_prefix("pack", &PACK_MAGIC, VERSION..=SEALED, b).map_err(|cause| StoreError::corrupt("pack", cause))?;
    let sealed = (version == SEALED).then(|| b.get(8..44)).map(|h| {
        h.map(|h| PackSeal { key: u32::from_le_bytes(h[..4].try_into().expect("4 bytes")), salt: h[4..].try_into().expect("32 bytes") })
    });
    match sealed {
        None if seal.is_none() => Ok(()),
        Some(Some(s)) if Some(s) == seal => Ok(()),
        _ => Err(corrupt("pack", "its header does not match its index's seal")),
    }
}

/// Writes a page list: its count, then each (pfn, hash).
fn put_pages(v: &mut Vec<u8>, pages: &[(Pfn, ChunkId)]) {
    v.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    put_page_entries(v, pages);
}

fn put_page_entries(v: &mut Vec<u8>, pages: &[(Pfn, ChunkId)]) {
    for (pfn, id) in pages {
        v.extend_from_slice(&pfn.0.to_le_bytes());
        v.extend_from_slice(&id.0);
    }
}

/// Reads `count` (pfn, hash) entries at `*at`, moving past them.
fn take_pages(body: &[u8], at: &mut usize, count: u64, what: &str) -> Result<Vec<(Pfn, ChunkId)>, StoreError> {
    let len = usize::try_from(count).ok().and_then(|c| c.checked_mul(40)).ok_or_else(|| corrupt(what, "count"))?;
    let rest = body.get(*at..).and_then(|r| r.get(..len)).ok_or_else(|| corrupt(what, "length does not match its counts"))?;
    *at += len;
    Ok(rest.chunks_exact(40).map(|e| (Pfn(u64_le(e, 0)), id_at(e, 8))).collect())
}

fn take_ids(body: &[u8], at: &mut usize, count: usize, what: &str) -> Result<Vec<ChunkId>, StoreError> {
    let len = count.checked_mul(32).ok_or_else(|| corrupt(what, "count"))?;
    let rest = body.get(*at..).and_then(|r| r.get(..len)).ok_or_else(|| corrupt(what, "length does not match its counts"))?;
    *at += len;
    Ok(rest.chunks_exact(32).map(|e| id_at(e, 0)).collect())
}

/// A run of one guest's epochs, as one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentObject {
    /// Guest.
    pub guest: GuestId,
    /// First epoch of the span it covers.
    pub first: EpochId,
    /// Last epoch of the span it covers.
    pub last: EpochId,
    /// Packs holding the chunks its epochs name, when it was put (a hint:
    /// repacking may have moved them since).
    pub packs: Vec<ChunkId>,
    /// Its epochs, ascending: manifest and the pages written in it.
    pub epochs: Vec<(Manifest, Vec<(Pfn, ChunkId)>)>,
}

impl SegmentObject {
    /// Encodes the segment.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut v = format::start_trailed(&SEGMENT_MAGIC, VERSION);
        for x in [self.guest.0, self.first.0, self.last.0] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        v.extend_from_slice(&(self.epochs.len() as u32).to_le_bytes());
        for p in &self.packs {
            v.extend_from_slice(&p.0);
        }
        for (m, pages) in &self.epochs {
            v.extend_from_slice(&m.encode());
            put_pages(&mut v, pages);
        }
        format::seal_trailed(v)
    }

    /// Decodes a segment, checking that its epochs are the guest's,
    /// ascending and inside its span. The caller checks each page list
    /// against its manifest.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`].
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        const WHAT: &str = "segment";
        let body = open(b, SEGMENT_MAGIC, WHAT)?;
        if body.len() < 32 {
            return Err(corrupt(WHAT, "truncated"));
        }
        let (guest, first, last) = (GuestId(u64_le(body, 0)), EpochId(u64_le(body, 8)), EpochId(u64_le(body, 16)));
        let packs = u32::from_le_bytes(body[24..28].try_into().expect("4 bytes")) as usize;
        let count = u32::from_le_bytes(body[28..32].try_into().expect("4 bytes")) as usize;
        let mut at = 32;
        let packs = take_ids(body, &mut at, packs, WHAT)?;
        // Each epoch takes at least its manifest and page count.
        if count > (body.len() - at) / (MANIFEST_LEN + 8) {
            return Err(corrupt(WHAT, "length does not match its counts"));
        }
        let mut epochs: Vec<(Manifest, Vec<(Pfn, ChunkId)>)> = Vec::with_capacity(count);
        for _ in 0..count {
            let m = Manifest::decode(body.get(at..at + MANIFEST_LEN).ok_or_else(|| corrupt(WHAT, "truncated"))?)?;
            at += MANIFEST_LEN;
            let n = u64_le(body.get(at..at + 8).ok_or_else(|| corrupt(WHAT, "truncated"))?, 0);
            at += 8;
            let pages = take_pages(body, &mut at, n, WHAT)?;
            if m.guest != guest || m.epoch < first || m.epoch > last || epochs.last().is_some_and(|(p, _)| p.epoch >= m.epoch) {
                return Err(corrupt(WHAT, "an epoch lies outside its span or out of order"));
            }
            epochs.push((m, pages));
        }
        if at != body.len() {
            return Err(corrupt(WHAT, "length does not match its counts"));
        }
        Ok(Self { guest, first, last, packs, epochs })
    }

    /// Its key as the uploader puts it.
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}{:020}", segments_prefix(self.guest), self.first.0)
    }

    /// Its key as thinning rewrites it (a key of its own, so the new
    /// segment is in place before the old one goes).
    #[must_use]
    pub fn rewritten_key(&self) -> String {
        format!("{}-t{}", self.key(), self.epochs.len())
    }
}

/// The first epoch of the span a segment's key (or an epoch object's,
/// from before segments) names.
#[must_use]
pub fn segment_first(key: &str) -> Option<EpochId> {
    key.rsplit('/').next()?.split('-').next()?.parse().ok().map(EpochId)
}

/// Prefix of a guest's epoch objects (written before segments).
#[must_use]
pub fn legacy_epochs_prefix(guest: GuestId) -> String {
    format!("epochs/{:016x}/", guest.0)
}

/// Decodes an object listed among a guest's segments: a segment, or an
/// epoch object from before segments (as a segment of that one epoch,
/// naming no packs).
///
/// # Errors
/// [`StoreError::Corrupt`].
pub fn decode_listed(key: &str, b: &[u8]) -> Result<SegmentObject, StoreError> {
    if !key.starts_with("epochs/") {
        return SegmentObject::decode(b);
    }
    const WHAT: &str = "epoch object";
    let body = open(b, EPOCH_MAGIC, WHAT)?;
    if body.len() < MANIFEST_LEN + 8 {
        return Err(corrupt(WHAT, "truncated"));
    }
    let m = Manifest::decode(&body[..MANIFEST_LEN])?;
    let mut at = MANIFEST_LEN + 8;
    let pages = take_pages(body, &mut at, u64_le(body, MANIFEST_LEN), WHAT)?;
    if at != body.len() {
        return Err(corrupt(WHAT, "length does not match its count"));
    }
    Ok(SegmentObject { guest: m.guest, first: m.epoch, last: m.epoch, packs: Vec::new(), epochs: vec![(m, pages)] })
}

/// The key `seg` was read from, when it is an epoch object's.
fn legacy_key(seg: &SegmentObject) -> String {
    format!("{}{:020}", legacy_epochs_prefix(seg.guest), seg.first.0)
}

impl SegmentObject {
    /// Whether `key` is one this segment may be read from.
    #[must_use]
    pub fn is_at(&self, key: &str) -> bool {
        self.key() == key || self.rewritten_key() == key || (self.epochs.len() == 1 && legacy_key(self) == key)
    }
}

/// The dropped epochs (`first..=last`) a bridge's key names.
#[must_use]
pub fn bridge_span(key: &str) -> Option<(EpochId, EpochId)> {
    let mut parts = key.rsplit('/').next()?.split('-');
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    (first <= last).then_some((EpochId(first), EpochId(last)))
}

/// A guest's whole page table at one kept epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointObject {
    /// The manifest of that epoch.
    pub manifest: Manifest,
    /// Packs holding the table's chunks, when it was put (a hint).
    pub packs: Vec<ChunkId>,
    /// Every page written at or before the epoch, in its newest version
    /// there, ascending pfn.
    pub pages: Vec<(Pfn, ChunkId)>,
}

impl CheckpointObject {
    /// Encodes the checkpoint.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut v = format::start_trailed(&CHECKPOINT_MAGIC, VERSION);
        v.extend_from_slice(&self.manifest.encode());
        v.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        v.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.packs {
            v.extend_from_slice(&p.0);
        }
        put_page_entries(&mut v, &self.pages);
        format::seal_trailed(v)
    }

    /// Decodes a checkpoint; checks that its table is ascending, inside
    /// the guest's memory, and hashes to the manifest's memory root.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`].
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        const WHAT: &str = "checkpoint";
        let body = open(b, CHECKPOINT_MAGIC, WHAT)?;
        if body.len() < MANIFEST_LEN + 12 {
            return Err(corrupt(WHAT, "truncated"));
        }
        let manifest = Manifest::decode(&body[..MANIFEST_LEN])?;
        let packs = u32::from_le_bytes(body[MANIFEST_LEN..MANIFEST_LEN + 4].try_into().expect("4 bytes")) as usize;
        let count = u64_le(body, MANIFEST_LEN + 4);
        let mut at = MANIFEST_LEN + 12;
        let packs = take_ids(body, &mut at, packs, WHAT)?;
        let pages = take_pages(body, &mut at, count, WHAT)?;
        if at != body.len() {
            return Err(corrupt(WHAT, "length does not match its counts"));
        }
        let mut digest = remus_types::MemoryDigest::zeroed(manifest.page_count);
        let mut prev = None;
        for (pfn, id) in &pages {
            if pfn.0 >= manifest.page_count || prev.is_some_and(|p| p >= pfn.0) {
                return Err(corrupt(WHAT, "its page table is out of order or beyond memory"));
            }
            prev = Some(pfn.0);
            digest.set(*pfn, *id);
        }
        if digest.root() != manifest.memory_root {
            return Err(corrupt(WHAT, "its page table does not hash to the manifest's memory root"));
        }
        Ok(Self { manifest, packs, pages })
    }

    /// Its key.
    #[must_use]
    pub fn key(&self) -> String {
        checkpoint_key(self.manifest.guest, self.manifest.epoch)
    }
}

/// What thinning leaves in place of a run of dropped epochs: the chain
/// link across the gap and the page versions still needed by later
/// kept epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeObject {
    /// Guest.
    pub guest: GuestId,
    /// The link across the gap (the chain rule's [`Bridge`]).
    pub bridge: Bridge,
    /// Page versions of dropped epochs that later kept epochs still see.
    pub pages: Vec<(Pfn, EpochId, ChunkId)>,
}

impl BridgeObject {
    /// Encodes the bridge object.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut v = format::start_trailed(&BRIDGE_MAGIC, VERSION);
        let b = &self.bridge;
        for x in [self.guest.0, b.first.0, b.last.0] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&b.first_parent.0);
        v.extend_from_slice(&b.last_id.0);
        v.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for (pfn, e, id) in &self.pages {
            v.extend_from_slice(&pfn.0.to_le_bytes());
            v.extend_from_slice(&e.0.to_le_bytes());
            v.extend_from_slice(&id.0);
        }
        format::seal_trailed(v)
    }

    /// Decodes a bridge object.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`].
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let body = open(b, BRIDGE_MAGIC, "bridge")?;
        if body.len() < 96 {
            return Err(corrupt("bridge", "truncated"));
        }
        let count = u64_le(body, 88) as usize;
        let rest = &body[96..];
        if Some(rest.len()) != count.checked_mul(48) {
            return Err(corrupt("bridge", "length does not match its count"));
        }
        Ok(Self {
            guest: GuestId(u64_le(body, 0)),
            bridge: Bridge {
                first: EpochId(u64_le(body, 8)),
                last: EpochId(u64_le(body, 16)),
                first_parent: id_at(body, 24),
                last_id: id_at(body, 56),
            },
            pages: rest.chunks_exact(48).map(|e| (Pfn(u64_le(e, 0)), EpochId(u64_le(e, 8)), id_at(e, 16))).collect(),
        })
    }
}

/// Key of a pack.
#[must_use]
pub fn pack_key(id: &ChunkId) -> String {
    format!("packs/{}", id.to_hex())
}

/// Key of a pack's index.
#[must_use]
pub fn index_key(id: &ChunkId) -> String {
    format!("index/{}", id.to_hex())
}

/// Prefix of a guest's segments.
#[must_use]
pub fn segments_prefix(guest: GuestId) -> String {
    format!("segments/{:016x}/", guest.0)
}

/// Prefix of a guest's checkpoints.
#[must_use]
pub fn checkpoints_prefix(guest: GuestId) -> String {
    format!("checkpoints/{:016x}/", guest.0)
}

/// Key of a checkpoint.
#[must_use]
pub fn checkpoint_key(guest: GuestId, epoch: EpochId) -> String {
    format!("{}{:020}", checkpoints_prefix(guest), epoch.0)
}

/// Prefix of a guest's bridges.
#[must_use]
pub fn bridges_prefix(guest: GuestId) -> String {
    format!("bridges/{:016x}/", guest.0)
}

/// Key of a bridge.
#[must_use]
pub fn bridge_key(b: &BridgeObject) -> String {
    format!("{}{:020}-{:020}", bridges_prefix(b.guest), b.bridge.first.0, b.bridge.last.0)
}

/// The epoch named by a checkpoint's key.
#[must_use]
pub fn checkpoint_epoch(key: &str) -> Option<EpochId> {
    key.rsplit('/').next()?.parse().ok().map(EpochId)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn garbage_never_decodes(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(decode_index(&b).is_err());
            prop_assert!(SegmentObject::decode(&b).is_err());
            prop_assert!(CheckpointObject::decode(&b).is_err());
            prop_assert!(BridgeObject::decode(&b).is_err());
        }

        #[test]
        fn bridges_round_trip(v in any::<[u64; 3]>(), pages in proptest::collection::vec(any::<(u64, u64, [u8; 32])>(), 0..20)) {
            let b = BridgeObject {
                guest: GuestId(v[0]),
                bridge: Bridge { first: EpochId(v[1]), last: EpochId(v[2]), first_parent: ChunkId([1; 32]), last_id: ChunkId([2; 32]) },
                pages: pages.into_iter().map(|(p, e, h)| (Pfn(p), EpochId(e), ChunkId(h))).collect(),
            };
            prop_assert_eq!(BridgeObject::decode(&b.encode()).unwrap(), b);
        }
    }

    fn manifest(epoch: u64, page_count: u64) -> Manifest {
        Manifest {
            guest: GuestId(5),
            epoch: EpochId(epoch),
            parent: ChunkId([epoch as u8; 32]),
            time_unix_ns: epoch * 10,
            page_count,
            dirty_pages: 0,
            memory_root: ChunkId::default(),
            page_delta: ChunkId::default(),
            device_state: ChunkId([3; 32]),
            instance: 1,
            pause_ns: 0,
            wire_bytes: 0,
            new_chunk_bytes: 0,
            generation: 0,
            commit_unix_ns: epoch * 10,
            released_ahead: false,
        }
    }

    #[test]
    fn segments_round_trip_and_refuse_epochs_outside_their_span() {
        let pages = vec![(Pfn(1), ChunkId([1; 32])), (Pfn(9), ChunkId([2; 32]))];
        let seg = SegmentObject {
            guest: GuestId(5),
            first: EpochId(10),
            last: EpochId(14),
            packs: vec![ChunkId([7; 32])],
            epochs: vec![(manifest(10, 16), pages.clone()), (manifest(12, 16), vec![]), (manifest(14, 16), pages)],
        };
        assert_eq!(SegmentObject::decode(&seg.encode()).unwrap(), seg);
        assert_eq!(segment_first(&seg.key()), Some(EpochId(10)));
        assert_eq!(segment_first(&seg.rewritten_key()), Some(EpochId(10)));
        assert!(seg.rewritten_key().ends_with("-t3"));
        let outside = SegmentObject { last: EpochId(13), ..seg.clone() };
        assert!(SegmentObject::decode(&outside.encode()).is_err());
        let mut unordered = seg.clone();
        unordered.epochs.swap(0, 1);
        assert!(SegmentObject::decode(&unordered.encode()).is_err());
        let mut bad = seg.encode();
        bad[60] ^= 1;
        assert!(SegmentObject::decode(&bad).is_err());
    }

    #[test]
    fn a_checkpoint_must_hash_to_its_manifest_root() {
        let pages = vec![(Pfn(0), ChunkId([1; 32])), (Pfn(15), ChunkId([2; 32]))];
        let mut digest = remus_types::MemoryDigest::zeroed(16);
        for (pfn, id) in &pages {
            digest.set(*pfn, *id);
        }
        let mut m = manifest(20, 16);
        m.memory_root = digest.root();
        let c = CheckpointObject { manifest: m.clone(), packs: vec![ChunkId([4; 32])], pages: pages.clone() };
        assert_eq!(CheckpointObject::decode(&c.encode()).unwrap(), c);
        assert_eq!(checkpoint_epoch(&c.key()), Some(EpochId(20)));
        let wrong = CheckpointObject { pages: vec![pages[0]], ..c.clone() };
        assert!(CheckpointObject::decode(&wrong.encode()).unwrap_err().to_string().contains("memory root"));
        let beyond = CheckpointObject { pages: vec![(Pfn(16), ChunkId([2; 32]))], ..c };
        assert!(CheckpointObject::decode(&beyond.encode()).is_err());
    }

    #[test]
    fn packs_and_indexes_round_trip_and_one_flipped_byte_is_caught() {
        let mut p = PackBuilder::default();
        p.push(ChunkId([7; 32]), b"\0hello");
        p.push(ChunkId([8; 32]), b"\0world!");
        let (id, bytes, index) = p.finish();
        let ix = decode_index(&index).unwrap();
        assert_eq!(ix.pack, id);
        assert_eq!(ix.pack_len, bytes.len() as u64);
        let e = ix.entries[1];
        assert_eq!(&bytes[e.offset as usize..][..e.len as usize], b"\0world!");
        check_pack_header(&bytes, None).unwrap();
        let mut bad = index.clone();
        bad[60] ^= 1;
        assert!(decode_index(&bad).is_err());
    }

    #[test]
    fn a_sealed_pack_keeps_ids_and_values_out_of_its_bytes_and_its_index_names_its_seal() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("k");
        crate::s3::Keyring::add_key(&keys).unwrap();
        let ring = crate::s3::Keyring::load(&keys).unwrap();
        let mut p = PackBuilder::new(Some(ring.pack_sealer()));
        p.push(ChunkId([7; 32]), b"\0hello hello hello");
        p.push(ChunkId([8; 32]), b"\0world world world!");
        let (id, bytes, index) = p.finish();
        assert!(!bytes.windows(32).any(|w| w == [7; 32] || w == [8; 32]), "no chunk id in the clear");
        assert!(!bytes.windows(5).any(|w| w == b"hello" || w == b"world"), "no value in the clear");
        let ix = decode_index(&index).unwrap();
        assert_eq!((ix.pack, ix.pack_len), (id, bytes.len() as u64));
        let seal = ix.seal.expect("a sealed index");
        assert!(ix.entries.iter().all(|e| e.seal == Some(seal)));
        check_pack_header(&bytes, Some(seal)).unwrap();
        assert!(check_pack_header(&bytes, None).is_err(), "a plain index for a sealed pack");
        assert!(check_pack_header(&bytes, Some(PackSeal { key: 2, ..seal })).is_err());
        let e = ix.entries[1];
        let v = &bytes[e.offset as usize..][..e.len as usize];
        assert_eq!(ring.open_value("p", &seal, e.offset, v).unwrap(), b"\0world world world!");
    }
}
