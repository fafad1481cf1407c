//! Output commit: what a guest sends to the outside world is held here,
//! tagged with the epoch that produced it, and released only once the
//! backup has acknowledged that epoch.
//!
//! Ordering rule: an item pushed while epoch `N` is open is released by
//! `release(N')` for some `N' >= N`, never earlier. The capture engine seals
//! epoch `N` while the guest is paused, so everything the guest emitted
//! before that pause belongs to `N` or earlier.

use parking_lot::Mutex;
use remus_types::EpochId;
use std::collections::VecDeque;

/// Externally visible output held until its epoch commits.
pub struct OutputBuffer<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    open: EpochId,
    held: VecDeque<(EpochId, T)>,
}

impl<T> Default for OutputBuffer<T> {
    fn default() -> Self {
        Self { inner: Mutex::new(Inner { open: EpochId(1), held: VecDeque::new() }) }
    }
}

impl<T> OutputBuffer<T> {
    /// Holds `item` as output of the currently open epoch; returns that epoch.
    pub fn push(&self, item: T) -> EpochId {
        let mut g = self.inner.lock();
        let e = g.open;
        g.held.push_back((e, item));
        e
    }

    /// Closes `epoch`: later pushes belong to `epoch + 1`. Called by the
    /// engine while the guest is paused, and only there.
    pub(crate) fn seal(&self, epoch: EpochId) {
        let mut g = self.inner.lock();
        g.open = epoch.next();
    }

    /// Opens `epoch` as the first (a history continued after `epoch - 1`):
    /// what was pushed before belongs to it.
    pub(crate) fn open_at(&self, epoch: EpochId) {
        let mut g = self.inner.lock();
        g.open = epoch;
        for (e, _) in &mut g.held {
            *e = (*e).max(epoch);
        }
    }

    /// Releases, in order, everything produced by epochs `<= acked`.
    /// Called by the engine on an acknowledgement, and only there.
    pub(crate) fn release(&self, acked: EpochId) -> Vec<T> {
        let mut g = self.inner.lock();
        let mut out = Vec::new();
        while g.held.front().is_some_and(|(e, _)| *e <= acked) {
            out.push(g.held.pop_front().expect("front exists").1);
        }
        out
    }

    /// Number of items still held.
    pub fn held(&self) -> usize {
        self.inner.lock().held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_released_before_its_epoch_is_acked() {
        let b = OutputBuffer::default();
        assert_eq!(b.push("a"), EpochId(1));
        b.seal(EpochId(1));
        assert_eq!(b.push("b"), EpochId(2));
        b.seal(EpochId(2));
        b.push("c");
        assert!(b.release(EpochId(0)).is_empty());
        assert_eq!(b.release(EpochId(1)), vec!["a"]);
        assert_eq!(b.held(), 2);
        assert_eq!(b.release(EpochId(3)), vec!["b", "c"]);
    }
}
