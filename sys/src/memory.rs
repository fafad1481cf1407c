//! An owned shared memory mapping of a file.
//!
//! Invariants: a [`Mapping`] owns its `mmap` for its whole life;
//! `ptr..ptr+len` is valid for reads (and, when writable, writes) until
//! drop, and nothing else unmaps it. A read-only mapping is `MAP_SHARED`
//! of a file nobody truncates while it is mapped (the callers' files are
//! guest RAM and append-only pack files).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use remus_types::PAGE_SIZE;

/// An owned shared mapping of a file: the guest's RAM (a memfd for the
/// arena guest, read-only; QEMU's memory-backend file for a QEMU guest).
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    memfd: File,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; callers
// synchronise access to its contents (see `Arena`).
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only hand out raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Creates a memfd of `len` bytes (a multiple of the page size) and maps
    /// it shared, read/write. Pages are not populated until touched.
    ///
    /// # Errors
    /// The OS error of `memfd_create`, `ftruncate` or `mmap`.
    pub fn memfd(name: &str, len: usize) -> io::Result<Self> {
        assert!(len % PAGE_SIZE == 0 && len > 0, "length must be whole pages");
        let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("nul in name"))?;
        // SAFETY: valid C string, flags are plain constants.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(len as u64)?;
        // SAFETY: mapping a fresh shared region of a file we own; the result
        // is checked before use.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, memfd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len, memfd, writable: true })
    }

    /// Maps the existing file at `path` (at least `len` bytes) shared and
    /// read-only: another process's memory, seen as it writes it.
    ///
    /// # Errors
    /// The OS error of `open` or `mmap`, or `InvalidInput` when the file is
    /// shorter than `len`.
    pub fn open_read_only(path: &std::path::Path, len: usize) -> io::Result<Self> {
        assert!(len % PAGE_SIZE == 0 && len > 0, "length must be whole pages");
        let file = File::open(path)?;
        if file.metadata()?.len() < len as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is shorter than {len} bytes", path.display())));
        }
        Self::read_only(file, len)
    }

    /// Maps all of `file`, as long as it is now, shared and read-only (an
    /// empty file maps to an empty slice).
    ///
    /// # Errors
    /// The OS error of `fstat` or `mmap`.
    pub fn whole_file_read_only(file: File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        if len == 0 {
            return Ok(Self { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, memfd: file, writable: false });
        }
        Self::read_only(file, len)
    }

    fn read_only(file: File, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh read-only shared mapping of a file we hold open;
        // the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len, memfd: file, writable: false })
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for the map of an empty file.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole mapping as a slice.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped for our lifetime (or len is 0 and
        // ptr dangling but aligned); the shared borrow of `self` excludes
        // `as_mut_slice` while it lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The whole mapping as a mutable slice.
    ///
    /// # Panics
    /// On a read-only mapping.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "read-only mapping");
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The memfd behind the mapping.
    #[must_use]
    pub fn file(&self) -> &File {
        &self.memfd
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly what was mapped; no borrows outlive self.
            unsafe {
                libc::munmap(self.ptr.cast(), self.len);
            }
        }
    }
}
