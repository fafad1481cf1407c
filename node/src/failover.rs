//! Failover at the backup: what happens when a primary goes silent, and
//! the live files that make resuming a QEMU guest immediate.
//!
//! Invariant: a failover hands back exactly the last committed epoch.
//! Nothing after it was ever acknowledged, so none of the output it
//! produced was ever released: the resumed guest continues from a state
//! the outside world has never seen beyond.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use remus_qemu::ResumedVm;
use remus_restore::vm::restore_vm;
use remus_restore::{RestorePlan, Target};
use remus_store::{PageList, Store};
use remus_types::{zero_page_hash, EpochId, GuestId, PAGE_SIZE};
use remus_vm::{QemuState, RunDir, VMSTATE_PAGES};

use crate::error::NodeError;
use crate::events::{BackupEvent, FailoverOutcome};

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
        dir: PathBuf,
        /// Resume QEMU guests here.
        resume: Option<ResumeVm>,
    },
}

impl FailoverAction {
    /// True when QEMU guests are resumed here, so their last committed
    /// epoch is worth keeping as live files.
    #[must_use]
    pub fn keeps_live(&self) -> bool {
        matches!(self, Self::RestoreTo { resume: Some(_), .. })
    }
}

/// How the backup resumes a QEMU guest on failover.
#[derive(Debug, Clone)]
pub struct ResumeVm {
    /// QEMU binary.
    pub qemu_binary: PathBuf,
    /// TAP interface for the resumed guest's network.
    pub tap: Option<String>,
    /// Directories whose kernels and initrds a failed-over guest may boot
    /// from: the machine comes from the primary's checkpoint and is checked
    /// against them before it becomes a QEMU command line here.
    pub images: Vec<PathBuf>,
    /// Protect the resumed guest at once, replicating to this backup: the
    /// files are made ready and the guest is left to a primary runtime of
    /// its own ([`FailoverOutcome::ReadyToProtect`]) instead of a QEMU
    /// started here.
    pub protect_to: Option<std::net::SocketAddr>,
}

/// One committed epoch's page table and device state, for the live files.
pub type CommittedPages = (EpochId, Vec<u8>, PageList);

/// A QEMU guest's last committed epoch kept as the files QEMU resumes from
/// (memory, disk image, device state) in the failover directory.
/// Invariant: `epoch` names the committed epoch the files hold; on any
/// failure to apply an epoch the entry is dropped (failover then restores
/// from the store).
pub struct LiveVm {
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

    /// Makes the files exactly what QEMU loads.
    fn seal(&self) -> std::io::Result<()> {
        self.state.finish_files(&self.run)
    }
}

/// The live files of every QEMU guest this backup would resume.
///
/// Invariant: while a guest's files are being rebuilt from the store (on a
/// thread of their own, off the commit path), every epoch committed since
/// the rebuild's epoch waits in order to be applied after it, and nothing
/// else writes those files: a failover waits for the rebuild to end.
#[derive(Default)]
pub struct LiveFiles {
    guests: Mutex<HashMap<GuestId, Live>>,
    rebuilt: Condvar,
}

/// Says that `guest`'s live files were dropped, and why: a failover then
/// restores from the store (slower, the same memory).
fn not_kept(guest: GuestId, why: &dyn std::fmt::Display) {
    tracing::warn!(%guest, error = %why, "live failover image not kept; failover will restore from the store");
}

enum Live {
    Ready(LiveVm),
    /// Rebuilt from the store at `epoch`; `pending` committed since.
    Rebuilding {
        epoch: EpochId,
        pending: Vec<CommittedPages>,
    },
}

