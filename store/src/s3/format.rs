//! Object formats of the S3 tier. Integers little-endian; every object
//! has a versioned magic and a checksum, and decoding is bounded.
//!
//! Pack (`packs/<id>`, id = blake3 of the whole object):
//! ```text
//! 0..4   b"RMPK", 4 version (1), 5..8 reserved
//! then per chunk: id [32] | len u32 | value [len]
//!        (value = codec u8 | bytes, exactly as in the `chunks` column family)
//! ```
//! Pack index (`index/<pack id>`):
//! ```text
//! 0..4   b"RMPI", 4 version (1), 5..8 reserved
//! 8      pack id [32]
//! 40     pack length u64
//! 48     count u32
//! 52     per chunk: id [32] | value offset u64 | value length u32
//! end-4  crc32 of everything before
//! ```
//! Epoch (`epochs/<guest %016x>/<epoch %020>`):
//! ```text
//! 0..4   b"RMEP", 4 version (1), 5..8 reserved
//! 8      manifest [252]
//! 260    count u64
//! 268    per page written in the epoch, ascending pfn: pfn u64 | hash [32]
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

use crate::chain::Bridge;
use crate::error::StoreError;
use crate::manifest::{Manifest, MANIFEST_LEN};

const PACK_MAGIC: [u8; 4] = *b"RMPK";
const INDEX_MAGIC: [u8; 4] = *b"RMPI";
const EPOCH_MAGIC: [u8; 4] = *b"RMEP";
const BRIDGE_MAGIC: [u8; 4] = *b"RMBR";
const VERSION: u8 = 1;
/// Header of a pack.
pub const PACK_HEADER: usize = format::PREFIX_LEN;

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
    /// Length of its value.
    pub len: u32,
}

/// A pack being filled.
#[derive(Debug)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self { bytes: format::prefix(&PACK_MAGIC, VERSION).to_vec(), entries: Vec::new() }
    }
}

impl PackBuilder {
    /// Appends a chunk value (codec byte and bytes).
    pub fn push(&mut self, id: ChunkId, value: &[u8]) {
        self.bytes.extend_from_slice(&id.0);
        self.bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
        let offset = self.bytes.len() as u64;
        self.bytes.extend_from_slice(value);
        self.entries.push(PackEntry { id, offset, len: value.len() as u32 });
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
        let index = encode_index(&id, self.bytes.len() as u64, &self.entries);
        (id, self.bytes, index)
    }
}

/// Encodes a pack index.
#[must_use]
pub fn encode_index(pack: &ChunkId, pack_len: u64, entries: &[PackEntry]) -> Vec<u8> {
    let mut v = format::start_trailed(&INDEX_MAGIC, VERSION);
    v.extend_from_slice(&pack.0);
    v.extend_from_slice(&pack_len.to_le_bytes());
    v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
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
    /// Its chunks.
    pub entries: Vec<PackEntry>,
}

/// Decodes a pack index.
///
/// # Errors
/// [`StoreError::Corrupt`] for any damage or an entry outside the pack.
pub fn decode_index(b: &[u8]) -> Result<PackIndex, StoreError> {
    let body = open(b, INDEX_MAGIC, "pack index")?;
    if body.len() < 44 {
        return Err(StoreError::corrupt("pack index", FormatError::Truncated { need: 44, have: body.len() }));
    }
    let pack = id_at(body, 0);
    let pack_len = u64_le(body, 32);
    let count = u32::from_le_bytes(body[40..44].try_into().expect("4 bytes")) as usize;
    let rest = &body[44..];
    if rest.len() != count.checked_mul(44).ok_or_else(|| corrupt("pack index", "count"))? {
        return Err(corrupt("pack index", "length does not match its count"));
    }
    let mut entries = Vec::with_capacity(count);
    for e in rest.chunks_exact(44) {
        let entry = PackEntry { id: id_at(e, 0), offset: u64_le(e, 32), len: u32::from_le_bytes(e[40..44].try_into().expect("4")) };
        if entry.offset.checked_add(u64::from(entry.len)).is_none_or(|end| end > pack_len) {
            return Err(corrupt("pack index", "entry outside the pack"));
        }
        entries.push(entry);
    }
    Ok(PackIndex { pack, pack_len, entries })
}

/// Checks a pack's header; its integrity as a whole is its id.
///
/// # Errors
/// [`StoreError::Corrupt`].
pub fn check_pack_header(b: &[u8]) -> Result<(), StoreError> {
    format::check_prefix("pack", &PACK_MAGIC, VERSION..=VERSION, b).map_err(|cause| StoreError::corrupt("pack", cause))?;
    Ok(())
}

/// Encodes an epoch object.
#[must_use]
pub fn encode_epoch(m: &Manifest, pages: &[(Pfn, ChunkId)]) -> Vec<u8> {
    let mut v = format::start_trailed(&EPOCH_MAGIC, VERSION);
    v.extend_from_slice(&m.encode());
    v.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for (pfn, id) in pages {
        v.extend_from_slice(&pfn.0.to_le_bytes());
        v.extend_from_slice(&id.0);
    }
    format::seal_trailed(v)
}

/// Decodes an epoch object: its manifest and page list. The caller
/// checks the list against the manifest's page delta.
///
/// # Errors
/// [`StoreError::Corrupt`].
pub fn decode_epoch(b: &[u8]) -> Result<(Manifest, Vec<(Pfn, ChunkId)>), StoreError> {
    let body = open(b, EPOCH_MAGIC, "epoch object")?;
    if body.len() < MANIFEST_LEN + 8 {
        return Err(corrupt("epoch object", "truncated"));
    }
    let m = Manifest::decode(&body[..MANIFEST_LEN])?;
    let count = u64_le(body, MANIFEST_LEN) as usize;
    let rest = &body[MANIFEST_LEN + 8..];
    if Some(rest.len()) != count.checked_mul(40) {
        return Err(corrupt("epoch object", "length does not match its count"));
    }
    let pages = rest.chunks_exact(40).map(|e| (Pfn(u64_le(e, 0)), id_at(e, 8))).collect();
    Ok((m, pages))
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

/// Prefix of a guest's epoch objects.
#[must_use]
pub fn epochs_prefix(guest: GuestId) -> String {
    format!("epochs/{:016x}/", guest.0)
}

/// Key of an epoch object.
#[must_use]
pub fn epoch_key(guest: GuestId, epoch: EpochId) -> String {
    format!("{}{:020}", epochs_prefix(guest), epoch.0)
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

/// The epoch named by an epoch object's key.
#[must_use]
pub fn epoch_of_key(key: &str) -> Option<EpochId> {
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
            prop_assert!(decode_epoch(&b).is_err());
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
        check_pack_header(&bytes).unwrap();
        let mut bad = index.clone();
        bad[60] ^= 1;
        assert!(decode_index(&bad).is_err());
    }
}
