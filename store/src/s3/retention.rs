//! Thinning and GC in the S3 tier, mirroring the local store.
//!
//! Thinning happens locally first (only on epochs S3 already holds);
//! [`S3Tier::mirror_thinning`] then makes S3 match: it puts a bridge
//! object for each local bridge it lacks, rewrites each segment holding
//! dropped epochs without them (the new one put before the old one is
//! deleted; readers pass over epochs a bridge spans and merge segments
//! that overlap), moves each checkpoint at a dropped epoch to the next
//! kept one, then deletes bridges a merged one replaced. Every step is
//! idempotent and ordered so that a reader, or a crash, between any two
//! of them finds every kept epoch restorable. [`S3Tier::gc`] deletes
//! packs none of whose chunks a kept epoch references, forgetting their
//! chunks' upload marks first so the uploader sends such content again
//! if it reappears, and repacks packs that are mostly dead: their live
//! chunks go to new packs (put and marked first), then the old pack and
//! its index are deleted, so every kept chunk is in some pack throughout.
//! It runs on the uploader's thread, never beside a pass.

use std::collections::HashSet;

use remus_types::{ChunkId, EpochId};

use super::format::{self, BridgeObject, PackIndex};
use super::upload::ok_if_exists;
use super::{S3Error, S3Tier};
use crate::db::Store;
use crate::error::StoreError;

/// What mirroring and GC did in S3.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct S3RetentionReport {
    /// Bridge objects put.
    pub bridges_put: u64,
    /// Epochs removed from segments.
    pub epochs_deleted: u64,
    /// Segments rewritten without their dropped epochs (or deleted when
    /// none was left).
    pub segments_rewritten: u64,
    /// Checkpoints moved from a dropped epoch to the next kept one.
    pub checkpoints_moved: u64,
    /// Packs deleted (with their indexes).
    pub packs_deleted: u64,
    /// Packs kept.
    pub packs_kept: u64,
    /// Chunks in kept packs that no kept epoch references (under half of
    /// each such pack: a pack more dead than that is repacked).
    pub dead_chunks_in_kept_packs: u64,
    /// Packs rewritten with their live chunks only.
    pub packs_repacked: u64,
    /// Live chunks copied into new packs by repacking.
    pub chunks_moved: u64,
}

