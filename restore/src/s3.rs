//! Restore from the S3 tier alone (after losing the backup site): plan
//! from the epoch objects, then fetch only the packs holding the chunks
//! of that epoch's page table.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use remus_store::s3::{S3History, S3Tier};
use remus_store::{Manifest, StoreError};
use remus_types::{EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

use crate::{RestoreError, RestoreReport, Target};

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
            if id != zero {
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
        let file = File::create(path)?;
        let bytes = m.page_count * PAGE_SIZE as u64;
        file.set_len(bytes)?;
        let total = wanted.values().map(|v| v.len() as u64).sum::<u64>();
        let mut done = 0u64;
        progress(0, total);
        tier.fetch_chunks(wanted.keys().copied().collect::<Vec<_>>(), |id, data| {
            for pfn in &wanted[&id] {
                file.write_all_at(&data, pfn.0 * PAGE_SIZE as u64).map_err(|e| StoreError::Corrupt(format!("write failed: {e}")))?;
                done += 1;
            }
            progress(done, total);
            Ok(())
        })?;
        file.sync_all()?;
        Ok(RestoreReport { epoch: m.epoch, pages_written: table.len() as u64, bytes, root })
    }

    /// Epochs of the guest that S3 holds, up to the plan's.
    #[must_use]
    pub fn epochs(&self) -> Vec<EpochId> {
        self.history.epochs.iter().map(|e| e.manifest.epoch).collect()
    }
}
