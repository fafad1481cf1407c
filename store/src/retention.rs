//! Retention: thinning old epochs by a policy, and GC of chunks no kept
//! epoch references.
//!
//! **Thinning** drops epochs (never a guest's newest) from the log. A
//! page version written in a dropped epoch stays in the page index while
//! a later kept epoch still sees it (no epoch up to the next kept one
//! rewrote that page), so every kept epoch restores byte-exact. A run of
//! dropped epochs between two kept ones is recorded as a *bridge* in
//! `meta`: `b"bridge" | guest u64 | first u64 → last u64 | parent of the
//! first dropped manifest [32] | id of the last dropped manifest [32]`.
//! The chain rule for `verify`: a kept manifest's parent is the previous
//! kept manifest's id, or, across a gap, a bridge spans exactly the gap,
//! its first parent is the previous kept manifest's id and its last id is
//! the kept manifest's parent. A dropped run next to an existing bridge
//! merges with it. Each epoch's page list (`delta` in `meta`) is trimmed
//! to the versions that survive, so a bridge's surviving pages are the
//! page lists of its epochs.
//!
//! **GC** deletes chunks that no page-index entry and no kept manifest's
//! device state names. It runs beside ingest: while it marks, commits add
//! every chunk they reference to its mark set, and the sweep holds the
//! commit lock exclusively (commits share it among themselves), so a
//! chunk a concurrent commit relies on is never deleted (and a commit
//! never references a chunk that is gone: it checks, and names every such
//! chunk in [`StoreError::Unstored`]). Watchers registered with
//! [`Store::on_chunks_deleted`] are told what each GC deleted, guest by
//! guest (the chunks that guest's thinning dropped): a backup relays it to
//! that guest's primary alone, which stops referencing those chunks.

use std::collections::HashSet;
use std::time::Duration;

use remus_types::{ChunkId, EpochId, GuestId, Pfn};
use rocksdb::{IteratorMode, WriteBatch};

use crate::chain::Bridge;
use crate::db::{
    decode_delta_list, decode_pfn_list, delta_key, encode_pfns, epoch_key, guest_key, held_key, page_key, pfns_key, u64_at, Head, Store,
    CF_BASES, CF_CHUNKS, CF_EPOCHS, CF_HELD, CF_META, CF_PAGES,
};
use crate::error::StoreError;
use crate::manifest::Manifest;

/// One tier of a retention policy: epochs at most `within` older than
/// the newest are kept one per `every` (zero: all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepRule {
    /// Age limit of this tier.
    pub within: Duration,
    /// Spacing of kept epochs (zero keeps every epoch).
    pub every: Duration,
}

/// Which epochs to keep, by age relative to the guest's newest epoch.
/// Epochs older than every rule's `within` are dropped; the newest epoch
/// is always kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Tiers, any order.
    pub rules: Vec<KeepRule>,
}

impl RetentionPolicy {
    /// The example policy: every epoch for an hour, one per second for a
    /// day, one per minute for 30 days, one per day for a year.
    #[must_use]
    pub fn standard() -> Self {
        let (s, m, h, d) = (1, 60, 3600, 86_400);
        let r = |within: u64, every: u64| KeepRule { within: Duration::from_secs(within), every: Duration::from_secs(every) };
        Self { rules: vec![r(h, 0), r(d, s), r(30 * d, m), r(365 * d, d)] }
    }

    /// The epochs to keep among `epochs` (epoch, commit time ns), ascending.
    /// In each tier the oldest epoch of each `every`-aligned slot is kept,
    /// so an epoch dropped once is never wanted back as time passes.
    #[must_use]
    pub fn keep(&self, epochs: &[(EpochId, u64)]) -> HashSet<EpochId> {
        let mut rules = self.rules.clone();
        rules.sort_by_key(|r| r.within);
        let Some(&(newest, now)) = epochs.last() else { return HashSet::new() };
        let mut keep = HashSet::from([newest]);
        let mut slots: HashSet<(usize, u128)> = HashSet::new();
        for &(e, t) in epochs {
            let age = Duration::from_nanos(now.saturating_sub(t));
            let Some((i, rule)) = rules.iter().enumerate().find(|(_, r)| age <= r.within) else { continue };
            if rule.every.is_zero() || slots.insert((i, u128::from(t) / rule.every.as_nanos())) {
                keep.insert(e);
            }
        }
        keep
    }
}

