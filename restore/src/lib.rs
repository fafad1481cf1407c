//! Restore: materialize guest `G` at epoch `N` (or at time `T`) as a
//! memory image, byte-exact, from the store.
//!
//! Plan, then execute: [`RestorePlan::new`] resolves the target to a
//! committed manifest; [`RestorePlan::execute`] writes every page the
//! index names at that epoch into a sparse image file (pages never written
//! stay holes, i.e. zero), verifying each chunk against its hash, and
//! checks the resulting memory root against the one the primary recorded
//! in the manifest.
//!
//! [`RestorePlan::mount`] serves the epoch lazily instead: read-only files
//! over FUSE, each page read from the store when first asked for.
//!
//! The same plan runs over either tier ([`RestoreSource`]): the local
//! [`Store`](remus_store::Store), or [`S3Source`], the S3 tier alone, for
//! when the backup site and its RocksDB are gone.
//!
//! A virtual machine's epoch comes back as the files QEMU resumes from
//! ([`vm`]), laid out by `remus-vm`.

pub mod elf;
pub mod inspect;
mod local;
mod mount;
mod s3;
pub mod vm;

pub use mount::{MountContent, MountFile, MountStats, Mounted};
pub use s3::S3Source;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use remus_store::{Manifest, StoreError};
use remus_types::{ChunkId, EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

/// Which epoch to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This epoch.
    Epoch(EpochId),
    /// The newest epoch paused at or before this time (ns since the Unix epoch).
    At(u64),
    /// The last committed epoch (failover).
    Latest,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The store failed or is damaged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No epoch matches the target.
    #[error("{guest}: no committed epoch matches {target:?}")]
    NoMatch {
        /// Guest.
        guest: GuestId,
        /// What was asked for.
        target: Target,
    },
    /// The image could not be written.
    #[error("writing the image: {0}")]
    Io(std::io::Error),
    /// The guest's VM state header is damaged, or its files cannot be laid out.
    #[error(transparent)]
    Vm(#[from] remus_vm::VmError),
    /// The restored memory does not hash to the recorded root.
    #[error("epoch {epoch}: restored memory root {got} differs from the recorded {expected}")]
    RootMismatch {
        /// Epoch.
        epoch: EpochId,
        /// Root in the manifest.
        expected: ChunkId,
        /// Root of the restored pages.
        got: ChunkId,
    },
}

/// A resolved restore.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// Guest.
    pub guest: GuestId,
    /// The manifest of the epoch to restore.
    pub manifest: Manifest,
    /// Sync the written files before returning (default true: the image
    /// is durable when the restore reports success).
    pub sync: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Copy)]
pub struct RestoreReport {
    /// Epoch restored.
    pub epoch: EpochId,
    /// Pages written (the rest are zero).
    pub pages_written: u64,
    /// Image size in bytes.
    pub bytes: u64,
    /// The verified memory root.
    pub root: ChunkId,
}

// The message names the cause: a field, not a `source()`, so a chained
// print says it once.
impl From<std::io::Error> for RestoreError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// A tier a restore reads a guest's history from: the local store
/// ([`Store`](remus_store::Store)) or the S3 tier ([`S3Source`]). The plan around it (resolve,
/// write the segments, verify the memory root, sync) is one.
pub trait RestoreSource {
    /// The manifest `target` names for `guest`.
    ///
    /// # Errors
    /// [`RestoreError::NoMatch`]; the tier's errors.
    fn resolve(&self, guest: GuestId, target: Target) -> Result<Manifest, RestoreError>;

    /// The epoch's device state, verified against its id.
    ///
    /// # Errors
    /// The tier's errors; a missing or corrupt chunk.
    fn device_state(&self, manifest: &Manifest) -> Result<Vec<u8>, RestoreError>;

    /// Writes every page of the epoch that lies in a segment of `files`,
    /// each verified against its id on the way, and returns the epoch's
    /// whole page table (for the memory root); `progress(done, total)`.
    ///
    /// # Errors
    /// The tier's errors, a missing or corrupt chunk, [`RestoreError::Io`].
    fn write_pages(
        &self,
        guest: GuestId,
        manifest: &Manifest,
        files: &SegmentFiles<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PagesWritten, RestoreError>;
}

/// What [`RestoreSource::write_pages`] did.
#[derive(Debug, Clone, Default)]
pub struct PagesWritten {
    /// Pages of the epoch's page table (the rest of the space is zero).
    pub written: u64,
    /// The page table: each page's content id.
    pub table: Vec<(Pfn, ChunkId)>,
}

impl RestorePlan {
    /// Resolves `target` for `guest` in `source`.
    ///
    /// # Errors
    /// [`RestoreError::NoMatch`] when nothing matches; the tier's errors.
    pub fn new<S: RestoreSource + ?Sized>(source: &S, guest: GuestId, target: Target) -> Result<Self, RestoreError> {
        Ok(Self { guest, manifest: source.resolve(guest, target)?, sync: true })
    }

