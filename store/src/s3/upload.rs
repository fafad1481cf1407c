//! The uploader: committed epochs flow from RocksDB to S3 in the
//! background.
//!
//! Per guest, a cursor in `meta` names the last epoch that a segment in
//! S3 covers. A pass reads the epochs after it in order, packs the chunks
//! S3 does not hold yet (`s3chk` marks in `meta`) into a pack of at most
//! `pack-size-kib` plus one chunk, and puts, in this order: the pack, its
//! index, then one segment holding the pass's epochs of that guest, then
//! advances the cursor. So a segment is in S3 only after every chunk it
//! names is, and every put is conditional (`If-None-Match: *`):
//! content-addressed keys that exist already hold the same bytes, and a
//! segment key held by other bytes is another writer's, which stops the
//! pass with an error.
//!
//! After a segment, when the pages written since the guest's last
//! checkpoint reach [`CHECKPOINT_PAGES`] times its memory size (and at
//! least 4 segments were put since), or 32 segments were put since
//! ([`CHECKPOINT_SEGMENTS`]), the pass also puts a checkpoint: the page
//! table at the segment's last epoch. A reader then reads one checkpoint
//! and at most 33 segments (about 4 page tables' worth of pages) for any
//! epoch.
//!
//! Before a checkpoint, when the chunks of its page table lie in more
//! packs than [`spread_limit`] allows (a long history scatters a table's
//! pages over one pack per pass), the live chunks of the sparsest of those
//! packs go again into the pass's own pack, so that the checkpoint names
//! few packs and a restore near the end of a long history reads about as
//! many as one near its start. The old copies stay (older epochs name
//! them); S3 GC repacks them once nothing references them. It costs the
//! bytes gathered and no request of its own unless the pack fills.
//!
//! Memory is bounded by one pack and the page lists of at most
//! [`MAX_PENDING`] epochs. When S3 is unreachable the pass fails, nothing
//! moves, and the backlog simply waits in RocksDB for the next pass.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use remus_types::{ChunkId, EpochId, GuestId, Pfn};
use rocksdb::WriteBatch;

use super::format::{self, index_key, pack_key, BridgeObject, CheckpointObject, PackBuilder, SegmentObject};
use super::{S3Config, S3Error, S3RetentionReport, S3Tier};
use crate::db::{guest_key, u64_at, Store, CF_META};
use crate::error::StoreError;
use crate::manifest::Manifest;
use crate::retention::RetentionPolicy;

/// Epochs in one segment at most.
pub const MAX_PENDING: usize = 1024;

/// Segments put between a guest's checkpoints: at least (so checkpoints
/// never outnumber segments), at most (so a reader reads no more).
pub const CHECKPOINT_SEGMENTS: std::ops::RangeInclusive<u64> = 4..=32;

/// Between those, a checkpoint is due once the pages written since the
/// last reach this many times the guest's memory size (a reader then reads
/// at most about that many times a whole page table after the checkpoint).
pub const CHECKPOINT_PAGES: u64 = 4;

/// What one pass uploaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Epochs put (in segments).
    pub epochs: u64,
    /// Segments put.
    pub segments: u64,
    /// Checkpoints put.
    pub checkpoints: u64,
    /// Packs put.
    pub packs: u64,
    /// Chunk bytes packed.
    pub chunk_bytes: u64,
    /// Requests made (puts, and the gets that check a key found taken).
    pub requests: u64,
    /// Chunks already in S3 packed again so that a checkpoint's page table
    /// lies in few packs.
    pub chunks_gathered: u64,
    /// Chunks put as deltas over a base S3 already holds (the rest whole).
    pub deltas: u64,
}

/// Packs a checkpoint's page table may lie in, at least.
pub const SPREAD_PACKS: usize = 8;

/// Packs the page table of a checkpoint may lie in before its chunks are
/// gathered: [`SPREAD_PACKS`], or twice the packs its `chunks` would
/// fill uncompressed.
#[must_use]
pub fn spread_limit(chunks: usize, pack_bytes: usize) -> usize {
    SPREAD_PACKS.max(2 * (chunks * remus_types::PAGE_SIZE).div_ceil(pack_bytes.max(1)))
}

fn chunk_mark_key(id: &ChunkId) -> Vec<u8> {
    let mut k = b"s3chk".to_vec();
    k.extend_from_slice(&id.0);
    k
}