/// What thinning did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThinReport {
    /// Epochs dropped.
    pub epochs_dropped: u64,
    /// Page versions no kept epoch sees any more, removed from the index.
    pub pages_dropped: u64,
}

/// What GC did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks still referenced.
    pub live: u64,
    /// Chunks deleted.
    pub deleted: u64,
    /// The referenced set (for the S3 tier's GC).
    pub referenced: HashSet<ChunkId>,
}

/// Puts `b` into `batch` as `guest`'s bridge record.
pub(crate) fn put_bridge(store: &Store, batch: &mut WriteBatch, guest: GuestId, b: &Bridge) {
    let mut v = Vec::with_capacity(72);
    v.extend_from_slice(&b.last.0.to_be_bytes());
    v.extend_from_slice(&b.first_parent.0);
    v.extend_from_slice(&b.last_id.0);
    batch.put_cf(store.cf(CF_META), bridge_key(guest, b.first), v);
}

pub(crate) fn bridge_key(guest: GuestId, first: EpochId) -> Vec<u8> {
    let mut k = guest_key(b"bridge", guest);
    k.extend_from_slice(&first.0.to_be_bytes());
    k
}

/// What GC's mark phase found.
struct Marked {
    /// Chunks some kept epoch references.
    referenced: HashSet<ChunkId>,
    /// The others, with their local pack location if packed.
    candidates: Vec<(ChunkId, Option<crate::packs::Location>)>,
    /// Entries per local pack: a pack all of whose entries go is deleted
    /// whole rather than punched.
    per_pack: std::collections::HashMap<u32, u64>,
}

