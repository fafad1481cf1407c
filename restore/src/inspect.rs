//! Looking into the history without restoring it: what an epoch holds
//! ([`show`]) and what changed between two epochs ([`diff`]), from the
//! page index alone (and the changed pages' chunks, for the byte ranges),
//! and when a condition on memory first held ([`bisect`]); over either
//! tier ([`HistoryView`]: the local store, or the S3 tier alone).

use std::ops::Range;

use remus_store::{Manifest, Store, StoreError};
use remus_types::{zero_page_hash, ChunkId, EpochId, GuestId, Pfn, PAGE_SIZE};
use remus_vm::QemuState;

use crate::{RestoreError, S3Source};

/// A guest's history as inspection reads it: kept epochs' manifests and
/// page lists, the page table at any kept epoch, and chunks, each
/// verified against its id.
pub trait HistoryView: Sync {
    /// The manifest of kept epoch `epoch`.
    ///
    /// # Errors
    /// An epoch that is not kept; the tier's errors.
    fn manifest(&self, guest: GuestId, epoch: EpochId) -> Result<Manifest, RestoreError>;

    /// The pages written in `epoch` (its page list).
    ///
    /// # Errors
    /// As [`HistoryView::manifest`].
    fn epoch_pages(&self, guest: GuestId, epoch: EpochId) -> Result<Vec<(Pfn, ChunkId)>, RestoreError>;

