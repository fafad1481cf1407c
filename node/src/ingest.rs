//! Ingest at the backup: received epochs turned into store commits.
//!
//! Each page record becomes the chunk it names (`Raw` pages as the zstd
//! frame that arrived, `Xor` pages as the delta over their base) with
//! its shape checked here (one page's worth); the store decodes every
//! chunk and checks it against its hash before anything is written, and
//! keeps what it verified in memory for the deltas of the next epochs.
//! A reference or XOR base the store no longer holds (GC deleted it after
//! the primary sent it) is collected, not failed on: the caller refuses
//! the whole group naming every such chunk, and the primary sends it
//! again in full.

use std::collections::HashSet;
use std::sync::Arc;

use remus_store::{EpochCommit, Store, StoreError, StoredChunk};
use remus_types::{zero_page_hash, ChunkId, GuestId, Pfn, PAGE_SIZE};

use crate::admission::Lineage;
use remus_wan::{CommitError, DecodeError, PageEncoding, ReceivedEpoch};

/// Turns received epochs into commits against a store.
pub struct Ingest {
    store: Arc<Store>,
}

impl Ingest {
    /// An ingest for `store`.
    #[must_use]
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// The commits of a group written by `lineage`.
    ///
    /// # Errors
    /// [`CommitError::Missing`] naming every reference or XOR base the
    /// store does not hold; [`CommitError::BadPage`] for a page that is
    /// not one page's worth; [`CommitError::Storage`] for a store read
    /// that fails.
    pub fn decode(&self, epochs: Vec<ReceivedEpoch>, lineage: Lineage) -> Result<Vec<EpochCommit>, CommitError> {
        let mut carried = HashSet::new();
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
            epochs.into_iter().map(|e| decode_epoch(e, lineage, &held, &mut carried, &mut missing)).collect::<Result<Vec<_>, _>>()?;
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            return Err(CommitError::Missing(missing));
        }
        Ok(commits)
    }
}

/// One epoch's commit. `carried` holds the pages earlier epochs of the
/// same group carried. A reference or XOR base that is not held goes into
/// `missing` (and its page is left out).
fn decode_epoch(
    e: ReceivedEpoch,
    lineage: Lineage,
    held: &HashSet<(GuestId, ChunkId)>,
    carried: &mut HashSet<ChunkId>,
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
        released_ahead: h.released_ahead,
        pages: Vec::with_capacity(e.records.len()),
        chunks: Vec::new(),
        device_state: e.device_state,
        // The store's clock at commit: the primary's time is a claim.
        commit_unix_ns: 0,
    };
    for r in e.records {
        let bad = |cause| CommitError::BadPage { epoch: h.epoch, pfn: r.pfn.0, cause };
        // Only what this guest holds (the store's per-guest set), so the
        // answer says nothing of other guests; GC may still collect it
        // before the commit, which checks again and names it if so.
        let named = match &r.encoding {
            PageEncoding::Ref => Some(&r.hash),
            PageEncoding::Xor { base, .. } => Some(base),
            _ => None,
        };
        if let Some(id) = named.filter(|id| !carried.contains(*id) && !held.contains(&(h.guest, **id))) {
            missing.push(*id);
            continue;
        }
        match &r.encoding {
            PageEncoding::Zero | PageEncoding::Ref => {}
            // Kept as the wire carried it: the store checks it against
            // its hash and keeps the delta (or makes it whole when its
            // chain is deep).
            PageEncoding::Xor { base, delta } => c.chunks.push((r.hash, StoredChunk::delta(base, delta))),
            PageEncoding::RawZstd(z) => {
                if !matches!(zstd::zstd_safe::get_frame_content_size(z), Ok(Some(n)) if n == PAGE_SIZE as u64) {
                    return Err(bad(DecodeError::Corrupt("a zstd page that is not one 4096-byte frame")));
                }
                c.chunks.push((r.hash, StoredChunk::Zstd(z.clone())));
            }
            PageEncoding::RawPlain(p) => {
                if p.len() != PAGE_SIZE {
                    return Err(bad(DecodeError::Corrupt("a plain page that is not 4096 bytes")));
                }
                c.chunks.push((r.hash, StoredChunk::Plain(p.clone())));
            }
        }
        if !matches!(r.encoding, PageEncoding::Zero | PageEncoding::Ref) {
            carried.insert(r.hash);
        }
        let hash = if r.encoding == PageEncoding::Zero { zero_page_hash() } else { r.hash };
        c.pages.push((r.pfn, hash));
    }
    // The first epoch of the run (merged or not) follows where it continues.
    if lineage.continues_after == Some(h.follows) {
        zero_fill(&mut c.pages, h.page_count);
    }
    Ok(c)
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

/// A store failure as a commit error: a page whose content does not
/// match its hash as a bad page, full disks told apart.
#[must_use]
pub fn storage(e: StoreError) -> CommitError {
    if let StoreError::Mismatch { epoch, pfn: Some(pfn), .. } = e {
        return CommitError::BadPage { epoch, pfn, cause: DecodeError::HashMismatch { pfn } };
    }
    CommitError::Storage { no_space: e.kind() == remus_store::ErrorKind::NoSpace, cause: Box::new(e) }
}
