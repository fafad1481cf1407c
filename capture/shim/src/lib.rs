//! Preloaded into QEMU (`LD_PRELOAD`) by `remus protect qemu`.
//!
//! A userfaultfd acts on the address space of the process that created it,
//! whoever later calls its ioctls. This library's constructor runs inside
//! QEMU before `main`, creates one, and parks it on the descriptor number
//! named by `REMUS_UFFD_FD`. remus then takes a copy with `pidfd_getfd`,
//! negotiates the API and registers QEMU's guest-RAM mapping for async
//! write-protect; the dirty pages are read with `PAGEMAP_SCAN` on
//! `/proc/<qemu>/pagemap`. The library does nothing else, and nothing at
//! all when the variable is absent or the kernel refuses.

// The shim is a C-ABI constructor living inside QEMU: raw libc calls are
// its whole job, so it is the one crate besides remus-sys allowed `unsafe`.
#![allow(unsafe_code)]

/// Runs at load time, before QEMU's `main`.
extern "C" fn open_userfaultfd() {
    // SAFETY: getenv with a NUL-terminated name; the result is read before
    // anything can modify the environment (no other thread exists yet).
    let target = unsafe { libc::getenv(c"REMUS_UFFD_FD".as_ptr()) };
    if target.is_null() {
        return;
    }
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    let Ok(Ok(target)) = unsafe { std::ffi::CStr::from_ptr(target) }.to_str().map(str::parse::<libc::c_int>) else {
        return;
    };
    // SAFETY: plain syscalls on descriptors owned by this function.
    unsafe {
        let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK);
        if fd < 0 {
            return;
        }
        let fd = fd as libc::c_int;
        if fd != target {
            libc::dup3(fd, target, libc::O_CLOEXEC);
            libc::close(fd);
        }
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = open_userfaultfd;
