//! `verify --s3`: re-hash every chunk of every pack, check every index,
//! segment, checkpoint and bridge, walk each guest's manifest chain, and
//! name exactly what is damaged (the pack and chunk, the epoch, the
//! object).

use std::collections::{BTreeMap, HashMap, HashSet};

use remus_types::{ChunkId, EpochId};

use super::format::{self, BridgeObject, CheckpointObject};
use super::{ChunkLocations, S3Epoch, S3Tier};
use crate::chain::{Bridge, ChainWalk};
use crate::db::{undo_xor, HeldValue};
use crate::error::StoreError;
use crate::verify::{Damage, VerifyReport};
use remus_types::content_id;

/// Deltas whose bases lie in other packs, checked per batch.
const DELTA_BATCH: usize = 4096;

/// Content of a pack's chunks kept while its deltas are checked, at most
/// (a delta over a base past it is checked as one in another pack).
const HERE_BYTES: usize = 64 << 20;

/// The content of the chunks of the pack being checked, read so far, for
/// the deltas over them in the same pack: up to [`HERE_BYTES`].
#[derive(Default)]
struct Here {
    content: HashMap<ChunkId, Vec<u8>>,
    bytes: usize,
}

impl Here {
    fn keep(&mut self, id: ChunkId, content: Vec<u8>) {
        if self.bytes < HERE_BYTES {
            self.bytes += content.len();
            self.content.insert(id, content);
        }
    }
}

/// One copy of a delta in a pack, its base to be read.
struct DeltaCopy {
    pack: ChunkId,
    id: ChunkId,
    base: ChunkId,
    xor: Vec<u8>,
}

/// Why a delta copy could not be read (in the order they are reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Unread {
    /// Its own bytes: its base read well.
    Own,
    /// A base on its chain is damaged.
    Base,
    /// A base on its chain is in no pack.
    BaseGone,
}

/// A delta copy that could not be read: its pack, its id, and why.
type Unreadable = (ChunkId, ChunkId, Unread);

