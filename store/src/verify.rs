//! `verify`: re-hash every chunk, walk every guest's manifest chain and
//! check every page-index entry, naming exactly what is damaged.

use std::collections::{BTreeMap, HashSet};

use remus_types::{ChunkId, EpochId, GuestId, Pfn};
use rocksdb::IteratorMode;

use crate::chain::{Bridge, ChainWalk};
use crate::db::{u64_at, Store, CF_CHUNKS, CF_EPOCHS, CF_PAGES};
use crate::error::StoreError;
use crate::manifest::Manifest;

/// One thing found damaged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Damage {
    /// A chunk whose bytes do not hash to its id (or do not decompress).
    ChunkCorrupt {
        /// The chunk.
        chunk: String,
    },
    /// A chunk the log references but the store lacks.
    ChunkMissing {
        /// The chunk.
        chunk: String,
        /// Guest referencing it.
        guest: u64,
        /// Epoch referencing it.
        epoch: u64,
    },
    /// A manifest that fails its checksum or layout.
    ManifestCorrupt {
        /// Guest.
        guest: u64,
        /// Epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// A manifest whose parent is not the previous manifest's id.
    ChainBroken {
        /// Guest.
        guest: u64,
        /// Epoch whose parent link is wrong.
        epoch: u64,
    },
    /// The page index of an epoch does not match its manifest.
    PageIndexMismatch {
        /// Guest.
        guest: u64,
        /// Epoch.
        epoch: u64,
    },
    /// The head does not name the newest manifest.
    HeadMismatch {
        /// Guest.
        guest: u64,
    },
    /// A chunk inside an S3 pack does not hash to its id.
    PackChunkCorrupt {
        /// The pack (its id).
        pack: String,
        /// The chunk.
        chunk: String,
    },
    /// An S3 pack is damaged as a whole (truncated, bad header, not
    /// matching its name, or without an index).
    PackCorrupt {
        /// The pack.
        pack: String,
        /// Why.
        reason: String,
    },
    /// An S3 pack index names a pack that is not there.
    PackMissing {
        /// The pack.
        pack: String,
    },
    /// Another S3 object (index, bridge) fails its checksum or layout.
    ObjectCorrupt {
        /// Its key under the prefix.
        key: String,
        /// Why.
        reason: String,
    },
}

/// What `verify` checked and found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Chunks re-hashed.
    pub chunks: u64,
    /// Manifests checked.
    pub manifests: u64,
    /// Page-index entries checked.
    pub pages: u64,
    /// Everything damaged, in the order found.
    pub damage: Vec<Damage>,
}