    /// Each page whose pfn lies in `pfns` and was written at or before
    /// `epoch`, in its newest version at or before it, ascending pfn.
    ///
    /// # Errors
    /// The tier's errors, or what `f` returns.
    fn pages_in(
        &self,
        guest: GuestId,
        epoch: EpochId,
        pfns: Range<u64>,
        f: &mut dyn FnMut(Pfn, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), RestoreError>;

    /// A chunk's bytes, verified against its id.
    ///
    /// # Errors
    /// A missing or damaged chunk; the tier's errors.
    fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError>;

    /// Each page whose content at `b` differs from its content at `a`
    /// (`a < b`), ascending pfn, with both hashes (a page not written by
    /// then is the zero page). By default from the two page tables.
    ///
    /// # Errors
    /// The tier's errors, or what `f` returns.
    fn changes(
        &self,
        guest: GuestId,
        a: EpochId,
        b: EpochId,
        f: &mut dyn FnMut(Pfn, ChunkId, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), RestoreError> {
        let (ta, tb) = (table(self, guest, a)?, table(self, guest, b)?);
        let zero = zero_page_hash();
        let (mut i, mut j) = (0, 0);
        // Both tables ascend by pfn; a page absent from one is zero there.
        while i < ta.len() || j < tb.len() {
            let pa = ta.get(i).map_or(u64::MAX, |p| p.0 .0);
            let pb = tb.get(j).map_or(u64::MAX, |p| p.0 .0);
            let pfn = pa.min(pb);
            let before = if pa == pfn { ta[i].1 } else { zero };
            let after = if pb == pfn { tb[j].1 } else { zero };
            i += usize::from(pa == pfn);
            j += usize::from(pb == pfn);
            if before != after {
                f(Pfn(pfn), before, after)?;
            }
        }
        Ok(())
    }

    /// The kept epoch nearest `epoch`: the first at or after it when
    /// `after`, else the last at or before it.
    ///
    /// # Errors
    /// The tier's errors.
    fn kept_epoch_near(&self, guest: GuestId, epoch: EpochId, after: bool) -> Result<Option<EpochId>, RestoreError>;
}

impl HistoryView for Store {
    fn manifest(&self, guest: GuestId, epoch: EpochId) -> Result<Manifest, RestoreError> {
        Ok(Store::manifest(self, guest, epoch)?)
    }

    fn epoch_pages(&self, guest: GuestId, epoch: EpochId) -> Result<Vec<(Pfn, ChunkId)>, RestoreError> {
        Ok(Store::epoch_pages(self, guest, epoch)?)
    }

    fn pages_in(
        &self,
        guest: GuestId,
        epoch: EpochId,
        pfns: Range<u64>,
        f: &mut dyn FnMut(Pfn, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), RestoreError> {
        Ok(self.for_each_page_in(guest, epoch, pfns, f)?)
    }

    fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        Store::chunk(self, id)
    }

    fn changes(
        &self,
        guest: GuestId,
        a: EpochId,
        b: EpochId,
        f: &mut dyn FnMut(Pfn, ChunkId, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), RestoreError> {
        let zero = zero_page_hash();
        Ok(self.for_each_change(guest, a, b, |pfn, before, after| {
            let before = before.unwrap_or(zero);
            if before == after {
                return Ok(());
            }
            f(pfn, before, after)
        })?)
    }

    fn kept_epoch_near(&self, guest: GuestId, epoch: EpochId, after: bool) -> Result<Option<EpochId>, RestoreError> {
        Ok(Store::kept_epoch_near(self, guest, epoch, after)?)
    }
}

/// The S3 tier read for inspection: its history (as [`S3Source::read`]
/// reads it) and the chunk locations, read once when a chunk is first
/// wanted ([`S3Source::locations`]); each chunk is one ranged read of its
/// pack.
pub struct S3View<'a> {
    source: S3Source<'a>,
}

impl<'a> S3View<'a> {
    /// Inspection over `source`.
    #[must_use]
    pub fn new(source: S3Source<'a>) -> Self {
        Self { source }
    }

    fn epoch(&self, guest: GuestId, epoch: EpochId) -> Result<&remus_store::s3::S3Epoch, RestoreError> {
        self.source.kept(guest, epoch).ok_or(RestoreError::Store(StoreError::NoEpoch { guest, epoch }))
    }
}

impl HistoryView for S3View<'_> {
    fn manifest(&self, guest: GuestId, epoch: EpochId) -> Result<Manifest, RestoreError> {
        Ok(self.epoch(guest, epoch)?.manifest.clone())
    }

    fn epoch_pages(&self, guest: GuestId, epoch: EpochId) -> Result<Vec<(Pfn, ChunkId)>, RestoreError> {
        Ok(self.epoch(guest, epoch)?.pages.clone())
    }

    fn pages_in(
        &self,
        guest: GuestId,
        epoch: EpochId,
        pfns: Range<u64>,
        f: &mut dyn FnMut(Pfn, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), RestoreError> {
        self.epoch(guest, epoch)?;
        for (pfn, id) in self.source.history().page_table(epoch).range(Pfn(pfns.start)..Pfn(pfns.end)) {
            f(*pfn, *id)?;
        }
        Ok(())
    }

    fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        self.source.chunk(id)
    }

    fn kept_epoch_near(&self, guest: GuestId, epoch: EpochId, after: bool) -> Result<Option<EpochId>, RestoreError> {
        Ok(if guest == self.source.guest() { self.source.history().kept_near(epoch, after) } else { None })
    }
}

/// What one epoch holds, beyond its manifest.
#[derive(Debug, Clone)]
pub struct EpochSummary {
    /// The manifest.
    pub manifest: Manifest,
    /// Its id (what the next epoch names as parent).
    pub id: ChunkId,
    /// Pages its page list names (written in the epoch).
    pub pages: u64,
    /// Of those, pages written as zeros.
    pub zero_pages: u64,
    /// Distinct non-zero contents among them.
    pub distinct_contents: u64,
    /// The guest's page-space layout, for a QEMU guest.
    pub vm: Option<QemuState>,
}

/// Summarises `epoch` of `guest`.
///
/// # Errors
/// [`RestoreError::Store`] for an epoch that is not there or a damaged
/// record.
pub fn show<H: HistoryView + ?Sized>(store: &H, guest: GuestId, epoch: EpochId) -> Result<EpochSummary, RestoreError> {
    let manifest = store.manifest(guest, epoch)?;
    let list = store.epoch_pages(guest, epoch)?;
    let zero = zero_page_hash();
    let mut contents: Vec<ChunkId> = list.iter().map(|(_, id)| *id).filter(|id| *id != zero).collect();
    let zero_pages = (list.len() - contents.len()) as u64;
    contents.sort_unstable();
    contents.dedup();
    let vm = vm_layout(store, &manifest)?;
    Ok(EpochSummary { id: manifest.id(), pages: list.len() as u64, zero_pages, distinct_contents: contents.len() as u64, manifest, vm })
}

fn vm_layout<H: HistoryView + ?Sized>(store: &H, m: &Manifest) -> Result<Option<QemuState>, RestoreError> {
    let ds = store.chunk(&m.device_state)?;
    Ok(QemuState::decode(&ds).map_err(|e| StoreError::malformed("device state", e.to_string()))?)
}

/// Which part of a guest's page space a page lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Region {
    /// Memory (all of a process guest's pages; a QEMU guest's RAM, at
    /// guest-physical address `pfn × 4096`).
    Memory,
    /// A QEMU guest's disk: block `pfn - disk_pfn`.
    Disk,
    /// A QEMU guest's device state pages.
    DeviceState,
}

