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

/// Sizes a UDP socket's receive and send buffers to `bytes` each, and
/// returns the sizes granted (receive, send). The kernel caps what is
/// asked at `net.core.rmem_max` / `wmem_max` (208 KiB on many systems);
/// past that cap only a process with `CAP_NET_ADMIN` may go, so this
/// asks again that way when the first ask was capped. A buffer smaller
/// than asked shows in the result, for the caller to say so.
///
/// # Errors
/// The OS error of reading a size back (not a socket, say).
pub fn size_udp_buffers(sock: &impl AsRawFd, bytes: usize) -> io::Result<(usize, usize)> {
    let fd = sock.as_raw_fd();
    let mut granted = [0usize; 2];
    for (slot, (opt, force)) in granted.iter_mut().zip([(libc::SO_RCVBUF, libc::SO_RCVBUFFORCE), (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE)]) {
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // Best effort: a refusal leaves the size read back below.
        let _ = set_int(fd, opt, want);
        if buffer_size(fd, opt)? < bytes {
            let _ = set_int(fd, force, want);
        }
        *slot = buffer_size(fd, opt)?;
    }
    Ok((granted[0], granted[1]))
}

fn set_int(fd: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid pointer to a c_int and its size.
    let r = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, opt, std::ptr::from_ref(&v).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The usable size of a socket buffer (Linux reports twice what was set,
/// the other half being its bookkeeping).
fn buffer_size(fd: libc::c_int, opt: libc::c_int) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to a c_int and its length.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, std::ptr::from_mut(&mut v).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(v).unwrap_or(0) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At least what the kernel lets anyone have, up to what was asked,
    /// and what the socket reports.
    #[test]
    fn udp_buffers_are_sized_as_far_as_the_kernel_allows() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cap = |f: &str| std::fs::read_to_string(f).unwrap().trim().parse::<usize>().unwrap();
        let want = 6 << 20;
        let (rcv, snd) = size_udp_buffers(&sock, want).unwrap();
        assert!(rcv >= want.min(cap("/proc/sys/net/core/rmem_max")), "receive {rcv}");
        assert!(snd >= want.min(cap("/proc/sys/net/core/wmem_max")), "send {snd}");
        assert_eq!(
            (rcv, snd),
            (buffer_size(sock.as_raw_fd(), libc::SO_RCVBUF).unwrap(), buffer_size(sock.as_raw_fd(), libc::SO_SNDBUF).unwrap())
        );
    }
}
