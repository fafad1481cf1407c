//! The backup's replica: the [`Replica`] the link driver calls, composed
//! of admission (who may replicate), ingest (decode and verify), the
//! store's atomic commit, and failover.
//!
//! Order of a commit group: decode and verify every page; refuse the
//! whole group naming every chunk it references that is not held; commit
//! all of it in one synced write; only then update the live failover
//! files and the page cache, and acknowledge. What the store's GC deletes
//! is relayed as it happens, so primaries stop naming it before they need
//! to be refused.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use remus_store::{Head, Store, StoreError};
use remus_types::{ChunkId, EpochId, GuestId};
use remus_wan::driver::Replica;
use remus_wan::{CommitError, ReceivedEpoch};

use crate::admission::Admission;
use crate::events::BackupEvent;
use crate::failover::{self, CommittedPages, FailoverAction, LiveFiles};
use crate::ingest::Ingest;
use crate::lease::{claim, LeaseWatch, Renewal, WitnessOptions, Won};
use crate::quota::{self, GuestQuota, Rates};

/// Commit statistics of one guest at the backup.
#[derive(Debug, Default, Clone)]
pub struct GuestStats {
    /// Epochs committed.
    pub epochs: u64,
    /// Last committed epoch.
    pub committed: EpochId,
    /// Time spent decoding and committing, per epoch, in ns.
    pub commit_ns: Vec<u64>,
    /// The primary went silent (failover point), if it did.
    pub lost_at: Option<EpochId>,
}

/// Per guest, the channel its connections hear GC's deletions on.
type DeletedByGuest = HashMap<GuestId, tokio::sync::broadcast::Sender<Arc<[ChunkId]>>>;

/// Most deleted chunks relayed to primaries per GC (32 MiB of hashes, the
/// size of a primary's default reference cache): a GC that deletes more
/// relays only these, and a primary still naming one of the others is
/// refused for it once.
const MAX_FORGET_RELAYED: usize = 1 << 20;

/// A [`Replica`] backed by a [`Store`].
pub struct StoreReplica {
    /// Itself, for the threads a takeover runs on.
    me: std::sync::Weak<StoreReplica>,
    store: Arc<Store>,
    ingest: Ingest,
    admission: Admission,
    failover: FailoverAction,
    /// The witness a takeover must win the lease on (none: fail over on
    /// silence alone).
    witness: Option<WitnessOptions>,
    /// When each guest's primary was last welcomed (a sign it is alive
    /// after a loss was declared).
    welcomed: Mutex<HashMap<GuestId, Instant>>,
    /// The lease of each guest this backup may take over, watched while
    /// its primary runs.
    watches: Mutex<HashMap<GuestId, LeaseWatch>>,
    /// One commit at a time per guest (two connections of one primary run
    /// may overlap for a while), and fencing between commits.
    commit_locks: Mutex<HashMap<GuestId, Arc<Mutex<()>>>>,
    live: Arc<LiveFiles>,
    /// What each guest may use, its rate buckets, and the guests whose
    /// commits are refused for their store quota now (each reported once
    /// per time it is reached).
    quota: GuestQuota,
    rates: Rates,
    over_quota: Mutex<std::collections::HashSet<GuestId>>,
    stats: Mutex<HashMap<GuestId, GuestStats>>,
    stopping: Arc<AtomicBool>,
    events: crossbeam_channel::Sender<BackupEvent>,
    /// What the store's GC deletes, for every connected primary.
    /// Per guest, what GC deleted of its chunks, for its connections.
    deleted: Arc<Mutex<DeletedByGuest>>,
}

