//! File and file-system calls std does not offer.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Frees the blocks of `len` bytes at `off` in `file`, keeping its size:
/// the range then reads as zeros. `Ok(false)` when the file system cannot
/// punch holes (the bytes stay).
///
/// # Errors
/// Any other OS error.
pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<bool> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a descriptor we hold open, with in-range
    // arguments; it touches no memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len) };
    done_unless(rc, libc::EOPNOTSUPP)
}

/// Takes an exclusive advisory lock on `file` without waiting; `Ok(false)`
/// when another holds it. The lock goes with the file.
///
/// # Errors
/// Any OS error other than the lock being held.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we hold open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    done_unless(rc, libc::EWOULDBLOCK)
}

/// A call's return code as done (`true`), not done for the one expected
/// reason `errno` (`false`), or failed.
fn done_unless(rc: libc::c_int, errno: libc::c_int) -> io::Result<bool> {
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(errno) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Detaches the mount at `path` (`umount2` with `MNT_DETACH`).
///
/// # Errors
/// The OS error.
pub fn detach_mount(path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Flushes every file system's dirty pages to disk (`sync(2)`).
pub fn sync_all() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Waits up to `timeout_ms` for `fd` to be readable; false on a timeout
/// (or an interrupted wait).
pub fn wait_readable(fd: &impl AsRawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}
