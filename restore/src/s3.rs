//! Restore from the S3 tier alone (after losing the backup site): plan
//! from the checkpoint and segments the target needs, then fetch only the
//! packs holding the chunks of that epoch's page table.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use remus_store::s3::{ChunkLocations, Reach, S3Epoch, S3History, S3Tier};
use remus_store::{Manifest, StoreError};
use remus_types::{ChunkId, EpochId, GuestId, MemoryDigest, Pfn};

use crate::{check_root, PagesWritten, RestoreError, RestoreSource, SegmentFiles, Target};

/// The S3 tier as a [`RestoreSource`]: the part of a guest's history a
/// target needs read and checked (each object, and the manifest chain
/// across bridges from the checkpoint it starts at), then only the packs
/// holding the chunks an epoch's page table names fetched.
pub struct S3Source<'a> {
    tier: &'a S3Tier,
    guest: GuestId,
    history: S3History,
    /// The chunks of the indexes of the packs the history names, read
    /// once (the device state and the pages both need them); true once
    /// they are those of every index instead (a chunk was not in those).
    located: Mutex<Option<(Arc<ChunkLocations>, bool)>>,
}

impl<'a> S3Source<'a> {
    /// Reads what restoring `target` of `guest` needs: for an epoch, from
    /// the newest checkpoint at or before it up to it; for the newest, from
    /// the newest checkpoint on; for a time, the epoch found by bisecting
    /// the segments, then as for that epoch. `progress(done, total)`
    /// counts segments read.
    ///
    /// # Errors
    /// [`RestoreError::NoMatch`] for a guest S3 has no history of;
    /// [`RestoreError::Store`] for S3 failures and damaged objects (named).
    pub fn read(tier: &'a S3Tier, guest: GuestId, target: Target, progress: &mut dyn FnMut(u64, u64)) -> Result<Self, RestoreError> {
        let reach = match target {
            Target::Epoch(e) => Reach::epoch(e),
            Target::Latest => Reach::LATEST,
            Target::At(t) => match tier.epoch_at(guest, t)? {
                Some(e) => Reach::epoch(e),
                None => return Err(RestoreError::NoMatch { guest, target }),
            },
        };
        Self::reach(tier, guest, reach, progress).map_err(|e| match e {
            RestoreError::NoMatch { guest, .. } => RestoreError::NoMatch { guest, target },
            e => e,
        })
    }

    /// Reads the part of `guest`'s history that `reach` names.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn reach(tier: &'a S3Tier, guest: GuestId, reach: Reach, progress: &mut dyn FnMut(u64, u64)) -> Result<Self, RestoreError> {
        let history = match tier.history(guest, reach, progress) {
            Err(StoreError::NoGuest(_)) => return Err(RestoreError::NoMatch { guest, target: Target::Latest }),
            r => r?,
        };
        Ok(Self { tier, guest, history, located: Mutex::new(None) })
    }

    /// Where S3 holds each of `wanted`: from the indexes of the packs the
    /// history names (read on first use), or from every index when a
    /// chunk is not in those (repacked since; read once, kept from then
    /// on, and a chunk not there either is missing).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming a damaged index; S3 errors.
    fn locations(&self, wanted: &[ChunkId]) -> Result<Arc<ChunkLocations>, StoreError> {
        let mut located = self.located.lock().unwrap_or_else(PoisonError::into_inner);
        if located.is_none() {
            *located = self.tier.pack_locations(&self.history.packs)?.map(|l| (Arc::new(l), false));
        }
        match located.as_ref() {
            Some((l, every)) if *every || wanted.iter().all(|id| l.contains_key(id)) => Ok(Arc::clone(l)),
            _ => Self::relocated(self.tier, &mut located),
        }
    }

    /// Every index read, and kept as the locations from then on.
    fn relocated(tier: &S3Tier, located: &mut Option<(Arc<ChunkLocations>, bool)>) -> Result<Arc<ChunkLocations>, StoreError> {
        let all = Arc::new(tier.relocate()?);
        *located = Some((Arc::clone(&all), true));
        Ok(all)
    }

    /// One chunk, checked against its id (see [`fetch`](Self::fetch)).
    ///
    /// # Errors
    /// As [`S3Tier::fetch_located`].
    pub fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let mut found = None;
        self.fetch(&[*id], &mut |_, data| {
            found = Some(data);
            Ok(())
        })?;
        found.ok_or(StoreError::ChunkMissing(*id))
    }

    /// Fetches `ids` (each checked against its id) as
    /// [`S3Tier::fetch_located`] does, at their [`locations`](Self::locations);
    /// when a base of a delta is not in the packs the history names
    /// (repacked since), every index is read and the chunks not yet handed
    /// to `f` are fetched from there.
    ///
    /// # Errors
    /// As [`S3Tier::fetch_located`].
    pub fn fetch(&self, ids: &[ChunkId], f: &mut dyn FnMut(ChunkId, Vec<u8>) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let locs = self.locations(ids)?;
        let mut got = HashSet::new();
        let r = self.tier.fetch_located(&locs, ids.iter().copied(), |id, data| {
            got.insert(id);
            f(id, data)
        });
        match r {
            Err(StoreError::ChunkMissing(_)) => {
                let all = {
                    let mut located = self.located.lock().unwrap_or_else(PoisonError::into_inner);
                    match located.as_ref() {
                        Some((_, true)) => return r,
                        _ => Self::relocated(self.tier, &mut located)?,
                    }
                };
                self.tier.fetch_located(&all, ids.iter().copied().filter(|id| !got.contains(id)), f)
            }
            r => r,
        }
    }
}

