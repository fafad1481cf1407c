//! Epoch manifests: one per committed epoch, hash-chained to its parent.
//!
//! Layout (little-endian), 252 bytes:
//! ```text
//! 0..4     magic b"RMMF"
//! 4        version (1)
//! 5..8     reserved, zero
//! 8        guest u64
//! 16       epoch u64
//! 24       parent manifest hash [32] (zero for the first epoch)
//! 56       time_unix_ns u64
//! 64       page_count u64
//! 72       dirty_pages u64
//! 80       memory_root [32]   (MemoryDigest root of the guest at this epoch)
//! 112      page_delta [32]    (blake3 over this epoch's (pfn, hash) list)
//! 144      device_state [32]  (chunk id of the device state)
//! 176      instance u64
//! 184      pause_ns u64
//! 192      wire_bytes u64
//! 200      new_chunk_bytes u64
//! 208      generation u64     (the owner's generation on the witness; 0
//!                              without one; reserved and zero before)
//! 216      commit_unix_ns u64 (when the backup committed it, its own clock,
//!                              never earlier than the parent's; 0 before)
//! 224      flags u64          (bit 0: released ahead, the primary released
//!                              this epoch's output when it sealed it; 0
//!                              before it was recorded)
//! 232      reserved [16], zero
//! 248      crc32 of bytes 0..248
//! ```
//! The manifest's id is the blake3 of these 252 bytes; the chain head in
//! `meta` names the newest, and each names its parent, so the chain proves
//! the order and content of the whole history. A change of `instance`
//! (with a greater `generation` where a witness is used) between parent and
//! child records a primary that restarted and continued the history: the
//! child's page delta names every page (unwritten ones as zero pages).

use remus_types::format::{self, FormatError};
use remus_types::{ChunkId, EpochId, GuestId, Pfn};

use crate::error::StoreError;

const MAGIC: [u8; 4] = *b"RMMF";
const VERSION: u8 = 1;
/// Flag bit: the epoch's output was released ahead.
const RELEASED_AHEAD: u64 = 1;
/// Encoded size of a manifest.
pub const MANIFEST_LEN: usize = 252;

/// What the log records about one committed epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Guest.
    pub guest: GuestId,
    /// Epoch.
    pub epoch: EpochId,
    /// Hash of the previous epoch's manifest (zero for the first).
    pub parent: ChunkId,
    /// Time of the epoch's pause at the primary.
    pub time_unix_ns: u64,
    /// Guest memory size in pages.
    pub page_count: u64,
    /// Pages written in this epoch.
    pub dirty_pages: u64,
    /// The primary's memory root at this epoch.
    pub memory_root: ChunkId,
    /// blake3 over this epoch's `(pfn, page hash)` list.
    pub page_delta: ChunkId,
    /// Chunk id of the device state.
    pub device_state: ChunkId,
    /// The primary run that produced it.
    pub instance: u64,
    /// Pause of the guest at this epoch.
    pub pause_ns: u64,
    /// Bytes the epoch took on the wire.
    pub wire_bytes: u64,
    /// Bytes of chunks this epoch added to the store (pages and device
    /// state, as stored).
    pub new_chunk_bytes: u64,
    /// The owner's generation on the witness (0 without one).
    pub generation: u64,
    /// When the backup committed it (its own clock; 0 in manifests
    /// written before it was recorded). `time_unix_ns` is the primary's
    /// claim; retention ages epochs by this.
    pub commit_unix_ns: u64,
    /// The primary released this epoch's output when it sealed it, before
    /// any backup committed it (a new guest's first copy; see
    /// `remus_types::Checkpoint::released_ahead`): while a guest's newest
    /// epoch is one of these, the backup does not fail it over.
    pub released_ahead: bool,
}