impl LiveFiles {
    /// Applies committed epochs to `guest`'s live files in `dir`. The
    /// first time (or after a failure) the files are rebuilt from the
    /// store's latest epoch instead, on a thread of their own, so that
    /// the commit (and its acknowledgement) does not wait for a restore of
    /// the guest's whole memory; epochs committed meanwhile are applied
    /// after it. Not a QEMU guest: nothing to do.
    pub fn update(self: &Arc<Self>, store: &Arc<Store>, dir: &Path, guest: GuestId, epochs: &[CommittedPages]) {
        let Some((last_epoch, last_ds, _)) = epochs.last() else { return };
        let Ok(Some(state)) = QemuState::decode(last_ds) else { return };
        let first = epochs[0].0;
        let mut live = self.guests.lock();
        match live.remove(&guest) {
            Some(Live::Ready(mut l)) if l.epoch.next() == first => match apply(&mut l, store, epochs, Some(state)) {
                Ok(()) => {
                    live.insert(guest, Live::Ready(l));
                }
                Err(e) => not_kept(guest, &e),
            },
            Some(Live::Rebuilding { epoch, mut pending }) if pending.last().map_or(epoch, |p| p.0).next() == first => {
                pending.extend_from_slice(epochs);
                live.insert(guest, Live::Rebuilding { epoch, pending });
            }
            Some(Live::Rebuilding { epoch, pending }) => {
                // Not the next epoch (cannot happen while commits are in
                // order): the rebuilt files will end before the committed
                // epoch, which a failover then restores from the store,
                // and the next commit rebuilds them.
                live.insert(guest, Live::Rebuilding { epoch, pending });
                drop(live);
                tracing::warn!(%guest, epoch = first.0, "live failover image out of step; failover will restore from the store");
            }
            _ => {
                live.insert(guest, Live::Rebuilding { epoch: *last_epoch, pending: Vec::new() });
                let (files, store, dir, epoch) = (Arc::clone(self), Arc::clone(store), dir.join(format!("{guest}")), *last_epoch);
                let spawned =
                    std::thread::Builder::new().name("remus-live-files".into()).spawn(move || files.rebuild(&store, &dir, guest, epoch));
                if let Err(e) = spawned {
                    live.remove(&guest);
                    not_kept(guest, &e);
                }
            }
        }
    }

    /// Restores `guest`'s `epoch` from the store into `dir` and opens it
    /// as its live files, then applies what was committed meanwhile;
    /// wakes a failover waiting for it whatever happens (a panic drops the
    /// entry: a failover then restores from the store).
    fn rebuild(&self, store: &Store, dir: &Path, guest: GuestId, epoch: EpochId) {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.rebuild_files(store, dir, guest, epoch)));
        if done.is_err() {
            let mut live = self.guests.lock();
            if matches!(live.get(&guest), Some(Live::Rebuilding { .. })) {
                live.remove(&guest);
            }
            not_kept(guest, &"its rebuild panicked");
        }
        self.rebuilt.notify_all();
    }

    fn rebuild_files(&self, store: &Store, dir: &Path, guest: GuestId, epoch: EpochId) {
        let t0 = std::time::Instant::now();
        let restored = (|| -> Result<LiveVm, NodeError> {
            let plan = RestorePlan::new(store, guest, Target::Epoch(epoch))?;
            let (state, run, _) = restore_vm(store, &plan, dir, |_, _| {})?.ok_or(NodeError::NotAVm)?;
            LiveVm::open(state, run, epoch).map_err(NodeError::io("opening the live VM files"))
        })();
        let mut live = self.guests.lock();
        let kept = match (live.remove(&guest), restored) {
            (Some(Live::Rebuilding { epoch: e, pending }), Ok(mut l)) if e == epoch => {
                let state = pending.last().and_then(|(_, ds, _)| QemuState::decode(ds).ok().flatten());
                apply(&mut l, store, &pending, state).map(|()| l).map_err(|e| e.to_string())
            }
            (_, Err(e)) => Err(e.to_string()),
            (_, Ok(_)) => Err(format!("replaced while rebuilding epoch {}", epoch.0)),
        };
        match kept {
            Ok(l) => {
                tracing::debug!(%guest, epoch = l.epoch.0, ms = t0.elapsed().as_secs_f64() * 1e3, "live failover image rebuilt");
                live.insert(guest, Live::Ready(l));
            }
            Err(e) => not_kept(guest, &e),
        }
    }

    /// Takes `guest`'s live files if they hold exactly `epoch`, waiting
    /// for a rebuild under way to end first.
    pub fn take(&self, guest: GuestId, epoch: EpochId) -> Option<LiveVm> {
        let mut live = self.guests.lock();
        while matches!(live.get(&guest), Some(Live::Rebuilding { .. })) {
            self.rebuilt.wait(&mut live);
        }
        match live.remove(&guest) {
            Some(Live::Ready(l)) if l.epoch == epoch => Some(l),
            _ => None,
        }
    }
}