impl StoreReplica {
    /// A replica writing into `store`, reporting on `events`; it relays
    /// what the store's GC deletes to connected primaries.
    pub fn new(
        store: Arc<Store>,
        failover: FailoverAction,
        witness: Option<WitnessOptions>,
        quota: GuestQuota,
        events: crossbeam_channel::Sender<BackupEvent>,
    ) -> Arc<Self> {
        // A few GC runs' lists; a connection that lags further misses some
        // (it is then refused once per chunk it still names, and recovers).
        let deleted: Arc<Mutex<DeletedByGuest>> = Arc::default();
        let senders = Arc::clone(&deleted);
        store.on_chunks_deleted(move |guest, ids| {
            // No receiver (the guest's primary not connected) is not an error.
            if let Some(tx) = senders.lock().get(&guest) {
                let _ = tx.send(Arc::from(&ids[..ids.len().min(MAX_FORGET_RELAYED)]));
            }
        });
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            ingest: Ingest::new(Arc::clone(&store)),
            store,
            admission: Admission::default(),
            failover,
            witness,
            welcomed: Mutex::default(),
            watches: Mutex::default(),
            commit_locks: Mutex::default(),
            quota,
            rates: Rates::default(),
            over_quota: Mutex::default(),
            live: Arc::default(),
            stats: Mutex::new(HashMap::new()),
            stopping: Arc::default(),
            events,
            deleted,
        })
    }

    /// Fails `guest` over: fences its old primary (here and in the store,
    /// so a restarted backup still refuses it) and brings back the last
    /// committed epoch; `lease`, when a witness is used, is kept renewed
    /// for as long as the resumed guest runs here.
    /// After a loss (`lost`), not while the guest's newest committed epoch
    /// is one whose output was released ahead ([`Self::protected`]).
    fn take_over(&self, guest: GuestId, committed: EpochId, lease: Option<Renewal>, lost: bool) {
        let FailoverAction::RestoreTo { dir, resume } = &self.failover else { return };
        // Fenced under the guest's commit lock, the head read after: a
        // commit running now finishes first and is in the head the guest
        // resumes from, and none starts after (see `commit`). No output
        // the old primary released is missing from the resumed guest, and
        // nothing after the failover epoch reaches the history or the
        // resumed guest's files.
        let committed = {
            let lock = self.guest_lock(guest);
            let _one = lock.lock();
            let head = self.store.head(guest);
            let epoch = head.as_ref().ok().and_then(|h| h.as_ref()).map_or(committed, |h| h.epoch);
            if lost && !self.protected(guest, head) {
                return;
            }
            self.admission.fence(guest, epoch);
            epoch
        };
        let _ = self.events.send(BackupEvent::Fenced { guest, epoch: committed });
        if let Err(e) =
            self.store.fence(guest, remus_store::Fence { epoch: committed, since_unix_ms: remus_types::now_unix_nanos() / 1_000_000 })
        {
            tracing::error!(%guest, error = %e, "the fence could not be stored; it holds until this backup stops");
        }
        let job = failover::Job {
            store: Arc::clone(&self.store),
            guest,
            dir: dir.clone(),
            resume: resume.clone(),
            epoch: committed,
            live: Arc::clone(&self.live),
            lease,
        };
        failover::spawn(job, Arc::clone(&self.stopping), self.events.clone());
    }

    /// Whether `guest` may fail over from its newest committed epoch: not
    /// when the primary released that epoch's output ahead (its first
    /// copy, before any backup held it; see
    /// `remus_capture::EpochEngine::releasing_ahead`), for the output of
    /// epochs after it, which this backup does not hold, may be out.
    /// Reported when not. `head`: the guest's head, as just read.
    fn protected(&self, guest: GuestId, head: Result<Option<Head>, StoreError>) -> bool {
        let newest = head.and_then(|h| h.map(|h| self.store.manifest(guest, h.epoch)).transpose());
        let (released_ahead, committed) = match newest {
            Ok(Some(m)) => (m.released_ahead, m.epoch),
            // No history here: the failover finds nothing to resume and says so.
            Ok(None) => return true,
            Err(e) => {
                tracing::error!(%guest, error = %e, "the newest manifest could not be read: not failed over");
                return false;
            }
        };
        if released_ahead {
            tracing::error!(
                %guest,
                committed = committed.0,
                "not failed over: the guest was not yet protected (its primary released output while making its first copy)"
            );
            let _ = self.events.send(BackupEvent::NotProtected { guest, committed });
        }
        !released_ahead
    }

    /// Wins `guest`'s lease for the next generation, starting from
    /// `epoch`, once the witness allows it (see [`claim`]: the owner last
    /// heard at `last_heard`, `heard` polled for newer signs of it,
    /// `cancel` ending the wait), reports it, and keeps it renewed. `None`:
    /// the claim was given up.
    fn win_lease(
        &self,
        w: &WitnessOptions,
        (guest, epoch): (GuestId, EpochId),
        last_heard: Instant,
        heard: impl Fn() -> Option<Instant>,
        cancel: &AtomicBool,
    ) -> Result<Option<Renewal>, crate::NodeError> {
        let watched = self.watches.lock().get(&guest).map(LeaseWatch::claimant);
        let Some(Won { holder, lease, released }) = claim(w, (guest, epoch), (last_heard, watched), heard, cancel)? else {
            return Ok(None);
        };
        let _ = self.events.send(BackupEvent::LeaseWon { lease: Box::new(lease.lease.clone()), after: last_heard.elapsed(), released });
        // The lease is this backup's now: no more watching.
        self.watches.lock().remove(&guest);
        Renewal::start(w, holder, lease).map(Some)
    }

    /// The lock that keeps `guest`'s commits (and its fencing) one at a
    /// time.
    fn guest_lock(&self, guest: GuestId) -> Arc<Mutex<()>> {
        Arc::clone(self.commit_locks.lock().entry(guest).or_default())
    }

    /// Refuses a commit group of `n` epochs of `guest` over its store
    /// quota (nothing committed is touched); over its epoch rate, waits
    /// until the group is within it.
    fn within_quota(&self, guest: GuestId, n: u64) -> Result<(), CommitError> {
        if let Some(limit) = self.quota.store_bytes {
            let used = self.store.usage(guest).map_err(crate::ingest::storage)?;
            if used >= limit {
                if self.over_quota.lock().insert(guest) {
                    tracing::warn!(%guest, used, limit, "store quota reached: the guest's commits are refused");
                    let _ = self.events.send(BackupEvent::QuotaExceeded { guest, used, limit });
                }
                return Err(CommitError::Refused(format!(
                    "{guest} is over its store quota at this backup ({} of {}, [backup] guest-store-mib): nothing more of it is \
                     committed until retention frees space or the quota is raised",
                    quota::bytes(used),
                    quota::bytes(limit)
                )));
            }
            self.over_quota.lock().remove(&guest);
        }
        if let Some(hz) = self.quota.epoch_hz {
            let wait = self.rates.wait(guest, hz, n);
            if !wait.is_zero() {
                tracing::debug!(%guest, hz, ms = wait.as_millis() as u64, "over the epoch rate quota: the commit waits");
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Stops guests resumed here by failover (the backup is stopping).
    pub fn shutdown(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Statistics of `guest`.
    pub fn stats(&self, guest: GuestId) -> GuestStats {
        self.stats.lock().get(&guest).cloned().unwrap_or_default()
    }
}

impl Replica for StoreReplica {
    fn welcome(
        &self,
        guest: GuestId,
        instance: u64,
        page_count: u64,
        generation: u64,
        continues: Option<(EpochId, ChunkId)>,
    ) -> Result<(EpochId, ChunkId), String> {
        let head = self.store.head(guest).map_err(|e| e.to_string())?;
        let fence = self.store.fenced(guest).map_err(|e| e.to_string())?;
        let admitted = self.admission.welcome(guest, (instance, generation), page_count, (head, fence), continues)?;
        if let Some(graft) = admitted.graft {
            // A guest protected again after failing over or moving: its
            // history here continues that chain (after what this backup
            // held of it before, if anything).
            if let Err(e) = self.store.graft(guest, graft) {
                self.admission.disconnected(guest);
                return Err(e.to_string());
            }
            let elsewhere_from = head.map(|h| h.epoch.next());
            tracing::info!(%guest, epoch = graft.epoch.0, ?elsewhere_from, "history continued from another backup's epoch");
            let _ = self.events.send(BackupEvent::Continued { guest, after: graft.epoch, elsewhere_from });
        }
        self.welcomed.lock().insert(guest, Instant::now());
        if let (Some(w), FailoverAction::RestoreTo { .. }) = (&self.witness, &self.failover) {
            if let std::collections::hash_map::Entry::Vacant(e) = self.watches.lock().entry(guest) {
                match LeaseWatch::start(w, guest) {
                    Ok(watch) => {
                        e.insert(watch);
                    }
                    Err(err) => tracing::warn!(%guest, error = %err, "the lease is not watched; a takeover will wait a lease period more"),
                }
            }
        }
        Ok(admitted.committed)
    }

    fn commit(&self, epochs: Vec<ReceivedEpoch>) -> Result<ChunkId, CommitError> {
        let t0 = Instant::now();
        let guest = epochs.first().ok_or(CommitError::Rejected("empty commit group"))?.header.guest;
        // One commit at a time per guest, and none once it failed over
        // here: the fence is set under the same lock (see `take_over`).
        let lock = self.guest_lock(guest);
        let _one = lock.lock();
        if self.admission.is_fenced(guest) {
            return Err(CommitError::Rejected("the guest failed over to this backup; its old primary's epochs are not committed"));
        }
        let lineage = self.admission.lineage(guest).ok_or(CommitError::Rejected("commit for a guest that was never welcomed"))?;
        let n = epochs.len() as u64;
        self.within_quota(guest, n)?;
        let commits = self.ingest.decode(epochs, lineage)?;
        let live: Option<Vec<CommittedPages>> =
            self.failover.keeps_live().then(|| commits.iter().map(|c| (c.epoch, c.device_state.clone(), c.pages.clone())).collect());
        let outs = self.store.commit_many(commits).map_err(|e| match e {
            // Collected between the checks above and the commit.
            remus_store::StoreError::Unstored { ids, .. } => CommitError::Missing(ids),
            e => crate::ingest::storage(e),
        })?;
        if let (Some(epochs), FailoverAction::RestoreTo { dir, .. }) = (live, &self.failover) {
            self.live.update(&self.store, dir, guest, &epochs);
        }
        let last = outs.last().ok_or(CommitError::Rejected("empty commit group"))?;
        let mut stats = self.stats.lock();
        let s = stats.entry(guest).or_default();
        s.epochs += n;
        s.committed = last.manifest.epoch;
        s.commit_ns.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        tracing::debug!(%guest, epochs = n, ms = t0.elapsed().as_secs_f64() * 1e3, "committed");
        Ok(last.id)
    }

    fn deleted_chunks(&self, guest: GuestId) -> Option<tokio::sync::broadcast::Receiver<Arc<[ChunkId]>>> {
        Some(self.deleted.lock().entry(guest).or_insert_with(|| tokio::sync::broadcast::channel(16).0).subscribe())
    }

    fn primary_lost(&self, guest: GuestId, committed: EpochId, silence: &remus_wan::Silence) {
        self.stats.lock().entry(guest).or_default().lost_at = Some(committed);
        let _ = self.events.send(BackupEvent::PrimaryLost { guest, committed, silence: *silence });
        let FailoverAction::RestoreTo { .. } = &self.failover else { return };
        let Some(w) = self.witness.clone() else {
            self.take_over(guest, committed, None, true);
            return;
        };
        // Not protected yet: no lease taken from a primary that may run on.
        if !self.protected(guest, self.store.head(guest)) {
            return;
        }
        // With a witness, only by winning the lease for the next
        // generation: a primary cut off from this backup but not from the
        // witness keeps its lease, and with it its guest.
        let last_heard = Instant::now().checked_sub(silence.silent_for).unwrap_or_else(Instant::now);
        let Some(me) = self.me.upgrade() else { return };
        std::thread::spawn(move || {
            let heard = || me.welcomed.lock().get(&guest).copied();
            match me.win_lease(&w, (guest, committed), last_heard, heard, &me.stopping) {
                Ok(Some(renewal)) => me.take_over(guest, committed, Some(renewal), true),
                Ok(None) => {
                    let _ = me.events.send(BackupEvent::TakeoverAbandoned { guest });
                }
                Err(e) => {
                    let _ = me.events.send(BackupEvent::FailoverFailed { guest, error: e.to_string() });
                }
            }
        });
    }

    fn hand_over(&self, guest: GuestId, epoch: EpochId) -> Result<(), String> {
        if !matches!(self.failover, FailoverAction::RestoreTo { .. }) {
            return Err(format!("{guest}: this backup takes no guest over (it runs without --failover-dir)"));
        }
        let _ = self.events.send(BackupEvent::HandedOver { guest, epoch });
        // With a witness, only as the lease's next owner: the primary has
        // stopped (its last epoch is sealed with the guest held still and
        // it releases nothing more), so the lease runs out unchanged.
        let lease = match &self.witness {
            Some(w) => match self.win_lease(w, (guest, epoch), Instant::now(), || None, &AtomicBool::new(false)) {
                Ok(Some(renewal)) => Some(renewal),
                Ok(None) => return Err(format!("{guest}: the takeover was cancelled")),
                Err(e) => return Err(format!("{guest}: the lease could not be taken: {e}")),
            },
            None => None,
        };
        // Every epoch is committed (the primary hands over only then): any
        // output it released ahead is here.
        self.take_over(guest, epoch, lease, false);
        Ok(())
    }

    fn disconnected(&self, guest: GuestId) {
        self.admission.disconnected(guest);
    }

    fn holds(&self, guest: GuestId) -> Vec<ChunkId> {
        let t0 = Instant::now();
        match self.memory_held(guest) {
            Ok(ids) => {
                tracing::info!(%guest, chunks = ids.len(), ms = t0.elapsed().as_millis() as u64, "told the primary what its memory here holds");
                ids
            }
            Err(e) => {
                tracing::warn!(%guest, error = %e, "could not list what the guest's memory here holds; its primary sends it whole");
                Vec::new()
            }
        }
    }
}

impl StoreReplica {
    /// The distinct non-zero chunks of `guest`'s memory at its head here
    /// (at most [`remus_wan::MAX_HOLDS`]) that it may name by hash.
    fn memory_held(&self, guest: GuestId) -> Result<Vec<ChunkId>, remus_store::StoreError> {
        let Some(head) = self.store.head(guest)? else { return Ok(Vec::new()) };
        let zero = remus_types::zero_page_hash();
        let mut ids = std::collections::HashSet::new();
        self.store.for_each_page_at(guest, head.epoch, |_, id| {
            if id != zero && ids.len() < remus_wan::MAX_HOLDS {
                ids.insert(id);
            }
            Ok(())
        })?;
        let ids: Vec<ChunkId> = ids.into_iter().collect();
        let held = self.store.held(guest, &ids)?;
        Ok(ids.into_iter().zip(held).filter(|(_, h)| *h).map(|(id, _)| id).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_types::{zero_page_hash, Pfn};
    use remus_wan::{EpochHeader, PageEncoding, PageRecord};

    /// Every file under `dir`.
    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    fn epoch(guest: GuestId, e: u64) -> ReceivedEpoch {
        let records = vec![PageRecord { pfn: Pfn(e % 16), hash: zero_page_hash(), encoding: PageEncoding::Zero }];
        let header = EpochHeader {
            guest,
            epoch: EpochId(e),
            time_unix_ns: e,
            page_count: 16,
            pause_ns: 0,
            records: records.len() as u32,
            round: 0,
            follows: EpochId(e - 1),
            released_ahead: false,
        };
        ReceivedEpoch { header, records, device_state: Vec::new(), memory_root: ChunkId::default(), wire_bytes: 0 }
    }

    /// A store in `dir` and a replica of it acting on failures as told,
    /// with the events it sends.
    fn replica_in(
        dir: &std::path::Path,
        failover: FailoverAction,
        quota: GuestQuota,
    ) -> (Arc<Store>, Arc<StoreReplica>, crossbeam_channel::Receiver<BackupEvent>) {
        let store = Arc::new(Store::open(&dir.join("store"), remus_store::StoreOptions::default()).unwrap());
        let (tx, events) = crossbeam_channel::unbounded();
        let replica = StoreReplica::new(Arc::clone(&store), failover, None, quota, tx);
        (store, replica, events)
    }

    #[test]
    fn a_guest_over_its_store_quota_is_refused_saying_so_and_others_and_its_history_are_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let quota = GuestQuota { store_bytes: Some(3000), epoch_hz: None };
        let (store, replica, events) = replica_in(dir.path(), FailoverAction::Record, quota);
        let (g, other) = (GuestId(1), GuestId(2));
        replica.welcome(g, 7, 16, 0, None).unwrap();
        replica.welcome(other, 8, 16, 0, None).unwrap();
        // Each epoch charges its manifest and one index entry (300 bytes):
        // the group that crosses 3000 is taken whole, the next refused.
        let mut e = 0;
        let err = loop {
            e += 1;
            match replica.commit(vec![epoch(g, e)]) {
                Ok(_) => assert!(e < 20, "never refused"),
                Err(err) => break err,
            }
        };
        let head = store.head(g).unwrap().unwrap().epoch;
        assert_eq!(head, EpochId(e - 1));
        assert!(store.usage(g).unwrap() >= 3000 && store.usage(g).unwrap() < 3000 + 400);
        let CommitError::Refused(why) = err else { panic!("{err:?}") };
        assert!(why.contains("guest-1 is over its store quota") && why.contains("guest-store-mib"), "{why}");
        // Refused again, reported once; nothing of it written.
        assert!(matches!(replica.commit(vec![epoch(g, e)]), Err(CommitError::Refused(_))));
        let reported: Vec<BackupEvent> = events.try_iter().collect();
        assert!(
            matches!(&reported[..], [BackupEvent::QuotaExceeded { guest, used, limit: 3000 }] if *guest == g && *used >= 3000),
            "{reported:?}"
        );
        assert_eq!(store.head(g).unwrap().unwrap().epoch, head);
        assert_eq!(store.manifests(g).unwrap().len() as u64, head.0, "its history is whole");
        // Another guest has a quota of its own.
        replica.commit(vec![epoch(other, 1), epoch(other, 2)]).unwrap();
        assert_eq!(store.head(other).unwrap().unwrap().epoch, EpochId(2));
    }

    /// Epoch `e` carrying `page` at pfn 3 as `encoding`, under `hash`.
    fn epoch_with(guest: GuestId, e: u64, hash: ChunkId, encoding: PageEncoding) -> ReceivedEpoch {
        let mut ep = epoch(guest, e);
        ep.records = vec![PageRecord { pfn: Pfn(3), hash, encoding }];
        ep.header.records = 1;
        ep
    }

    /// A page whose content is not what its hash says (sent whole,
    /// compressed, or as a delta over a held page) or is not one page's
    /// worth is refused as a bad page naming it, and nothing of its group
    /// is written; the honest page commits after.
    #[test]
    fn a_page_that_is_not_its_hash_is_refused_naming_it_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (store, replica, _events) = replica_in(dir.path(), FailoverAction::Record, GuestQuota::default());
        let g = GuestId(1);
        replica.welcome(g, 7, 16, 0, None).unwrap();
        let page = |b: u8| vec![b; remus_types::PAGE_SIZE];
        let id = |b: u8| remus_types::content_id(&page(b));
        let zstd = |p: &[u8]| zstd::bulk::compress(p, 1).unwrap();
        replica.commit(vec![epoch_with(g, 1, id(1), PageEncoding::RawZstd(zstd(&page(1))))]).unwrap();
        let xor: Vec<u8> = page(1).iter().zip(page(2)).map(|(a, b)| a ^ b).collect();
        let lies =
            [PageEncoding::RawPlain(page(2)), PageEncoding::RawZstd(zstd(&page(2))), PageEncoding::Xor { base: id(1), delta: zstd(&xor) }];
        for lie in lies {
            // Epoch 2 is fine; epoch 3 says page 9 and carries page 2.
            let group = vec![epoch(g, 2), epoch_with(g, 3, id(9), lie.clone())];
            let err = replica.commit(group).unwrap_err();
            assert!(
                matches!(err, CommitError::BadPage { epoch: EpochId(3), pfn: 3, cause: remus_wan::DecodeError::HashMismatch { pfn: 3 } }),
                "{lie:?}: {err:?}"
            );
            assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(1), "{lie:?}: nothing of the group written");
        }
        let short = epoch_with(g, 2, id(2), PageEncoding::RawPlain(vec![2; 100]));
        assert!(matches!(replica.commit(vec![short]).unwrap_err(), CommitError::BadPage { pfn: 3, .. }));
        let short = epoch_with(g, 2, id(2), PageEncoding::RawZstd(zstd(&[2; 100])));
        assert!(matches!(replica.commit(vec![short]).unwrap_err(), CommitError::BadPage { pfn: 3, .. }));
        replica.commit(vec![epoch_with(g, 2, id(2), PageEncoding::Xor { base: id(1), delta: zstd(&xor) })]).unwrap();
        assert_eq!(store.chunk(&id(2)).unwrap(), page(2));
        assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    }

    #[test]
    fn of_two_concurrent_commits_of_one_epoch_exactly_one_lands() {
        let dir = tempfile::tempdir().unwrap();
        let (store, replica, _events) = replica_in(dir.path(), FailoverAction::Record, GuestQuota::default());
        let g = GuestId(1);
        replica.welcome(g, 7, 16, 0, None).unwrap();
        // Two connections of one primary run offer each epoch at once.
        for e in 1..=50 {
            let start = Arc::new(std::sync::Barrier::new(2));
            let results: Vec<Result<ChunkId, CommitError>> = std::thread::scope(|s| {
                let runs: Vec<_> = (0..2)
                    .map(|_| {
                        let (replica, start) = (Arc::clone(&replica), Arc::clone(&start));
                        s.spawn(move || {
                            start.wait();
                            replica.commit(vec![epoch(g, e)])
                        })
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "epoch {e}: {results:?}");
            assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(e));
        }
        assert_eq!(store.manifests(g).unwrap().len(), 50, "each epoch once");
        assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    }

    #[test]
    fn commits_over_the_epoch_rate_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let quota = GuestQuota { store_bytes: None, epoch_hz: Some(20) };
        let (store, replica, _events) = replica_in(dir.path(), FailoverAction::Record, quota);
        let g = GuestId(1);
        replica.welcome(g, 7, 16, 0, None).unwrap();
        let t0 = Instant::now();
        replica.commit((1..=20).map(|e| epoch(g, e)).collect()).unwrap();
        let burst = t0.elapsed();
        // The bucket held 20 (a second's): the next 10 wait half a second.
        replica.commit((21..=30).map(|e| epoch(g, e)).collect()).unwrap();
        let paced = t0.elapsed();
        assert!(paced >= burst + std::time::Duration::from_millis(450), "burst {burst:?}, then {paced:?}");
        assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(30));
    }

    /// Waits until the failover's thread has let go of the store (RocksDB
    /// must not outlive the test's process).
    fn wait_for_the_failover_to_let_go(store: &Arc<Store>) {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while Arc::strong_count(store) > 1 {
            assert!(Instant::now() < deadline, "the failover thread keeps the store");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_guest_whose_newest_epoch_was_released_ahead_is_not_failed_over_until_a_held_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let failover = FailoverAction::RestoreTo { dir: dir.path().join("failover"), resume: None };
        let (store, replica, events) = replica_in(dir.path(), failover, GuestQuota::default());
        let g = GuestId(1);
        let ahead = |e| {
            let mut r = epoch(g, e);
            r.header.released_ahead = true;
            r
        };
        let silence = remus_wan::Silence {
            silent_for: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_millis(500),
            phi: 9.0,
            mean_gap: std::time::Duration::from_millis(20),
            std_gap: std::time::Duration::from_millis(5),
            samples: 100,
            rtt: std::time::Duration::from_millis(1),
        };
        replica.welcome(g, 7, 16, 0, None).unwrap();
        replica.commit(vec![ahead(1), ahead(2)]).unwrap();
        assert!(store.manifest(g, EpochId(2)).unwrap().released_ahead, "the manifest records it");
        replica.primary_lost(g, EpochId(2), &silence);
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e);
        }
        assert!(seen.iter().any(|e| matches!(e, BackupEvent::NotProtected { committed: EpochId(2), .. })), "{seen:?}");
        assert!(!seen.iter().any(|e| matches!(e, BackupEvent::Fenced { .. })), "not fenced: {seen:?}");
        assert!(replica.commit(vec![epoch(g, 3)]).is_ok(), "the primary, heard again, goes on");
        assert!(!store.manifest(g, EpochId(3)).unwrap().released_ahead);
        // Epoch 3's output was held for its commit: from here it fails over.
        replica.primary_lost(g, EpochId(3), &silence);
        loop {
            match events.recv_timeout(std::time::Duration::from_secs(60)).expect("the failover ends") {
                BackupEvent::Fenced { epoch, .. } => assert_eq!(epoch, EpochId(3)),
                BackupEvent::NotProtected { .. } => panic!("protected once a held epoch is committed"),
                BackupEvent::FailedOver { .. } | BackupEvent::FailoverFailed { .. } => break,
                _ => {}
            }
        }
        drop(replica);
        wait_for_the_failover_to_let_go(&store);
    }

    #[test]
    fn nothing_commits_for_a_guest_once_it_failed_over_here() {
        let dir = tempfile::tempdir().unwrap();
        let failover = FailoverAction::RestoreTo { dir: dir.path().join("failover"), resume: None };
        let (store, replica, events) = replica_in(dir.path(), failover, GuestQuota::default());
        let g = GuestId(1);
        replica.welcome(g, 7, 16, 0, None).unwrap();
        replica.commit(vec![epoch(g, 1), epoch(g, 2)]).unwrap();
        replica.take_over(g, EpochId(1), None, true);
        // A commit of the old primary after the fence: refused whole,
        // nothing written, the head where the guest failed over.
        let err = replica.commit(vec![epoch(g, 3)]).unwrap_err();
        assert!(matches!(err, CommitError::Rejected(m) if m.contains("failed over")), "{err:?}");
        assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(2), "the fence is at the head, epoch 2, not the link's 1");
        assert!(replica.welcome(g, 7, 16, 0, None).unwrap_err().contains("failed over"));
        // The failover runs on: wait for it, and for its thread to let go
        // of the store (RocksDB must not outlive the test's process).
        let mut fenced = Vec::new();
        loop {
            match events.recv_timeout(std::time::Duration::from_secs(60)).expect("the failover ends") {
                BackupEvent::Fenced { epoch, .. } => fenced.push(epoch),
                // These epochs carry no memory roots, so the restore
                // refuses them: the failover ends either way.
                BackupEvent::FailedOver { .. } | BackupEvent::FailoverFailed { .. } => break,
                _ => {}
            }
        }
        assert_eq!(fenced, [EpochId(2)]);
        // The failover has written what it writes: a late commit now is
        // refused and leaves every file of it as it was.
        let snapshot = |dir: &std::path::Path| {
            let mut files = Vec::new();
            for e in walk(dir) {
                files.push((e.clone(), std::fs::read(&e).unwrap()));
            }
            files.sort();
            files
        };
        let before = snapshot(&dir.path().join("failover"));
        assert!(!before.is_empty(), "the failover wrote its files");
        assert!(matches!(replica.commit(vec![epoch(g, 3)]), Err(CommitError::Rejected(_))));
        assert_eq!(snapshot(&dir.path().join("failover")), before, "the resumed guest's files are untouched");
        assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(2));
        drop(replica);
        wait_for_the_failover_to_let_go(&store);
    }
}
