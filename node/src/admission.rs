//! Admission at the backup: which primary may replicate which guest.
//!
//! Rules, checked when a primary says Hello:
//! - a guest that failed over here is fenced: its old primary is refused
//!   from then on (it could only continue a history that has moved on),
//!   also after the backup restarts (the fence is kept in the store);
//!   only a run that continues the guest's history from past the fence's
//!   epoch is admitted (the guest ran on elsewhere and comes back: a
//!   failback), its history here grafted after what was here;
//! - a primary of an older generation (on the witness) than the guest's
//!   history is refused: another owner took the guest over;
//! - a new primary instance (a restarted primary) continues the guest's
//!   history after its last committed epoch, in a newer generation where
//!   a witness is used; its first epoch is a whole memory (see
//!   [`Lineage::continues_after`]);
//! - the memory size of a guest never changes within its history;
//! - one connected primary per guest, except that the same instance may
//!   reconnect while its old connection lingers.

use std::collections::HashMap;

use parking_lot::Mutex;
use remus_store::{Fence, Head};
use remus_types::{ChunkId, EpochId, GuestId};

/// Who writes a guest's epochs: the primary run admitted, and where its
/// history begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lineage {
    /// The primary run.
    pub instance: u64,
    /// Its generation on the witness (0 without one).
    pub generation: u64,
    /// For a run that continues a history another run wrote: that run's
    /// last committed epoch. The epoch after it starts from a memory of
    /// zeros: every page it does not carry is recorded as a zero page.
    pub continues_after: Option<EpochId>,
    /// The epoch its Hello said it continues from (a guest protected again
    /// after failing over or moving), if it said so.
    pub continues: Option<EpochId>,
}

/// What a Hello was admitted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The epoch the primary resumes (or continues) after, and its
    /// manifest id (0 and zero when none).
    pub committed: (EpochId, ChunkId),
    /// The head to record before the Welcome: the guest's history went on
    /// elsewhere past what is here (or nothing of it is here), and this
    /// run continues it from there (see `Store::graft`).
    pub graft: Option<Head>,
}

/// Who is admitted for which guest.
#[derive(Default)]
pub struct Admission {
    fenced: Mutex<HashMap<GuestId, EpochId>>,
    /// Connections per guest: a primary that reconnects before its old
    /// connection timed out here has two for a while.
    active: Mutex<HashMap<GuestId, usize>>,
    lineages: Mutex<HashMap<GuestId, Lineage>>,
}

impl Admission {
    /// Admits primary `instance` of `guest` (generation `generation`) with
    /// `page_count` pages, given the guest's stored head and fence and the
    /// epoch (and manifest) the Hello says it continues from; returns
    /// where it resumes or continues, and the graft to record first.
    ///
    /// A fence refuses every run but one that continues the guest's
    /// history from past the fence's epoch: the guest failed over (or
    /// moved) from here, ran on elsewhere, and comes back.
    ///
    /// # Errors
    /// The reason for refusal, for the primary to show.
    pub fn welcome(
        &self,
        guest: GuestId,
        (instance, generation): (u64, u64),
        page_count: u64,
        (head, stored_fence): (Option<Head>, Option<Fence>),
        continues: Option<(EpochId, ChunkId)>,
    ) -> Result<Admitted, String> {
        let beyond = |fence: EpochId| continues.is_some_and(|(e, _)| e > fence);
        if let Some(f) = stored_fence.filter(|f| !beyond(f.epoch)) {
            let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(f.since_unix_ms);
            return Err(format!(
                "{guest} failed over to this backup at epoch {} at {}; its old primary is fenced",
                f.epoch.0,
                humantime::format_rfc3339_seconds(since)
            ));
        }
        if let Some(e) = self.fenced.lock().get(&guest).filter(|e| !beyond(**e)) {
            return Err(format!("{guest} failed over at epoch {}; its old primary is fenced", e.0));
        }
        if !(1..=remus_types::MAX_PAGE_COUNT).contains(&page_count) {
            return Err(format!(
                "{guest}: a memory of {page_count} pages is not one remus protects (1 to {} pages)",
                remus_types::MAX_PAGE_COUNT
            ));
        }
        let graft = continues.filter(|(e, _)| head.is_none_or(|h| h.epoch < *e)).map(|(epoch, manifest)| Head {
            epoch,
            manifest,
            instance,
            page_count,
            generation,
        });
        let mut continues_after = graft.map(|g| g.epoch);
        if let Some(h) = &head {
            if generation < h.generation {
                return Err(format!(
                    "{guest} is in generation {} here (committed up to epoch {}); this primary holds generation {generation}: \
                     another owner took the guest over",
                    h.generation, h.epoch
                ));
            }
            if h.page_count != page_count {
                return Err(format!("{guest}: memory size changed from {} to {page_count} pages", h.page_count));
            }
            if h.instance != instance {
                if generation != 0 && generation == h.generation {
                    return Err(format!(
                        "{guest}: another primary run already wrote generation {generation} (committed up to epoch {}); \
                         a restarted primary takes a new generation",
                        h.epoch
                    ));
                }
                continues_after = continues_after.or(Some(h.epoch));
            } else if continues.is_some_and(|(e, _)| e == h.epoch) {
                // Grafted for this very run, which reconnects before its
                // first epoch here was committed.
                continues_after = Some(h.epoch);
            }
        }
        let mut active = self.active.lock();
        let n = active.entry(guest).or_default();
        if *n > 0 && self.lineages.lock().get(&guest).is_some_and(|l| l.instance != instance) {
            return Err(format!("{guest} is already connected from another primary"));
        }
        *n += 1;
        drop(active);
        let lineage = Lineage { instance, generation, continues_after, continues: continues.map(|(e, _)| e) };
        self.lineages.lock().insert(guest, lineage);
        let committed = graft.or(head).map_or((EpochId(0), ChunkId::default()), |h| (h.epoch, h.manifest));
        Ok(Admitted { committed, graft })
    }

