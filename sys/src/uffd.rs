//! Exact dirty tracking by userfaultfd write-protect in async mode plus
//! the `PAGEMAP_SCAN` ioctl ([`WriteProtectScanner`]).
//!
//! Invariants: the scanner only ever names pages inside the mapping it was
//! armed on, and holds a reference-counted fd of the userfaultfd so the
//! protection stays in force as long as the scanner lives.
//!
//! Debian 12's headers predate `PAGEMAP_SCAN` (Linux 6.7), so the constants
//! and structures are defined here from `include/uapi/linux/fs.h` and
//! `include/uapi/linux/userfaultfd.h`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use remus_types::PAGE_SIZE;

use crate::Mapping;

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `_IOWR(type, nr, size)` from `asm-generic/ioctl.h`.
const fn iowr(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((3u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_API: libc::c_ulong = iowr(0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = iowr(0xAA, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: libc::c_ulong = iowr(0xAA, 0x06, std::mem::size_of::<UffdioWriteprotect>());

/// `struct pm_scan_arg`, 96 bytes.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGEMAP_SCAN: libc::c_ulong = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`; note `1 << 5` would be `PAGE_IS_PFNZERO`.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// Exact dirty-page tracking: userfaultfd write-protect in async mode makes
/// the kernel clear a page's protection on its first write without any
/// fault delivered to us; `PAGEMAP_SCAN` then returns the written pages and
/// re-protects them in one ioctl.
pub struct WriteProtectScanner {
    _uffd: OwnedFd,
    pagemap: File,
    start: u64,
    end: u64,
    regions: Vec<PageRegion>,
}

impl WriteProtectScanner {
    /// Arms tracking on the whole of `mapping`: every page counts as clean
    /// from now on.
    ///
    /// # Errors
    /// The OS error of the first syscall that failed: `ENOSYS`/`EPERM` from
    /// `userfaultfd`, `EINVAL` from `UFFDIO_API` when the kernel lacks
    /// async write-protect, or an error from opening `/proc/self/pagemap`.
    pub fn arm(mapping: &Mapping) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned only here.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Self::register(uffd, File::open("/proc/self/pagemap")?, mapping.addr(), mapping.len() as u64)
    }

    /// Arms tracking on `len` bytes at `start` in the address space of
    /// process `pid`, through the userfaultfd that process opened on
    /// descriptor `fd` (the preloaded shim does that inside QEMU). A
    /// userfaultfd acts on its creator's memory whoever calls it, and
    /// `/proc/<pid>/pagemap` scans that process; both need ptrace rights
    /// over it (root, or the same user with ptrace scope 0).
    ///
    /// # Errors
    /// The OS error of `pidfd_open`/`pidfd_getfd` (no such process or
    /// descriptor, or no permission), or of arming (as in [`Self::arm`]).
    pub fn attach(pid: u32, fd: i32, start: u64, len: u64) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned only here.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: plain syscall; the result is checked.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pidfd_getfd returns a new descriptor owned by the caller.
        let uffd = unsafe { OwnedFd::from_raw_fd(got as i32) };
        Self::register(uffd, File::open(format!("/proc/{pid}/pagemap"))?, start, len)
    }

    fn register(uffd: OwnedFd, pagemap: File, start: u64, len: u64) -> io::Result<Self> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_API, &mut api)?;
        let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        ioctl(&uffd, UFFDIO_REGISTER, &mut reg)?;
        let mut wp = UffdioWriteprotect { range: UffdioRange { start, len }, mode: UFFDIO_WRITEPROTECT_MODE_WP };
        ioctl(&uffd, UFFDIO_WRITEPROTECT, &mut wp)?;
        Ok(Self { _uffd: uffd, pagemap, start, end: start + len, regions: vec![PageRegion::default(); 4096] })
    }

    /// Appends the page numbers (relative to the mapping) written since the
    /// last call, ascending, and write-protects them again.
    ///
    /// The caller must keep all writers of the mapping stopped for the call:
    /// a write racing the scan may land after its page was re-protected and
    /// is then reported next time, which is correct, but only a stopped
    /// guest gives a consistent checkpoint.
    ///
    /// # Errors
    /// The OS error of `PAGEMAP_SCAN`.
    pub fn collect(&mut self, out: &mut Vec<u64>) -> io::Result<()> {
        let mut start = self.start;
        while start < self.end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end: self.end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            let n = ioctl(&self.pagemap, PAGEMAP_SCAN, &mut arg)?;
            for r in &self.regions[..n as usize] {
                let first = (r.start - self.start) / PAGE_SIZE as u64;
                let last = (r.end - self.start) / PAGE_SIZE as u64;
                out.extend(first..last);
            }
            if arg.walk_end <= start {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            start = arg.walk_end;
        }
        Ok(())
    }
}

fn ioctl<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `req` is one of the request codes above, each paired by its
    // caller with the `#[repr(C)]` struct the kernel expects for it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(arg)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_reports_exactly_the_written_pages() {
        let mut m = Mapping::memfd("t", 1024 * PAGE_SIZE).unwrap();
        let mut s = WriteProtectScanner::arm(&m).unwrap();
        let mut out = Vec::new();
        s.collect(&mut out).unwrap();
        assert!(out.is_empty(), "fresh mapping is clean: {out:?}");
        let mem = m.as_mut_slice();
        for pfn in [0usize, 3, 4, 5, 1023] {
            mem[pfn * PAGE_SIZE + 17] = 1;
        }
        let _ = mem[9 * PAGE_SIZE]; // reads do not count
        s.collect(&mut out).unwrap();
        assert_eq!(out, vec![0, 3, 4, 5, 1023]);
        out.clear();
        s.collect(&mut out).unwrap();
        assert!(out.is_empty(), "re-protected after scan: {out:?}");
        m.as_mut_slice()[4 * PAGE_SIZE] = 2;
        s.collect(&mut out).unwrap();
        assert_eq!(out, vec![4]);
    }
}
