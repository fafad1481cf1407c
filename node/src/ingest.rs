//! Ingest at the backup: received epochs decoded, verified and turned
//! into store commits.
//!
//! Each page record is decoded and verified against its hash before
//! anything is written (`Raw` pages are stored as the zstd frame that
//! arrived; `Xor` pages are rebuilt against their base and compressed;
//! `Ref` pages must name a chunk already held). A reference or XOR base
//! the store no longer holds (GC deleted it after the primary sent it) is
//! collected, not failed on: the caller refuses the whole group naming
//! every such chunk, and the primary sends it again in full.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use remus_store::{EpochCommit, Store, StoreError, StoredChunk};
use remus_types::{zero_page_hash, BoundedMap, ChunkId, EpochId, GuestId, Pfn};

use crate::admission::Lineage;
use remus_wan::{CommitError, PageEncoding, ReceivedEpoch};

/// Pages decoded in one commit group, by hash, not yet in the store.
pub type Staged = HashMap<ChunkId, Arc<Vec<u8>>>;

/// A decoded commit group: the commits, and the pages they carry.
pub struct Decoded {
    /// One commit per epoch, in order.
    pub commits: Vec<EpochCommit>,
    /// Every page the group carried, by hash.
    pub staged: Staged,
}

/// Decodes and verifies received epochs against a store.
pub struct Ingest {
    /// Recently committed pages by hash: most XOR bases and references
    /// name a page committed a few epochs ago, and reading it back from
    /// the store costs a blob read, a decompression and a re-hash.
    /// Invariant: only pages durably committed are inserted.
    cache: Mutex<BoundedMap<ChunkId, Arc<Vec<u8>>>>,
    store: Arc<Store>,
}

impl Ingest {
    /// An ingest for `store` with a cache of `cache_pages` pages.
    #[must_use]
    pub fn new(store: Arc<Store>, cache_pages: usize) -> Self {
        Self { cache: Mutex::new(BoundedMap::new(cache_pages)), store }
    }

    /// The page with hash `id`, from `staged`, the cache or the store.
    ///
    /// # Errors
    /// The store's read error.
    pub fn page(&self, id: &ChunkId, staged: &Staged) -> Result<Arc<Vec<u8>>, StoreError> {
        match staged.get(id).cloned().or_else(|| self.cache.lock().get(id).cloned()) {
            Some(p) => Ok(p),
            None => Ok(Arc::new(self.store.chunk(id)?)),
        }
    }

    /// Remembers the pages of a group that is now durably committed.
    pub fn committed(&self, staged: Staged) {
        let mut cache = self.cache.lock();
        for (id, page) in staged {
            cache.insert(id, page);
        }
    }

