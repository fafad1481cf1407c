//! Shared identifiers and records of remus.
//!
//! Everything that more than one stage of the pipeline
//! (capture → wan → store → restore) must agree on lives here and nowhere
//! else: the page size, the newtype identifiers, the checkpoint record that
//! capture hands to the sender, and the [`MemoryDigest`] that lets any stage
//! prove that a memory image is the one the primary had at an epoch.

mod bounded;
mod codec;
mod digest;
pub mod format;
mod ids;

pub use bounded::BoundedMap;
pub use codec::{zstd_compress, zstd_decompress_into};
pub use digest::{MemoryDigest, GROUP_PAGES};
pub use format::FormatError;
pub use ids::{ChunkId, EpochId, GuestId, Pfn};

use std::time::{SystemTime, UNIX_EPOCH};

/// Size of one guest page in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Most pages in a guest's page space that remus accepts from a peer: 1 TiB
/// of memory and 1 TiB of disk (a QEMU guest's disk blocks share the page
/// space), and 1024 device-state pages. Every count from the wire that a
/// page count bounds is bounded by this first.
pub const MAX_PAGE_COUNT: u64 = (2 << 40) / PAGE_SIZE as u64 + 1024;

/// Content id of bytes (a page, a device state, a pack): their blake3.
/// The one content hash of remus: what dedup, the store's keys and every
/// verification compare.
#[must_use]
pub fn content_id(data: &[u8]) -> ChunkId {
    ChunkId(*blake3::hash(data).as_bytes())
}

/// Hash of the all-zero page, computed once.
#[must_use]
pub fn zero_page_hash() -> ChunkId {
    static ZERO: std::sync::OnceLock<ChunkId> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| content_id(&[0u8; PAGE_SIZE]))
}

/// True when every byte of `page` is zero (16 bytes at a time).
#[must_use]
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0) && words.remainder().iter().all(|&b| b == 0)
}

/// A page's id: the zero page's id for a page of zeros (found without
/// hashing it), else its content id.
#[must_use]
pub fn page_id(page: &[u8]) -> ChunkId {
    if is_zero_page(page) {
        zero_page_hash()
    } else {
        content_id(page)
    }
}

/// Wall-clock time as nanoseconds since the Unix epoch.
#[must_use]
pub fn now_unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Everything one epoch changed in a guest, as sealed by the capture engine
/// while the guest was paused.
///
/// Invariant: `pages.len() == pfns.len() * PAGE_SIZE`, and page `i` of
/// `pages` is the content of guest page `pfns[i]` at the end of the epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Protected guest.
    pub guest: GuestId,
    /// Epoch this checkpoint closes.
    pub epoch: EpochId,
    /// Wall-clock time of the pause, ns since the Unix epoch.
    pub time_unix_ns: u64,
    /// Guest memory size in pages.
    pub page_count: u64,
    /// Page numbers written during the epoch, ascending.
    pub pfns: Vec<Pfn>,
    /// Their contents, `PAGE_SIZE` bytes each, in the order of `pfns`.
    pub pages: Vec<u8>,
    /// Opaque device state of the guest at the pause.
    pub device_state: Vec<u8>,
    /// How long the guest was paused for this checkpoint, in nanoseconds.
    pub pause_ns: u64,
    /// The pages' ids in the order of `pfns` ([`Checkpoint::page_ids`]),
    /// when taken once for several backups' links; empty when not taken.
    pub hashes: Vec<ChunkId>,
    /// This epoch's output was released when it was sealed, before any
    /// backup committed it: a guest with no history making its first copy
    /// (see `remus_capture::EpochEngine::releasing_ahead`). A backup whose
    /// newest committed epoch is such an epoch does not fail the guest
    /// over: output of epochs it does not hold may have gone out.
    pub released_ahead: bool,
}