    /// Writes the memory image to `path` (created or truncated), calling
    /// `progress(done, total)` now and then.
    ///
    /// # Errors
    /// [`RestoreError::Store`] for a missing or corrupt chunk,
    /// [`RestoreError::Io`], [`RestoreError::RootMismatch`].
    pub fn execute<S: RestoreSource + ?Sized>(
        &self,
        source: &S,
        path: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<RestoreReport, RestoreError> {
        self.execute_segments(source, &[Segment { first: 0, pages: self.manifest.page_count, path, offset: 0 }], progress)
    }

    /// Writes the guest's page space split into files: each segment's
    /// pages go to its own file (created or truncated to its size), pages
    /// outside every segment are neither read nor written. The memory root
    /// is verified over the whole page space all the same (from the page
    /// table's hashes; each page read is checked against its hash).
    ///
    /// # Errors
    /// As [`Self::execute`].
    pub fn execute_segments<S: RestoreSource + ?Sized>(
        &self,
        source: &S,
        segments: &[Segment<'_>],
        progress: impl FnMut(u64, u64),
    ) -> Result<RestoreReport, RestoreError> {
        Ok(self.write_segments(source, segments, progress)?.0)
    }

    /// [`Self::execute_segments`], also giving the epoch's page table (the
    /// pages that are not zero).
    pub(crate) fn write_segments<S: RestoreSource + ?Sized>(
        &self,
        source: &S,
        segments: &[Segment<'_>],
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(RestoreReport, Vec<(Pfn, ChunkId)>), RestoreError> {
        let m = &self.manifest;
        let files = SegmentFiles::create(segments)?;
        let PagesWritten { written, table } = source.write_pages(self.guest, m, &files, &mut progress)?;
        let mut digest = MemoryDigest::zeroed(m.page_count);
        for &(pfn, id) in &table {
            if pfn.0 >= m.page_count {
                return Err(StoreError::malformed("page table", format!("names pfn {} beyond memory", pfn.0)).into());
            }
            digest.set(pfn, id);
        }
        if self.sync {
            files.sync()?;
        }
        let root = self.check_root(&mut digest)?;
        Ok((RestoreReport { epoch: m.epoch, pages_written: written, bytes: m.page_count * PAGE_SIZE as u64, root }, table))
    }

    /// The root of `digest`, when it is the one the manifest records.
    ///
    /// # Errors
    /// [`RestoreError::RootMismatch`] otherwise.
    fn check_root(&self, digest: &mut MemoryDigest) -> Result<ChunkId, RestoreError> {
        check_root(&self.manifest, digest)
    }
}

/// The root of `digest`, when it is the one `m` records.
///
/// # Errors
/// [`RestoreError::RootMismatch`] otherwise.
pub(crate) fn check_root(m: &Manifest, digest: &mut MemoryDigest) -> Result<ChunkId, RestoreError> {
    let root = digest.root();
    if root != m.memory_root {
        return Err(RestoreError::RootMismatch { epoch: m.epoch, expected: m.memory_root, got: root });
    }
    Ok(root)
}

/// A range of the page space restored into a file: its pages from byte
/// `offset` of the file on (segments may share a file).
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// First page.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// The file.
    pub path: &'a Path,
    /// Where in the file its first page goes.
    pub offset: u64,
}

impl Segment<'_> {
    /// True when page `pfn` lies in this segment.
    fn holds(&self, pfn: u64) -> bool {
        (self.first..self.first + self.pages).contains(&pfn)
    }

    fn end(&self) -> u64 {
        self.offset + self.pages * PAGE_SIZE as u64
    }
}

/// The open files of a restore's segments.
pub struct SegmentFiles<'a> {
    segments: Vec<(Segment<'a>, usize)>,
    files: Vec<File>,
}

impl<'a> SegmentFiles<'a> {
    /// Creates (or truncates) each segment's file, once per path, at the
    /// size its segments need (unwritten pages are holes).
    fn create(segments: &[Segment<'a>]) -> std::io::Result<Self> {
        let mut paths: Vec<&Path> = Vec::new();
        let mut placed = Vec::with_capacity(segments.len());
        for s in segments {
            let i = paths.iter().position(|p| *p == s.path).unwrap_or_else(|| {
                paths.push(s.path);
                paths.len() - 1
            });
            placed.push((*s, i));
        }
        let files = paths
            .iter()
            .map(|path| {
                let f = File::create(path)?;
                let len = placed.iter().filter(|(s, _)| s.path == *path).map(|(s, _)| s.end()).max().unwrap_or(0);
                f.set_len(len)?;
                Ok(f)
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self { segments: placed, files })
    }

    /// The segment holding page `pfn` and the page's byte offset in its
    /// file; `None` when no segment holds it.
    #[must_use]
    pub fn locate(&self, pfn: u64) -> Option<(usize, u64)> {
        let i = self.segments.iter().position(|(s, _)| s.holds(pfn))?;
        let s = &self.segments[i].0;
        Some((i, s.offset + (pfn - s.first) * PAGE_SIZE as u64))
    }

    /// Writes `bytes` at `offset` of segment `seg`'s file.
    ///
    /// # Errors
    /// The write's error.
    pub fn write(&self, seg: usize, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.files[self.segments[seg].1].write_all_at(bytes, offset)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.files.iter().try_for_each(File::sync_all)
    }
}

/// Memory root of an image file, hashed from its bytes: an independent
/// check that a restored file is byte-exact.
///
/// # Errors
/// [`std::io::Error`] when the file cannot be read.
pub fn image_root(path: &Path) -> std::io::Result<ChunkId> {
    let data = std::fs::read(path)?;
    Ok(MemoryDigest::of_image(&data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_store::{EpochCommit, Store, StoreOptions, StoredChunk};
    use remus_types::content_id;

    /// Five epochs of a 100-page guest, each writing three pages; returns
    /// the memory image after each.
    pub(crate) fn history(store: &Store) -> Vec<Vec<u8>> {
        let pages = 100u64;
        let mut mem = vec![0u8; pages as usize * PAGE_SIZE];
        let mut images = Vec::new();
        for e in 1..=5u64 {
            let mut c =
                EpochCommit { guest: GuestId(1), epoch: EpochId(e), page_count: pages, time_unix_ns: e * 1000, ..Default::default() };
            for pfn in [e, e * 7 % pages, 99] {
                let p = &mut mem[pfn as usize * PAGE_SIZE..][..PAGE_SIZE];
                p.fill(e as u8 + pfn as u8);
                let id = content_id(p);
                c.pages.push((Pfn(pfn), id));
                c.chunks.push((id, StoredChunk::Zstd(zstd::bulk::compress(p, 1).unwrap())));
            }
            c.memory_root = MemoryDigest::of_image(&mem);
            store.commit(c).unwrap();
            images.push(mem.clone());
        }
        images
    }

    #[test]
    fn restores_each_epoch_byte_exact_and_refuses_a_wrong_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let images = history(&store);
        for e in 1..=5u64 {
            let out = dir.path().join(format!("e{e}.img"));
            let plan = RestorePlan::new(&store, GuestId(1), Target::Epoch(EpochId(e))).unwrap();
            plan.execute(&store, &out, |_, _| {}).unwrap();
            assert!(std::fs::read(&out).unwrap() == images[e as usize - 1], "epoch {e}");
        }
        let at = RestorePlan::new(&store, GuestId(1), Target::At(3500)).unwrap();
        assert_eq!(at.manifest.epoch, EpochId(3));
        assert!(matches!(RestorePlan::new(&store, GuestId(1), Target::Epoch(EpochId(9))), Err(RestoreError::NoMatch { .. })));
        assert!(matches!(RestorePlan::new(&store, GuestId(1), Target::At(10)), Err(RestoreError::NoMatch { .. })));
        // A plan whose recorded root is wrong must not pass.
        let mut bad = RestorePlan::new(&store, GuestId(1), Target::Latest).unwrap();
        bad.manifest.memory_root = ChunkId([1; 32]);
        assert!(matches!(bad.execute(&store, &dir.path().join("x.img"), |_, _| {}), Err(RestoreError::RootMismatch { .. })));
    }
}