    /// Decodes and verifies a commit group written by `lineage`.
    ///
    /// # Errors
    /// [`CommitError::Missing`] naming every reference or XOR base the
    /// store does not hold; [`CommitError::BadPage`] for a page that does
    /// not decode to its hash; [`CommitError::Storage`] for a store read
    /// that fails.
    pub fn decode(&self, epochs: Vec<ReceivedEpoch>, lineage: Lineage) -> Result<Decoded, CommitError> {
        let mut staged = Staged::new();
        let mut missing = Vec::new();
        // What the group names by hash (references, XOR bases) that this
        // guest holds, in one batched lookup.
        let mut named: Vec<(GuestId, ChunkId)> = epochs
            .iter()
            .flat_map(|e| {
                e.records.iter().filter_map(move |r| match &r.encoding {
                    PageEncoding::Ref => Some((e.header.guest, r.hash)),
                    PageEncoding::Xor { base, .. } => Some((e.header.guest, *base)),
                    _ => None,
                })
            })
            .collect();
        named.sort_unstable();
        named.dedup();
        let mut held = HashSet::new();
        for guest in named.iter().map(|(g, _)| *g).collect::<std::collections::BTreeSet<_>>() {
            let ids: Vec<ChunkId> = named.iter().filter(|(g, _)| *g == guest).map(|(_, id)| *id).collect();
            let found = self.store.held(guest, &ids).map_err(storage)?;
            held.extend(ids.into_iter().zip(found).filter(|(_, h)| *h).map(|(id, _)| (guest, id)));
        }
        let commits =
            epochs.into_iter().map(|e| self.decode_epoch(e, lineage, &held, &mut staged, &mut missing)).collect::<Result<Vec<_>, _>>()?;
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            return Err(CommitError::Missing(missing));
        }
        Ok(Decoded { commits, staged })
    }

    /// Decodes and verifies one epoch. `staged` holds pages decoded earlier
    /// in the same group. A reference or XOR base that is not held goes
    /// into `missing` (and its page is left out).
    fn decode_epoch(
        &self,
        e: ReceivedEpoch,
        lineage: Lineage,
        held: &HashSet<(GuestId, ChunkId)>,
        staged: &mut Staged,
        missing: &mut Vec<ChunkId>,
    ) -> Result<EpochCommit, CommitError> {
        let h = e.header;
        let mut c = EpochCommit {
            guest: h.guest,
            epoch: h.epoch,
            follows: Some(h.follows).filter(|f| f.next() != h.epoch),
            instance: lineage.instance,
            generation: lineage.generation,
            time_unix_ns: h.time_unix_ns,
            page_count: h.page_count,
            memory_root: e.memory_root,
            pause_ns: h.pause_ns,
            wire_bytes: e.wire_bytes,
            pages: Vec::with_capacity(e.records.len()),
            chunks: Vec::new(),
            device_state: e.device_state,
            // The store's clock at commit: the primary's time is a claim.
            commit_unix_ns: 0,
        };
        for r in e.records {
            let fail = |cause| CommitError::BadPage { epoch: h.epoch, pfn: r.pfn.0, cause };
            match &r.encoding {
                PageEncoding::Zero => {}
                PageEncoding::Ref => {
                    // Only what this guest holds (the store's per-guest
                    // set), so the answer says nothing of other guests; GC
                    // may still collect it before the commit, which checks
                    // again and names it if so.
                    if !staged.contains_key(&r.hash) && !held.contains(&(h.guest, r.hash)) {
                        missing.push(r.hash);
                        continue;
                    }
                }
                PageEncoding::Xor { base, delta } => {
                    // A base this guest does not hold is missing, whoever
                    // else holds it.
                    if !staged.contains_key(base) && !held.contains(&(h.guest, *base)) {
                        missing.push(*base);
                        continue;
                    }
                    // A damaged or missing base is named as such, not as a
                    // decoding error of this page.
                    let base_page = match self.page(base, staged) {
                        // A page read from the store is not shared: no copy.
                        Ok(p) => Arc::try_unwrap(p).unwrap_or_else(|shared| shared.to_vec()),
                        Err(StoreError::ChunkMissing(_)) => {
                            missing.push(*base);
                            continue;
                        }
                        Err(e) => return Err(storage(e)),
                    };
                    let page = r.decode_page(|_| Some(base_page)).map_err(fail)?;
                    // Kept as the wire carried it: the store keeps the
                    // delta (or makes it whole when its chain is deep).
                    c.chunks.push((r.hash, StoredChunk::delta(base, delta)));
                    staged.insert(r.hash, Arc::new(page));
                }
                PageEncoding::RawZstd(z) => {
                    let page = r.decode_page(|_| None).map_err(fail)?;
                    c.chunks.push((r.hash, StoredChunk::Zstd(z.clone())));
                    staged.insert(r.hash, Arc::new(page));
                }
                PageEncoding::RawPlain(p) => {
                    r.decode_page(|_| None).map_err(fail)?;
                    c.chunks.push((r.hash, StoredChunk::Plain(p.clone())));
                    staged.insert(r.hash, Arc::new(p.clone()));
                }
            }
            let hash = if r.encoding == PageEncoding::Zero { zero_page_hash() } else { r.hash };
            c.pages.push((r.pfn, hash));
        }
        if lineage.continues_after.map(EpochId::next) == Some(h.epoch) {
            zero_fill(&mut c.pages, h.page_count);
        }
        Ok(c)
    }
}

/// Records every page of a `page_count`-page memory that `pages` does not
/// name as a zero page: the first epoch of a run that continues another
/// run's history carries the pages its guest wrote since it started from
/// zeros, and none of the earlier run's pages may show through.
fn zero_fill(pages: &mut Vec<(Pfn, ChunkId)>, page_count: u64) {
    let mut named = vec![false; usize::try_from(page_count).unwrap_or(usize::MAX)];
    for (pfn, _) in pages.iter() {
        if let Some(n) = named.get_mut(usize::try_from(pfn.0).unwrap_or(usize::MAX)) {
            *n = true;
        }
    }
    let zero = zero_page_hash();
    pages.extend(named.iter().enumerate().filter(|(_, n)| !**n).map(|(pfn, _)| (Pfn(pfn as u64), zero)));
}

/// A store failure as a commit error (full disks told apart).
#[must_use]
pub fn storage(e: StoreError) -> CommitError {
    CommitError::Storage { no_space: e.kind() == remus_store::ErrorKind::NoSpace, cause: Box::new(e) }
}
