//! Fan-out: one primary replicating to a near backup (high availability)
//! and far ones (disaster recovery) at once.
//!
//! Every sealed checkpoint goes to every backup, each over a link of its
//! own (its own encoder, its own view of what that backup holds). The
//! [`Release`] rule says whose acknowledgements release held output, and
//! so which backups *pace* the guest: the engine waits for a pacing
//! backup's link to take each checkpoint, as with a single backup. A
//! backup that does not pace never holds the guest or its output back:
//! when its link falls behind (a slow path, or cut off), the checkpoints
//! it has not taken are merged into one ([`MergedCheckpoint`]), which it
//! commits after the last epoch it holds, skipping those between. Memory
//! for it stays bounded by what its link retains
//! ([`FAR_RETAINED_BYTES`]), two queued checkpoints, and one merged
//! checkpoint (at most the guest's memory).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use parking_lot::Mutex;
use remus_types::{Checkpoint, EpochId, MergedCheckpoint};
use tokio::sync::mpsc;

/// Bytes of unacknowledged checkpoints a far backup's link keeps for
/// resending (its near counterpart keeps [`remus_wan::SenderConfig`]'s
/// `max_retained_bytes`); beyond it, checkpoints are merged instead.
pub const FAR_RETAINED_BYTES: usize = 256 << 20;

/// Checkpoints queued for a far backup's link beyond what it retains.
pub(crate) const FAR_QUEUE: usize = 2;

/// Whose acknowledgement releases output, among the backups (the near one
/// first, then the far ones in the order configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Release {
    /// The near backup's alone (far backups never hold output back).
    #[default]
    Near,
    /// Every backup's.
    All,
    /// Any `n` backups' (at least 1; more than there are means all). The
    /// first `n` in the list pace the guest.
    Count(usize),
}

impl Release {
    /// Parses `near`, `all` or a count.
    ///
    /// # Errors
    /// Anything else, or a count of 0.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "near" => Ok(Self::Near),
            "all" => Ok(Self::All),
            n => match n.parse::<usize>() {
                Ok(0) => Err("a release count must be at least 1".into()),
                Ok(n) => Ok(Self::Count(n)),
                Err(_) => Err(format!("release must be \"near\", \"all\" or a count of backups, not {n:?}")),
            },
        }
    }

    /// The epoch whose output may be released when the backups (near
    /// first) have acknowledged `acked`.
    #[must_use]
    pub fn released(self, acked: &[EpochId]) -> EpochId {
        match self {
            Self::Near => acked.first().copied().unwrap_or_default(),
            Self::All => acked.iter().copied().min().unwrap_or_default(),
            Self::Count(n) => {
                let mut sorted = acked.to_vec();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                sorted.get(n.clamp(1, sorted.len().max(1)) - 1).copied().unwrap_or_default()
            }
        }
    }

    /// Whether backup `i` (0 the near one) paces the guest: its link takes
    /// every checkpoint, and the engine waits for it.
    #[must_use]
    pub fn paces(self, i: usize) -> bool {
        match self {
            Self::Near => i == 0,
            Self::All => true,
            Self::Count(n) => i < n.max(1),
        }
    }
}

/// Combines the backups' acknowledgements by the release rule and passes
/// each new releasable epoch to the engine's driver.
pub(crate) struct Releaser {
    rule: Release,
    state: Mutex<(Vec<EpochId>, EpochId)>,
    to_engine: Sender<EpochId>,
}

impl Releaser {
    pub(crate) fn new(rule: Release, backups: usize, to_engine: Sender<EpochId>) -> Self {
        Self { rule, state: Mutex::new((vec![EpochId(0); backups], EpochId(0))), to_engine }
    }

    /// Backup `i` acknowledged every epoch up to `epoch`.
    pub(crate) fn acked(&self, i: usize, epoch: EpochId) {
        let mut st = self.state.lock();
        let (acked, released) = &mut *st;
        acked[i] = acked[i].max(epoch);
        let now = self.rule.released(acked);
        if now > *released {
            *released = now;
            // The driver is gone only once the engine finished.
            let _ = self.to_engine.send(now);
        }
    }
}

/// What a far backup's link did, for the summary.
#[derive(Debug, Clone, Default)]
pub struct FarStats {
    /// Its address.
    pub addr: Option<SocketAddr>,
    /// Highest epoch it acknowledged.
    pub acked: EpochId,
    /// Bytes of epochs put on the wire to it (resends included).
    pub wire_bytes: u64,
    /// Bytes sent to it again after a reconnect or a refusal.
    pub resent_bytes: u64,
    /// Epochs merged into a later one because its link was behind (never
    /// kept there).
    pub merged: Arc<AtomicU64>,
    /// Connection losses.
    pub disconnects: u64,
    /// Whether its link is connected and welcomed now.
    pub connected: bool,
}

/// Where the engine's checkpoints go: the links that pace the guest, in
/// order, and the far ones that are merged into when behind.
pub(crate) struct Feeds {
    pub(crate) paced: Vec<mpsc::Sender<Checkpoint>>,
    pub(crate) merging: Vec<mpsc::UnboundedSender<Checkpoint>>,
}