impl Checkpoint {
    /// Content of the `i`-th captured page.
    #[must_use]
    pub fn page(&self, i: usize) -> &[u8] {
        &self.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    /// Each page's id ([`page_id`]), in the order of `pfns`.
    #[must_use]
    pub fn page_ids(&self) -> Vec<ChunkId> {
        (0..self.pfns.len()).map(|i| page_id(self.page(i))).collect()
    }
}

/// Checkpoint page buffers handed back once their epoch is acknowledged,
/// for the next checkpoints to copy into: memory already faulted in, where
/// a fresh buffer each epoch cost the kernel zeroing every page of it (an
/// epoch of 1500 pages is 6 MiB, 40 times a second). Keeps at most
/// [`KEPT`](Self::KEPT) buffers of at most [`LARGEST`](Self::LARGEST)
/// bytes each: a first copy's buffer (the guest's whole memory) is let go.
#[derive(Debug, Clone, Default)]
pub struct PagePool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl PagePool {
    /// Buffers kept at most.
    pub const KEPT: usize = 4;
    /// Capacity of the largest buffer kept, bytes.
    pub const LARGEST: usize = 64 << 20;

    /// An empty kept buffer of at least `capacity` bytes, if one is kept.
    #[must_use]
    pub fn take(&self, capacity: usize) -> Option<Vec<u8>> {
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = kept.iter().position(|b| b.capacity() >= capacity)?;
        Some(kept.swap_remove(i))
    }

    /// Hands `buf` back (emptied); dropped when too large, and the
    /// smallest kept let go when more than enough are kept.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > Self::LARGEST {
            return;
        }
        buf.clear();
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.push(buf);
        if kept.len() > Self::KEPT {
            let smallest = kept.iter().enumerate().min_by_key(|(_, b)| b.capacity()).map_or(0, |(i, _)| i);
            kept.swap_remove(smallest);
        }
    }
}

/// Checkpoints of successive epochs of one guest merged into one, as they
/// come: the newest epoch's number, time and device state with every page
/// any of them wrote, at its newest content. It describes the guest at the
/// newest epoch as fully as they did together (for a backup that fell
/// behind: the epochs between are not kept there, only skipped). Each
/// merge takes time in proportion to its own pages, not to what was
/// merged before (a backup cut off for long accumulates up to the guest's
/// whole memory).
#[derive(Debug)]
pub struct MergedCheckpoint {
    /// The newest checkpoint's header and device state (no pages).
    newest: Checkpoint,
    /// Where each page's newest content sits in `pages`.
    slots: std::collections::BTreeMap<Pfn, usize>,
    pages: Vec<u8>,
}

impl MergedCheckpoint {
    /// Starts with `cp`.
    #[must_use]
    pub fn new(cp: Checkpoint) -> Self {
        let slots = cp.pfns.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let mut newest = cp;
        let pages = std::mem::take(&mut newest.pages);
        newest.pfns.clear();
        // Ids of the pages as they were: the merged checkpoint's differ.
        newest.hashes.clear();
        Self { newest, slots, pages }
    }

    /// Merges in `later`.
    ///
    /// # Panics
    /// If `later` is not of a later epoch of the same guest and size.
    pub fn absorb(&mut self, mut later: Checkpoint) {
        let n = &self.newest;
        assert!(later.epoch > n.epoch && later.guest == n.guest && later.page_count == n.page_count, "absorbing a later checkpoint");
        for (i, pfn) in later.pfns.iter().enumerate() {
            match self.slots.get(pfn) {
                Some(&s) => self.pages[s * PAGE_SIZE..(s + 1) * PAGE_SIZE].copy_from_slice(later.page(i)),
                None => {
                    self.slots.insert(*pfn, self.pages.len() / PAGE_SIZE);
                    self.pages.extend_from_slice(later.page(i));
                }
            }
        }
        (later.pfns, later.pages, later.hashes) = (Vec::new(), Vec::new(), Vec::new());
        self.newest = later;
    }