impl Store {
    /// Continues `guest`'s history in this store after `head` (epoch and
    /// manifest) of a history kept elsewhere, so that the next commit,
    /// epoch `head.epoch + 1`, continues that chain: a guest protected
    /// again after failing over or moving, replicating to a backup that
    /// never held it, or that held it only up to an earlier epoch (it
    /// failed over or moved from here, and comes back). The epochs this
    /// store lacks up to `head.epoch` are recorded as a bridge, as if
    /// thinned (from the start, or from the guest's head here): verify
    /// accepts the chain, and none of them can be restored here. One
    /// synced write.
    ///
    /// # Errors
    /// [`StoreError::OutOfOrder`] when the guest's history here already
    /// reaches `head.epoch`; [`StoreError::Db`].
    pub fn graft(&self, guest: GuestId, head: Head) -> Result<(), StoreError> {
        let here = self.head(guest)?;
        let mut batch = WriteBatch::default();
        let bridge = match here {
            Some(h) if h.epoch >= head.epoch => return Err(StoreError::OutOfOrder { guest, epoch: head.epoch, head: h.epoch }),
            // Nothing before the graft is here to upload.
            None => {
                batch.put_cf(self.cf(CF_META), guest_key(b"s3cur", guest), head.epoch.0.to_be_bytes());
                Bridge { first: EpochId(1), last: head.epoch, first_parent: ChunkId::default(), last_id: head.manifest }
            }
            Some(h) => match self.manifest(guest, h.epoch) {
                // Grafted here before and never committed after: that
                // graft's bridge reaches on.
                Err(StoreError::NoEpoch { .. }) => match self.bridges(guest)?.into_iter().find(|b| b.last == h.epoch) {
                    Some(b) => Bridge { last: head.epoch, last_id: head.manifest, ..b },
                    None => return Err(StoreError::malformed(format!("{guest} head"), "no manifest and no bridge at the head")),
                },
                Ok(_) => Bridge { first: h.epoch.next(), last: head.epoch, first_parent: h.manifest, last_id: head.manifest },
                Err(e) => return Err(e),
            },
        };
        put_bridge(self, &mut batch, guest, &bridge);
        self.put_head(&mut batch, guest, &head);
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Records, in `batch`, the epochs between `head` (its manifest id
    /// `parent`) and `epoch` as never kept: a commit of `epoch` that
    /// follows `head` because the primary merged the epochs between into
    /// it. The chain rule is thinning's: the bridge's first parent and
    /// last id are both `parent`. A bridge ending at `head` (a graft,
    /// whose head has no manifest) is extended instead.
    pub(crate) fn bridge_skipped(
        &self,
        batch: &mut WriteBatch,
        guest: GuestId,
        head: EpochId,
        parent: ChunkId,
        epoch: EpochId,
    ) -> Result<(), StoreError> {
        let last = EpochId(epoch.0 - 1);
        let bridge = match self.bridges(guest)?.into_iter().find(|b| b.last == head) {
            Some(graft) => Bridge { last, ..graft },
            None => Bridge { first: head.next(), last, first_parent: parent, last_id: parent },
        };
        put_bridge(self, batch, guest, &bridge);
        Ok(())
    }

    /// The bridges of `guest`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub fn bridges(&self, guest: GuestId) -> Result<Vec<Bridge>, StoreError> {
        let prefix = guest_key(b"bridge", guest);
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_META), IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            if k.len() != prefix.len() + 8 || v.len() != 72 {
                return Err(StoreError::malformed(format!("{guest} bridge record"), "wrong length"));
            }
            out.push(Bridge {
                first: EpochId(u64_at(&k, prefix.len())),
                last: EpochId(u64_at(&v, 0)),
                first_parent: ChunkId(v[8..40].try_into().expect("32 bytes")),
                last_id: ChunkId(v[40..72].try_into().expect("32 bytes")),
            });
        }
        Ok(out)
    }

    /// Drops the epochs of `guest` that `policy` does not keep, among
    /// those at or before `upto` (the S3 tier's cursor when there is one:
    /// only what S3 holds is thinned, so S3 can mirror it).
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub fn thin(&self, guest: GuestId, policy: &RetentionPolicy, upto: EpochId) -> Result<ThinReport, StoreError> {
        let manifests = self.manifests(guest)?;
        // Aged by the backup's commit times: a primary's claimed time (one
        // epoch stamped years ahead, say) thins nothing.
        let times: Vec<(EpochId, u64)> = manifests.iter().map(|m| (m.epoch, m.age_time_ns())).collect();
        let keep = policy.keep(&times);
        let kept = |m: &Manifest| keep.contains(&m.epoch) || m.epoch > upto;
        let bridges = self.bridges(guest)?;
        let mut report = ThinReport::default();
        // Walk kept manifests; each gap holding a newly dropped epoch is
        // rebuilt as one bridge.
        let mut prev: Option<&Manifest> = None;
        let mut dropped: Vec<&Manifest> = Vec::new();
        for m in &manifests {
            if !kept(m) {
                dropped.push(m);
                continue;
            }
            if !dropped.is_empty() {
                report = add(report, self.bridge_gap(guest, prev, m, &dropped, &bridges)?);
                dropped.clear();
            }
            prev = Some(m);
        }
        Ok(report)
    }

    /// Rebuilds the gap between `prev` (or the start) and `next` after
    /// dropping `dropped`: one bridge, trimmed page lists and index.
    fn bridge_gap(
        &self,
        guest: GuestId,
        prev: Option<&Manifest>,
        next: &Manifest,
        dropped: &[&Manifest],
        bridges: &[Bridge],
    ) -> Result<ThinReport, StoreError> {
        let first = prev.map_or(EpochId(1), |p| p.epoch.next());
        let last = EpochId(next.epoch.0 - 1);
        let mut batch = WriteBatch::default();
        for b in bridges.iter().filter(|b| b.first >= first && b.last <= last) {
            batch.delete_cf(self.cf(CF_META), bridge_key(guest, b.first));
        }
        let rec = Bridge { first, last, first_parent: prev.map_or(ChunkId::default(), Manifest::id), last_id: next.parent };
        put_bridge(self, &mut batch, guest, &rec);
        // Page versions in the gap, newest first: a version survives only
        // if no later epoch up to `next` rewrote its page.
        let mut seen: HashSet<Pfn> = self.epoch_pfns(guest, next.epoch)?.into_iter().collect();
        let mut report = ThinReport { epochs_dropped: dropped.len() as u64, pages_dropped: 0 };
        // What this guest no longer names: a GC that deletes any of it
        // tells this guest's primary.
        let mut unreferenced: Vec<ChunkId> = dropped.iter().map(|m| m.device_state).collect();
        // Only the dropped versions' hashes are needed: read after, at once.
        let mut gone = Vec::new();
        for (e, pfns, old_form) in self.pfn_lists(guest, first, last)?.into_iter().rev() {
            let mut keep = Vec::with_capacity(pfns.len());
            for pfn in pfns {
                if seen.insert(pfn) {
                    keep.push(pfn);
                } else {
                    batch.delete_cf(self.cf(CF_PAGES), page_key(guest, pfn, e));
                    gone.push((pfn, e));
                }
            }
            // Kept even when empty: "nothing of this epoch survives".
            if old_form {
                batch.delete_cf(self.cf(CF_META), delta_key(guest, e));
            }
            batch.put_cf(self.cf(CF_META), pfns_key(guest, e), encode_pfns(keep.into_iter()));
        }
        report.pages_dropped = gone.len() as u64;
        unreferenced.extend(self.index_hashes(guest, &gone)?);
        for m in dropped {
            batch.delete_cf(self.cf(CF_EPOCHS), epoch_key(guest, m.epoch));
            self.charge(&mut batch, guest, -(m.charge() as i64));
        }
        self.db.write(batch)?;
        self.gc.dropped(guest, unreferenced);
        Ok(report)
    }

    /// Every chunk a page-index entry or a kept manifest names.
    pub(crate) fn referenced(&self) -> Result<HashSet<ChunkId>, StoreError> {
        let mut live = HashSet::new();
        for kv in self.db.iterator_cf(self.cf(CF_PAGES), IteratorMode::Start) {
            let (_, v) = kv?;
            live.insert(crate::db::hash_value(&v)?);
        }
        for (guest, _) in self.guests()? {
            for m in self.manifests(guest)? {
                live.insert(m.device_state);
            }
        }
        Ok(live)
    }

    /// GC's mark phase, over what was committed before marking began.
    fn mark(&self) -> Result<Marked, StoreError> {
        let marked = self.referenced()?;
        let mut candidates = Vec::new();
        let mut per_pack: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for kv in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (k, v) = kv?;
            let loc = Store::location(&v);
            if let Some(loc) = loc {
                *per_pack.entry(loc.pack).or_default() += 1;
            }
            match <[u8; 32]>::try_from(&k[..]).map(ChunkId) {
                Ok(id) if !marked.contains(&id) => candidates.push((id, loc)),
                _ => {}
            }
        }
        Ok(Marked { referenced: marked, candidates, per_pack })
    }

    /// Calls `f(guest, ids)` for each guest with the chunks each later
    /// [`gc`](Self::gc) of this store deletes that the guest's thinning
    /// had dropped (after the deletion is written, on the GC's thread; not
    /// called when there are none): a guest hears only of chunks its own
    /// history named. `f` should return quickly.
    pub fn on_chunks_deleted(&self, f: impl Fn(GuestId, &[ChunkId]) + Send + Sync + 'static) {
        self.gc.watch(Box::new(f));
    }

    /// Deletes every chunk no kept epoch references; safe while commits
    /// go on (see the module notes), and tells the watchers of
    /// [`on_chunks_deleted`](Self::on_chunks_deleted) what it deleted.
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        // Each commit either is in the index read below, or records its
        // chunks in the marks (see `gc.rs`).
        self.gc.begin_marking();
        let Marked { referenced: mut marked, mut candidates, per_pack } = match self.mark() {
            Ok(m) => m,
            Err(e) => {
                self.gc.abandon();
                return Err(e);
            }
        };
        let sweep = self.gc.sweep();
        marked.extend(sweep.marked.iter().copied());
        // Every base of a live delta lives, and its base in turn (read
        // with no commit running: every delta written is in the table).
        let mut bases = std::collections::HashMap::new();
        for kv in self.db.iterator_cf(self.cf(CF_BASES), IteratorMode::Start) {
            let (k, v) = kv?;
            match (<[u8; 32]>::try_from(&k[..]), v.get(..32).map(<[u8; 32]>::try_from)) {
                (Ok(d), Some(Ok(b))) => bases.insert(ChunkId(d), ChunkId(b)),
                _ => return Err(StoreError::malformed("bases record".to_string(), "wrong length")),
            };
        }
        let mut frontier: Vec<ChunkId> = marked.iter().filter_map(|id| bases.get(id)).copied().collect();
        while let Some(b) = frontier.pop() {
            if marked.insert(b) {
                frontier.extend(bases.get(&b));
            }
        }
        let mut batch = WriteBatch::default();
        candidates.retain(|(id, _)| !marked.contains(id));
        let mut freed: Vec<crate::packs::Location> = Vec::new();
        let guests: Vec<GuestId> = self.guests()?.into_iter().map(|(g, _)| g).collect();
        for (id, loc) in &candidates {
            batch.delete_cf(self.cf(CF_CHUNKS), id.0);
            if bases.contains_key(id) {
                batch.delete_cf(self.cf(CF_BASES), id.0);
            }
            // No guest holds what is gone: its bytes must come again.
            for g in &guests {
                batch.delete_cf(self.cf(CF_HELD), held_key(*g, id));
            }
            freed.extend(loc);
        }
        // Synced before the packed bytes are freed: a crash must not leave
        // an index entry naming a punched-out record.
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        let deleted: Vec<ChunkId> = candidates.into_iter().map(|(id, _)| id).collect();
        self.forget_recent(&deleted);
        drop(sweep);
        // Gone from the index for good: watchers may hear of it now.
        self.gc.notify(&deleted);
        // Only the pack being appended to can gain entries, so any other
        // whose entries all went is unreferenced for good.
        let appending = self.packs.appending()?;
        let mut gone: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for l in &freed {
            *gone.entry(l.pack).or_default() += 1;
        }
        let empty: std::collections::HashSet<u32> =
            gone.iter().filter(|(p, n)| **p < appending && per_pack.get(p) == Some(n)).map(|(p, _)| *p).collect();
        freed.retain(|l| !empty.contains(&l.pack));
        self.packs.remove(&empty)?;
        self.packs.punch(&freed)?;
        Ok(GcReport { live: marked.len() as u64, deleted: deleted.len() as u64, referenced: marked })
    }
}