/// Copies each checkpoint to every link: waits for each pacing link to
/// take it, hands it to each merging feed at once. Ends when the engine's
/// channel closes (the links then end once all is acknowledged) or a
/// pacing link is gone.
pub(crate) async fn fan_out(mut input: mpsc::Receiver<Checkpoint>, mut feeds: Feeds) {
    while let Some(cp) = input.recv().await {
        // A merging feed whose link ended (refused) is dropped; the others go on.
        feeds.merging.retain(|f| f.send(cp.clone()).is_ok());
        let Some((last, rest)) = feeds.paced.split_last() else { return };
        for link in rest {
            if link.send(cp.clone()).await.is_err() {
                return;
            }
        }
        if last.send(cp).await.is_err() {
            return;
        }
    }
}

/// Feeds a far backup's link: each checkpoint goes to the link while it
/// has room; while it has none, they are merged into one, sent when room
/// frees. `merged` counts the epochs merged away.
pub(crate) async fn merging_feed(mut from: mpsc::UnboundedReceiver<Checkpoint>, to: mpsc::Sender<Checkpoint>, merged: Arc<AtomicU64>) {
    let mut held: Option<MergedCheckpoint> = None;
    loop {
        tokio::select! {
            biased;
            permit = to.reserve(), if held.is_some() => match permit {
                Ok(p) => p.send(held.take().expect("held").into_checkpoint()),
                Err(_) => return,
            },
            cp = from.recv() => match (cp, held.as_mut()) {
                (None, _) => break,
                (Some(cp), Some(h)) => {
                    h.absorb(cp);
                    merged.fetch_add(1, Ordering::Relaxed);
                }
                (Some(cp), None) => match to.try_send(cp) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(cp)) => held = Some(MergedCheckpoint::new(cp)),
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                },
            },
        }
    }
    if let Some(h) = held {
        let _ = to.send(h.into_checkpoint()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_types::{GuestId, Pfn, PAGE_SIZE};

    #[test]
    fn release_rules_pick_the_epoch_their_backups_acknowledged() {
        let acked = [EpochId(7), EpochId(3), EpochId(9)];
        assert_eq!(Release::Near.released(&acked), EpochId(7));
        assert_eq!(Release::All.released(&acked), EpochId(3));
        assert_eq!(Release::Count(1).released(&acked), EpochId(9));
        assert_eq!(Release::Count(2).released(&acked), EpochId(7));
        assert_eq!(Release::Count(3).released(&acked), EpochId(3));
        assert_eq!(Release::Count(5).released(&acked), EpochId(3), "more than there are: all");
        assert!(Release::Near.paces(0) && !Release::Near.paces(1));
        assert!(Release::All.paces(2));
        assert!(Release::Count(2).paces(1) && !Release::Count(2).paces(2));
        assert_eq!(Release::parse("near"), Ok(Release::Near));
        assert_eq!(Release::parse("all"), Ok(Release::All));
        assert_eq!(Release::parse("2"), Ok(Release::Count(2)));
        assert!(Release::parse("0").unwrap_err().contains("at least 1"));
        assert!(Release::parse("most").unwrap_err().contains("\"near\", \"all\""));
    }

    #[test]
    fn the_releaser_passes_each_new_releasable_epoch_once() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let r = Releaser::new(Release::All, 2, tx);
        r.acked(0, EpochId(5));
        assert!(rx.try_recv().is_err(), "the far backup has acknowledged nothing");
        r.acked(1, EpochId(3));
        r.acked(1, EpochId(2));
        r.acked(1, EpochId(8));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![EpochId(3), EpochId(5)]);
    }

    fn cp(epoch: u64, pfn: u64) -> Checkpoint {
        Checkpoint {
            guest: GuestId(1),
            epoch: EpochId(epoch),
            page_count: 16,
            pfns: vec![Pfn(pfn)],
            pages: vec![epoch as u8; PAGE_SIZE],
            ..Checkpoint::default()
        }
    }

    /// A feed whose link takes nothing merges what it cannot pass on, and
    /// passes the merge on when the link takes again: every epoch reaches
    /// the link or is counted as merged, and the memory it describes is
    /// the last epoch's.
    #[tokio::test]
    async fn a_far_feed_merges_while_its_link_is_full_and_catches_up_after() {
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (link_tx, mut link_rx) = mpsc::channel(FAR_QUEUE);
        let merged = Arc::new(AtomicU64::new(0));
        let feed = tokio::spawn(merging_feed(in_rx, link_tx, Arc::clone(&merged)));
        for e in 1..=10 {
            in_tx.send(cp(e, e % 4)).unwrap();
        }
        // Nothing taken yet: two queued, the rest merged behind them.
        let mut got = Vec::new();
        tokio::task::yield_now().await;
        drop(in_tx);
        while let Some(c) = link_rx.recv().await {
            got.push(c);
        }
        feed.await.unwrap();
        let epochs: Vec<u64> = got.iter().map(|c| c.epoch.0).collect();
        assert_eq!(epochs.first(), Some(&1));
        assert_eq!(epochs.last(), Some(&10), "the newest epoch always arrives");
        assert_eq!(epochs.len() as u64 + merged.load(Ordering::Relaxed), 10, "each epoch sent or merged: {epochs:?}");
        assert!(merged.load(Ordering::Relaxed) > 0, "a full link merges: {epochs:?}");
        let last = got.last().unwrap();
        // Pages 0..4 as the newest epoch that wrote each: 8, 9, 10, 7 (or
        // earlier epochs' where those were sent on their own before).
        for (i, pfn) in last.pfns.iter().enumerate() {
            let newest = (1..=10u64).rev().find(|e| e % 4 == pfn.0).unwrap();
            assert_eq!(last.page(i)[0], newest as u8, "page {pfn:?}");
        }
    }
}
