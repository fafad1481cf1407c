//! The backup's memory budget for epochs received and not yet committed:
//! a limit per connection and one across all connections, so that no
//! primary (a slow store, a primary sending faster than it commits, or a
//! malicious one) can make the backup buffer without bound, and one
//! guest's backlog cannot take the memory another needs (N-to-1).
//!
//! An epoch stream's reader takes budget for each chunk before it keeps
//! it; the budget is given back when the epoch is committed (or dropped:
//! resent, stale, refused). A reader out of budget waits, and QUIC flow
//! control then holds the primary back. One stream per connection is
//! never held back: the oldest open one, which is the epoch the next
//! commit waits for (streams open in epoch order), reads on without
//! budget when there is none left, so a connection whose later epochs
//! hold all of it still makes progress. Memory is thus bounded by the
//! budget plus one epoch per connection.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Bytes per permit.
const UNIT: u64 = 1024;

/// The budget shared by every connection of one backup.
#[derive(Debug)]
pub struct Budget {
    per_connection: u64,
    total: Arc<Semaphore>,
    total_units: u64,
    /// The most units ever held at once across connections.
    peak: AtomicU64,
}

impl Budget {
    /// A budget of `per_connection` bytes for each connection and `total`
    /// bytes across all of them.
    #[must_use]
    pub fn new(per_connection: u64, total: u64) -> Self {
        let total_units = total.div_ceil(UNIT).max(1);
        let units = usize::try_from(total_units).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Self { per_connection, total: Arc::new(Semaphore::new(units)), total_units: units as u64, peak: AtomicU64::new(0) }
    }

    /// The most bytes held at once across connections so far (by stream
    /// readers held back; the oldest stream of each connection is not
    /// counted).
    #[must_use]
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed) * UNIT
    }

    /// The budget of one new connection.
    pub(crate) fn connection(self: &Arc<Self>) -> Arc<ConnectionBudget> {
        let units = self.per_connection.div_ceil(UNIT).max(1);
        let units = usize::try_from(units).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Arc::new(ConnectionBudget {
            shared: Arc::clone(self),
            own: Arc::new(Semaphore::new(units)),
            open: Mutex::new(BTreeSet::new()),
            changed: Notify::new(),
        })
    }

    fn note_held(&self) {
        let held = self.total_units.saturating_sub(self.total.available_permits() as u64);
        self.peak.fetch_max(held, Ordering::Relaxed);
    }
}

/// One connection's share of a [`Budget`].
#[derive(Debug)]
pub(crate) struct ConnectionBudget {
    shared: Arc<Budget>,
    own: Arc<Semaphore>,
    /// The epoch streams being read, by stream index.
    open: Mutex<BTreeSet<u64>>,
    changed: Notify,
}

/// Budget held for received bytes; given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct Held(Vec<OwnedSemaphorePermit>);

impl Held {
    fn add(&mut self, p: OwnedSemaphorePermit) {
        self.0.push(p);
    }
}

/// A stream registered as open while its reader lives.
pub(crate) struct OpenStream<'a> {
    budget: &'a ConnectionBudget,
    id: u64,
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.budget.open.lock().remove(&self.id);
        self.budget.changed.notify_waiters();
    }
}

impl ConnectionBudget {
    /// Registers stream `id` as being read until the guard drops.
    pub(crate) fn open(&self, id: u64) -> OpenStream<'_> {
        self.open.lock().insert(id);
        OpenStream { budget: self, id }
    }

    fn oldest(&self, id: u64) -> bool {
        self.open.lock().first() == Some(&id)
    }

    /// Takes budget for `bytes` more of stream `id` into `held`, waiting
    /// while there is none, unless the stream is (or becomes) the oldest
    /// open one of the connection.
    pub(crate) async fn take(&self, id: u64, bytes: usize, held: &mut Held) {
        let units = u32::try_from((bytes as u64).div_ceil(UNIT)).unwrap_or(u32::MAX);
        if units == 0 {
            return;
        }
        for sem in [&self.own, &self.shared.total] {
            loop {
                if let Ok(p) = Arc::clone(sem).try_acquire_many_owned(units) {
                    held.add(p);
                    break;
                }
                if self.oldest(id) {
                    // Out of budget, and the epoch the next commit waits
                    // for: it reads on without.
                    return;
                }
                let changed = self.changed.notified();
                tokio::pin!(changed);
                // Registered before looking again, so a change in between
                // is not missed.
                changed.as_mut().enable();
                if self.oldest(id) {
                    return;
                }
                tokio::select! {
                    p = Arc::clone(sem).acquire_many_owned(units) => {
                        held.add(p.expect("the semaphore is never closed"));
                        break;
                    }
                    () = &mut changed => {}
                }
            }
        }
        self.shared.note_held();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_wait_for_budget_but_the_oldest_stream_never_does() {
        let budget = Arc::new(Budget::new(8 * UNIT, 100 * UNIT));
        let conn = budget.connection();
        let (_a, _b) = (conn.open(1), conn.open(2));
        // The oldest stream takes nothing when there is not enough, and
        // never waits.
        let mut held_a = Held::default();
        conn.take(1, 1 << 30, &mut held_a).await;
        assert!(held_a.0.is_empty());
        // The next one takes up to the connection's budget ...
        let mut held_b = Held::default();
        conn.take(2, 8 * UNIT as usize, &mut held_b).await;
        assert_eq!(budget.peak_bytes(), 8 * UNIT);
        // ... and then waits, until budget comes back.
        let c = Arc::clone(&conn);
        let waiter = tokio::spawn(async move {
            let _open = c.open(3);
            let mut held = Held::default();
            c.take(3, UNIT as usize, &mut held).await;
            held.0.len()
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held_b);
        assert_eq!(waiter.await.unwrap(), 2, "one permit of each budget");
    }

    #[tokio::test]
    async fn a_waiting_reader_goes_on_once_it_is_the_oldest() {
        let budget = Arc::new(Budget::new(UNIT, UNIT));
        let conn = budget.connection();
        let first = conn.open(1);
        let mut held = Held::default();
        conn.take(1, UNIT as usize, &mut held).await; // the oldest takes what there is
        let c = Arc::clone(&conn);
        let waiter = tokio::spawn(async move {
            let _open = c.open(5);
            let mut h = Held::default();
            c.take(5, 4 * UNIT as usize, &mut h).await;
            h.0.len()
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "out of budget and not the oldest");
        drop(first);
        assert_eq!(waiter.await.unwrap(), 0, "the oldest now: it reads on without budget");
    }
}