impl Manifest {
    /// Encodes to the fixed layout.
    #[must_use]
    pub fn encode(&self) -> [u8; MANIFEST_LEN] {
        let mut b = [0u8; MANIFEST_LEN];
        b[..format::PREFIX_LEN].copy_from_slice(&format::prefix(&MAGIC, VERSION));
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(8, &self.guest.0.to_le_bytes());
        put(16, &self.epoch.0.to_le_bytes());
        put(24, &self.parent.0);
        put(56, &self.time_unix_ns.to_le_bytes());
        put(64, &self.page_count.to_le_bytes());
        put(72, &self.dirty_pages.to_le_bytes());
        put(80, &self.memory_root.0);
        put(112, &self.page_delta.0);
        put(144, &self.device_state.0);
        put(176, &self.instance.to_le_bytes());
        put(184, &self.pause_ns.to_le_bytes());
        put(192, &self.wire_bytes.to_le_bytes());
        put(200, &self.new_chunk_bytes.to_le_bytes());
        put(208, &self.generation.to_le_bytes());
        put(216, &self.commit_unix_ns.to_le_bytes());
        put(224, &u64::from(self.released_ahead).to_le_bytes());
        let (covered, crc) = b.split_at_mut(MANIFEST_LEN - format::TRAILER_LEN);
        crc.copy_from_slice(&format::checksum(covered));
        b
    }

    /// The time retention ages it by: when the backup committed it, or for
    /// a manifest from before that was recorded, the primary's pause time.
    #[must_use]
    pub fn age_time_ns(&self) -> u64 {
        if self.commit_unix_ns == 0 {
            self.time_unix_ns
        } else {
            self.commit_unix_ns
        }
    }

    /// The bytes this epoch charges to its guest's store usage: the new
    /// chunks it brought in, its manifest, and its page-index entries
    /// (key and hash, about 48 bytes a page).
    #[must_use]
    pub fn charge(&self) -> u64 {
        self.new_chunk_bytes.saturating_add(MANIFEST_LEN as u64).saturating_add(self.dirty_pages.saturating_mul(48))
    }

    /// The manifest's id: blake3 of its encoding.
    #[must_use]
    pub fn id(&self) -> ChunkId {
        ChunkId(*blake3::hash(&self.encode()).as_bytes())
    }

    /// Whether `pages` (pfn order) is the page list this manifest records:
    /// its count and its page delta.
    #[must_use]
    pub fn names_pages(&self, pages: &[(Pfn, ChunkId)]) -> bool {
        pages.len() as u64 == self.dirty_pages && page_delta_hash(pages) == self.page_delta
    }

    /// Decodes and checks a stored manifest.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for a wrong length, magic, version or checksum.
    pub fn decode(b: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |cause| StoreError::corrupt("manifest", cause);
        if b.len() < MANIFEST_LEN {
            return Err(corrupt(FormatError::Truncated { need: MANIFEST_LEN, have: b.len() }));
        }
        if b.len() > MANIFEST_LEN {
            return Err(corrupt(FormatError::TooLarge { len: b.len(), max: MANIFEST_LEN }));
        }
        format::open_trailed("manifest", &MAGIC, VERSION, b).map_err(corrupt)?;
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let h = |at: usize| ChunkId(b[at..at + 32].try_into().expect("32 bytes"));
        Ok(Self {
            guest: GuestId(u(8)),
            epoch: EpochId(u(16)),
            parent: h(24),
            time_unix_ns: u(56),
            page_count: u(64),
            dirty_pages: u(72),
            memory_root: h(80),
            page_delta: h(112),
            device_state: h(144),
            instance: u(176),
            pause_ns: u(184),
            wire_bytes: u(192),
            new_chunk_bytes: u(200),
            generation: u(208),
            commit_unix_ns: u(216),
            released_ahead: u(224) & RELEASED_AHEAD != 0,
        })
    }
}

/// blake3 over an epoch's `(pfn, hash)` list, in the order given.
#[must_use]
pub fn page_delta_hash(pages: &[(Pfn, ChunkId)]) -> ChunkId {
    let mut h = blake3::Hasher::new();
    for (pfn, id) in pages {
        h.update(&pfn.0.to_le_bytes());
        h.update(&id.0);
    }
    ChunkId(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(v in any::<[u64; 11]>(), hs in any::<[[u8; 32]; 4]>(), released_ahead in any::<bool>()) {
            let m = Manifest {
                guest: GuestId(v[0]), epoch: EpochId(v[1]), parent: ChunkId(hs[0]), time_unix_ns: v[2],
                page_count: v[3], dirty_pages: v[4], memory_root: ChunkId(hs[1]), page_delta: ChunkId(hs[2]),
                device_state: ChunkId(hs[3]), instance: v[5], pause_ns: v[6], wire_bytes: v[7], new_chunk_bytes: v[8],
                generation: v[9], commit_unix_ns: v[10], released_ahead,
            };
            prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn garbage_is_an_error(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert!(Manifest::decode(&b).is_err());
        }
    }
}
