//! Reading the S3 tier back: epochs, bridges, pack indexes and chunks,
//! checked as they arrive, for restore after site loss.

use std::collections::{BTreeMap, HashMap};

use remus_types::{ChunkId, EpochId, GuestId, Pfn};

use super::format::{self, BridgeObject, PackEntry};
use super::{S3Client, S3Config, S3Error};
use crate::chain::{Bridge, ChainWalk};
use crate::db::decode_chunk_value;
use crate::error::StoreError;
use crate::manifest::{page_delta_hash, Manifest};

/// A bucket and prefix holding remus history.
#[derive(Debug)]
pub struct S3Tier {
    pub(crate) client: S3Client,
    pub(crate) cfg: S3Config,
}

/// One epoch as S3 holds it.
#[derive(Debug, Clone)]
pub struct S3Epoch {
    /// Its manifest.
    pub manifest: Manifest,
    /// Pages written in it, ascending pfn.
    pub pages: Vec<(Pfn, ChunkId)>,
}

/// A guest's whole history in S3 (manifests and page lists, no chunks).
#[derive(Debug, Clone, Default)]
pub struct S3History {
    /// Kept epochs, oldest first.
    pub epochs: Vec<S3Epoch>,
    /// Thinned runs, oldest first.
    pub bridges: Vec<BridgeObject>,
}

impl S3Tier {
    /// A tier for `cfg`; makes no request, so it works while S3 is away.
    ///
    /// # Errors
    /// [`S3Error::Config`].
    pub fn new(cfg: &S3Config) -> Result<Self, S3Error> {
        Ok(Self { client: S3Client::new(cfg)?, cfg: cfg.clone() })
    }

    /// A tier for `cfg` whose bucket answers with these credentials.
    ///
    /// # Errors
    /// [`S3Error::Config`], [`S3Error::Unreachable`], [`S3Error::Denied`],
    /// [`S3Error::NoSuchBucket`].
    pub fn connect(cfg: &S3Config) -> Result<Self, S3Error> {
        let t = Self::new(cfg)?;
        t.client.check()?;
        Ok(t)
    }