impl Store {
    /// Checks the whole store; `progress(done)` is called per 4096 chunks.
    ///
    /// # Errors
    /// [`StoreError::Db`] when RocksDB itself fails; damage is reported in
    /// the [`VerifyReport`], not as an error.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // Page index, grouped by (guest, epoch), in pfn order.
        let mut index: BTreeMap<(u64, u64), Vec<(Pfn, ChunkId)>> = BTreeMap::new();
        for kv in self.db.iterator_cf(self.cf(CF_PAGES), IteratorMode::Start) {
            let (k, v) = kv?;
            report.pages += 1;
            if k.len() != 24 || v.len() != 32 {
                report.damage.push(Damage::PageIndexMismatch { guest: prefix_u64(&k, 0), epoch: 0 });
                continue;
            }
            let id = ChunkId(v[..].try_into().expect("32 bytes"));
            index.entry((u64_at(&k, 0), !u64_at(&k, 16))).or_default().push((Pfn(u64_at(&k, 8)), id));
        }
        let mut referenced = HashSet::new();
        let mut bridged: Vec<(u64, Bridge)> = Vec::new();
        for (guest, head) in self.guests()? {
            let bridges = self.bridges(guest)?;
            bridged.extend(bridges.iter().map(|b| (guest.0, *b)));
            let mut walk = ChainWalk::new(&bridges);
            let mut last = None;
            for kv in self.db.prefix_iterator_cf(self.cf(CF_EPOCHS), guest.0.to_be_bytes()) {
                let (k, v) = kv?;
                if k.len() != 16 || u64_at(&k, 0) != guest.0 {
                    break;
                }
                let epoch = u64_at(&k, 8);
                report.manifests += 1;
                let pages = index.remove(&(guest.0, epoch)).unwrap_or_default();
                let m = match Manifest::decode(&v) {
                    Ok(m) if m.guest == guest && m.epoch == EpochId(epoch) => m,
                    Ok(_) => {
                        report.damage.push(Damage::ManifestCorrupt { guest: guest.0, epoch, reason: "names another epoch".into() });
                        walk.damaged();
                        last = Some(None);
                        continue;
                    }
                    Err(e) => {
                        report.damage.push(Damage::ManifestCorrupt { guest: guest.0, epoch, reason: e.to_string() });
                        walk.damaged();
                        last = Some(None);
                        continue;
                    }
                };
                if walk.step(&m).is_err() {
                    report.damage.push(Damage::ChainBroken { guest: guest.0, epoch });
                }
                // The index against the manifest, and the page list (what
                // `show`, thinning and the uploader read) against the index.
                if !m.names_pages(&pages) || !self.lists(guest, EpochId(epoch), &pages)? {
                    report.damage.push(Damage::PageIndexMismatch { guest: guest.0, epoch });
                }
                let zero = remus_types::zero_page_hash();
                for id in pages.iter().map(|(_, id)| *id).filter(|id| *id != zero).chain([m.device_state]) {
                    if referenced.insert(id) && !self.has_chunk(&id)? {
                        report.damage.push(Damage::ChunkMissing { chunk: id.to_hex(), guest: guest.0, epoch });
                    }
                }
                last = Some(Some(m));
            }
            if last.flatten().as_ref().map(Manifest::id) != Some(head.manifest) {
                report.damage.push(Damage::HeadMismatch { guest: guest.0 });
            }
        }
        // Entries of thinned epochs: only inside a bridge, and exactly the
        // epoch's trimmed page list.
        let zero = remus_types::zero_page_hash();
        for ((guest, epoch), pages) in index {
            let inside = bridged.iter().any(|(g, b)| *g == guest && b.spans(EpochId(epoch)));
            if !inside || !self.lists(GuestId(guest), EpochId(epoch), &pages)? {
                report.damage.push(Damage::PageIndexMismatch { guest, epoch });
                continue;
            }
            for (_, id) in pages.iter().filter(|(_, id)| *id != zero) {
                if referenced.insert(*id) && !self.has_chunk(id)? {
                    report.damage.push(Damage::ChunkMissing { chunk: id.to_hex(), guest, epoch });
                }
            }
        }
        for kv in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (k, _) = kv?;
            report.chunks += 1;
            let Ok(id) = <[u8; 32]>::try_from(&k[..]).map(ChunkId) else {
                report.damage.push(Damage::ChunkCorrupt { chunk: format!("key of {} bytes", k.len()) });
                continue;
            };
            match self.chunk(&id) {
                Ok(_) => {}
                Err(StoreError::ChunkCorrupt(_)) => report.damage.push(Damage::ChunkCorrupt { chunk: id.to_hex() }),
                Err(e) => return Err(e),
            }
            if report.chunks % 4096 == 0 {
                progress(report.chunks);
            }
        }
        progress(report.chunks);
        Ok(report)
    }
}

fn prefix_u64(k: &[u8], at: usize) -> u64 {
    if k.len() >= at + 8 {
        u64_at(k, at)
    } else {
        0
    }
}

/// The guest ids named in a report (for messages).
#[must_use]
pub fn damaged_guests(r: &VerifyReport) -> Vec<GuestId> {
    let mut g: Vec<GuestId> = r
        .damage
        .iter()
        .filter_map(|d| match d {
            Damage::ChunkMissing { guest, .. }
            | Damage::ManifestCorrupt { guest, .. }
            | Damage::ChainBroken { guest, .. }
            | Damage::PageIndexMismatch { guest, .. }
            | Damage::HeadMismatch { guest } => Some(GuestId(*guest)),
            Damage::ChunkCorrupt { .. }
            | Damage::PackChunkCorrupt { .. }
            | Damage::PackCorrupt { .. }
            | Damage::PackMissing { .. }
            | Damage::ObjectCorrupt { .. } => None,
        })
        .collect();
    g.sort_unstable();
    g.dedup();
    g
}

impl Store {
    /// Whether `epoch`'s page list lists exactly `pages` (its page-index
    /// entries); an epoch without one (committed before lists were kept)
    /// passes, as what the index gives for it is those entries. A list
    /// that cannot be read (damaged) does not.
    fn lists(&self, guest: GuestId, epoch: EpochId, pages: &[(Pfn, ChunkId)]) -> Result<bool, StoreError> {
        match self.page_list(guest, epoch) {
            Ok(list) => Ok(list.is_none_or(|l| l == pages)),
            Err(e) if e.kind() == crate::ErrorKind::Corrupt => Ok(false),
            Err(e) => Err(e),
        }
    }
}