impl Store {
    /// The last epoch of `guest` uploaded to the S3 tier (0: none).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn s3_cursor(&self, guest: GuestId) -> Result<EpochId, StoreError> {
        let v = self.db.get_cf(self.cf(CF_META), guest_key(b"s3cur", guest))?;
        Ok(EpochId(v.filter(|v| v.len() == 8).map_or(0, |v| u64_at(&v, 0))))
    }

    /// The pack holding `id` in S3, if uploaded.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn s3_pack_of(&self, id: &ChunkId) -> Result<Option<ChunkId>, StoreError> {
        let v = self.db.get_cf(self.cf(CF_META), chunk_mark_key(id))?;
        Ok(v.and_then(|v| <[u8; 32]>::try_from(&v[..]).ok()).map(ChunkId))
    }

    /// Adds to `packs` the S3 pack holding `id` and those holding each
    /// base of its delta chain in the local store: every pack a reader of
    /// `id` from S3 may need (S3 keeps a chunk as a delta only over the
    /// base the local store keeps it over).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub(crate) fn s3_chain_packs(&self, id: &ChunkId, packs: &mut BTreeSet<ChunkId>) -> Result<(), StoreError> {
        self.s3_chain_packs_from(id, self.s3_pack_of(id)?, packs)
    }

    /// As [`s3_chain_packs`](Self::s3_chain_packs), with the pack holding
    /// `id` (if any) already looked up.
    fn s3_chain_packs_from(&self, id: &ChunkId, pack: Option<ChunkId>, packs: &mut BTreeSet<ChunkId>) -> Result<(), StoreError> {
        self.s3_chain_from(id, pack, |_, pack| {
            packs.insert(pack);
        })
    }

    /// Calls `f(chunk, pack)` for `id` and each base of its local delta
    /// chain that S3 holds, with the pack holding it.
    fn s3_chain(&self, id: &ChunkId, f: impl FnMut(ChunkId, ChunkId)) -> Result<(), StoreError> {
        self.s3_chain_from(id, self.s3_pack_of(id)?, f)
    }

    /// As [`s3_chain`](Self::s3_chain), with the pack holding `id` (if
    /// any) already looked up.
    fn s3_chain_from(&self, id: &ChunkId, pack: Option<ChunkId>, mut f: impl FnMut(ChunkId, ChunkId)) -> Result<(), StoreError> {
        let (mut at, mut pack) = (*id, pack);
        for depth in 0..=crate::db::MAX_DELTA_DEPTH {
            if let Some(pack) = pack {
                f(at, pack);
            }
            if depth == crate::db::MAX_DELTA_DEPTH {
                break;
            }
            let Some(base) = self.delta_base(&at)? else { break };
            pack = self.s3_pack_of(&base)?;
            at = base;
        }
        Ok(())
    }

    pub(crate) fn mark_in_s3(&self, ids: &[ChunkId], pack: &ChunkId) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        for id in ids {
            b.put_cf(self.cf(CF_META), chunk_mark_key(id), pack.0);
        }
        self.db.write(b)?;
        Ok(())
    }

    pub(crate) fn unmark_in_s3(&self, ids: &[ChunkId]) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        for id in ids {
            b.delete_cf(self.cf(CF_META), chunk_mark_key(id));
        }
        self.db.write(b)?;
        Ok(())
    }

    pub(crate) fn set_s3_cursor(&self, guest: GuestId, epoch: EpochId) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(CF_META), guest_key(b"s3cur", guest), epoch.0.to_be_bytes())?;
        Ok(())
    }

    /// Pages and segments put since `guest`'s last checkpoint in S3.
    fn s3_since_checkpoint(&self, guest: GuestId) -> Result<(u64, u64), StoreError> {
        let v = self.db.get_cf(self.cf(CF_META), guest_key(b"s3ckp", guest))?;
        Ok(v.filter(|v| v.len() == 16).map_or((0, 0), |v| (u64_at(&v, 0), u64_at(&v, 8))))
    }

    fn set_s3_since_checkpoint(&self, guest: GuestId, pages: u64, segments: u64) -> Result<(), StoreError> {
        let mut v = pages.to_be_bytes().to_vec();
        v.extend_from_slice(&segments.to_be_bytes());
        self.db.put_cf(self.cf(CF_META), guest_key(b"s3ckp", guest), v)?;
        Ok(())
    }

    /// The page table of `guest` at `m`'s epoch as a checkpoint object,
    /// with the packs S3 holds its chunks in.
    pub(crate) fn s3_checkpoint(&self, m: &Manifest) -> Result<CheckpointObject, StoreError> {
        let zero = remus_types::zero_page_hash();
        let mut pages = Vec::new();
        let mut packs = BTreeSet::new();
        self.for_each_page_at(m.guest, m.epoch, |pfn, id| {
            if id != zero {
                self.s3_chain_packs(&id, &mut packs)?;
            }
            pages.push((pfn, id));
            Ok(())
        })?;
        Ok(CheckpointObject { manifest: m.clone(), packs: packs.into_iter().collect(), pages })
    }
}