impl<'a> S3Source<'a> {
    /// The guest it read.
    #[must_use]
    pub fn guest(&self) -> GuestId {
        self.guest
    }

    /// The tier.
    #[must_use]
    pub fn tier(&self) -> &'a S3Tier {
        self.tier
    }

    /// The history read.
    #[must_use]
    pub fn history(&self) -> &S3History {
        &self.history
    }

    /// Kept epoch `epoch` of `guest`, if S3 holds it.
    #[must_use]
    pub fn kept(&self, guest: GuestId, epoch: EpochId) -> Option<&S3Epoch> {
        (guest == self.guest).then(|| self.history.get(epoch)).flatten()
    }
}

impl RestoreSource for S3Source<'_> {
    fn resolve(&self, guest: GuestId, target: Target) -> Result<Manifest, RestoreError> {
        let no = || RestoreError::NoMatch { guest, target };
        if guest != self.guest {
            return Err(no());
        }
        let found = match target {
            Target::Epoch(e) => self.history.get(e),
            Target::At(t) => self.history.at(t),
            Target::Latest => self.history.latest(),
        };
        Ok(found.ok_or_else(no)?.manifest.clone())
    }

    fn device_state(&self, m: &Manifest) -> Result<Vec<u8>, RestoreError> {
        Ok(self.chunk(&m.device_state)?)
    }

    fn write_pages(
        &self,
        _guest: GuestId,
        m: &Manifest,
        files: &SegmentFiles<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PagesWritten, RestoreError> {
        let table: Vec<(Pfn, ChunkId)> = self.history.page_table(m.epoch).into_iter().collect();
        let mut digest = MemoryDigest::zeroed(m.page_count);
        let zero = remus_types::zero_page_hash();
        let mut wanted: HashMap<ChunkId, Vec<(usize, u64)>> = HashMap::new();
        for &(pfn, id) in &table {
            if pfn.0 >= m.page_count {
                return Err(StoreError::malformed("page table", format!("names pfn {} beyond memory", pfn.0)).into());
            }
            digest.set(pfn, id);
            if id != zero {
                if let Some(at) = files.locate(pfn.0) {
                    wanted.entry(id).or_default().push(at);
                }
            }
        }
        // Check the table before fetching anything: the recorded root must
        // match its hashes; each chunk is then checked against its hash as
        // it arrives.
        check_root(m, &mut digest)?;
        let total = wanted.values().map(|v| v.len() as u64).sum::<u64>();
        let mut done = 0u64;
        progress(0, total);
        let ids: Vec<ChunkId> = wanted.keys().copied().collect();
        self.fetch(&ids, &mut |id, data| {
            for &(seg, offset) in &wanted[&id] {
                files.write(seg, offset, &data).map_err(|cause| StoreError::Io { what: "writing the restored image", cause })?;
                done += 1;
            }
            progress(done, total);
            Ok(())
        })?;
        Ok(PagesWritten { written: table.len() as u64, table })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RestorePlan, Segment};
    use remus_store::s3::{S3Client, S3Config};
    use remus_store::{EpochCommit, Store, StoreOptions, StoredChunk};
    use remus_types::content_id;
    use remus_types::{EpochId, PAGE_SIZE};

    /// Against the real S3 server the test script starts.
    fn tier(name: &str) -> S3Tier {
        let endpoint = std::env::var("REMUS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "REMUS_TEST_S3_ENDPOINT is not set: run `bash scripts/test.sh`, which starts moto_server, or start one and export its URL"
            )
        });
        let mut cfg = S3Config::new(&format!("{name}-{}", std::process::id()), "site");
        cfg.endpoint = Some(endpoint);
        cfg.region = Some("us-east-1".into());
        cfg.access_key_id = Some("test".into());
        cfg.secret_access_key = Some("test".into());
        S3Client::new(&cfg).unwrap().create_bucket(false).unwrap();
        S3Tier::connect(&cfg).unwrap()
    }

    #[test]
    fn segments_restore_from_s3_into_their_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let pages = 40u64;
        let mut mem = vec![0u8; pages as usize * PAGE_SIZE];
        for e in 1..=3u64 {
            let mut c = EpochCommit { guest: GuestId(1), epoch: EpochId(e), page_count: pages, time_unix_ns: e, ..Default::default() };
            for pfn in [e, 9 + e, 20 + e * 3, 39] {
                let p = &mut mem[pfn as usize * PAGE_SIZE..][..PAGE_SIZE];
                p.fill((e * 40 + pfn) as u8);
                let id = content_id(p);
                c.pages.push((Pfn(pfn), id));
                c.chunks.push((id, StoredChunk::Zstd(zstd::bulk::compress(p, 1).unwrap())));
            }
            c.memory_root = MemoryDigest::of_image(&mem);
            c.device_state = b"device state of epoch 3".to_vec();
            store.commit(c).unwrap();
        }
        let tier = tier("segments");
        assert_eq!(tier.upload_pending(&store, &|| false).unwrap().epochs, 3);
        drop(store);
        let source = S3Source::read(&tier, GuestId(1), Target::Latest, &mut |_, _| {}).unwrap();
        let plan = RestorePlan::new(&source, GuestId(1), Target::Latest).unwrap();
        assert_eq!(source.device_state(&plan.manifest).unwrap(), b"device state of epoch 3");
        // Pages 0..10 and 25..40 in two files; 10..25 in none.
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let segs = [Segment { first: 0, pages: 10, path: &a, offset: 0 }, Segment { first: 25, pages: 15, path: &b, offset: 0 }];
        let r = plan.execute_segments(&source, &segs, |_, _| {}).unwrap();
        assert_eq!(r.root, MemoryDigest::of_image(&mem));
        assert!(std::fs::read(&a).unwrap() == mem[..10 * PAGE_SIZE], "first segment");
        assert!(std::fs::read(&b).unwrap() == mem[25 * PAGE_SIZE..], "second segment");
    }

    #[test]
    fn a_delta_whose_base_is_in_no_pack_the_history_names_is_read_from_every_index() {
        use remus_store::s3::format::{self, CheckpointObject};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let tier = tier("delta-base");
        let g = GuestId(1);
        let mut mem = vec![0u8; 2 * PAGE_SIZE];
        // One pass per epoch (a segment each); page 0 goes as a delta over
        // its first version in epoch 2, then only page 1 changes, until a
        // checkpoint at epoch 6 (4 segments, 8 pages: four times memory).
        let passes: [&[u64]; 4] = [&[1], &[2], &[3], &[4, 5, 6]];
        let mut base = None;
        let mut versions = Vec::new();
        for epochs in passes {
            for &e in epochs {
                let mut c = EpochCommit {
                    guest: g,
                    epoch: EpochId(e),
                    page_count: 2,
                    time_unix_ns: e,
                    device_state: format!("device state {e}").into_bytes(),
                    ..Default::default()
                };
                for pfn in [0u64, 1].into_iter().filter(|p| *p == 1 || e <= 2) {
                    let p = &mut mem[pfn as usize * PAGE_SIZE..][..PAGE_SIZE];
                    let old = p.to_vec();
                    p[..64].fill((e * 10 + pfn) as u8);
                    p[64..].fill(pfn as u8 + 1);
                    let id = content_id(p);
                    c.pages.push((Pfn(pfn), id));
                    let chunk = match (pfn, base) {
                        (0, Some(b)) => {
                            let xor: Vec<u8> = old.iter().zip(p.iter()).map(|(a, b)| a ^ b).collect();
                            StoredChunk::delta(&b, &zstd::bulk::compress(&xor, 1).unwrap())
                        }
                        _ => StoredChunk::Zstd(zstd::bulk::compress(p, 1).unwrap()),
                    };
                    if pfn == 0 {
                        base = Some(id);
                        versions.push((id, p.to_vec()));
                    }
                    c.chunks.push((id, chunk));
                }
                c.memory_root = MemoryDigest::of_image(&mem);
                store.commit(c).unwrap();
            }
            tier.upload_pending(&store, &|| false).unwrap();
        }
        assert_eq!(tier.checkpoint_epochs(g).unwrap(), [EpochId(6)]);
        // The checkpoint names its delta's base's pack; drop that from its
        // list, as a history written without it would be.
        let key = format::checkpoint_key(g, EpochId(6));
        let mut c = CheckpointObject::decode(&tier.client().get(&key).unwrap()).unwrap();
        let (base_pack, _) = tier.chunk_locations().unwrap()[&versions[0].0];
        assert!(c.packs.contains(&base_pack), "the checkpoint names its delta's base's pack");
        c.packs.retain(|p| *p != base_pack);
        tier.client().delete(&key, None).unwrap();
        tier.client().put_new(&key, c.encode()).unwrap();
        drop(store);
        let source = S3Source::read(&tier, g, Target::Latest, &mut |_, _| {}).unwrap();
        assert!(!source.history().packs.contains(&base_pack));
        // The delta first: its own pack is named, its base's is not.
        assert_eq!(c.pages[0].1, versions[1].0);
        assert!(source.chunk(&versions[1].0).unwrap() == versions[1].1, "read through its base");
        let plan = RestorePlan::new(&source, g, Target::Latest).unwrap();
        let out = dir.path().join("latest.img");
        let r = plan.execute(&source, &out, |_, _| {}).unwrap();
        assert_eq!(r.root, MemoryDigest::of_image(&mem));
        assert!(std::fs::read(&out).unwrap() == mem, "byte-exact through the delta");
    }

    #[test]
    fn the_same_plan_restores_every_epoch_alike_from_the_store_and_from_s3() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let images = crate::tests::history(&store);
        let tier = tier("same-plan");
        assert_eq!(tier.upload_pending(&store, &|| false).unwrap().epochs, 5);
        for e in 1..=5u64 {
            let target = Target::Epoch(EpochId(e));
            let s3 = S3Source::read(&tier, GuestId(1), target, &mut |_, _| {}).unwrap();
            let sources: [&dyn RestoreSource; 2] = [&store, &s3];
            let mut restored = Vec::new();
            for (i, source) in sources.into_iter().enumerate() {
                let plan = RestorePlan::new(source, GuestId(1), target).unwrap();
                let out = dir.path().join(format!("e{e}-{i}.img"));
                let report = plan.execute(source, &out, |_, _| {}).unwrap();
                restored.push((plan.manifest, report.root, std::fs::read(&out).unwrap()));
            }
            assert_eq!(restored[0].0, restored[1].0, "epoch {e}: one manifest from both tiers");
            assert_eq!(restored[0].1, restored[1].1);
            assert!(restored[0].2 == images[e as usize - 1] && restored[1].2 == images[e as usize - 1], "epoch {e} byte-exact from both");
        }
        let at = S3Source::read(&tier, GuestId(1), Target::At(3500), &mut |_, _| {}).unwrap();
        assert_eq!(RestorePlan::new(&at, GuestId(1), Target::At(3500)).unwrap().manifest.epoch, EpochId(3));
        assert!(matches!(RestorePlan::new(&at, GuestId(2), Target::Latest), Err(RestoreError::NoMatch { .. })));
    }
}