    /// The client (bucket and prefix bound).
    #[must_use]
    pub fn client(&self) -> &S3Client {
        &self.client
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    /// Guests with epochs in S3.
    ///
    /// # Errors
    /// As S3 answers.
    pub fn guests(&self) -> Result<Vec<GuestId>, StoreError> {
        // One entry per guest, not per epoch object.
        let mut g: Vec<GuestId> = self
            .client
            .list_folders("epochs/")?
            .iter()
            .filter_map(|p| p.split('/').nth(1).and_then(|h| u64::from_str_radix(h, 16).ok()))
            .map(GuestId)
            .collect();
        g.dedup();
        Ok(g)
    }

    /// Epochs of `guest` with an epoch object, ascending.
    ///
    /// # Errors
    /// As S3 answers.
    pub fn epoch_ids(&self, guest: GuestId) -> Result<Vec<EpochId>, StoreError> {
        let mut v: Vec<EpochId> =
            self.client.list(&format::epochs_prefix(guest))?.iter().filter_map(|l| format::epoch_of_key(&l.key)).collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Reads one epoch object, checking it against its key and its
    /// manifest's page delta.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the object; S3 errors.
    pub fn epoch(&self, guest: GuestId, epoch: EpochId) -> Result<S3Epoch, StoreError> {
        let key = format::epoch_key(guest, epoch);
        check_epoch(&key, guest, epoch, &self.client.get(&key)?)
    }

    /// Every thinning bridge of `guest`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the object; S3 errors.
    pub fn bridges(&self, guest: GuestId) -> Result<Vec<BridgeObject>, StoreError> {
        let keys: Vec<String> = self.client.list(&format::bridges_prefix(guest))?.into_iter().map(|l| l.key).collect();
        let mut out = Vec::with_capacity(keys.len());
        for (key, body) in keys.iter().zip(self.client.get_many(&keys)?) {
            out.push(BridgeObject::decode(&body).map_err(|e| e.at(format!("s3 {key}")))?);
        }
        out.sort_by_key(|b| b.bridge.first);
        Ok(out)
    }

    /// A guest's history up to `upto` (everything when `None`), with
    /// every object checked and the manifest chain walked across bridges.
    ///
    /// # Errors
    /// [`StoreError::NoGuest`] when S3 holds nothing of it,
    /// [`StoreError::Corrupt`] naming the damaged object or broken link.
    pub fn history(&self, guest: GuestId, upto: Option<EpochId>, progress: &mut dyn FnMut(u64, u64)) -> Result<S3History, StoreError> {
        let ids: Vec<EpochId> = self.epoch_ids(guest)?.into_iter().filter(|e| upto.is_none_or(|u| *e <= u)).collect();
        if ids.is_empty() {
            return Err(StoreError::NoGuest(guest));
        }
        let mut epochs = Vec::with_capacity(ids.len());
        for batch in ids.chunks(256) {
            let keys: Vec<String> = batch.iter().map(|e| format::epoch_key(guest, *e)).collect();
            for ((key, e), body) in keys.iter().zip(batch).zip(self.client.get_many(&keys)?) {
                epochs.push(check_epoch(key, guest, *e, &body)?);
            }
            progress(epochs.len() as u64, ids.len() as u64);
        }
        let bridges = self.bridges(guest)?;
        check_chain(&epochs, &bridges)
            .map_err(|(epoch, why)| StoreError::malformed(format!("s3 {guest} epoch {epoch} manifest chain"), why.to_string()))?;
        Ok(S3History { epochs, bridges })
    }

    /// Every pack index: chunk id → (pack, entry).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming a damaged index; S3 errors.
    pub fn chunk_locations(&self) -> Result<HashMap<ChunkId, (ChunkId, PackEntry)>, StoreError> {
        let keys: Vec<String> = self.client.list("index/")?.into_iter().map(|l| l.key).collect();
        let mut out = HashMap::new();
        for batch in keys.chunks(256) {
            for (key, body) in batch.iter().zip(self.client.get_many(batch)?) {
                let ix = format::decode_index(&body).map_err(|e| e.at(format!("s3 {key}")))?;
                for e in ix.entries {
                    out.insert(e.id, (ix.pack, e));
                }
            }
        }
        Ok(out)
    }

    /// Fetches the chunks in `wanted`, a pack at a time (memory: two
    /// packs), verifying each against its id, and hands each to `f`.
    ///
    /// # Errors
    /// [`StoreError::ChunkMissing`] when no pack holds one,
    /// [`StoreError::Corrupt`] naming pack and chunk when one is damaged,
    /// S3 errors, or what `f` returns.
    pub fn fetch_chunks(
        &self,
        wanted: impl IntoIterator<Item = ChunkId>,
        f: impl FnMut(ChunkId, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.fetch_located(&self.chunk_locations()?, wanted, f)
    }

    /// One chunk, verified against its id, by a ranged read of its pack
    /// (`locs` from [`chunk_locations`](Self::chunk_locations)): a page
    /// without fetching the pack around it.
    ///
    /// # Errors
    /// [`StoreError::ChunkMissing`]; [`StoreError::Corrupt`] for bytes
    /// that do not match the id; S3 failures.
    pub fn read_chunk(&self, locs: &HashMap<ChunkId, (ChunkId, PackEntry)>, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let (pack, e) = locs.get(id).ok_or(StoreError::ChunkMissing(*id))?;
        let value = self.client.get_range(&format::pack_key(pack), e.offset, u64::from(e.len))?;
        decode_chunk_value(id, &value)
            .map_err(|_| StoreError::malformed(format!("s3 pack {pack}"), format!("chunk {id} does not match its hash")))
    }

    /// As [`fetch_chunks`](Self::fetch_chunks), with the chunk locations
    /// already read.
    ///
    /// # Errors
    /// As [`fetch_chunks`](Self::fetch_chunks).
    pub fn fetch_located(
        &self,
        locs: &HashMap<ChunkId, (ChunkId, PackEntry)>,
        wanted: impl IntoIterator<Item = ChunkId>,
        mut f: impl FnMut(ChunkId, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut by_pack: BTreeMap<ChunkId, Vec<PackEntry>> = BTreeMap::new();
        for id in wanted {
            let (pack, e) = locs.get(&id).ok_or(StoreError::ChunkMissing(id))?;
            by_pack.entry(*pack).or_default().push(*e);
        }
        let packs: Vec<(ChunkId, Vec<PackEntry>)> = by_pack.into_iter().collect();
        for batch in packs.chunks(2) {
            let keys: Vec<String> = batch.iter().map(|(p, _)| format::pack_key(p)).collect();
            for ((pack, entries), body) in batch.iter().zip(self.client.get_many(&keys)?) {
                for e in entries {
                    let value = body
                        .get(e.offset as usize..e.offset as usize + e.len as usize)
                        .ok_or_else(|| StoreError::malformed(format!("s3 pack {pack}"), format!("truncated at chunk {}", e.id)))?;
                    let data = decode_chunk_value(&e.id, value)
                        .map_err(|_| StoreError::malformed(format!("s3 pack {pack}"), format!("chunk {} does not match its hash", e.id)))?;
                    f(e.id, data)?;
                }
            }
        }
        Ok(())
    }
}

impl S3History {
    /// The kept epochs' manifests, oldest first.
    pub fn manifests(&self) -> impl Iterator<Item = &Manifest> {
        self.epochs.iter().map(|e| &e.manifest)
    }

    /// The newest kept epoch.
    #[must_use]
    pub fn latest(&self) -> Option<&S3Epoch> {
        self.epochs.last()
    }

    /// The kept epoch `epoch`.
    #[must_use]
    pub fn get(&self, epoch: EpochId) -> Option<&S3Epoch> {
        self.epochs.binary_search_by_key(&epoch, |e| e.manifest.epoch).ok().map(|i| &self.epochs[i])
    }

    /// The kept epoch nearest `epoch`: the first at or after it when
    /// `after`, else the last at or before it.
    #[must_use]
    pub fn kept_near(&self, epoch: EpochId, after: bool) -> Option<EpochId> {
        let i = self.epochs.partition_point(|e| e.manifest.epoch < epoch);
        if after {
            self.epochs.get(i).map(|e| e.manifest.epoch)
        } else {
            match self.epochs.get(i) {
                Some(e) if e.manifest.epoch == epoch => Some(epoch),
                _ => i.checked_sub(1).map(|j| self.epochs[j].manifest.epoch),
            }
        }
    }

    /// The newest kept epoch paused at or before `time_unix_ns`.
    #[must_use]
    pub fn at(&self, time_unix_ns: u64) -> Option<&S3Epoch> {
        self.epochs.iter().take_while(|e| e.manifest.time_unix_ns <= time_unix_ns).last()
    }

    /// Every page written at or before `epoch`, with its newest version
    /// at or before it (pages never written are zero).
    #[must_use]
    pub fn page_table(&self, epoch: EpochId) -> BTreeMap<Pfn, ChunkId> {
        let mut versions: BTreeMap<Pfn, (EpochId, ChunkId)> = BTreeMap::new();
        let mut put = |pfn: Pfn, e: EpochId, id: ChunkId| {
            if e <= epoch && versions.get(&pfn).is_none_or(|(have, _)| *have < e) {
                versions.insert(pfn, (e, id));
            }
        };
        for ep in &self.epochs {
            for (pfn, id) in &ep.pages {
                put(*pfn, ep.manifest.epoch, *id);
            }
        }
        for b in &self.bridges {
            for (pfn, e, id) in &b.pages {
                put(*pfn, *e, *id);
            }
        }
        versions.into_iter().map(|(p, (_, id))| (p, id)).collect()
    }
}

pub(crate) fn check_epoch(key: &str, guest: GuestId, epoch: EpochId, body: &[u8]) -> Result<S3Epoch, StoreError> {
    let (manifest, pages) = format::decode_epoch(body).map_err(|e| e.at(format!("s3 {key}")))?;
    if manifest.guest != guest || manifest.epoch != epoch {
        return Err(StoreError::malformed(format!("s3 {key}"), "the manifest names another epoch"));
    }
    if pages.len() as u64 != manifest.dirty_pages || page_delta_hash(&pages) != manifest.page_delta {
        return Err(StoreError::malformed(format!("s3 {key}"), "the page list does not match the manifest"));
    }
    Ok(S3Epoch { manifest, pages })
}

/// Walks the chain of kept manifests (see `chain.rs`); returns the first
/// epoch whose link fails, and how.
pub(crate) fn check_chain(epochs: &[S3Epoch], bridges: &[BridgeObject]) -> Result<(), (EpochId, crate::ChainBreak)> {
    let links: Vec<Bridge> = bridges.iter().map(|b| b.bridge).collect();
    let mut walk = ChainWalk::new(&links);
    for e in epochs {
        walk.step(&e.manifest).map_err(|why| (e.manifest.epoch, why))?;
    }
    Ok(())
}