struct Pass<'a> {
    tier: &'a S3Tier,
    store: &'a Store,
    pack: PackBuilder,
    in_pack: HashSet<ChunkId>,
    /// The open segment: the span it covers from, its epochs, and the
    /// packs (put) holding the chunks they name.
    span_first: EpochId,
    pending: Vec<(Manifest, Vec<(Pfn, ChunkId)>)>,
    packs: BTreeSet<ChunkId>,
    report: UploadReport,
}

impl Pass<'_> {
    fn flush_pack(&mut self) -> Result<(), StoreError> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let pack = std::mem::replace(&mut self.pack, self.tier.new_pack());
        let (id, size) = self.tier.put_pack(self.store, pack)?;
        self.packs.insert(id);
        self.report.chunk_bytes += size;
        self.in_pack.clear();
        self.report.packs += 1;
        self.report.requests += 2;
        Ok(())
    }

    /// Before a checkpoint at `m`: when the chunks of its page table (and
    /// the bases of those S3 may hold as deltas) lie in more packs than
    /// [`spread_limit`], puts the live chunks of the sparsest packs into
    /// the pass's pack until the rest lie in at most half that many. A
    /// delta stays a delta over a base S3 holds: its base is one of the
    /// table's chunks' chain, so the base's pack is among those counted
    /// (or the base moves with it). A chunk the local store no longer
    /// holds stays where it is.
    fn gather(&mut self, m: &Manifest) -> Result<(), StoreError> {
        let zero = remus_types::zero_page_hash();
        let mut seen = HashSet::new();
        let mut chained = HashSet::new();
        let mut by_pack: std::collections::HashMap<ChunkId, Vec<ChunkId>> = std::collections::HashMap::new();
        self.store.for_each_page_at(m.guest, m.epoch, |_, id| {
            if id != zero && seen.insert(id) {
                self.store.s3_chain(&id, |id, pack| {
                    if chained.insert(id) {
                        by_pack.entry(pack).or_default().push(id);
                    }
                })?;
            }
            Ok(())
        })?;
        let limit = spread_limit(seen.len(), self.tier.cfg.pack_bytes());
        if by_pack.len() <= limit {
            return Ok(());
        }
        let mut packs: Vec<(ChunkId, Vec<ChunkId>)> = by_pack.into_iter().collect();
        packs.sort_unstable_by_key(|(pack, ids)| (ids.len(), *pack));
        let moving = packs.len() - limit / 2;
        for id in packs.into_iter().take(moving).flat_map(|(_, ids)| ids) {
            if self.in_pack.contains(&id) {
                continue;
            }
            let value = self.store.chunk_value_for_s3(&id, |b| self.in_pack.contains(b));
            match value {
                Ok((v, base)) => {
                    self.pack.push(id, &v);
                    self.report.deltas += u64::from(base.is_some());
                }
                Err(StoreError::ChunkMissing(_)) => continue,
                Err(e) => return Err(e),
            }
            self.in_pack.insert(id);
            self.report.chunks_gathered += 1;
            if self.pack.len() >= self.tier.cfg.pack_bytes() {
                self.flush_pack()?;
            }
        }
        Ok(())
    }

    /// Puts the open segment covering `span_first..=last`, moves the
    /// cursor to `last`, and puts a checkpoint when one is due (gathering
    /// its page table's chunks first when they are scattered).
    fn flush_segment(&mut self, guest: GuestId, last: EpochId) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return self.flush_pack();
        }
        let pages: u64 = self.pending.iter().map(|(_, p)| p.len() as u64).sum();
        let (before, segments) = self.store.s3_since_checkpoint(guest)?;
        let (pages, segments) = (before + pages, segments + 1);
        let newest = self.pending.last().map(|(m, _)| m.clone()).expect("not empty");
        let checkpoint = segments >= *CHECKPOINT_SEGMENTS.end()
            || (segments >= *CHECKPOINT_SEGMENTS.start() && pages >= newest.page_count.saturating_mul(CHECKPOINT_PAGES));
        if checkpoint {
            self.gather(&newest)?;
        }
        self.flush_pack()?;
        let mut seg = SegmentObject {
            guest,
            first: self.span_first,
            last,
            packs: std::mem::take(&mut self.packs).into_iter().collect(),
            epochs: std::mem::take(&mut self.pending),
        };
        let epochs = seg.epochs.len() as u64;
        loop {
            let key = seg.key();
            self.report.requests += 1;
            match self.tier.put_object(&key, seg.encode()) {
                Ok(()) => break,
                Err(S3Error::Exists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // Ours from a pass that stopped before its cursor moved (the
            // same epochs, perhaps fewer), or another writer's: only the
            // former is fine, and what it lacks goes in a segment after it.
            self.report.requests += 1;
            let conflict = || StoreError::from(S3Error::Conflict(format!("{key} holds another writer's segment")));
            let theirs = self.tier.get_object(&key).and_then(|b| SegmentObject::decode(&b)).map_err(|_| conflict())?;
            let n = theirs.epochs.len().min(seg.epochs.len());
            if theirs.guest != guest || n == 0 || theirs.epochs[..n] != seg.epochs[..n] {
                return Err(conflict());
            }
            let rest = seg.epochs.split_off(n);
            match rest.first() {
                None => break,
                Some((m, _)) if m.epoch <= theirs.last => return Err(conflict()),
                Some(_) => seg = SegmentObject { first: theirs.last.next(), epochs: rest, ..seg },
            }
        }
        self.report.segments += 1;
        self.report.epochs += epochs;
        self.store.set_s3_cursor(guest, last)?;
        self.span_first = last.next();
        if checkpoint {
            self.tier.put_checkpoint(self.store, &newest)?;
            self.report.checkpoints += 1;
            self.report.requests += 1;
            self.store.set_s3_since_checkpoint(guest, 0, 0)
        } else {
            self.store.set_s3_since_checkpoint(guest, pages, segments)
        }
    }
}

