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
//! [`S3RestorePlan`] does the same from the S3 tier alone, for when the
//! backup site and its RocksDB are gone.
//!
//! A virtual machine's epoch comes back as the files QEMU resumes from
//! ([`vm`]), laid out by `remus-vm`.

mod mount;
mod s3;
pub mod vm;

pub use mount::{MountContent, MountFile, MountStats, Mounted};
pub use s3::S3RestorePlan;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender};

use remus_store::{Manifest, Store, StoreError};
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
    Io(#[from] std::io::Error),
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

impl RestorePlan {
    /// Resolves `target` for `guest`.
    ///
    /// # Errors
    /// [`RestoreError::NoMatch`] when nothing matches; store errors.
    pub fn new(store: &Store, guest: GuestId, target: Target) -> Result<Self, RestoreError> {
        let no = || RestoreError::NoMatch { guest, target };
        let epoch = match target {
            Target::Epoch(e) => e,
            Target::At(t) => store.epoch_at(guest, t)?.ok_or_else(no)?,
            Target::Latest => store.head(guest)?.ok_or_else(no)?.epoch,
        };
        let manifest = match store.manifest(guest, epoch) {
            Err(StoreError::NoEpoch { .. }) => return Err(no()),
            r => r?,
        };
        Ok(Self { guest, manifest, sync: true })
    }

    /// Writes the memory image to `path` (created or truncated), calling
    /// `progress(pages_done)` now and then.
    ///
    /// # Errors
    /// [`RestoreError::Store`] for a missing or corrupt chunk,
    /// [`RestoreError::Io`], [`RestoreError::RootMismatch`].
    pub fn execute(&self, store: &Store, path: &Path, progress: impl FnMut(u64)) -> Result<RestoreReport, RestoreError> {
        self.execute_segments(store, &[Segment { first: 0, pages: self.manifest.page_count, path }], progress)
    }

    /// Writes the guest's page space split into files: each segment's
    /// pages go to its own file (created or truncated to its size), pages
    /// outside every segment are neither read nor written. The memory root
    /// is verified over the whole page space all the same (from the page
    /// index's hashes; each page read is checked against its hash).
    ///
    /// # Errors
    /// As [`Self::execute`].
    pub fn execute_segments(
        &self,
        store: &Store,
        segments: &[Segment<'_>],
        mut progress: impl FnMut(u64),
    ) -> Result<RestoreReport, RestoreError> {
        let m = &self.manifest;
        let files = Segment::create_all(segments)?;
        let bytes = m.page_count * PAGE_SIZE as u64;
        // Two halves of the pfn space on two threads: reading, checking
        // and decoding pages is CPU work. Their buffers go to one writer
        // thread: writers of one file serialize on its inode lock in the
        // kernel (ext4), and two of them spend more time contending than
        // writing.
        let done = AtomicU64::new(0);
        let half = m.page_count / 2;
        let (filled, to_write) = crossbeam_channel::bounded::<(usize, u64, Vec<u8>)>(4);
        let (emptied, pool) = crossbeam_channel::unbounded::<Vec<u8>>();
        let work = |range: std::ops::Range<u64>,
                    out: Sender<(usize, u64, Vec<u8>)>,
                    report: &mut dyn FnMut(u64)|
         -> Result<Vec<(Pfn, ChunkId)>, StoreError> {
            let zero = remus_types::zero_page_hash();
            let mut ids = Vec::new();
            // Consecutive pages go out in one write of up to 1 MiB: a write
            // per page costs more in the kernel than reading and checking it.
            let mut run = RunWriter { files: &files, seg: 0, start: 0, buf: Vec::with_capacity(RunWriter::MAX), out, pool: pool.clone() };
            store.for_each_page_in(self.guest, m.epoch, range, |pfn, id| {
                if pfn.0 >= m.page_count {
                    return Err(StoreError::Corrupt(format!("page index names pfn {} beyond memory", pfn.0)));
                }
                ids.push((pfn, id));
                if id != zero {
                    // Decoded straight into the write buffer.
                    run.put_with(pfn.0, |buf| store.chunk_into(&id, buf))?;
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 4096 == 0 {
                    report(n);
                }
                Ok(())
            })?;
            run.flush().map_err(|e| StoreError::Corrupt(format!("write failed: {e}")))?;
            Ok(ids)
        };
        let (low, high, wrote) = std::thread::scope(|s| {
            let files = &files;
            let writer = s.spawn(move || -> std::io::Result<()> {
                for (seg, start, mut buf) in to_write {
                    files[seg].1.write_all_at(&buf, start)?;
                    buf.clear();
                    // The pool outlives the writer only while decoders run.
                    let _ = emptied.send(buf);
                }
                Ok(())
            });
            let out = filled.clone();
            let high = s.spawn(|| work(half..u64::MAX, out, &mut |_| {}));
            let low = work(0..half, filled, &mut progress);
            let high = high.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (low, high, writer.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        // A failed write stops the writer; decoders then fail to hand it
        // buffers, so its own error is the one to report.
        wrote?;
        let mut digest = MemoryDigest::zeroed(m.page_count);
        for (pfn, id) in low?.into_iter().chain(high?) {
            digest.set(pfn, id);
        }
        let written = done.load(Ordering::Relaxed);
        if self.sync {
            for (_, f) in &files {
                f.sync_all()?;
            }
        }
        progress(written);
        let root = self.check_root(&mut digest)?;
        Ok(RestoreReport { epoch: m.epoch, pages_written: written, bytes, root })
    }

    /// The root of `digest`, when it is the one the manifest records.
    ///
    /// # Errors
    /// [`RestoreError::RootMismatch`] otherwise.
    fn check_root(&self, digest: &mut MemoryDigest) -> Result<ChunkId, RestoreError> {
        let m = &self.manifest;
        let root = digest.root();
        if root != m.memory_root {
            return Err(RestoreError::RootMismatch { epoch: m.epoch, expected: m.memory_root, got: root });
        }
        Ok(root)
    }
}

/// A range of the page space restored into a file of its own.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// First page.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// The file.
    pub path: &'a Path,
}

impl<'a> Segment<'a> {
    /// True when page `pfn` lies in this segment.
    fn holds(&self, pfn: u64) -> bool {
        (self.first..self.first + self.pages).contains(&pfn)
    }

    /// Creates (or truncates) each segment's file at its size.
    fn create_all(segments: &[Segment<'a>]) -> std::io::Result<Vec<(Segment<'a>, File)>> {
        segments
            .iter()
            .map(|s| {
                let f = File::create(s.path)?;
                f.set_len(s.pages * PAGE_SIZE as u64)?;
                Ok((*s, f))
            })
            .collect()
    }
}

/// Gathers consecutive pages of one segment into one buffer of up to
/// 1 MiB, handed to the writer thread as one positioned write.
struct RunWriter<'a, 'p> {
    files: &'a [(Segment<'p>, File)],
    /// Segment of the run, and the run's first byte in its file.
    seg: usize,
    start: u64,
    buf: Vec<u8>,
    out: Sender<(usize, u64, Vec<u8>)>,
    /// Buffers the writer is done with, for reuse.
    pool: Receiver<Vec<u8>>,
}

impl RunWriter<'_, '_> {
    const MAX: usize = 1 << 20;

    fn segment_of(&self, pfn: u64) -> Option<usize> {
        self.files.iter().position(|(s, _)| s.holds(pfn))
    }

    /// Adds page `pfn`, which `fill` appends to the buffer (nothing when
    /// the page is in no segment).
    fn put_with(&mut self, pfn: u64, fill: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let Some(seg) = self.segment_of(pfn) else { return Ok(()) };
        let at = (pfn - self.files[seg].0.first) * PAGE_SIZE as u64;
        let contiguous = seg == self.seg && self.start + self.buf.len() as u64 == at;
        if self.buf.len() >= Self::MAX || (!self.buf.is_empty() && !contiguous) {
            self.flush().map_err(|e| StoreError::Corrupt(format!("write failed: {e}")))?;
        }
        if self.buf.is_empty() {
            self.seg = seg;
            self.start = at;
        }
        let before = self.buf.len();
        fill(&mut self.buf)?;
        if self.buf.len() - before != PAGE_SIZE {
            let got = self.buf.len() - before;
            self.buf.truncate(before);
            return Err(StoreError::Corrupt(format!("page {pfn}: content of {got} bytes, not a page")));
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let next = self.pool.try_recv().unwrap_or_else(|_| Vec::with_capacity(Self::MAX));
            let full = std::mem::replace(&mut self.buf, next);
            self.out.send((self.seg, self.start, full)).map_err(|_| std::io::Error::other("the image writer stopped"))?;
        }
        Ok(())
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
    use remus_store::{EpochCommit, StoreOptions, StoredChunk};
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
            plan.execute(&store, &out, |_| {}).unwrap();
            assert!(std::fs::read(&out).unwrap() == images[e as usize - 1], "epoch {e}");
        }
        let at = RestorePlan::new(&store, GuestId(1), Target::At(3500)).unwrap();
        assert_eq!(at.manifest.epoch, EpochId(3));
        assert!(matches!(RestorePlan::new(&store, GuestId(1), Target::Epoch(EpochId(9))), Err(RestoreError::NoMatch { .. })));
        assert!(matches!(RestorePlan::new(&store, GuestId(1), Target::At(10)), Err(RestoreError::NoMatch { .. })));
        // A plan whose recorded root is wrong must not pass.
        let mut bad = RestorePlan::new(&store, GuestId(1), Target::Latest).unwrap();
        bad.manifest.memory_root = ChunkId([1; 32]);
        assert!(matches!(bad.execute(&store, &dir.path().join("x.img"), |_| {}), Err(RestoreError::RootMismatch { .. })));
    }
}
