//! Admission at the backup: which primary may replicate which guest.
//!
//! Rules, checked when a primary says Hello:
//! - a guest that failed over here is fenced: its old primary is refused
//!   from then on (it could only continue a history that has moved on),
//!   also after the backup restarts (the fence is kept in the store);
//! - a guest's history belongs to one primary instance: another instance
//!   (a fresh process whose memory does not continue the stored history)
//!   is refused;
//! - the memory size of a guest never changes within its history;
//! - one connected primary per guest, except that the same instance may
//!   reconnect while its old connection lingers.

use std::collections::HashMap;

use parking_lot::Mutex;
use remus_store::{Fence, Head};
use remus_types::{ChunkId, EpochId, GuestId};

/// Who is admitted for which guest.
#[derive(Default)]
pub struct Admission {
    fenced: Mutex<HashMap<GuestId, EpochId>>,
    /// Connections per guest: a primary that reconnects before its old
    /// connection timed out here has two for a while.
    active: Mutex<HashMap<GuestId, usize>>,
    instances: Mutex<HashMap<GuestId, u64>>,
}

impl Admission {
    /// Admits primary `instance` of `guest` with `page_count` pages, given
    /// the guest's stored head and fence; returns the committed epoch and
    /// manifest it resumes from.
    ///
    /// # Errors
    /// The reason for refusal, for the primary to show.
    pub fn welcome(
        &self,
        guest: GuestId,
        instance: u64,
        page_count: u64,
        head: Option<Head>,
        stored_fence: Option<Fence>,
    ) -> Result<(EpochId, ChunkId), String> {
        if let Some(f) = stored_fence {
            let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(f.since_unix_ms);
            return Err(format!(
                "{guest} failed over to this backup at epoch {} at {}; its old primary is fenced",
                f.epoch.0,
                humantime::format_rfc3339_seconds(since)
            ));
        }
        if let Some(e) = self.fenced.lock().get(&guest) {
            return Err(format!("{guest} failed over at epoch {}; its old primary is fenced", e.0));
        }
        if let Some(h) = &head {
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
        if *n > 0 && self.instances.lock().get(&guest) != Some(&instance) {
            return Err(format!("{guest} is already connected from another primary"));
        }
        *n += 1;
        drop(active);
        self.instances.lock().insert(guest, instance);
        Ok(head.map_or((EpochId(0), ChunkId::default()), |h| (h.epoch, h.manifest)))
    }

    /// The admitted instance of `guest`, if any was.
    pub fn instance(&self, guest: GuestId) -> Option<u64> {
        self.instances.lock().get(&guest).copied()
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

    /// True once `guest` failed over here.
    pub fn is_fenced(&self, guest: GuestId) -> bool {
        self.fenced.lock().contains_key(&guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(instance: u64, epoch: u64) -> Head {
        Head { epoch: EpochId(epoch), manifest: ChunkId::default(), instance, page_count: 16 }
    }

    #[test]
    fn another_instance_of_a_stored_guest_is_refused() {
        let a = Admission::default();
        let g = GuestId(1);
        assert_eq!(a.welcome(g, 7, 16, Some(head(7, 3)), None).unwrap().0, EpochId(3));
        let err = a.welcome(g, 8, 16, Some(head(7, 3)), None).unwrap_err();
        assert!(err.contains("another primary instance"), "{err}");
        let err = a.welcome(g, 7, 32, Some(head(7, 3)), None).unwrap_err();
        assert!(err.contains("memory size changed"), "{err}");
    }

    #[test]
    fn one_live_primary_per_guest_but_the_same_instance_may_reconnect() {
        let a = Admission::default();
        let g = GuestId(2);
        a.welcome(g, 1, 16, None, None).unwrap();
        a.welcome(g, 1, 16, None, None).expect("the same instance reconnecting");
        assert!(a.welcome(g, 2, 16, None, None).unwrap_err().contains("already connected"));
        a.disconnected(g);
        a.disconnected(g);
        a.welcome(g, 2, 16, None, None).expect("no connection left");
    }

    #[test]
    fn a_fenced_guest_is_refused_naming_the_failover_epoch() {
        let a = Admission::default();
        let g = GuestId(3);
        a.fence(g, EpochId(41));
        let err = a.welcome(g, 1, 16, None, None).unwrap_err();
        assert!(err.contains("failed over at epoch 41"), "{err}");
        // A fence kept in the store (a restarted backup) refuses too, and
        // says since when.
        let fresh = Admission::default();
        let f = Fence { epoch: EpochId(41), since_unix_ms: 1_767_225_600_000 };
        let err = fresh.welcome(g, 1, 16, None, Some(f)).unwrap_err();
        assert!(err.contains("at epoch 41 at 2026-01-01T00:00:00Z"), "{err}");
    }
}