pub(crate) fn ok_if_exists(r: Result<(), S3Error>) -> Result<(), S3Error> {
    match r {
        Err(S3Error::Exists(_)) => Ok(()),
        r => r,
    }
}

impl S3Tier {
    /// Puts the checkpoint at `m`'s epoch (a key that exists holds the
    /// same table: the epoch is committed).
    pub(crate) fn put_checkpoint(&self, store: &Store, m: &Manifest) -> Result<(), StoreError> {
        let c = store.s3_checkpoint(m)?;
        Ok(ok_if_exists(self.put_object(&c.key(), c.encode()))?)
    }

    /// Puts a finished pack and its index, then marks its chunks as held
    /// in it; returns the pack's id and size.
    pub(crate) fn put_pack(&self, store: &Store, pack: PackBuilder) -> Result<(ChunkId, u64), StoreError> {
        let ids: Vec<ChunkId> = pack.entries().iter().map(|e| e.id).collect();
        let (id, bytes, index) = pack.finish();
        let size = bytes.len() as u64;
        // Content-addressed: a key that exists holds these very bytes.
        ok_if_exists(self.client.put_new(&pack_key(&id), bytes))?;
        ok_if_exists(self.put_object(&index_key(&id), index))?;
        store.mark_in_s3(&ids, &id)?;
        Ok((id, size))
    }