/// Where a form of page list is kept: its key for a guest's epoch.
type ListKey = fn(GuestId, EpochId) -> Vec<u8>;

fn add(a: ThinReport, b: ThinReport) -> ThinReport {
    ThinReport { epochs_dropped: a.epochs_dropped + b.epochs_dropped, pages_dropped: a.pages_dropped + b.pages_dropped }
}

impl Store {
    /// The page lists of `guest`'s epochs in `first..=last` that have one
    /// (after thinning: the versions a bridge carries), ascending epoch.
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub fn page_lists(&self, guest: GuestId, first: EpochId, last: EpochId) -> Result<Vec<(EpochId, crate::PageList)>, StoreError> {
        let lists = self.pfn_lists(guest, first, last)?;
        let entries: Vec<(Pfn, EpochId)> = lists.iter().flat_map(|(e, pfns, _)| pfns.iter().map(move |pfn| (*pfn, *e))).collect();
        let mut ids = self.index_hashes(guest, &entries)?.into_iter();
        Ok(lists.into_iter().map(|(e, pfns, _)| (e, pfns.into_iter().zip(ids.by_ref()).collect())).collect())
    }

    /// The pages listed for each of `guest`'s epochs in `first..=last`
    /// that has a list, ascending epoch, without their hashes; and
    /// whether the list is in the earlier form.
    pub(crate) fn pfn_lists(&self, guest: GuestId, first: EpochId, last: EpochId) -> Result<Vec<(EpochId, Vec<Pfn>, bool)>, StoreError> {
        // Both forms (a store written before pfns lists holds delta lists;
        // thinning rewrites an epoch's list in the new form).
        let mut out = std::collections::BTreeMap::new();
        let old = self.old_page_lists.load(std::sync::atomic::Ordering::Relaxed);
        let forms: [(ListKey, bool); 2] = [(delta_key, true), (pfns_key, false)];
        for (key, hashes_inline) in forms.into_iter().filter(|(_, inline)| old || !inline) {
            let start = key(guest, first);
            let end = key(guest, last);
            for kv in self.db.iterator_cf(self.cf(CF_META), IteratorMode::From(&start, rocksdb::Direction::Forward)) {
                let (k, v) = kv?;
                if k.len() != end.len() || k[..end.len() - 8] != end[..end.len() - 8] || k[..] > end[..] {
                    break;
                }
                let e = EpochId(u64_at(&k, end.len() - 8));
                let pfns = if hashes_inline {
                    decode_delta_list(guest, e, &v)?.into_iter().map(|(pfn, _)| pfn).collect()
                } else {
                    decode_pfn_list(guest, e, &v)?
                };
                out.insert(e, (pfns, hashes_inline));
            }
        }
        Ok(out.into_iter().map(|(e, (pfns, old_form))| (e, pfns, old_form)).collect())
    }
}
