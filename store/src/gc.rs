//! The coordination between GC and commits, in one place.
//!
//! GC deletes chunks no kept epoch references while ingest goes on:
//! 1. *Mark start* ([`GcCoordinator::begin_marking`]): with no commit in
//!    flight (the exclusive lock), marking is switched on. From then on
//!    each commit, under the shared lock, records every chunk it
//!    references ([`GcCoordinator::referenced`]).
//! 2. GC reads the index and the manifests (what was committed before the
//!    mark started) without any lock.
//! 3. *Sweep* ([`GcCoordinator::sweep`]): again with no commit in flight,
//!    the marks taken since step 1 are added to what GC read, the
//!    candidates are re-checked against them and deleted in one synced
//!    write, and marking is switched off.
//!
//! Invariant: a chunk referenced by a commit that completed after the mark
//! started is in the marks, and one committed before it is in the index GC
//! reads; so no referenced chunk is ever swept. After a sweep the
//! watchers hear what was deleted ([`GcCoordinator::notify`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use remus_types::{ChunkId, GuestId};

/// Told, guest by guest, the chunks each GC deleted that the guest's
/// thinning had dropped.
pub(crate) type DeletedWatcher = Box<dyn Fn(GuestId, &[ChunkId]) + Send + Sync>;

/// GC's locks, marks and watchers.
#[derive(Default)]
pub(crate) struct GcCoordinator {
    /// Read-held by commits (which run in parallel), write-held by GC to
    /// start marking and to sweep.
    lock: RwLock<()>,
    /// While GC marks, `Some`: every chunk commits reference.
    marks: Mutex<Option<HashSet<ChunkId>>>,
    watchers: Mutex<Vec<DeletedWatcher>>,
    /// Chunks each guest's thinning dropped a reference to since the last
    /// GC: what a deletion concerns (a guest hears only of its own).
    dropped: Mutex<HashMap<GuestId, HashSet<ChunkId>>>,
}

/// Held by a commit for its whole length.
pub(crate) struct CommitGuard<'a> {
    _lock: RwLockReadGuard<'a, ()>,
    coordinator: &'a GcCoordinator,
}

impl CommitGuard<'_> {
    /// Records chunks the commit references, when GC is marking.
    pub(crate) fn referenced(&self, ids: impl IntoIterator<Item = ChunkId>) {
        if let Some(marked) = self.coordinator.marks().as_mut() {
            marked.extend(ids);
        }
    }
}

/// Held by GC while it sweeps: no commit runs meanwhile.
pub(crate) struct Sweep<'a> {
    _lock: RwLockWriteGuard<'a, ()>,
    /// Chunks commits referenced since marking began.
    pub(crate) marked: HashSet<ChunkId>,
}

impl GcCoordinator {
    fn marks(&self) -> MutexGuard<'_, Option<HashSet<ChunkId>>> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a commit (waits while GC starts marking or sweeps).
    pub(crate) fn commit(&self) -> CommitGuard<'_> {
        CommitGuard { _lock: self.lock.read().unwrap_or_else(PoisonError::into_inner), coordinator: self }
    }

    /// Starts marking, with no commit in flight.
    pub(crate) fn begin_marking(&self) {
        let _exclusive = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        *self.marks() = Some(HashSet::new());
    }

    /// Stops marking without sweeping (GC failed before its sweep).
    pub(crate) fn abandon(&self) {
        *self.marks() = None;
    }

    /// Waits for commits in flight to end, stops marking, and holds
    /// commits off until the returned sweep is dropped.
    pub(crate) fn sweep(&self) -> Sweep<'_> {
        let lock = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        let marked = self.marks().take().unwrap_or_default();
        Sweep { _lock: lock, marked }
    }

    /// Adds a watcher of deletions.
    pub(crate) fn watch(&self, f: DeletedWatcher) {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner).push(f);
    }

    /// Records that `guest`'s thinning dropped references to `ids`.
    pub(crate) fn dropped(&self, guest: GuestId, ids: impl IntoIterator<Item = ChunkId>) {
        self.dropped.lock().unwrap_or_else(PoisonError::into_inner).entry(guest).or_default().extend(ids);
    }

    /// Tells every watcher, guest by guest, what a sweep deleted of the
    /// chunks that guest's thinning dropped (nothing: no call); a chunk
    /// another guest still referenced was not deleted and is forgotten
    /// here (whoever drops its last reference hears of it).
    pub(crate) fn notify(&self, deleted: &[ChunkId]) {
        let dropped = std::mem::take(&mut *self.dropped.lock().unwrap_or_else(PoisonError::into_inner));
        if deleted.is_empty() {
            return;
        }
        let deleted: HashSet<&ChunkId> = deleted.iter().collect();
        let watchers = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
        for (guest, ids) in dropped {
            let mut mine: Vec<ChunkId> = ids.into_iter().filter(|id| deleted.contains(id)).collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort_unstable();
            for w in watchers.iter() {
                w(guest, &mine);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn what_commits_reference_while_marking_survives_the_sweep() {
        let gc = GcCoordinator::default();
        let a = ChunkId([1; 32]);
        let b = ChunkId([2; 32]);
        gc.commit().referenced([a]);
        gc.begin_marking();
        gc.commit().referenced([b]);
        let sweep = gc.sweep();
        assert!(sweep.marked.contains(&b), "referenced while marking");
        assert!(!sweep.marked.contains(&a), "before marking GC reads the index instead");
        drop(sweep);
        gc.commit().referenced([a]);
        assert!(gc.marks().is_none(), "marking stops at the sweep");
    }

    #[test]
    fn a_sweep_waits_for_the_commit_in_flight() {
        let gc = Arc::new(GcCoordinator::default());
        gc.begin_marking();
        let commit = gc.commit();
        let gc2 = Arc::clone(&gc);
        let (tx, rx) = std::sync::mpsc::channel();
        let sweeper = std::thread::spawn(move || {
            let sweep = gc2.sweep();
            tx.send(sweep.marked.len()).unwrap();
        });
        // The sweep cannot finish while the commit holds its guard: the
        // chunk recorded before the guard drops is in the sweep's marks.
        commit.referenced([ChunkId([9; 32])]);
        assert!(rx.try_recv().is_err());
        drop(commit);
        assert_eq!(rx.recv().unwrap(), 1);
        sweeper.join().unwrap();
    }
}
