//! The backup's replica: turns received epochs into store commits.
//!
//! Each page record is decoded and verified against its hash before
//! anything is written (`Raw` pages are stored as the zstd frame that
//! arrived; `Xor` pages are rebuilt against their base and compressed;
//! `Ref` pages must name a chunk already held). The epoch is then
//! committed in one atomic write, and only then acknowledged.
//!
//! A group naming chunks the store no longer holds (GC deleted them after
//! the primary sent them) is refused with the full list
//! ([`CommitError::Missing`]): the primary then sends it again in full.
//! What GC deletes is also relayed as it happens, so primaries stop naming
//! it before they need to be refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use remus_store::{EpochCommit, Store, StoredChunk};
use remus_capture::qemu::{QemuState, RunDir, VMSTATE_PAGES};
use remus_types::{zero_page_hash, ChunkId, EpochId, GuestId, PAGE_SIZE};
use remus_wan::driver::Replica;
use remus_wan::{CommitError, PageEncoding, ReceivedEpoch};

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

/// What the backup does when a primary goes silent.
#[derive(Debug, Clone, Default)]
pub enum FailoverAction {
    /// Record it (the default): the primary may come back and resume.
    #[default]
    Record,
    /// Fail over: fence the old primary (its guest is refused from now on)
    /// and hand back the last committed epoch in this directory, ready to
    /// resume from: a memory image, or for a QEMU guest the memory, disk
    /// and device-state files, and, with `resume`, the guest running again
    /// in a QEMU here.
    RestoreTo {
        /// Where the images go (a subdirectory per QEMU guest).
        dir: std::path::PathBuf,
        /// Resume QEMU guests here.
        resume: Option<ResumeVm>,
    },
}

/// How the backup resumes a QEMU guest on failover.
#[derive(Debug, Clone)]
pub struct ResumeVm {
    /// QEMU binary.
    pub qemu_binary: std::path::PathBuf,
    /// TAP interface for the resumed guest's network.
    pub tap: Option<String>,
}

/// Recently committed pages by hash, bounded: most XOR bases and
/// references name a page committed a few epochs ago, and reading it back
/// from the store costs a blob read, a decompression and a re-hash.
/// Invariant: only pages durably committed are inserted.
struct PageCache {
    pages: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<ChunkId>,
    capacity: usize,
}

impl PageCache {
    fn new(capacity: usize) -> Self {
        Self { pages: HashMap::new(), order: std::collections::VecDeque::new(), capacity }
    }

    fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.pages.get(id).cloned()
    }

    fn insert(&mut self, id: ChunkId, page: Arc<Vec<u8>>) {
        if self.pages.insert(id, page).is_none() {
            self.order.push_back(id);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.pages.remove(&old);
                }
            }
        }
    }
}

/// Most deleted chunks relayed to primaries per GC (32 MiB of hashes, the
/// size of a primary's default reference cache): a GC that deletes more
/// relays only these, and a primary still naming one of the others is
/// refused for it once.
const MAX_FORGET_RELAYED: usize = 1 << 20;

/// A [`Replica`] backed by a [`Store`].
pub struct StoreReplica {
    cache: Mutex<PageCache>,
    store: Arc<Store>,
    failover: FailoverAction,
    fenced: Mutex<HashMap<GuestId, EpochId>>,
    zstd_level: i32,
    /// Connections per guest: a primary that reconnects before its old
    /// connection timed out here has two for a while.
    active: Mutex<HashMap<GuestId, usize>>,
    instances: Mutex<HashMap<GuestId, u64>>,
    stats: Mutex<HashMap<GuestId, GuestStats>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// QEMU guests' last committed state as files, when failover resumes
    /// them: failover then starts QEMU at once instead of restoring.
    live: Mutex<HashMap<GuestId, LiveVm>>,
    /// What the store's GC deletes, for every connected primary.
    deleted: tokio::sync::broadcast::Sender<Arc<[ChunkId]>>,
}

/// A QEMU guest's last committed epoch kept as the files QEMU resumes from
/// (memory, disk image, device state) in the failover directory.
/// Invariant: `epoch` names the committed epoch the files hold; on any
/// failure to apply an epoch the entry is dropped (failover then restores
/// from the store).
struct LiveVm {
    epoch: EpochId,
    state: QemuState,
    run: RunDir,
    files: Vec<(u64, u64, std::fs::File)>,
}

