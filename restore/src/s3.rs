//! Restore from the S3 tier alone (after losing the backup site): plan
//! from the epoch objects, then fetch only the packs holding the chunks
//! of that epoch's page table.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use remus_store::s3::{S3History, S3Tier};
use remus_store::{Manifest, StoreError};
use remus_types::{EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

use crate::{RestoreError, RestoreReport, Segment, Target};

/// A restore resolved against the S3 tier.
#[derive(Debug, Clone)]
pub struct S3RestorePlan {
    /// Guest.
    pub guest: GuestId,
    /// The manifest of the epoch to restore.
    pub manifest: Manifest,
    history: S3History,
}

impl S3RestorePlan {
    /// Reads the guest's epoch objects (up to the target when it is an
    /// epoch), checks each and the manifest chain, and resolves `target`.
    /// `progress(done, total)` counts epoch objects read.
    ///
    /// # Errors
    /// [`RestoreError::NoMatch`]; [`RestoreError::Store`] for S3 failures
    /// and damaged objects (named).
    pub fn new(tier: &S3Tier, guest: GuestId, target: Target, progress: &mut dyn FnMut(u64, u64)) -> Result<Self, RestoreError> {
        let no = || RestoreError::NoMatch { guest, target };
        let upto = match target {
            Target::Epoch(e) => Some(e),
            _ => None,
        };
        let history = match tier.history(guest, upto, progress) {
            Err(StoreError::NoGuest(_)) => return Err(no()),
            r => r?,
        };
        let found = match target {
            Target::Epoch(e) => history.get(e),
            Target::At(t) => history.at(t),
            Target::Latest => history.latest(),
        };
        let manifest = found.ok_or_else(no)?.manifest.clone();
        Ok(Self { guest, manifest, history })
    }

    /// Writes the memory image to `path`, fetching each needed pack once
    /// and verifying every chunk; `progress(pages_done, pages_total)`.
    ///
    /// # Errors
    /// [`RestoreError::Store`] for S3 failures, a missing or corrupt
    /// chunk (naming pack and chunk); [`RestoreError::Io`];
    /// [`RestoreError::RootMismatch`].
    pub fn execute(&self, tier: &S3Tier, path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<RestoreReport, RestoreError> {
        self.execute_segments(tier, &[Segment { first: 0, pages: self.manifest.page_count, path }], progress)
    }

    /// The epoch's device state, fetched and verified (a QEMU guest's
    /// names the layout of its page space: see `execute_segments`).
    ///
    /// # Errors
    /// [`RestoreError::Store`] for S3 failures or a missing or corrupt
    /// chunk.
    pub fn device_state(&self, tier: &S3Tier) -> Result<Vec<u8>, RestoreError> {
        let id = self.manifest.device_state;
        let mut found = None;
        tier.fetch_chunks([id], |_, data| {
            found = Some(data);
            Ok(())
        })?;
        Ok(found.ok_or(StoreError::ChunkMissing(id))?)
    }

    /// As [`execute`](Self::execute), with the page space split into files
    /// as [`crate::RestorePlan::execute_segments`] does: each segment's
    /// pages go to its own file; pages outside every segment are not
    /// written (the memory root still covers them).
    ///
    /// # Errors
    /// As [`execute`](Self::execute).
    pub fn execute_segments(
        &self,
        tier: &S3Tier,
        segments: &[Segment<'_>],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RestoreReport, RestoreError> {
        let m = &self.manifest;
        let table = self.history.page_table(m.epoch);
        let mut digest = MemoryDigest::zeroed(m.page_count);
        let zero = remus_types::zero_page_hash();
        let mut wanted: HashMap<remus_types::ChunkId, Vec<Pfn>> = HashMap::new();
        for (&pfn, &id) in &table {
            if pfn.0 >= m.page_count {
                return Err(StoreError::Corrupt(format!("page table names pfn {} beyond memory", pfn.0)).into());
            }
            digest.set(pfn, id);
            if id != zero && segments.iter().any(|s| s.holds(pfn.0)) {
                wanted.entry(id).or_default().push(pfn);
            }
        }
        let root = digest.root();
        // Check the plan before fetching anything: the recorded root must
        // match the page table's hashes; each chunk is then checked
        // against its hash as it arrives.
        if root != m.memory_root {
            return Err(RestoreError::RootMismatch { epoch: m.epoch, expected: m.memory_root, got: root });
        }
        let files = Segment::create_all(segments)?;
        let bytes = m.page_count * PAGE_SIZE as u64;
        let total = wanted.values().map(|v| v.len() as u64).sum::<u64>();
        let mut done = 0u64;
        progress(0, total);
        tier.fetch_chunks(wanted.keys().copied().collect::<Vec<_>>(), |id, data| {
            for pfn in &wanted[&id] {
                let (s, file) = files.iter().find(|(s, _)| s.holds(pfn.0)).expect("wanted pages lie in a segment");
                file.write_all_at(&data, (pfn.0 - s.first) * PAGE_SIZE as u64)
                    .map_err(|e| StoreError::Corrupt(format!("write failed: {e}")))?;
                done += 1;
            }
            progress(done, total);
            Ok(())
        })?;
        for (_, f) in &files {
            f.sync_all()?;
        }
        Ok(RestoreReport { epoch: m.epoch, pages_written: table.len() as u64, bytes, root })
    }

    /// Epochs of the guest that S3 holds, up to the plan's.
    #[must_use]
    pub fn epochs(&self) -> Vec<EpochId> {
        self.history.epochs.iter().map(|e| e.manifest.epoch).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_store::s3::{S3Client, S3Config};
    use remus_store::{EpochCommit, Store, StoreOptions, StoredChunk};
    use remus_types::content_id;

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
        let plan = S3RestorePlan::new(&tier, GuestId(1), Target::Latest, &mut |_, _| {}).unwrap();
        assert_eq!(plan.device_state(&tier).unwrap(), b"device state of epoch 3");
        // Pages 0..10 and 25..40 in two files; 10..25 in none.
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let segs = [Segment { first: 0, pages: 10, path: &a }, Segment { first: 25, pages: 15, path: &b }];
        let r = plan.execute_segments(&tier, &segs, &mut |_, _| {}).unwrap();
        assert_eq!(r.root, MemoryDigest::of_image(&mem));
        assert!(std::fs::read(&a).unwrap() == mem[..10 * PAGE_SIZE], "first segment");
        assert!(std::fs::read(&b).unwrap() == mem[25 * PAGE_SIZE..], "second segment");
    }
}