/// One page that differs between two epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageChange {
    /// The page.
    pub pfn: Pfn,
    /// Where it lies.
    pub region: Region,
    /// Its offset within the region: a guest-physical address for
    /// memory, a byte offset into the disk, into the device state.
    pub offset: u64,
    /// Its content at the first epoch and at the second.
    pub before: ChunkId,
    /// Its content at the second epoch.
    pub after: ChunkId,
    /// The byte ranges (start, end) within the page that differ.
    pub ranges: Vec<(u16, u16)>,
}

/// What changed between two epochs.
#[derive(Debug, Clone)]
pub struct Diff {
    /// The earlier epoch.
    pub from: EpochId,
    /// The later one.
    pub to: EpochId,
    /// Every page whose content differs, by pfn.
    pub pages: Vec<PageChange>,
}

impl Diff {
    /// Pages and differing bytes per region.
    #[must_use]
    pub fn by_region(&self) -> Vec<(Region, u64, u64)> {
        let mut out: Vec<(Region, u64, u64)> = Vec::new();
        for p in &self.pages {
            let bytes: u64 = p.ranges.iter().map(|(a, b)| u64::from(b - a)).sum();
            match out.iter_mut().find(|(r, _, _)| *r == p.region) {
                Some(e) => (e.1, e.2) = (e.1 + 1, e.2 + bytes),
                None => out.push((p.region, 1, bytes)),
            }
        }
        out.sort_by_key(|(r, _, _)| *r);
        out
    }
}