/// Writes committed `epochs` (each following the last) into `l`, whose
/// device state then is `state` (the last epoch's, decoded once).
fn apply(l: &mut LiveVm, store: &Store, epochs: &[CommittedPages], state: Option<QemuState>) -> Result<(), NodeError> {
    let zero = vec![0u8; PAGE_SIZE];
    for (epoch, _, pages) in epochs {
        for (pfn, id) in pages {
            let written = if *id == zero_page_hash() {
                l.write(pfn.0, &zero)
            } else {
                l.write(pfn.0, &store.recent_chunk(id).map_err(|e| NodeError::Restore(e.into()))?)
            };
            written.map_err(NodeError::io("writing the live VM files"))?;
        }
        l.epoch = *epoch;
    }
    if let Some(state) = state {
        l.state = state;
    }
    Ok(())
}

/// A failover to carry out: `guest`'s last committed epoch in `store`
/// brought back into `dir` (and resumed there when `resume` says so).
pub struct Job {
    /// The store holding the guest's history.
    pub store: Arc<Store>,
    /// The guest.
    pub guest: GuestId,
    /// Where its images go.
    pub dir: PathBuf,
    /// Resume a QEMU guest here.
    pub resume: Option<ResumeVm>,
    /// The last committed epoch (the one failed over to).
    pub epoch: EpochId,
    /// The backup's live files: the guest's, when they hold exactly that
    /// epoch, are resumed from (taken on the failover's thread, which
    /// waits for a rebuild under way).
    pub live: Arc<LiveFiles>,
    /// The guest's lease (with a witness), kept renewed while it runs here.
    pub lease: Option<crate::lease::Renewal>,
}

