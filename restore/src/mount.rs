//! Lazy restore: an epoch's files served read-only over FUSE.
//!
//! Nothing is written up front. The mount reads the epoch's page index
//! once, checks it against the manifest's memory root, and from then on
//! answers each read with the pages it covers, each read from the store
//! and checked against its hash on the way. A guest can be started on the
//! mounted files at once (its RAM mapped privately, its disk behind an
//! overlay): it faults in what it touches, and the kernel's page cache
//! keeps what was read.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};
use remus_store::{Store, StoreError};
use remus_types::{zero_page_hash, MemoryDigest, Pfn, PAGE_SIZE};

use crate::{RestoreError, RestorePlan};

/// One file of a mounted epoch.
#[derive(Debug, Clone)]
pub struct MountFile {
    /// Its name in the mount's directory.
    pub name: String,
    /// What it holds.
    pub content: MountContent,
}

/// What a mounted file holds.
#[derive(Debug, Clone)]
pub enum MountContent {
    /// The guest's pages from `first` on, `len` bytes of them.
    Pages {
        /// First page.
        first: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Bytes given at mount time (e.g. a description of the machine).
    Bytes(Vec<u8>),
}

/// What a mount has served so far.
#[derive(Debug, Default)]
pub struct MountStats {
    /// Pages read from the store (zero pages are not read).
    pub pages_read: AtomicU64,
    /// Reads refused because a chunk was missing or damaged.
    pub errors: AtomicU64,
}

/// A mounted epoch; unmounted when dropped.
pub struct Mounted {
    session: Option<BackgroundSession>,
    at: PathBuf,
    stats: Arc<MountStats>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted").field("at", &self.at).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Mounted {
    /// The mount point.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.at
    }

    /// What it has served.
    #[must_use]
    pub fn stats(&self) -> &MountStats {
        &self.stats
    }

    /// True until the file system is unmounted (by [`Self::unmount`], or
    /// from outside: `fusermount -u`, `umount`).
    #[must_use]
    pub fn is_mounted(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.guard.is_finished())
    }

    /// Unmounts and waits for the session to end. A mount still in use
    /// (a file open in it) is detached instead: it leaves the directory
    /// tree at once, and its open files read as errors once this process
    /// is gone.
    ///
    /// # Errors
    /// [`RestoreError::Io`] when the kernel refuses.
    pub fn unmount(mut self) -> Result<(), RestoreError> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> Result<(), RestoreError> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        match s.umount_and_join() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!("{} is in use: detaching it", self.at.display());
                remus_sys::detach_mount(&self.at).map_err(|e| mount_error(&self.at, "detaching", e))
            }
            r => r.map_err(|e| mount_error(&self.at, "unmounting", e)),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_now() {
            tracing::warn!("{e}");
        }
    }
}

fn mount_error(at: &Path, what: &str, e: std::io::Error) -> RestoreError {
    RestoreError::Io(std::io::Error::new(e.kind(), format!("{what} {}: {e}", at.display())))
}

impl RestorePlan {
    /// Mounts this epoch at `at` (an existing, empty directory) as the
    /// read-only `files`, and returns at once: pages are read from the
    /// store when a reader asks for them. The page index is checked
    /// against the memory root first, and each page read against its hash.
    ///
    /// # Errors
    /// [`RestoreError::RootMismatch`] when the index does not match the
    /// manifest; store errors; [`RestoreError::Io`] when FUSE is missing or
    /// the mount is refused.
    pub fn mount(&self, store: Arc<Store>, files: Vec<MountFile>, at: &Path) -> Result<Mounted, RestoreError> {
        for f in &files {
            if let MountContent::Pages { first, len } = f.content {
                let end = first.saturating_add(len.div_ceil(PAGE_SIZE as u64));
                if end > self.manifest.page_count {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{} spans pages {first}..{end}, beyond the guest's {} pages", f.name, self.manifest.page_count),
                    );
                    return Err(mount_error(at, "mounting", e));
                }
            }
        }
        let pages = self.page_index(&store)?;
        let stats = Arc::new(MountStats::default());
        let (uid, gid) = remus_sys::ids();
        let fs = EpochFs { store, pages, files, stats: stats.clone(), uid, gid };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName(format!("remus-{}-{}", self.guest, self.manifest.epoch)),
            MountOption::Subtype("remus".into()),
        ];
        // Two workers: one page fault need not wait behind another's reads.
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, at, &config)
            .map_err(|e| mount_error(at, "mounting (FUSE needs /dev/fuse, and root or fusermount)", e))?;
        Ok(Mounted { session: Some(session), at: at.to_path_buf(), stats })
    }

    /// The chunk id of every page at this epoch, checked against the
    /// manifest's memory root.
    ///
    /// # Errors
    /// [`RestoreError::RootMismatch`]; store errors.
    pub fn page_index(&self, store: &Store) -> Result<MemoryDigest, RestoreError> {
        let m = &self.manifest;
        let mut digest = MemoryDigest::zeroed(m.page_count);
        store.for_each_page_at(self.guest, m.epoch, |pfn, id| {
            if pfn.0 >= m.page_count {
                return Err(StoreError::malformed("page index", format!("names pfn {} beyond memory", pfn.0)));
            }
            digest.set(pfn, id);
            Ok(())
        })?;
        self.check_root(&mut digest)?;
        Ok(digest)
    }
}

