//! `verify --s3`: re-hash every chunk of every pack, check every index,
//! segment, checkpoint and bridge, walk each guest's manifest chain, and
//! name exactly what is damaged (the pack and chunk, the epoch, the
//! object).

use std::collections::{BTreeMap, HashSet};

use remus_types::{ChunkId, EpochId};

use super::format::{self, BridgeObject, CheckpointObject};
use super::{ChunkLocations, S3Epoch, S3Tier};
use crate::chain::{Bridge, ChainWalk};
use crate::db::HeldValue;
use crate::error::StoreError;
use crate::verify::{Damage, VerifyReport};
use remus_types::content_id;

/// Deltas read through their chains per batch.
const DELTA_BATCH: usize = 4096;

impl S3Tier {
    /// Reads, opens and decodes the object at `key`: the outer error when
    /// verify cannot go on (S3 away, a key missing), the inner one when
    /// the object is damaged.
    fn checked<T>(&self, key: &str, decode: impl FnOnce(&[u8]) -> Result<T, StoreError>) -> Result<Result<T, StoreError>, StoreError> {
        match self.get_object(key).and_then(|b| decode(&b)) {
            Err(e @ (StoreError::Keys(_) | StoreError::S3(_))) => Err(e),
            r => Ok(r),
        }
    }

    /// Reads each delta of `deltas` through its chain of bases and checks
    /// its content against its id, in batches; calls `bad(id, base_gone)`
    /// for each that cannot be read (`base_gone`: a base on its chain is
    /// in no pack, else one is damaged).
    fn check_deltas(&self, locs: &ChunkLocations, deltas: &[ChunkId], bad: &mut dyn FnMut(ChunkId, bool)) -> Result<(), StoreError> {
        let away = |e: &StoreError| matches!(e, StoreError::Keys(_) | StoreError::S3(_));
        for batch in deltas.chunks(DELTA_BATCH) {
            match self.fetch_located(locs, batch.iter().copied(), |_, _| Ok(())) {
                Err(e) if away(&e) => return Err(e),
                Ok(()) => continue,
                Err(_) => {}
            }
            // One is damaged: find which, one at a time.
            for id in batch {
                match self.fetch_located(locs, [*id], |_, _| Ok(())) {
                    Err(e) if away(&e) => return Err(e),
                    Err(StoreError::ChunkMissing(_)) => bad(*id, true),
                    Err(_) => bad(*id, false),
                    Ok(()) => {}
                }
            }
        }
        Ok(())
    }