/// Checks each of `copies` over their base's `content`.
fn settle(copies: Vec<DeltaCopy>, content: &[u8], bad: &mut Vec<Unreadable>) {
    for d in copies {
        if undo_xor(&d.id, content, &d.xor).is_err() {
            bad.push((d.pack, d.id, Unread::Own));
        }
    }
}

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

    /// Checks each of `copies` (deltas whose bases lie in other packs)
    /// against its id over its base's content, the bases read through
    /// their chains in one fetch, or one at a time when one cannot be
    /// read; pushes to `bad` those that cannot be read.
    fn check_deferred(&self, locs: &ChunkLocations, copies: Vec<DeltaCopy>, bad: &mut Vec<Unreadable>) -> Result<(), StoreError> {
        let away = |e: &StoreError| matches!(e, StoreError::Keys(_) | StoreError::S3(_));
        let mut over: HashMap<ChunkId, Vec<DeltaCopy>> = HashMap::new();
        for d in copies {
            over.entry(d.base).or_default().push(d);
        }
        let bases: Vec<ChunkId> = over.keys().copied().collect();
        match self.fetch_located(locs, bases, |base, content| {
            settle(over.remove(&base).unwrap_or_default(), &content, bad);
            Ok(())
        }) {
            Err(e) if away(&e) => return Err(e),
            Ok(()) => return Ok(()),
            Err(_) => {}
        }
        // A base could not be read: the rest one at a time, to tell which.
        let rest: Vec<ChunkId> = over.keys().copied().collect();
        for base in rest {
            let copies = over.remove(&base).unwrap_or_default();
            let mut got = None;
            match self.fetch_located(locs, [base], |_, content| {
                got = Some(content);
                Ok(())
            }) {
                Err(e) if away(&e) => return Err(e),
                Err(e) => {
                    let why = if matches!(e, StoreError::ChunkMissing(_)) { Unread::BaseGone } else { Unread::Base };
                    bad.extend(copies.iter().map(|d| (d.pack, d.id, why)));
                }
                Ok(()) => settle(copies, &got.unwrap_or_default(), bad),
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
        // Every index first: where each chunk is, so that a delta over a
        // base in another pack can be read through its chain. (Each is read
        // again with its pack rather than kept: indexes are a few per cent
        // of the packs' bytes, and `locs` holds as many entries already.)
        let mut locs = ChunkLocations::new();
        let mut indexes = Vec::new();
        for key in &index_keys {
            let ix = match self.checked(key, format::decode_index)? {
                Ok(ix) => ix,
                Err(e) => {
                    r.damage.push(Damage::ObjectCorrupt { key: key.clone(), reason: e.to_string() });
                    continue;
                }
            };
            if !packs.remove(&format::pack_key(&ix.pack)) {
                r.damage.push(Damage::PackMissing { pack: ix.pack.to_hex() });
                continue;
            }
            for e in &ix.entries {
                locs.insert(e.id, (ix.pack, *e));
            }
            indexes.push(key);
        }
        // Then each pack: its whole chunks checked, then every copy of a
        // delta over its base, from this pack when it holds the base (and
        // the base reads), else read through its chain with others.
        let mut deferred = Vec::new();
        let mut unreadable = Vec::new();
        // Packs whose bytes do not give their name, with no chunk found
        // damaged yet (a delta's own damage shows once it is read).
        let mut mismatched = Vec::new();
        for key in indexes {
            let ix = match self.checked(key, format::decode_index)? {
                Ok(ix) => ix,
                Err(e) => {
                    r.damage.push(Damage::ObjectCorrupt { key: key.clone(), reason: format!("read again: {e}") });
                    continue;
                }
            };
            let pack = ix.pack.to_hex();
            let body = self.client.get(&format::pack_key(&ix.pack))?;
            let mut bad = 0;
            if body.len() as u64 != ix.pack_len || format::check_pack_header(&body, ix.seal).is_err() {
                r.damage.push(Damage::PackCorrupt { pack: pack.clone(), reason: "truncated or bad header".into() });
                bad += 1;
            }
            let mut here = Here::default();
            let mut waiting = Vec::new();
            for e in &ix.entries {
                r.chunks += 1;
                let value = body.get(e.offset as usize..e.offset as usize + e.len as usize).map(|v| self.held_value(&ix.pack, e, v));
                match value {
                    Some(Ok(HeldValue::Whole(content))) => {
                        held.insert(e.id);
                        here.keep(e.id, content);
                    }
                    Some(Ok(HeldValue::Delta { base, xor })) => {
                        held.insert(e.id);
                        waiting.push(DeltaCopy { pack: ix.pack, id: e.id, base, xor });
                    }
                    _ => {
                        damaged.insert(e.id);
                        bad += 1;
                        r.damage.push(Damage::PackChunkCorrupt { pack: pack.clone(), chunk: e.id.to_hex() });
                    }
                }
            }
            // Chains within the pack, a level at a time (a delta's base
            // may come after it); what is left waits for a batch.
            loop {
                let before = waiting.len();
                let mut read = Vec::new();
                waiting.retain(|d: &DeltaCopy| {
                    let Some(base) = here.content.get(&d.base) else { return true };
                    match undo_xor(&d.id, base, &d.xor) {
                        Ok(content) => read.push((d.id, content)),
                        Err(_) => unreadable.push((d.pack, d.id, Unread::Own)),
                    }
                    false
                });
                for (id, content) in read {
                    here.keep(id, content);
                }
                if waiting.len() == before {
                    break;
                }
            }
            deferred.append(&mut waiting);
            if deferred.len() >= DELTA_BATCH {
                self.check_deferred(&locs, std::mem::take(&mut deferred), &mut unreadable)?;
            }
            if bad == 0 && content_id(&body) != ix.pack {
                mismatched.push(pack);
            }
            progress(r.chunks);
        }
        self.check_deferred(&locs, deferred, &mut unreadable)?;
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
        // damaged, each copy named with its pack: first those damaged
        // themselves, then those read through a damaged base.
        unreadable.sort_by_key(|(_, _, why)| *why);
        for (pack, id, why) in unreadable {
            if why != Unread::BaseGone || referenced.contains(&id) {
                r.damage.push(Damage::PackChunkCorrupt { pack: pack.to_hex(), chunk: id.to_hex() });
            }
        }
        for pack in mismatched {
            if !r.damage.iter().any(|d| matches!(d, Damage::PackChunkCorrupt { pack: p, .. } if *p == pack)) {
                r.damage.push(Damage::PackCorrupt { pack, reason: "content does not match its name".into() });
            }
        }
        progress(r.chunks);
        Ok(r)
    }
}