impl LiveVm {
    fn open(state: QemuState, run: RunDir, epoch: EpochId) -> std::io::Result<Self> {
        let files = state
            .segments(&run)
            .into_iter()
            .map(|(first, pages, path)| {
                let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
                let want = if first == state.vmstate_pfn() { VMSTATE_PAGES } else { pages };
                if f.metadata()?.len() < want * PAGE_SIZE as u64 {
                    f.set_len(want * PAGE_SIZE as u64)?;
                }
                Ok((first, want, f))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self { epoch, state, run, files })
    }

    fn write(&self, pfn: u64, page: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self.files.iter().find(|(first, pages, _)| (*first..first + pages).contains(&pfn)) {
            Some((first, _, f)) => f.write_all_at(page, (pfn - first) * PAGE_SIZE as u64),
            None => Err(std::io::Error::other(format!("page {pfn} outside the guest's layout"))),
        }
    }

    /// Makes the files exactly what QEMU loads: the device-state stream cut
    /// to its length, and the machine described.
    fn seal(&self) -> std::io::Result<()> {
        std::fs::OpenOptions::new().write(true).open(self.run.vmstate())?.set_len(self.state.vmstate_len)?;
        std::fs::write(self.run.machine(), self.state.machine_json()?)
    }
}

impl StoreReplica {
    /// A replica writing into `store`; it relays what the store's GC
    /// deletes to connected primaries.
    pub fn new(store: Arc<Store>, failover: FailoverAction) -> Self {
        // A few GC runs' lists; a connection that lags further misses some
        // (it is then refused once per chunk it still names, and recovers).
        let (deleted, _) = tokio::sync::broadcast::channel(16);
        let tx = deleted.clone();
        store.on_chunks_deleted(move |ids| {
            // No receiver (no primary connected) is not an error.
            let _ = tx.send(Arc::from(&ids[..ids.len().min(MAX_FORGET_RELAYED)]));
        });
        Self {
            cache: Mutex::new(PageCache::new(16 << 10)),
            store,
            failover,
            fenced: Mutex::new(HashMap::new()),
            zstd_level: 1,
            active: Mutex::new(HashMap::new()),
            instances: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            stopping: Arc::default(),
            live: Mutex::new(HashMap::new()),
            deleted,
        }
    }

    fn keeps_live(&self) -> bool {
        matches!(&self.failover, FailoverAction::RestoreTo { resume: Some(_), .. })
    }