    /// Who was admitted for `guest`, if anyone was.
    pub fn lineage(&self, guest: GuestId) -> Option<Lineage> {
        self.lineages.lock().get(&guest).copied()
    }

    /// One connection of `guest` ended.
    pub fn disconnected(&self, guest: GuestId) {
        let mut active = self.active.lock();
        if let Some(n) = active.get_mut(&guest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                active.remove(&guest);
            }
        }
    }

    /// Fences `guest`'s primary: it failed over here at `epoch`.
    pub fn fence(&self, guest: GuestId, epoch: EpochId) {
        self.fenced.lock().insert(guest, epoch);
    }

    /// True once `guest` failed over here, unless the run admitted since
    /// continues its history from past that epoch (it came back).
    pub fn is_fenced(&self, guest: GuestId) -> bool {
        let Some(fence) = self.fenced.lock().get(&guest).copied() else { return false };
        self.lineage(guest).and_then(|l| l.continues).is_none_or(|e| e <= fence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(instance: u64, epoch: u64) -> Head {
        Head { epoch: EpochId(epoch), manifest: ChunkId::default(), instance, page_count: 16, generation: 0 }
    }

    #[test]
    fn a_restarted_primary_continues_the_history_in_a_newer_generation() {
        let a = Admission::default();
        let g = GuestId(1);
        assert_eq!(a.welcome(g, (7, 0), 16, (Some(head(7, 3)), None), None).unwrap().committed.0, EpochId(3));
        assert_eq!(a.lineage(g).unwrap().continues_after, None, "the same run resumes");
        a.disconnected(g);
        // Another run (a restart) continues after epoch 3.
        assert_eq!(a.welcome(g, (8, 0), 16, (Some(head(7, 3)), None), None).unwrap().committed.0, EpochId(3));
        assert_eq!(a.lineage(g).unwrap(), Lineage { instance: 8, generation: 0, continues_after: Some(EpochId(3)), continues: None });
        a.disconnected(g);
        let err = a.welcome(g, (8, 0), 32, (Some(head(8, 5)), None), None).unwrap_err();
        assert!(err.contains("memory size changed"), "{err}");
        // With a witness: an older generation is refused, the same
        // generation from another run too, a newer one continues.
        let h = Head { generation: 4, ..head(8, 5) };
        let err = a.welcome(g, (9, 3), 16, (Some(h), None), None).unwrap_err();
        assert!(err.contains("generation 4 here") && err.contains("holds generation 3"), "{err}");
        let err = a.welcome(g, (9, 4), 16, (Some(h), None), None).unwrap_err();
        assert!(err.contains("already wrote generation 4"), "{err}");
        a.welcome(g, (9, 5), 16, (Some(h), None), None).expect("a newer generation continues");
        assert_eq!(a.lineage(g).unwrap().continues_after, Some(EpochId(5)));
    }

    #[test]
    fn a_page_count_no_guest_can_have_is_refused() {
        let a = Admission::default();
        for n in [0, remus_types::MAX_PAGE_COUNT + 1, u64::MAX] {
            let err = a.welcome(GuestId(4), (1, 0), n, (None, None), None).unwrap_err();
            assert!(err.contains("is not one remus protects"), "{err}");
        }
        a.welcome(GuestId(4), (1, 0), remus_types::MAX_PAGE_COUNT, (None, None), None).expect("the largest page space");
    }

    #[test]
    fn one_live_primary_per_guest_but_the_same_instance_may_reconnect() {
        let a = Admission::default();
        let g = GuestId(2);
        a.welcome(g, (1, 0), 16, (None, None), None).unwrap();
        a.welcome(g, (1, 0), 16, (None, None), None).expect("the same instance reconnecting");
        assert!(a.welcome(g, (2, 0), 16, (None, None), None).unwrap_err().contains("already connected"));
        a.disconnected(g);
        a.disconnected(g);
        a.welcome(g, (2, 0), 16, (None, None), None).expect("no connection left");
    }

    #[test]
    fn a_fenced_guest_is_refused_naming_the_failover_epoch() {
        let a = Admission::default();
        let g = GuestId(3);
        a.fence(g, EpochId(41));
        let err = a.welcome(g, (1, 0), 16, (None, None), None).unwrap_err();
        assert!(err.contains("failed over at epoch 41"), "{err}");
        // A fence kept in the store (a restarted backup) refuses too, and
        // says since when.
        let fresh = Admission::default();
        let f = Fence { epoch: EpochId(41), since_unix_ms: 1_767_225_600_000 };
        let err = fresh.welcome(g, (1, 0), 16, (None, Some(f)), None).unwrap_err();
        assert!(err.contains("at epoch 41 at 2026-01-01T00:00:00Z"), "{err}");
    }

    #[test]
    fn a_guest_that_comes_back_past_its_fence_continues_its_history_here() {
        let a = Admission::default();
        let g = GuestId(5);
        // It moved away from here at epoch 41 (in generation 2), ran on
        // elsewhere, and comes back continuing epoch 90 of its history.
        let here = Head { generation: 2, ..head(7, 41) };
        let f = Fence { epoch: EpochId(41), since_unix_ms: 0 };
        a.fence(g, EpochId(41));
        for at in [30, 41] {
            let err = a.welcome(g, (9, 4), 16, (Some(here), Some(f)), Some((EpochId(at), ChunkId([1; 32])))).unwrap_err();
            assert!(err.contains("fenced"), "continuing from epoch {at}, not past the fence: {err}");
        }
        assert!(a.welcome(g, (9, 1), 16, (Some(here), Some(f)), Some((EpochId(90), ChunkId([1; 32])))).is_err(), "an older generation");
        assert!(a.welcome(g, (9, 4), 32, (Some(here), Some(f)), Some((EpochId(90), ChunkId([1; 32])))).is_err(), "another size");
        assert!(a.is_fenced(g));
        let back = a.welcome(g, (9, 4), 16, (Some(here), Some(f)), Some((EpochId(90), ChunkId([1; 32])))).unwrap();
        let graft = Head { epoch: EpochId(90), manifest: ChunkId([1; 32]), instance: 9, page_count: 16, generation: 4 };
        assert_eq!(back, Admitted { committed: (EpochId(90), ChunkId([1; 32])), graft: Some(graft) });
        // Its first epoch here starts from zeros: nothing of epoch 41's
        // memory shows through; its commits are not fenced.
        assert_eq!(a.lineage(g).unwrap().continues_after, Some(EpochId(90)));
        assert!(!a.is_fenced(g));
        a.disconnected(g);
        // Reconnecting before its first commit, at the graft: the same.
        let again = a.welcome(g, (9, 4), 16, (Some(graft), Some(f)), Some((EpochId(90), ChunkId([1; 32])))).unwrap();
        assert_eq!((again.graft, a.lineage(g).unwrap().continues_after), (None, Some(EpochId(90))));
        a.disconnected(g);
        // The run that was fenced is still refused.
        let err = a.welcome(g, (7, 2), 16, (Some(graft), Some(f)), None).unwrap_err();
        assert!(err.contains("fenced"), "{err}");
    }
}