impl S3Tier {
    /// Makes S3 reflect the local store's thinning.
    ///
    /// # Errors
    /// S3 and store errors; a rerun continues where it stopped.
    pub fn mirror_thinning(&self, store: &Store) -> Result<S3RetentionReport, StoreError> {
        let mut r = S3RetentionReport::default();
        for (guest, _) in store.guests()? {
            let local = store.bridges(guest)?;
            let in_s3: HashSet<String> = self.client.list(&format::bridges_prefix(guest))?.into_iter().map(|l| l.key).collect();
            let mut wanted = HashSet::new();
            for b in &local {
                let pages = store
                    .page_lists(guest, b.first, b.last)?
                    .into_iter()
                    .flat_map(|(e, ps)| ps.into_iter().map(move |(p, id)| (p, e, id)))
                    .collect();
                let bridge = BridgeObject { guest, bridge: *b, pages };
                let key = format::bridge_key(&bridge);
                if !in_s3.contains(&key) {
                    match self.put_object(&key, bridge.encode()) {
                        Ok(()) | Err(S3Error::Exists(_)) => r.bridges_put += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
                wanted.insert(key);
            }
            let dropped = |e: EpochId| local.iter().any(|b| b.spans(e));
            let spans_some = |first: EpochId, last: EpochId| local.iter().any(|b| b.first <= last && first <= b.last);
            for s in self.segment_keys(guest)? {
                if !spans_some(s.first, s.last) {
                    continue;
                }
                let mut seg = self.segment(guest, &s.key)?;
                let before = seg.epochs.len();
                seg.epochs.retain(|(m, _)| !dropped(m.epoch));
                if seg.epochs.len() == before {
                    continue;
                }
                r.epochs_deleted += (before - seg.epochs.len()) as u64;
                if !seg.epochs.is_empty() {
                    ok_if_exists(self.put_object(&seg.rewritten_key(), seg.encode()))?;
                }
                self.client.delete(&s.key, None)?;
                r.segments_rewritten += 1;
            }
            for e in self.checkpoint_epochs(guest)?.into_iter().filter(|e| dropped(*e)) {
                // Readers start at checkpoints of kept epochs only; the
                // next kept epoch takes this one's place.
                if let Some(next) = store.kept_epoch_near(guest, e, true)? {
                    if next <= store.s3_cursor(guest)? {
                        self.put_checkpoint(store, &store.manifest(guest, next)?)?;
                        r.checkpoints_moved += 1;
                    }
                }
                self.client.delete(&format::checkpoint_key(guest, e), None)?;
            }
            for key in in_s3.difference(&wanted) {
                self.client.delete(key, None)?;
            }
        }
        Ok(r)
    }

    /// Deletes packs that hold no chunk in `referenced` (the local GC's
    /// mark set, a superset of what S3's kept epochs name) and repacks
    /// those where more than half of the chunks are dead.
    ///
    /// # Errors
    /// S3 and store errors; a rerun continues where it stopped.
    pub fn gc(&self, store: &Store, referenced: &HashSet<ChunkId>) -> Result<S3RetentionReport, StoreError> {
        let mut r = S3RetentionReport::default();
        let packs: HashSet<String> = self.client.list("packs/")?.into_iter().map(|l| l.key).collect();
        let mut sparse = Vec::new();
        for l in self.client.list("index/")? {
            let ix = format::decode_index(&self.get_object(&l.key)?).map_err(|e| e.at(format!("s3 {}", l.key)))?;
            let live = ix.entries.iter().filter(|e| referenced.contains(&e.id)).count();
            if live * 2 < ix.entries.len() && live > 0 {
                sparse.push((l.key, ix));
            } else if live > 0 {
                r.packs_kept += 1;
                r.dead_chunks_in_kept_packs += (ix.entries.len() - live) as u64;
            } else {
                self.delete_pack(store, &l.key, &ix, &packs)?;
                r.packs_deleted += 1;
            }
        }
        // Live chunks of mostly dead packs into new packs, from the local
        // store (which holds every referenced chunk); each old pack goes
        // once the new pack holding its live chunks is in place.
        let mut next = self.new_pack();
        let mut emptied: Vec<(String, PackIndex)> = Vec::new();
        for (key, ix) in sparse {
            let live: Vec<ChunkId> = ix.entries.iter().map(|e| e.id).filter(|id| referenced.contains(id)).collect();
            // A delta stays one over a base S3 holds (a live delta's base
            // is live: it is kept, or moved before its pack goes).
            let value = |id: &ChunkId| store.chunk_value_for_s3(id, |_| false).map(|(v, _)| (*id, v));
            let values = match live.iter().map(value).collect::<Result<Vec<_>, _>>() {
                Ok(v) => v,
                Err(StoreError::ChunkMissing(id)) => {
                    tracing::warn!(pack = %ix.pack, chunk = %id, "not repacking: a live chunk is not in the local store");
                    r.packs_kept += 1;
                    r.dead_chunks_in_kept_packs += (ix.entries.len() - live.len()) as u64;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (id, v) in values {
                next.push(id, &v);
                r.chunks_moved += 1;
            }
            emptied.push((key, ix));
            if next.len() >= self.cfg.pack_bytes() {
                self.put_pack(store, std::mem::replace(&mut next, self.new_pack()))?;
                for (key, ix) in emptied.drain(..) {
                    self.delete_pack(store, &key, &ix, &packs)?;
                    r.packs_repacked += 1;
                }
            }
        }
        if !next.is_empty() {
            self.put_pack(store, next)?;
        }
        for (key, ix) in emptied {
            self.delete_pack(store, &key, &ix, &packs)?;
            r.packs_repacked += 1;
        }
        Ok(r)
    }

    /// Deletes a pack and its index object (`index_key`), first forgetting
    /// the upload marks that still name it.
    fn delete_pack(&self, store: &Store, index_key: &str, ix: &PackIndex, packs: &HashSet<String>) -> Result<(), StoreError> {
        let mut ours = Vec::new();
        for e in &ix.entries {
            if store.s3_pack_of(&e.id)? == Some(ix.pack) {
                ours.push(e.id);
            }
        }
        store.unmark_in_s3(&ours)?;
        let pack = format::pack_key(&ix.pack);
        if packs.contains(&pack) {
            self.client.delete(&pack, None)?;
        }
        self.client.delete(index_key, None)?;
        Ok(())
    }
}