/// The file system: the root directory (inode 1) and file `i` as inode
/// `i + 2`. Content never changes, so the kernel may cache it for good.
struct EpochFs {
    store: Arc<Store>,
    pages: MemoryDigest,
    files: Vec<MountFile>,
    stats: Arc<MountStats>,
    uid: u32,
    gid: u32,
}

/// Attributes and names never change while mounted.
const TTL: Duration = Duration::from_secs(24 * 3600);

impl EpochFs {
    fn file(&self, ino: INodeNo) -> Option<&MountFile> {
        usize::try_from(ino.0).ok().and_then(|i| i.checked_sub(2)).and_then(|i| self.files.get(i))
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0, 0o555, 2)
        } else {
            let size = match &self.file(ino)?.content {
                MountContent::Pages { len, .. } => *len,
                MountContent::Bytes(b) => b.len() as u64,
            };
            (FileType::RegularFile, size, 0o444, 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: PAGE_SIZE as u32,
            flags: 0,
        })
    }

    /// Bytes `offset..offset + size` (cut at `len`) of the pages from
    /// `first` on, each read from the store and checked against its hash.
    fn read_pages(&self, first: u64, len: u64, offset: u64, size: u32) -> Result<Vec<u8>, StoreError> {
        if offset >= len {
            return Ok(Vec::new());
        }
        let end = (offset + u64::from(size)).min(len);
        let page = PAGE_SIZE as u64;
        let (p0, p1) = (offset / page, end.div_ceil(page));
        let mut buf = Vec::with_capacity(((p1 - p0) * page) as usize);
        let zero = zero_page_hash();
        for p in p0..p1 {
            // In range: the mount checked each file's pages.
            let pfn = Pfn(first + p);
            let id = self.pages.get(pfn);
            if id == zero {
                buf.resize(buf.len() + PAGE_SIZE, 0);
                continue;
            }
            self.store.chunk_into(&id, &mut buf)?;
            if buf.len() as u64 != (p - p0 + 1) * page {
                return Err(StoreError::malformed(format!("page {}", pfn.0), format!("chunk {id} is not one page")));
            }
            self.stats.pages_read.fetch_add(1, Ordering::Relaxed);
        }
        let skip = (offset - p0 * page) as usize;
        buf.drain(..skip);
        buf.truncate((end - offset) as usize);
        Ok(buf)
    }
}

