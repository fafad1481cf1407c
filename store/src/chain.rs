//! The manifest chain rule, in one place for the local store and the S3
//! tier alike.
//!
//! Each kept manifest names its predecessor's id as its parent. Where
//! thinning dropped a run of epochs, a [`Bridge`] records how the kept
//! manifests on either side link across it. Manifest `B` following kept
//! manifest `A` (or the start, id zero at epoch 0) is linked when either
//! - `B` follows `A` directly and `B.parent == id(A)`, or
//! - a bridge spans exactly the gap, with `first_parent == id(A)` and
//!   `last_id == B.parent`.
//!
//! What a bridge cannot prove is the content of the dropped manifests: it
//! records that they existed and how the kept ones link across them.

use remus_types::{ChunkId, EpochId};

use crate::Manifest;

/// A recorded run of dropped epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bridge {
    /// First dropped epoch.
    pub first: EpochId,
    /// Last dropped epoch.
    pub last: EpochId,
    /// Parent of the first dropped manifest (the previous kept manifest's
    /// id, zero at the start).
    pub first_parent: ChunkId,
    /// Id of the last dropped manifest (the next kept manifest's parent).
    pub last_id: ChunkId,
}

impl Bridge {
    /// True when `epoch` is one of the dropped epochs.
    #[must_use]
    pub fn spans(&self, epoch: EpochId) -> bool {
        self.first <= epoch && epoch <= self.last
    }
}

/// How a manifest fails to link to the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainBreak {
    /// It follows the previous one directly but names another parent.
    #[error("parent link does not match the previous manifest")]
    Parent,
    /// A bridge spans the gap but does not link both ends.
    #[error("thinning bridge does not link the kept manifests")]
    Bridge,
    /// Epochs before it are missing and no bridge covers them.
    #[error("epochs before it are missing and no thinning bridge covers them")]
    Gap,
}

/// Walks one guest's kept manifests in epoch order, checking each link.
pub struct ChainWalk<'a> {
    bridges: &'a [Bridge],
    /// The previous manifest's epoch and id; `None` after a damaged one
    /// (the next link cannot be judged, and the damage is reported once).
    prev: Option<(EpochId, ChunkId)>,
}

impl<'a> ChainWalk<'a> {
    /// A walk from the start of a history with these bridges.
    #[must_use]
    pub fn new(bridges: &'a [Bridge]) -> Self {
        Self { bridges, prev: Some((EpochId(0), ChunkId::default())) }
    }

    /// A walk that starts after `m` and checks every link from there on
    /// (the chain before `m` is not read: a checkpoint's reader).
    #[must_use]
    pub fn after(bridges: &'a [Bridge], m: &Manifest) -> Self {
        Self { bridges, prev: Some((m.epoch, m.id())) }
    }

    /// Checks `m` against the previous manifest and moves on to it.
    ///
    /// # Errors
    /// The [`ChainBreak`] (the walk moves on all the same).
    pub fn step(&mut self, m: &Manifest) -> Result<(), ChainBreak> {
        let result = match self.prev {
            None => Ok(()),
            Some((pe, pid)) if m.epoch == pe.next() => {
                if m.parent == pid {
                    Ok(())
                } else {
                    Err(ChainBreak::Parent)
                }
            }
            Some((pe, pid)) => match self.bridges.iter().find(|b| b.first == pe.next() && b.last.next() == m.epoch) {
                Some(b) if b.first_parent == pid && b.last_id == m.parent => Ok(()),
                Some(_) => Err(ChainBreak::Bridge),
                None => Err(ChainBreak::Gap),
            },
        };
        self.prev = Some((m.epoch, m.id()));
        result
    }

    /// The manifest at this point could not be read: the next link is not
    /// judged.
    pub fn damaged(&mut self) {
        self.prev = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_types::GuestId;

    fn manifest(epoch: u64, parent: ChunkId) -> Manifest {
        Manifest {
            guest: GuestId(1),
            epoch: EpochId(epoch),
            parent,
            time_unix_ns: epoch,
            page_count: 4,
            dirty_pages: 0,
            memory_root: ChunkId::default(),
            page_delta: ChunkId::default(),
            device_state: ChunkId::default(),
            instance: 7,
            pause_ns: 0,
            wire_bytes: 0,
            new_chunk_bytes: 0,
            generation: 0,
            commit_unix_ns: 0,
            released_ahead: false,
        }
    }

    /// Epochs 1..=n, each naming the one before.
    fn chain(n: u64) -> Vec<Manifest> {
        let mut out: Vec<Manifest> = Vec::new();
        for e in 1..=n {
            let parent = out.last().map_or(ChunkId::default(), Manifest::id);
            out.push(manifest(e, parent));
        }
        out
    }

    #[test]
    fn a_whole_chain_links_and_each_break_is_named() {
        let c = chain(5);
        let mut walk = ChainWalk::new(&[]);
        assert!(c.iter().all(|m| walk.step(m).is_ok()));

        let mut forged = c.clone();
        forged[2].parent = ChunkId([9; 32]);
        let mut walk = ChainWalk::new(&[]);
        let breaks: Vec<_> = forged.iter().map(|m| walk.step(m)).collect();
        assert_eq!(breaks[2], Err(ChainBreak::Parent));
        assert_eq!(breaks[3], Err(ChainBreak::Parent), "epoch 4 names the real epoch 3, not the forged one");

        let first_forged = manifest(1, ChunkId([1; 32]));
        assert_eq!(ChainWalk::new(&[]).step(&first_forged), Err(ChainBreak::Parent), "the first names no parent");
    }

    #[test]
    fn a_bridge_must_span_the_gap_and_link_both_ends() {
        let c = chain(6);
        // Epochs 3 and 4 dropped.
        let kept = [&c[0], &c[1], &c[4], &c[5]];
        let good = Bridge { first: EpochId(3), last: EpochId(4), first_parent: c[1].id(), last_id: c[3].id() };
        let walk_with = |bridges: &[Bridge]| {
            let mut walk = ChainWalk::new(bridges);
            kept.iter().map(|m| walk.step(m)).collect::<Vec<_>>()
        };
        assert!(walk_with(&[good]).iter().all(Result::is_ok));
        assert_eq!(walk_with(&[])[2], Err(ChainBreak::Gap));
        let short = Bridge { last: EpochId(3), ..good };
        assert_eq!(walk_with(&[short])[2], Err(ChainBreak::Gap), "a bridge must span exactly the gap");
        let unlinked = Bridge { first_parent: ChunkId([3; 32]), ..good };
        assert_eq!(walk_with(&[unlinked])[2], Err(ChainBreak::Bridge));
        assert!(good.spans(EpochId(3)) && good.spans(EpochId(4)) && !good.spans(EpochId(5)));
    }

    #[test]
    fn after_a_damaged_manifest_the_next_link_is_not_judged() {
        let c = chain(3);
        let mut walk = ChainWalk::new(&[]);
        walk.step(&c[0]).unwrap();
        walk.damaged();
        assert_eq!(walk.step(&c[2]), Ok(()), "reported once, as the damaged manifest");
    }
}