    /// The merged checkpoint (pages in ascending order).
    #[must_use]
    pub fn into_checkpoint(self) -> Checkpoint {
        let mut pages = Vec::with_capacity(self.pages.len());
        for s in self.slots.values() {
            pages.extend_from_slice(&self.pages[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]);
        }
        Checkpoint { pfns: self.slots.into_keys().collect(), pages, ..self.newest }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_page_pool_keeps_a_few_buffers_not_too_large_and_lets_the_smallest_go() {
        let pool = PagePool::default();
        pool.give(Vec::with_capacity(PagePool::LARGEST + 1));
        assert!(pool.take(0).is_none(), "a buffer past the largest is let go");
        for pages in 1..=PagePool::KEPT + 1 {
            pool.give(vec![7u8; pages * PAGE_SIZE]);
        }
        assert!(pool.take((PagePool::KEPT + 2) * PAGE_SIZE).is_none(), "none that large");
        let mut capacities: Vec<usize> = std::iter::from_fn(|| pool.take(0))
            .map(|b| {
                assert!(b.is_empty(), "handed out emptied");
                b.capacity() / PAGE_SIZE
            })
            .collect();
        capacities.sort_unstable();
        assert_eq!(capacities, (2..=PagePool::KEPT + 1).collect::<Vec<_>>(), "the smallest let go");
    }

    fn checkpoint(epoch: u64, writes: &std::collections::BTreeMap<u64, u8>) -> Checkpoint {
        Checkpoint {
            guest: GuestId(1),
            epoch: EpochId(epoch),
            time_unix_ns: epoch,
            page_count: 32,
            pfns: writes.keys().map(|p| Pfn(*p)).collect(),
            pages: writes.values().flat_map(|v| [*v; PAGE_SIZE]).collect(),
            device_state: vec![epoch as u8],
            pause_ns: epoch,
            hashes: Vec::new(),
            // A first copy's epochs come first; any rule serves here.
            released_ahead: epoch <= 2,
        }
    }

    fn apply(memory: &mut [u8], cp: &Checkpoint) {
        for (i, pfn) in cp.pfns.iter().enumerate() {
            let at = pfn.0 as usize * PAGE_SIZE;
            memory[at..at + PAGE_SIZE].copy_from_slice(cp.page(i));
        }
    }

    proptest! {
        /// A merged checkpoint brings memory to the same state as its
        /// epochs applied one by one, and is itself a well-formed
        /// checkpoint of the last epoch (pages ascending, each once).
        #[test]
        fn absorbing_later_checkpoints_yields_the_state_they_reach(
            epochs in proptest::collection::vec(proptest::collection::btree_map(0u64..32, any::<u8>(), 0..12), 1..6)
        ) {
            // Each with its pages' ids taken (as for several links): the
            // merged checkpoint's are its own.
            let cps: Vec<Checkpoint> = epochs
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let mut cp = checkpoint(i as u64 + 1, w);
                    cp.hashes = cp.page_ids();
                    cp
                })
                .collect();
            let (mut one_by_one, mut merged_memory) = (vec![0u8; 32 * PAGE_SIZE], vec![0u8; 32 * PAGE_SIZE]);
            for cp in &cps {
                apply(&mut one_by_one, cp);
            }
            let mut merging = MergedCheckpoint::new(cps[0].clone());
            for cp in &cps[1..] {
                merging.absorb(cp.clone());
            }
            let merged = merging.into_checkpoint();
            apply(&mut merged_memory, &merged);
            prop_assert_eq!(one_by_one, merged_memory);
            prop_assert!(merged.pfns.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(merged.pages.len(), merged.pfns.len() * PAGE_SIZE);
            prop_assert_eq!(merged.epoch, EpochId(cps.len() as u64));
            prop_assert!(merged.hashes.is_empty() || merged.hashes == merged.page_ids(), "stale page ids");
            prop_assert_eq!(merged.device_state, vec![cps.len() as u8]);
            prop_assert_eq!(merged.released_ahead, cps.len() <= 2, "the last epoch's: committing it commits the rest");
        }
    }
}