impl Filesystem for EpochFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large reads: a guest's first touches of its RAM come in bursts.
        let _ = config.set_max_readahead(1 << 20).or_else(|max| config.set_max_readahead(max));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == INodeNo::ROOT).then(|| self.files.iter().position(|f| OsStr::new(&f.name) == name)).flatten();
        match found.and_then(|i| self.attr(INodeNo(i as u64 + 2))) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            reply.error(Errno::ENOENT);
        } else if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
        } else {
            // What was read stays valid across opens: the epoch is immutable.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match &file.content {
            MountContent::Bytes(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                let end = start.saturating_add(size as usize).min(b.len());
                reply.data(&b[start..end]);
            }
            MountContent::Pages { first, len } => match self.read_pages(*first, *len, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("{}: reading {size} bytes at {offset}: {e}", file.name);
                    reply.error(Errno::EIO);
                }
            },
        }
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // Regular files are always ready: the kernel stops asking.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [(INodeNo::ROOT, FileType::Directory, "."), (INodeNo::ROOT, FileType::Directory, "..")];
        let files = self.files.iter().enumerate().map(|(i, f)| (INodeNo(i as u64 + 2), FileType::RegularFile, f.name.as_str()));
        for (i, (ino, kind, name)) in dots.into_iter().chain(files).enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::FileExt;

    use remus_store::{EpochCommit, StoreOptions, StoredChunk};
    use remus_types::content_id;
    use remus_types::{ChunkId, EpochId, GuestId};

    use super::*;
    use crate::tests::history;
    use crate::Target;

    fn plan(store: &Store, e: u64) -> RestorePlan {
        RestorePlan::new(store, GuestId(1), Target::Epoch(EpochId(e))).unwrap()
    }

    /// Needs FUSE (/dev/fuse and root, as the README's test command runs).
    #[test]
    fn serves_each_epoch_byte_exact_and_names_a_damaged_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap());
        let images = history(&store);
        let page = PAGE_SIZE as u64;
        for e in [1u64, 3, 5] {
            let at = dir.path().join(format!("e{e}"));
            std::fs::create_dir(&at).unwrap();
            let files = vec![
                MountFile { name: "memory".into(), content: MountContent::Pages { first: 0, len: 100 * page } },
                // A file that starts mid-space and ends mid-page.
                MountFile { name: "tail".into(), content: MountContent::Pages { first: 97, len: 2 * page + 100 } },
                MountFile { name: "machine.json".into(), content: MountContent::Bytes(b"{\"epoch\": 1}".to_vec()) },
            ];
            let m = plan(&store, e).mount(store.clone(), files, &at).unwrap();
            let image = &images[e as usize - 1];
            assert!(std::fs::read(at.join("memory")).unwrap() == *image, "epoch {e}: memory");
            assert_eq!(std::fs::read(at.join("tail")).unwrap(), &image[97 * PAGE_SIZE..][..2 * PAGE_SIZE + 100], "epoch {e}: tail");
            assert_eq!(std::fs::read(at.join("machine.json")).unwrap(), b"{\"epoch\": 1}");
            // Reads at any offset, past the end too.
            let f = std::fs::File::open(at.join("tail")).unwrap();
            let mut b = [0u8; 10];
            assert_eq!(f.read_at(&mut b, page + 5).unwrap(), 10);
            assert_eq!(&b, &image[98 * PAGE_SIZE + 5..][..10]);
            assert_eq!(f.read_at(&mut b, 3 * page).unwrap(), 0);
            let mut names: Vec<String> = std::fs::read_dir(&at).unwrap().map(|d| d.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            assert_eq!(names, ["machine.json", "memory", "tail"]);
            let w = std::fs::OpenOptions::new().write(true).open(at.join("memory")).unwrap_err();
            assert_eq!(w.raw_os_error(), Some(libc::EROFS), "{w}");
            assert!(m.stats().pages_read.load(Ordering::Relaxed) > 0);
            assert!(m.is_mounted());
            if e == 5 {
                // Still open: detached, gone from the tree all the same.
                m.unmount().unwrap();
                assert!(!at.join("memory").exists(), "detached");
                assert!(f.read_at(&mut b, 0).is_err() || b == image[..10], "an open file reads as an error or as before");
            } else {
                drop(f);
                m.unmount().unwrap();
                assert!(!at.join("memory").exists(), "unmounted");
            }
        }

        // Epoch 6 names a chunk whose stored bytes are damaged after the
        // commit (the store checks them at commit).
        let mut mem = images[4].clone();
        let good = vec![0xab; PAGE_SIZE];
        let id = content_id(&good);
        mem[10 * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&good);
        let c = EpochCommit {
            guest: GuestId(1),
            epoch: EpochId(6),
            page_count: 100,
            time_unix_ns: 6000,
            pages: vec![(Pfn(10), id)],
            chunks: vec![(id, StoredChunk::Plain(good.clone()))],
            memory_root: MemoryDigest::of_image(&mem),
            ..Default::default()
        };
        store.commit(c).unwrap();
        store.corrupt_chunk_for_test(&id, 100).unwrap();
        let at = dir.path().join("e6");
        std::fs::create_dir(&at).unwrap();
        let files = vec![MountFile { name: "memory".into(), content: MountContent::Pages { first: 0, len: 100 * page } }];
        let m = plan(&store, 6).mount(store.clone(), files, &at).unwrap();
        let f = std::fs::File::open(at.join("memory")).unwrap();
        let mut b = vec![0u8; PAGE_SIZE];
        f.read_exact_at(&mut b, 11 * page).unwrap();
        assert!(b == mem[11 * PAGE_SIZE..][..PAGE_SIZE], "pages beside the damaged one read");
        let err = f.read_exact_at(&mut b, 10 * page).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let mut all = Vec::new();
        assert!((&f).read_to_end(&mut all).is_err(), "a whole read fails on the damaged page");
        assert!(m.stats().errors.load(Ordering::Relaxed) > 0);
        drop(f);
        drop(m);
        assert!(!at.join("memory").exists(), "unmounted on drop");

        // A file reaching past the guest's memory is refused before mounting.
        let past = vec![MountFile { name: "past".into(), content: MountContent::Pages { first: 99, len: 2 * page } }];
        let err = plan(&store, 5).mount(store.clone(), past, &at).unwrap_err().to_string();
        assert!(err.contains("past spans pages 99..101, beyond the guest's 100 pages"), "{err}");
        // A plan whose recorded root is not the index's is refused before mounting.
        let mut bad = plan(&store, 5);
        bad.manifest.memory_root = ChunkId([1; 32]);
        assert!(matches!(bad.mount(store.clone(), Vec::new(), &at), Err(RestoreError::RootMismatch { .. })));
    }
}