    /// Checks the whole tier; `progress(chunks)` after each pack.
    ///
    /// # Errors
    /// S3 failures; damage is reported in the [`VerifyReport`].
    pub fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, StoreError> {
        let mut r = VerifyReport::default();
        let mut packs: HashSet<String> = self.client.list("packs/")?.into_iter().map(|l| l.key).collect();
        let index_keys: Vec<String> = self.client.list("index/")?.into_iter().map(|l| l.key).collect();
        let mut held = HashSet::new();
        let mut damaged = HashSet::new();
        // Where each chunk is, and the deltas, read once their bases are.
        let mut locs = ChunkLocations::new();
        let mut deltas = Vec::new();
        for key in &index_keys {
            let ix = match self.checked(key, format::decode_index)? {
                Ok(ix) => ix,
                Err(e) => {
                    r.damage.push(Damage::ObjectCorrupt { key: key.clone(), reason: e.to_string() });
                    continue;
                }
            };
            let pack = ix.pack.to_hex();
            if !packs.remove(&format::pack_key(&ix.pack)) {
                r.damage.push(Damage::PackMissing { pack });
                continue;
            }
            let body = self.client.get(&format::pack_key(&ix.pack))?;
            let mut bad = 0;
            if body.len() as u64 != ix.pack_len || format::check_pack_header(&body, ix.seal).is_err() {
                r.damage.push(Damage::PackCorrupt { pack: pack.clone(), reason: "truncated or bad header".into() });
                bad += 1;
            }
            for e in &ix.entries {
                r.chunks += 1;
                locs.insert(e.id, (ix.pack, *e));
                let value = body.get(e.offset as usize..e.offset as usize + e.len as usize).map(|v| self.held_value(&ix.pack, e, v));
                let ok = match value {
                    Some(Ok(HeldValue::Whole(_))) => true,
                    Some(Ok(HeldValue::Delta { .. })) => {
                        deltas.push(e.id);
                        true
                    }
                    _ => false,
                };
                if ok {
                    held.insert(e.id);
                } else {
                    damaged.insert(e.id);
                    bad += 1;
                    r.damage.push(Damage::PackChunkCorrupt { pack: pack.clone(), chunk: e.id.to_hex() });
                }
            }
            if bad == 0 && content_id(&body) != ix.pack {
                r.damage.push(Damage::PackCorrupt { pack, reason: "content does not match its name".into() });
            }
            progress(r.chunks);
        }
        let mut orphans: Vec<String> = packs.into_iter().collect();
        orphans.sort();
        for key in orphans {
            let pack = key.trim_start_matches("packs/").to_string();
            r.damage.push(Damage::PackCorrupt { pack, reason: "no index".into() });
        }

        let zero = remus_types::zero_page_hash();
        let mut referenced = HashSet::new();
        for guest in self.guests()? {
            let bridges: Vec<BridgeObject> = {
                let mut v = Vec::new();
                for l in self.client.list(&format::bridges_prefix(guest))? {
                    match self.checked(&l.key, BridgeObject::decode)? {
                        Ok(b) => v.push(b),
                        Err(e) => r.damage.push(Damage::ObjectCorrupt { key: l.key, reason: e.to_string() }),
                    }
                }
                v.sort_by_key(|b| b.bridge.first);
                v
            };
            let links: Vec<Bridge> = bridges.iter().map(|b| b.bridge).collect();
            // A chunk this guest's `epoch` names, reported missing the first
            // time it is met if no pack holds it (nor a damaged one).
            let mut named = |id: ChunkId, epoch: EpochId, damage: &mut Vec<Damage>| {
                if referenced.insert(id) && !held.contains(&id) && !damaged.contains(&id) {
                    damage.push(Damage::ChunkMissing { chunk: id.to_hex(), guest: guest.0, epoch: epoch.0 });
                }
            };
            for b in &bridges {
                for (_, e, id) in b.pages.iter().filter(|(_, _, id)| *id != zero) {
                    named(*id, *e, &mut r.damage);
                }
            }
            // Every kept epoch, from whichever segment holds it (segments
            // overlap while thinning rewrites one); `None` marks the start
            // of a segment that could not be read.
            let mut epochs: BTreeMap<EpochId, Option<S3Epoch>> = BTreeMap::new();
            for s in self.segment_keys(guest)? {
                let seg = match self.checked(&s.key, |b| format::decode_listed(&s.key, b))? {
                    Ok(seg) if seg.guest == guest && seg.is_at(&s.key) => seg,
                    Ok(_) => {
                        r.damage.push(Damage::ObjectCorrupt { key: s.key, reason: "names another guest or span".into() });
                        epochs.entry(s.first).or_insert(None);
                        continue;
                    }
                    Err(e) => {
                        r.damage.push(Damage::ObjectCorrupt { key: s.key, reason: e.to_string() });
                        epochs.entry(s.first).or_insert(None);
                        continue;
                    }
                };
                for (m, pages) in seg.epochs {
                    if links.iter().any(|b| b.spans(m.epoch)) {
                        continue;
                    }
                    match epochs.get(&m.epoch) {
                        Some(Some(have)) if have.manifest != m || have.pages != pages => {
                            r.damage.push(Damage::ManifestCorrupt {
                                guest: guest.0,
                                epoch: m.epoch.0,
                                reason: format!("{} disagrees with another segment about it", s.key),
                            });
                        }
                        Some(Some(_)) => {}
                        _ => {
                            epochs.insert(m.epoch, Some(S3Epoch { manifest: m, pages }));
                        }
                    }
                }
            }
            let mut walk = ChainWalk::new(&links);
            for (epoch, entry) in &epochs {
                let Some(S3Epoch { manifest: m, pages }) = entry else {
                    walk.damaged();
                    continue;
                };
                r.manifests += 1;
                r.pages += pages.len() as u64;
                if !m.names_pages(pages) {
                    r.damage.push(Damage::PageIndexMismatch { guest: guest.0, epoch: epoch.0 });
                }
                if walk.step(m).is_err() {
                    r.damage.push(Damage::ChainBroken { guest: guest.0, epoch: epoch.0 });
                }
                for id in pages.iter().map(|(_, id)| *id).filter(|id| *id != zero).chain([m.device_state]) {
                    named(id, *epoch, &mut r.damage);
                }
            }
            for e in self.checkpoint_epochs(guest)? {
                let key = format::checkpoint_key(guest, e);
                let c = match self.checked(&key, CheckpointObject::decode)? {
                    Ok(c) => c,
                    Err(err) => {
                        r.damage.push(Damage::ObjectCorrupt { key, reason: err.to_string() });
                        continue;
                    }
                };
                let kept = epochs.get(&e).and_then(Option::as_ref).map(|k| &k.manifest);
                if c.manifest.guest != guest || c.manifest.epoch != e || kept.is_some_and(|m| *m != c.manifest) {
                    r.damage.push(Damage::ObjectCorrupt { key, reason: "its manifest is not the kept epoch's".into() });
                    continue;
                }
                for id in c.pages.iter().map(|(_, id)| *id).filter(|id| *id != zero) {
                    named(id, e, &mut r.damage);
                }
            }
        }
        // A delta no kept epoch names may have lost a base to GC (it is
        // garbage its pack still holds); any other that cannot be read is
        // damaged.
        self.check_deltas(&locs, &deltas, &mut |id, base_gone| {
            if !base_gone || referenced.contains(&id) {
                let pack = locs[&id].0.to_hex();
                r.damage.push(Damage::PackChunkCorrupt { pack, chunk: id.to_hex() });
            }
        })?;
        progress(r.chunks);
        Ok(r)
    }
}