/// Carries `job` out off the network thread (restoring a large guest takes
/// a while) and reports the outcome on `events`. A resumed QEMU lives as
/// long as that thread (it is killed when the thread that started it
/// ends), so the thread stays until `stopping` is set or the guest exits;
/// so does the lease, kept renewed meanwhile.
pub fn spawn(job: Job, stopping: Arc<AtomicBool>, events: crossbeam_channel::Sender<BackupEvent>) {
    let Job { store, guest, dir, resume, epoch, live, mut lease } = job;
    std::thread::spawn(move || match execute(&store, guest, &dir, resume.as_ref(), live.take(guest, epoch)) {
        Ok(Failover { epoch, path, vm, live }) => {
            let outcome = match (&vm, resume.as_ref().and_then(|r| r.protect_to)) {
                (Some(vm), _) => FailoverOutcome::Resumed { pid: vm.pid(), qmp: vm.run.qmp(), from_live: live },
                (None, Some(backup)) if path.is_dir() => {
                    let manifest = store.manifest(guest, epoch).map(|m| m.id()).unwrap_or_default();
                    // The lease goes to the guest's new primary, renewed
                    // here up to now.
                    let lease = lease.take().and_then(crate::lease::Renewal::hand_off).map(|t| (t.lease.generation, t.tag));
                    FailoverOutcome::ReadyToProtect { run_dir: path, backup, manifest, lease }
                }
                (None, _) => FailoverOutcome::Written { path },
            };
            let _ = events.send(BackupEvent::FailedOver { guest, epoch, outcome });
            if let Some(mut vm) = vm {
                while !stopping.load(Ordering::Relaxed) && vm.running() {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            drop(lease);
        }
        Err(e) => {
            let _ = events.send(BackupEvent::FailoverFailed { guest, error: e.to_string() });
        }
    });
}

struct Failover {
    epoch: EpochId,
    path: PathBuf,
    vm: Option<ResumedVm>,
    /// Resumed from the live files (no restore was needed).
    live: bool,
}

/// Writes the last committed epoch of `guest` into `dir`: a memory image,
/// or the files of a QEMU guest (then resumed when `resume` says so).
fn execute(store: &Store, guest: GuestId, dir: &Path, resume: Option<&ResumeVm>, live: Option<LiveVm>) -> Result<Failover, NodeError> {
    std::fs::create_dir_all(dir).map_err(NodeError::io(format!("creating {}", dir.display())))?;
    // Resumed here by QEMU, or left ready for a primary of its own; either
    // way only a machine this host trusts.
    let start = |state: &QemuState, run: RunDir| -> Result<Option<ResumedVm>, NodeError> {
        if let Some(r) = resume {
            state.machine.validate_from_peer(&r.images).map_err(|e| NodeError::UntrustedVm(e.to_string()))?;
        }
        match resume {
            Some(r) if r.protect_to.is_none() => {
                Ok(Some(ResumedVm::start(&r.qemu_binary, state, run, None, r.tap.as_deref(), true, None).map_err(NodeError::Resume)?))
            }
            _ => Ok(None),
        }
    };
    if let (Some(l), Some(_)) = (live, resume) {
        // The files already hold the last committed epoch.
        l.seal().map_err(NodeError::io("sealing the live VM files"))?;
        let vm = start(&l.state, l.run.clone())?;
        return Ok(Failover { epoch: l.epoch, path: l.run.dir.clone(), vm, live: true });
    }
    let plan = RestorePlan::new(store, guest, Target::Latest)?;
    let epoch = plan.manifest.epoch;
    let vm_dir = dir.join(format!("{guest}"));
    if let Some((state, run, _)) = restore_vm(store, &plan, &vm_dir, |_, _| {})? {
        let vm = start(&state, run)?;
        return Ok(Failover { epoch, path: vm_dir, vm, live: false });
    }
    let path = dir.join(format!("{guest}-epoch-{}.img", epoch.0));
    plan.execute(store, &path, |_, _| {})?;
    Ok(Failover { epoch, path, vm: None, live: false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_store::StoreOptions;
    use remus_types::{ChunkId, Pfn};
    use remus_vm::QemuMachine;

    fn qemu_device_state() -> Vec<u8> {
        QemuState { machine: QemuMachine::default(), vmstate_len: 0 }.encode()
    }

    /// A rebuild that fails (here: the store holds nothing of the guest)
    /// wakes the failover waiting on it, which then restores from the
    /// store; the epochs committed meanwhile are not applied anywhere.
    #[test]
    fn a_failover_waits_for_a_rebuild_under_way_and_a_failed_one_leaves_no_files_to_resume() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store"), StoreOptions::default()).unwrap());
        let live = Arc::new(LiveFiles::default());
        let guest = GuestId(4);
        let ds = qemu_device_state();
        let epoch = |e: u64| -> CommittedPages { (EpochId(e), ds.clone(), vec![(Pfn(1), ChunkId([e as u8; 32]))]) };
        live.update(&store, &dir.path().join("live"), guest, &[epoch(1)]);
        // Committed while it rebuilds (or after it failed): no panic, no wait.
        live.update(&store, &dir.path().join("live"), guest, &[epoch(2), epoch(3)]);
        assert!(live.take(guest, EpochId(3)).is_none(), "nothing rebuilt to resume from");
        assert!(live.take(guest, EpochId(3)).is_none());
        // Not a QEMU guest: nothing kept, nothing rebuilt.
        live.update(&store, &dir.path().join("live"), GuestId(5), &[(EpochId(1), vec![1, 2, 3], Vec::new())]);
        assert!(live.guests.lock().get(&GuestId(5)).is_none());
    }
}