    /// Uploads every committed epoch after each guest's cursor; stops
    /// early (with what was done) once `stop()` says so.
    ///
    /// # Errors
    /// [`StoreError::S3`] when S3 fails (nothing acknowledged is lost:
    /// the backlog stays in RocksDB), store errors.
    pub fn upload_pending(&self, store: &Store, stop: &dyn Fn() -> bool) -> Result<UploadReport, StoreError> {
        let mut pass = Pass {
            tier: self,
            store,
            pack: self.new_pack(),
            in_pack: HashSet::new(),
            span_first: EpochId(0),
            pending: Vec::new(),
            packs: BTreeSet::new(),
            report: UploadReport::default(),
        };
        let zero = remus_types::zero_page_hash();
        for (guest, head) in store.guests()? {
            let mut e = store.s3_cursor(guest)?.next();
            pass.span_first = e;
            // Epochs a commit skipped (merged into a later one by the
            // primary) are bridged as thinned ones are, before the
            // segments that cross them.
            let bridges = store.bridges(guest)?;
            // A graft's bridge reaches the head, which has no manifest
            // here: final (and uploaded) once an epoch is committed after
            // it, and the cursor waits before it until then.
            let upto = match store.manifest(guest, head.epoch) {
                Err(StoreError::NoEpoch { .. }) => {
                    bridges.iter().find(|b| b.last == head.epoch).map_or(head.epoch, |b| EpochId(b.first.0 - 1))
                }
                _ => head.epoch,
            };
            for b in bridges.into_iter().filter(|b| b.first >= e && b.last < head.epoch) {
                let bridge = BridgeObject { guest, bridge: b, pages: Vec::new() };
                pass.report.requests += 1;
                ok_if_exists(self.put_object(&format::bridge_key(&bridge), bridge.encode()))?;
            }
            while e <= upto && !stop() {
                let m = match store.manifest(guest, e) {
                    // Thinned before it was uploaded: nothing to send.
                    Err(StoreError::NoEpoch { .. }) => {
                        e = e.next();
                        continue;
                    }
                    r => r?,
                };
                let pages = store.epoch_pages(guest, e)?;
                for id in pages.iter().map(|(_, id)| *id).filter(|id| *id != zero).chain([m.device_state]) {
                    if pass.in_pack.contains(&id) {
                        continue;
                    }
                    // Each chunk's S3 mark looked up once: the walk down
                    // its chain starts from what was found.
                    if let Some(pack) = store.s3_pack_of(&id)? {
                        store.s3_chain_packs_from(&id, Some(pack), &mut pass.packs)?;
                        continue;
                    }
                    let (value, base) = store.chunk_value_for_s3(&id, |b| pass.in_pack.contains(b))?;
                    if let Some((base, pack)) = base {
                        store.s3_chain_packs_from(&base, pack, &mut pass.packs)?;
                        pass.report.deltas += 1;
                    }
                    pass.pack.push(id, &value);
                    pass.in_pack.insert(id);
                    if pass.pack.len() >= self.cfg.pack_bytes() {
                        pass.flush_pack()?;
                    }
                }
                pass.pending.push((m, pages));
                if pass.pending.len() >= MAX_PENDING {
                    pass.flush_segment(guest, e)?;
                }
                e = e.next();
            }
            pass.flush_segment(guest, EpochId(e.0 - 1))?;
        }
        Ok(pass.report)
    }
}

/// Shared between the uploader thread and its owner.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    wake: (Mutex<bool>, Condvar),
    last_error: Mutex<Option<String>>,
}

/// The history worker of a backup: a thread that runs an upload pass
/// every `upload-interval-ms`, retrying with backoff while S3 is away,
/// and applies the retention policy when one is set.
pub struct Uploader {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Uploader {
    /// Starts uploading `store` to the tier configured by `cfg`.
    ///
    /// # Errors
    /// [`S3Error::Config`] for an unusable configuration (an unreachable
    /// service is not an error here: the backlog waits for it).
    pub fn start(store: Arc<Store>, cfg: S3Config) -> Result<Self, S3Error> {
        Self::start_with(store, Some(cfg), None)
    }