/// The pages of `guest` whose content differs between epochs `from` and
/// `to` (either order), from the page index at each; with the byte ranges
/// that differ, read from the changed pages' chunks (each verified).
///
/// # Errors
/// [`RestoreError::Store`] for an epoch that is not there (or was
/// thinned), a damaged record or chunk.
pub fn diff<H: HistoryView + ?Sized>(store: &H, guest: GuestId, from: EpochId, to: EpochId) -> Result<Diff, RestoreError> {
    let (from, to) = (from.min(to), from.max(to));
    let mb = store.manifest(guest, to)?;
    store.manifest(guest, from)?;
    let vm = vm_layout(store, &mb)?;
    let mut changed = Vec::new();
    store.changes(guest, from, to, &mut |pfn, before, after| {
        changed.push((pfn, before, after));
        Ok(())
    })?;
    // The byte ranges need both contents of every changed page: read and
    // compared on two threads (reading a chunk verifies and decompresses it).
    let ranges = |part: &[(Pfn, ChunkId, ChunkId)]| -> Result<Vec<Vec<(u16, u16)>>, StoreError> {
        part.iter().map(|(_, before, after)| Ok(differing(&content(store, before)?, &content(store, after)?))).collect()
    };
    let (first, second) = changed.split_at(changed.len() / 2);
    let (r1, r2) = std::thread::scope(|s| {
        let t = s.spawn(|| ranges(second));
        (ranges(first), t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    let pages = changed
        .iter()
        .zip(r1?.into_iter().chain(r2?))
        .map(|(&(pfn, before, after), ranges)| {
            let (region, offset) = locate(vm.as_ref(), pfn.0);
            PageChange { pfn, region, offset, before, after, ranges }
        })
        .collect();
    Ok(Diff { from, to, pages })
}

fn table<H: HistoryView + ?Sized>(store: &H, guest: GuestId, epoch: EpochId) -> Result<Vec<(Pfn, ChunkId)>, RestoreError> {
    let mut t = Vec::new();
    store.pages_in(guest, epoch, 0..u64::MAX, &mut |pfn, id| {
        t.push((pfn, id));
        Ok(())
    })?;
    t.sort_unstable_by_key(|(pfn, _)| *pfn);
    Ok(t)
}

fn content<H: HistoryView + ?Sized>(store: &H, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
    if *id == zero_page_hash() {
        Ok(vec![0; PAGE_SIZE])
    } else {
        store.chunk(id)
    }
}

fn locate(vm: Option<&QemuState>, pfn: u64) -> (Region, u64) {
    let page = PAGE_SIZE as u64;
    match vm {
        Some(s) if pfn >= s.vmstate_pfn() => (Region::DeviceState, (pfn - s.vmstate_pfn()) * page),
        Some(s) if pfn >= s.disk_pfn() => (Region::Disk, (pfn - s.disk_pfn()) * page),
        _ => (Region::Memory, pfn * page),
    }
}

/// The runs of bytes where `a` and `b` differ, as (start, end) offsets.
fn differing(a: &[u8], b: &[u8]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let mut start = None;
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        match (x != y, start) {
            (true, None) => start = Some(k),
            (false, Some(s)) => {
                out.push((s as u16, k as u16));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s as u16, a.len().min(b.len()) as u16));
    }
    out
}

/// A condition on a guest's memory at an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    /// The bytes at `address` are `value`.
    Equals {
        /// Byte offset into the page space (a guest-physical address for
        /// memory).
        address: u64,
        /// The bytes.
        value: Vec<u8>,
    },
    /// `pattern` appears somewhere in `start..end`.
    Contains {
        /// First byte of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// The bytes.
        pattern: Vec<u8>,
    },
    /// The `len` bytes at `address` differ from what they were at the
    /// first epoch of the search.
    Changed {
        /// Where.
        address: u64,
        /// How many bytes.
        len: u64,
    },
}

impl Predicate {
    /// The bytes it reads.
    fn range(&self) -> (u64, u64) {
        match self {
            Self::Equals { address, value } => (*address, value.len() as u64),
            Self::Contains { start, end, .. } => (*start, end.saturating_sub(*start)),
            Self::Changed { address, len } => (*address, *len),
        }
    }

    fn holds(&self, bytes: &[u8], first: &[u8]) -> bool {
        match self {
            Self::Equals { value, .. } => bytes == value.as_slice(),
            Self::Contains { pattern, .. } => !pattern.is_empty() && bytes.windows(pattern.len()).any(|w| w == pattern.as_slice()),
            Self::Changed { .. } => bytes != first,
        }
    }
}

/// What a bisection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bisection {
    /// The first epoch (among those kept) at which the predicate holds,
    /// when it holds at the last one and not at the first.
    pub first: Option<EpochId>,
    /// Whether it held at the first and at the last epoch of the search.
    pub ends: (bool, bool),
    /// Every epoch read, in order, and whether the predicate held there.
    pub probes: Vec<(EpochId, bool)>,
}

