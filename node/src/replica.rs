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
use remus_store::Store;
use remus_types::{ChunkId, EpochId, GuestId};
use remus_wan::driver::Replica;
use remus_wan::{CommitError, ReceivedEpoch};

use crate::admission::Admission;
use crate::events::BackupEvent;
use crate::failover::{self, CommittedPages, FailoverAction, LiveFiles};
use crate::ingest::Ingest;

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

/// Most deleted chunks relayed to primaries per GC (32 MiB of hashes, the
/// size of a primary's default reference cache): a GC that deletes more
/// relays only these, and a primary still naming one of the others is
/// refused for it once.
const MAX_FORGET_RELAYED: usize = 1 << 20;

/// Pages of recently committed content kept for XOR bases and references.
const CACHE_PAGES: usize = 16 << 10;

/// A [`Replica`] backed by a [`Store`].
pub struct StoreReplica {
    store: Arc<Store>,
    ingest: Ingest,
    admission: Admission,
    failover: FailoverAction,
    live: LiveFiles,
    stats: Mutex<HashMap<GuestId, GuestStats>>,
    stopping: Arc<AtomicBool>,
    events: crossbeam_channel::Sender<BackupEvent>,
    /// What the store's GC deletes, for every connected primary.
    deleted: tokio::sync::broadcast::Sender<Arc<[ChunkId]>>,
}

impl StoreReplica {
    /// A replica writing into `store`, reporting on `events`; it relays
    /// what the store's GC deletes to connected primaries.
    pub fn new(store: Arc<Store>, failover: FailoverAction, events: crossbeam_channel::Sender<BackupEvent>) -> Self {
        // A few GC runs' lists; a connection that lags further misses some
        // (it is then refused once per chunk it still names, and recovers).
        let (deleted, _) = tokio::sync::broadcast::channel(16);
        let tx = deleted.clone();
        store.on_chunks_deleted(move |ids| {
            // No receiver (no primary connected) is not an error.
            let _ = tx.send(Arc::from(&ids[..ids.len().min(MAX_FORGET_RELAYED)]));
        });
        Self {
            ingest: Ingest::new(Arc::clone(&store), CACHE_PAGES),
            store,
            admission: Admission::default(),
            failover,
            live: LiveFiles::default(),
            stats: Mutex::new(HashMap::new()),
            stopping: Arc::default(),
            events,
            deleted,
        }
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
    fn welcome(&self, guest: GuestId, instance: u64, page_count: u64) -> Result<(EpochId, ChunkId), String> {
        let head = self.store.head(guest).map_err(|e| e.to_string())?;
        let fence = self.store.fenced(guest).map_err(|e| e.to_string())?;
        self.admission.welcome(guest, instance, page_count, head, fence)
    }

    fn commit(&self, epochs: Vec<ReceivedEpoch>) -> Result<ChunkId, CommitError> {
        let t0 = Instant::now();
        let guest = epochs.first().ok_or(CommitError::Rejected("empty commit group"))?.header.guest;
        let instance = self.admission.instance(guest).ok_or(CommitError::Rejected("commit for a guest that was never welcomed"))?;
        let n = epochs.len() as u64;
        let decoded = self.ingest.decode(epochs, instance)?;
        let live: Option<Vec<CommittedPages>> = self
            .failover
            .keeps_live()
            .then(|| decoded.commits.iter().map(|c| (c.epoch, c.device_state.clone(), c.pages.clone())).collect());
        let outs = self.store.commit_many(decoded.commits).map_err(|e| match e {
            // Collected between the checks above and the commit.
            remus_store::StoreError::Unstored { ids, .. } => CommitError::Missing(ids),
            e => crate::ingest::storage(e),
        })?;
        if let (Some(epochs), FailoverAction::RestoreTo { dir, .. }) = (live, &self.failover) {
            self.live.update(&self.store, &self.ingest, dir, guest, &epochs, &decoded.staged);
        }
        self.ingest.committed(decoded.staged);
        let last = outs.last().ok_or(CommitError::Rejected("empty commit group"))?;
        let mut stats = self.stats.lock();
        let s = stats.entry(guest).or_default();
        s.epochs += n;
        s.committed = last.manifest.epoch;
        s.commit_ns.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        Ok(last.id)
    }

    fn deleted_chunks(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<[ChunkId]>>> {
        Some(self.deleted.subscribe())
    }

    fn primary_lost(&self, guest: GuestId, committed: EpochId, silence: &remus_wan::Silence) {
        self.stats.lock().entry(guest).or_default().lost_at = Some(committed);
        let _ = self.events.send(BackupEvent::PrimaryLost { guest, committed, silence: *silence });
        let FailoverAction::RestoreTo { dir, resume } = &self.failover else { return };
        self.admission.fence(guest, committed);
        // Kept in the store as well, so that a restarted backup still
        // refuses the old primary.
        if let Err(e) =
            self.store.fence(guest, remus_store::Fence { epoch: committed, since_unix_ms: remus_types::now_unix_nanos() / 1_000_000 })
        {
            tracing::error!(%guest, error = %e, "the fence could not be stored; it holds until this backup stops");
        }
        let live = self.live.take(guest, committed);
        failover::spawn(Arc::clone(&self.store), guest, dir.clone(), resume.clone(), live, Arc::clone(&self.stopping), self.events.clone());
    }

    fn disconnected(&self, guest: GuestId) {
        self.admission.disconnected(guest);
    }
}