    /// Starts the history worker of a backup: uploading to `s3` (if
    /// any) every `upload-interval-ms`, and applying `retention` (if any:
    /// thinning, GC, and their S3 mirror) every given period. One thread
    /// does both, so S3 GC never runs beside an upload pass.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_with(store: Arc<Store>, s3: Option<S3Config>, retention: Option<(RetentionPolicy, Duration)>) -> Result<Self, S3Error> {
        if let Some(cfg) = &s3 {
            cfg.validate()?;
        }
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("remus-history".into())
            .spawn(move || {
                let tier = match s3.as_ref().map(S3Tier::new).transpose() {
                    Ok(t) => {
                        let _ = tx.send(Ok(()));
                        t
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let interval = s3.as_ref().map_or(Duration::from_secs(1), S3Config::upload_interval);
                run(tier.as_ref(), &store, &sh, interval, retention.as_ref());
            })
            .map_err(|e| S3Error::Config(format!("starting the history worker: {e}")))?;
        rx.recv().map_err(|_| S3Error::Config("the history worker ended early".into()))??;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// The last pass's error, while S3 fails.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Asks for a pass now.
    pub fn kick(&self) {
        let (m, c) = &self.shared.wake;
        *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        c.notify_all();
    }

    /// Stops after the pass under way (the backlog stays in RocksDB).
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Thins every guest by `policy`, collects chunks, and mirrors both in S3.
///
/// # Errors
/// Store and S3 errors.
pub fn apply_retention(store: &Store, tier: Option<&S3Tier>, policy: &RetentionPolicy) -> Result<RetentionRun, StoreError> {
    let mut run = RetentionRun::default();
    for (guest, head) in store.guests()? {
        // Only what S3 holds is thinned, so S3 can mirror it.
        let upto = if tier.is_some() { store.s3_cursor(guest)? } else { head.epoch };
        let t = store.thin(guest, policy, upto)?;
        run.epochs_dropped += t.epochs_dropped;
        run.pages_dropped += t.pages_dropped;
    }
    let gc = store.gc()?;
    run.chunks_deleted = gc.deleted;
    if let Some(tier) = tier {
        let m = tier.mirror_thinning(store)?;
        let g = tier.gc(store, &gc.referenced)?;
        run.s3 = S3RetentionReport {
            packs_deleted: g.packs_deleted,
            packs_kept: g.packs_kept,
            dead_chunks_in_kept_packs: g.dead_chunks_in_kept_packs,
            packs_repacked: g.packs_repacked,
            chunks_moved: g.chunks_moved,
            ..m
        };
    }
    Ok(run)
}

/// What one retention run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionRun {
    /// Epochs dropped locally.
    pub epochs_dropped: u64,
    /// Page versions no kept epoch sees, removed.
    pub pages_dropped: u64,
    /// Local chunks deleted.
    pub chunks_deleted: u64,
    /// What happened in S3.
    #[serde(skip)]
    pub s3: S3RetentionReport,
}

fn run(tier: Option<&S3Tier>, store: &Store, sh: &Shared, interval: Duration, retention: Option<&(RetentionPolicy, Duration)>) {
    let mut backoff = interval;
    let stop = || sh.stop.load(Ordering::Relaxed);
    let mut next_retention = retention.map(|(_, every)| std::time::Instant::now() + *every);
    while !stop() {
        let mut result = match tier {
            Some(t) => t.upload_pending(store, &stop).map(|r| {
                if r.epochs > 0 {
                    tracing::info!(
                        epochs = r.epochs,
                        segments = r.segments,
                        checkpoints = r.checkpoints,
                        packs = r.packs,
                        bytes = r.chunk_bytes,
                        gathered = r.chunks_gathered,
                        deltas = r.deltas,
                        "uploaded to s3"
                    );
                }
            }),
            None => Ok(()),
        };
        if let (Ok(()), Some((policy, every)), Some(due)) = (&result, retention, next_retention) {
            if std::time::Instant::now() >= due {
                result = apply_retention(store, tier, policy).map(|r| tracing::info!(?r, "retention applied"));
                next_retention = Some(std::time::Instant::now() + *every);
            }
        }
        let mut last_error = sh.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wait = match result {
            Ok(()) => {
                if last_error.take().is_some() {
                    tracing::info!("s3 upload and retention succeed again");
                }
                backoff = interval;
                interval
            }
            Err(e) => {
                // Once per distinct error: a failing pass is retried every
                // few seconds for as long as S3 fails, which for refused
                // credentials is until someone fixes them.
                let e = e.to_string();
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "s3 upload or retention failed; the backlog stays in the store and is retried");
                }
                *last_error = Some(e);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        drop(last_error);
        let (m, c) = &sh.wake;
        let mut woken = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*woken {
            woken = c.wait_timeout(woken, wait).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        *woken = false;
    }
}