/// The bytes `address..address + len` of `guest`'s page space at `epoch`,
/// from the page index and the pages' chunks (each verified).
///
/// # Errors
/// [`RestoreError::Store`] for an epoch that is not there, a range beyond
/// the page space, a damaged record or chunk.
pub fn read_bytes<H: HistoryView + ?Sized>(
    store: &H,
    guest: GuestId,
    epoch: EpochId,
    address: u64,
    len: u64,
) -> Result<Vec<u8>, RestoreError> {
    let m = store.manifest(guest, epoch)?;
    let page = PAGE_SIZE as u64;
    let end = address
        .checked_add(len)
        .filter(|e| *e <= m.page_count * page)
        .ok_or_else(|| StoreError::malformed("range", format!("{address:#x}+{len} lies beyond the guest's {} pages", m.page_count)))?;
    let mut out = vec![0u8; usize::try_from(len).map_err(|_| StoreError::malformed("range", "too long"))?];
    let (first, last) = (address / page, end.div_ceil(page));
    let mut err = None;
    store.pages_in(guest, epoch, first..last, &mut |pfn, id| {
        if id == zero_page_hash() {
            return Ok(());
        }
        let bytes = store.chunk(&id)?;
        let (p0, p1) = (pfn.0 * page, (pfn.0 + 1) * page);
        let (a, b) = (address.max(p0), end.min(p1));
        if a < b {
            out[(a - address) as usize..(b - address) as usize].copy_from_slice(&bytes[(a - p0) as usize..(b - p0) as usize]);
        } else {
            err = Some(pfn);
        }
        Ok(())
    })?;
    if let Some(pfn) = err {
        return Err(StoreError::malformed("page index", format!("page {} outside the pages asked for", pfn.0)).into());
    }
    Ok(out)
}