    /// Applies committed epochs to the guest's live files (QEMU guests
    /// only). The first time (or after a failure) the files are rebuilt
    /// from the store's latest epoch instead.
    fn update_live(&self, guest: GuestId, epochs: Vec<(EpochId, Vec<u8>, Vec<(remus_types::Pfn, ChunkId)>)>, staged: &HashMap<ChunkId, Arc<Vec<u8>>>) {
        let FailoverAction::RestoreTo { dir, .. } = &self.failover else { return };
        let Some((last_epoch, last_ds, _)) = epochs.last() else { return };
        let Ok(Some(state)) = QemuState::decode(last_ds) else { return };
        let mut live = self.live.lock();
        let result = (|| -> anyhow::Result<()> {
            let current = live.remove(&guest).filter(|l| epochs.first().is_some_and(|(e, _, _)| l.epoch.next() == *e));
            let mut l = match current {
                Some(l) => l,
                None => {
                    // Rebuild from the store (which holds these epochs now).
                    let plan = remus_restore::RestorePlan::new(&self.store, guest, remus_restore::Target::Epoch(*last_epoch))?;
                    let (state, run, _) = crate::vm::restore_vm(&self.store, &plan, &dir.join(format!("{guest}")), |_| {})?
                        .ok_or_else(|| anyhow::anyhow!("not a QEMU guest"))?;
                    live.insert(guest, LiveVm::open(state, run, *last_epoch)?);
                    return Ok(());
                }
            };
            let zero = vec![0u8; PAGE_SIZE];
            for (epoch, _, pages) in &epochs {
                for (pfn, id) in pages {
                    if *id == zero_page_hash() {
                        l.write(pfn.0, &zero)?;
                        continue;
                    }
                    let cached = staged.get(id).cloned().or_else(|| self.cache.lock().get(id));
                    match cached {
                        Some(p) => l.write(pfn.0, &p)?,
                        None => l.write(pfn.0, &self.store.chunk(id)?)?,
                    }
                }
                l.epoch = *epoch;
            }
            l.state = state;
            live.insert(guest, l);
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(%guest, error = %e, "live failover image not kept; failover will restore from the store");
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

    /// Decodes and verifies one epoch. `staged` holds pages decoded earlier
    /// in the same commit group, not yet in the store. A reference or XOR
    /// base that is not held goes into `missing` (and its page is left
    /// out): the caller refuses the group with all of them.
    fn build_commit(
        &self,
        e: ReceivedEpoch,
        instance: u64,
        staged: &mut HashMap<ChunkId, Arc<Vec<u8>>>,
        missing: &mut Vec<ChunkId>,
    ) -> Result<EpochCommit, String> {
        let h = e.header;
        let mut c = EpochCommit {
            guest: h.guest,
            epoch: h.epoch,
            instance,
            time_unix_ns: h.time_unix_ns,
            page_count: h.page_count,
            memory_root: e.memory_root,
            pause_ns: h.pause_ns,
            wire_bytes: e.wire_bytes,
            pages: Vec::with_capacity(e.records.len()),
            chunks: Vec::new(),
            device_state: e.device_state,
        };
        for r in e.records {
            let fail = |err: remus_wan::DecodeError| format!("epoch {}: page {}: {err}", h.epoch, r.pfn.0);
            match &r.encoding {
                PageEncoding::Zero => {}
                PageEncoding::Ref => {
                    // A cached page may have been collected meanwhile: the
                    // store's commit checks again, and names it if so.
                    let held = staged.contains_key(&r.hash)
                        || self.cache.lock().get(&r.hash).is_some()
                        || self.store.has_chunk(&r.hash).map_err(|e| e.to_string())?;
                    if !held {
                        missing.push(r.hash);
                        continue;
                    }
                }
                PageEncoding::Xor { base, .. } => {
                    // A damaged or missing base is named as such, not as a
                    // decoding error of this page.
                    let cached = staged.get(base).cloned().or_else(|| self.cache.lock().get(base));
                    let base_page = match cached {
                        Some(p) => p.to_vec(),
                        None => match self.store.chunk(base) {
                            Ok(p) => p,
                            Err(remus_store::StoreError::ChunkMissing(_)) => {
                                missing.push(*base);
                                continue;
                            }
                            Err(e) => return Err(format!("epoch {}: page {}: xor base: {e}", h.epoch, r.pfn.0)),
                        },
                    };
                    let page = r.decode_page(|_| Some(base_page)).map_err(fail)?;
                    let z = zstd::bulk::compress(&page, self.zstd_level).map_err(|e| e.to_string())?;
                    c.chunks.push((r.hash, StoredChunk::Zstd(z)));
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
        Ok(c)
    }
}

impl Replica for StoreReplica {
    fn welcome(&self, guest: GuestId, instance: u64, page_count: u64) -> Result<(EpochId, ChunkId), String> {
        if let Some(e) = self.fenced.lock().get(&guest) {
            return Err(format!("{guest} failed over at epoch {}; its old primary is fenced", e.0));
        }
        let head = self.store.head(guest).map_err(|e| e.to_string())?;
        if let Some(h) = head {
            if h.instance != instance {
                return Err(format!(
                    "{guest} already has history from another primary instance (committed up to epoch {}); \
                     protect this guest under a new guest id",
                    h.epoch
                ));
            }
            if h.page_count != page_count {
                return Err(format!("{guest}: memory size changed from {} to {page_count} pages", h.page_count));
            }
        }
        let mut active = self.active.lock();
        let n = active.entry(guest).or_default();
        // The same primary instance may reconnect while its old connection
        // lingers; another instance may not join a live one.
        if *n > 0 && self.instances.lock().get(&guest) != Some(&instance) {
            return Err(format!("{guest} is already connected from another primary"));
        }
        *n += 1;
        drop(active);
        self.instances.lock().insert(guest, instance);
        Ok(head.map_or((EpochId(0), ChunkId::default()), |h| (h.epoch, h.manifest)))
    }

    fn commit(&self, epochs: Vec<ReceivedEpoch>) -> Result<ChunkId, CommitError> {
        let t0 = Instant::now();
        let failed = |m: &str| CommitError::Failed(m.to_string());
        let guest = epochs.first().ok_or_else(|| failed("empty commit group"))?.header.guest;
        let instance = *self.instances.lock().get(&guest).ok_or_else(|| failed("commit for a guest that was never welcomed"))?;
        let mut staged = HashMap::new();
        let mut missing = Vec::new();
        let n = epochs.len() as u64;
        let commits = epochs
            .into_iter()
            .map(|e| self.build_commit(e, instance, &mut staged, &mut missing))
            .collect::<Result<Vec<_>, _>>()
            .map_err(CommitError::Failed)?;
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            return Err(CommitError::Missing(missing));
        }
        let live = self.keeps_live().then(|| commits.iter().map(|c| (c.epoch, c.device_state.clone(), c.pages.clone())).collect::<Vec<_>>());
        let outs = self.store.commit_many(commits).map_err(|e| match e {
            // Collected between the checks above and the commit.
            remus_store::StoreError::Unstored { ids, .. } => CommitError::Missing(ids),
            e => CommitError::Failed(e.to_string()),
        })?;
        if let Some(epochs) = live {
            self.update_live(guest, epochs, &staged);
        }
        let mut cache = self.cache.lock();
        for (id, page) in staged {
            cache.insert(id, page);
        }
        drop(cache);
        let last = outs.last().ok_or_else(|| failed("empty commit group"))?;
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

    fn primary_lost(&self, guest: GuestId, committed: EpochId) {
        self.stats.lock().entry(guest).or_default().lost_at = Some(committed);
        let FailoverAction::RestoreTo { dir, resume } = &self.failover else { return };
        self.fenced.lock().insert(guest, committed);
        let store = Arc::clone(&self.store);
        let dir = dir.clone();
        let resume = resume.clone();
        let live = self.live.lock().remove(&guest).filter(|l| l.epoch == committed);
        let stopping = Arc::clone(&self.stopping);
        // Restoring a large guest takes a while: off the network thread.
        // A resumed QEMU lives as long as this thread (it is killed when
        // the thread that started it ends), so the thread stays until the
        // backup stops or the guest exits.
        std::thread::spawn(move || match failover(&store, guest, &dir, resume.as_ref(), live) {
            Ok(Failover { epoch, path, vm, live }) => {
                use std::io::Write;
                match &vm {
                    Some(vm) => println!(
                        "failover {guest} epoch {} resumed in qemu pid {} (qmp {}; {})",
                        epoch.0,
                        vm.pid(),
                        vm.run.qmp().display(),
                        if live { "from the live image" } else { "restored from the store" }
                    ),
                    None => println!("failover {guest} epoch {} image {}", epoch.0, path.display()),
                }
                let _ = std::io::stdout().flush();
                if let Some(mut vm) = vm {
                    while !stopping.load(std::sync::atomic::Ordering::Relaxed) && vm.running() {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
            Err(e) => eprintln!("failover of {guest} failed: {e:#}"),
        });
    }

    fn disconnected(&self, guest: GuestId) {
        let mut active = self.active.lock();
        if let Some(n) = active.get_mut(&guest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                active.remove(&guest);
            }
        }
    }
}

struct Failover {
    epoch: EpochId,
    path: std::path::PathBuf,
    vm: Option<crate::vm::ResumedVm>,
    /// Resumed from the live files (no restore was needed).
    live: bool,
}

/// Writes the last committed epoch of `guest` into `dir`: a memory image,
/// or the files of a QEMU guest (then resumed when `resume` says so).
fn failover(store: &Store, guest: GuestId, dir: &std::path::Path, resume: Option<&ResumeVm>, live: Option<LiveVm>) -> anyhow::Result<Failover> {
    use remus_restore::{RestorePlan, Target};
    std::fs::create_dir_all(dir)?;
    if let (Some(l), Some(r)) = (live, resume) {
        // The files already hold the last committed epoch.
        l.seal()?;
        let vm = crate::vm::ResumedVm::start(&r.qemu_binary, &l.state, l.run.clone(), None, r.tap.as_deref(), true)?;
        return Ok(Failover { epoch: l.epoch, path: l.run.dir.clone(), vm: Some(vm), live: true });
    }
    let plan = RestorePlan::new(store, guest, Target::Latest)?;
    let epoch = plan.manifest.epoch;
    let vm_dir = dir.join(format!("{guest}"));
    if let Some((state, run, _)) = crate::vm::restore_vm(store, &plan, &vm_dir, |_| {})? {
        let vm = match resume {
            Some(r) => Some(crate::vm::ResumedVm::start(&r.qemu_binary, &state, run, None, r.tap.as_deref(), true)?),
            None => None,
        };
        return Ok(Failover { epoch, path: vm_dir, vm, live: false });
    }
    let path = dir.join(format!("{guest}-epoch-{}.img", epoch.0));
    plan.execute(store, &path, |_| {})?;
    Ok(Failover { epoch, path, vm: None, live: false })
}
