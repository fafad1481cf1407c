//! TAP and TUN interfaces, network namespaces.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` with the flags member of its union, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to the TAP interface `name` (1 to 15 bytes), creating a
/// transient one if it does not exist and the caller may; frames are read
/// and written whole, without a packet-information header.
///
/// # Errors
/// `InvalidInput` for a bad name; the OS error (no `/dev/net/tun`, no
/// permission, busy).
pub fn open_tap(name: &str) -> io::Result<File> {
    open_tun_or_tap(name, IFF_TAP)
}

/// As [`open_tap`], for a TUN interface: IP packets, not frames.
///
/// # Errors
/// As [`open_tap`].
pub fn open_tun(name: &str) -> io::Result<File> {
    open_tun_or_tap(name, IFF_TUN)
}

fn open_tun_or_tap(name: &str, kind: libc::c_short) -> io::Result<File> {
    if name.is_empty() || name.len() > 15 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?} must be 1..=15 bytes")));
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq { name: [0; 16], flags: kind | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF takes a `struct ifreq`, which IfReq lays out (name,
    // then the flags union member), padded to its 40 bytes.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, std::ptr::from_mut(&mut req)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Moves the calling thread into the network namespace `ns` (an open
/// `/var/run/netns/NAME` or `/proc/PID/ns/net`).
///
/// # Errors
/// The OS error (not permitted, not a namespace).
pub fn enter_net_namespace(ns: &File) -> io::Result<()> {
    // SAFETY: setns on this thread with a namespace descriptor we hold open.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the calling process a new, private network namespace.
///
/// # Errors
/// The OS error (not permitted: needs root).
pub fn unshare_net_namespace() -> io::Result<()> {
    // SAFETY: plain syscall; affects only this process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