/// The first epoch between `from` and `to` at which `p` holds, by
/// bisection over the epochs kept there: it reads the predicate's bytes
/// at both ends and then at about log2(n) epochs. Exact when the predicate,
/// once it holds, holds at every later epoch (a value written once and
/// kept); otherwise it finds *an* epoch where it starts to hold.
///
/// # Errors
/// As [`read_bytes`]; either end not being a kept epoch.
pub fn bisect<H: HistoryView + ?Sized>(
    store: &H,
    guest: GuestId,
    from: EpochId,
    to: EpochId,
    p: &Predicate,
) -> Result<Bisection, RestoreError> {
    let (address, len) = p.range();
    let initial = read_bytes(store, guest, from, address, len)?;
    let mut probes = Vec::new();
    let mut probe = |e: EpochId| -> Result<bool, RestoreError> {
        let holds = p.holds(&read_bytes(store, guest, e, address, len)?, &initial);
        probes.push((e, holds));
        Ok(holds)
    };
    let ends = (probe(from)?, probe(to)?);
    if ends != (false, true) {
        return Ok(Bisection { first: None, ends, probes });
    }
    // Invariant: it does not hold at `lo`, it holds at `hi`.
    let (mut lo, mut hi) = (from, to);
    loop {
        let mid = EpochId(lo.0 + (hi.0 - lo.0) / 2);
        // The kept epoch nearest the middle, strictly between lo and hi.
        let up = store.kept_epoch_near(guest, mid.max(lo.next()), true)?.filter(|e| *e < hi);
        let down = || store.kept_epoch_near(guest, mid, false).map(|e| e.filter(|e| *e > lo));
        let Some(m) = (match up {
            Some(e) => Some(e),
            None => down()?,
        }) else {
            break;
        };
        if probe(m)? {
            hi = m;
        } else {
            lo = m;
        }
    }
    Ok(Bisection { first: Some(hi), ends, probes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_store::{EpochCommit, StoreOptions, StoredChunk};
    use remus_types::content_id;

    fn page(fill: u8, at: &[(usize, u8)]) -> Vec<u8> {
        let mut p = vec![fill; PAGE_SIZE];
        for &(k, v) in at {
            p[k] = v;
        }
        p
    }

    fn commit(store: &Store, epoch: u64, pages: &[(u64, Vec<u8>)]) {
        let mut c = EpochCommit { guest: GuestId(1), epoch: EpochId(epoch), page_count: 8, time_unix_ns: epoch, ..Default::default() };
        for (pfn, p) in pages {
            let id = if p.iter().all(|b| *b == 0) { zero_page_hash() } else { content_id(p) };
            c.pages.push((Pfn(*pfn), id));
            if id != zero_page_hash() {
                c.chunks.push((id, StoredChunk::Plain(p.clone())));
            }
        }
        store.commit(c).unwrap();
    }

    #[test]
    fn diff_names_each_changed_page_and_its_byte_runs_and_show_counts_an_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        commit(&store, 1, &[(0, page(1, &[])), (1, page(2, &[])), (2, page(3, &[]))]);
        // Epoch 2: page 1 gains two changed runs, page 2 is rewritten with
        // the same bytes (no change), page 5 appears.
        commit(&store, 2, &[(1, page(2, &[(10, 9), (11, 9), (100, 0)])), (2, page(3, &[])), (5, page(7, &[]))]);
        // Epoch 3: page 0 is zeroed.
        commit(&store, 3, &[(0, vec![0; PAGE_SIZE])]);
        let d = diff(&store, GuestId(1), EpochId(3), EpochId(1)).unwrap();
        assert_eq!((d.from, d.to), (EpochId(1), EpochId(3)));
        let pfns: Vec<u64> = d.pages.iter().map(|p| p.pfn.0).collect();
        assert_eq!(pfns, [0, 1, 5], "the unchanged rewrite of page 2 is not a change");
        assert_eq!(d.pages[1].ranges, [(10, 12), (100, 101)]);
        assert_eq!(d.pages[0].ranges, [(0, PAGE_SIZE as u16)]);
        assert_eq!(d.pages[2].before, zero_page_hash(), "absent before: zero");
        assert_eq!(d.by_region(), [(Region::Memory, 3, 3 + PAGE_SIZE as u64 * 2)]);
        assert!(diff(&store, GuestId(1), EpochId(2), EpochId(2)).unwrap().pages.is_empty());
        assert!(diff(&store, GuestId(1), EpochId(1), EpochId(9)).is_err(), "no epoch 9");
        let s = show(&store, GuestId(1), EpochId(2)).unwrap();
        assert_eq!((s.pages, s.zero_pages, s.distinct_contents), (3, 0, 3));
        assert_eq!(show(&store, GuestId(1), EpochId(3)).unwrap().zero_pages, 1);
        assert_eq!(s.manifest.parent, show(&store, GuestId(1), EpochId(1)).unwrap().id);
    }

    #[test]
    fn bisect_finds_the_epoch_a_value_appeared_reading_about_log2_n_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        // 1000 epochs; page 3 changes every epoch; from epoch 613 on, bytes
        // 100..104 of page 5 hold "MARK".
        for e in 1..=1000u64 {
            let mut pages = vec![(3, page((e % 251) as u8 + 1, &[]))];
            if e == 613 {
                pages.push((5, page(0, &[(100, b'M'), (101, b'A'), (102, b'R'), (103, b'K')])));
            }
            commit(&store, e, &pages);
        }
        let g = GuestId(1);
        let p = Predicate::Equals { address: 5 * PAGE_SIZE as u64 + 100, value: b"MARK".to_vec() };
        let b = bisect(&store, g, EpochId(1), EpochId(1000), &p).unwrap();
        assert_eq!(b.first, Some(EpochId(613)));
        assert!(b.probes.len() <= 10 + 2, "log2(1000) + 2 reads, not {}", b.probes.len());
        assert_eq!(read_bytes(&store, g, EpochId(612), 5 * PAGE_SIZE as u64 + 100, 4).unwrap(), [0; 4]);
        let c = Predicate::Contains { start: 5 * PAGE_SIZE as u64, end: 6 * PAGE_SIZE as u64, pattern: b"ARK".to_vec() };
        assert_eq!(bisect(&store, g, EpochId(1), EpochId(1000), &c).unwrap().first, Some(EpochId(613)));
        let ch = Predicate::Changed { address: 5 * PAGE_SIZE as u64, len: PAGE_SIZE as u64 };
        assert_eq!(bisect(&store, g, EpochId(400), EpochId(900), &ch).unwrap().first, Some(EpochId(613)));
        // Already true at the start, never true at the end: no epoch.
        let b = bisect(&store, g, EpochId(700), EpochId(900), &p).unwrap();
        assert_eq!((b.first, b.ends), (None, (true, true)));
        assert_eq!(bisect(&store, g, EpochId(1), EpochId(600), &p).unwrap().ends, (false, false));
        assert!(read_bytes(&store, g, EpochId(1), 8 * PAGE_SIZE as u64 - 2, 4).is_err(), "beyond the page space");
    }
}
