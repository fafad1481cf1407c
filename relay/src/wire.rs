//! A wire between two network namespaces of its own through the relay's
//! pipes, for traffic a UDP relay cannot carry: kernel TCP above all, so
//! that a plain TCP stream can be measured over the same impaired path as
//! remus's QUIC link.
//!
//! Each namespace has a TUN interface `rw0` (side A `10.201.0.1`, side B
//! `10.201.0.2`, point to point, MTU 1500); every IP packet one side's
//! kernel sends is read from its TUN, goes through that direction's
//! [`Impairment`] (up: A to B, down: B to A) and is written into the other
//! side's TUN at its time. A thread [`enter`](TunWire::enter)s a side to
//! open sockets there. Needs root (network namespaces, `/dev/net/tun`)
//! and iproute2's `ip`; the namespaces go when the wire is dropped.

use std::fs::File;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::{Counters, Direction, Impairment, Pipe, Pipes, RelayError, Sink, MAX_DATAGRAM};

/// Side A's address.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// Side B's address.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// One end of a [`TunWire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `10.201.0.1`; what it sends goes up.
    A,
    /// `10.201.0.2`; what it sends goes down.
    B,
}

/// A running wire; its namespaces are deleted when it is dropped.
pub struct TunWire {
    pipes: Arc<Pipes>,
    names: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), RelayError> {
    let out = Command::new("ip").args(args).output().map_err(|e| RelayError::Invalid(format!("running ip {args:?}: {e}")))?;
    if !out.status.success() {
        return Err(RelayError::Invalid(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// Opens the TUN interface `rw0` inside namespace `name` (on a thread of
/// its own, which alone enters it).
fn tun_in(name: &str) -> Result<File, RelayError> {
    let ns = format!("/var/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| -> io::Result<File> {
            remus_sys::enter_net_namespace(&File::open(&ns)?)?;
            remus_sys::open_tun("rw0")
        })
        .join()
        .map_err(|_| RelayError::Invalid("the TUN thread panicked".into()))?
        .map_err(RelayError::from)
    })
}

impl TunWire {
    /// Makes two namespaces joined by the wire, `up` impairing A to B and
    /// `down` B to A; `seed` as for the relay.
    ///
    /// # Errors
    /// [`RelayError::Invalid`] for an impairment out of range or when `ip`
    /// fails (not root, no iproute2); [`RelayError::Io`] for the TUN
    /// devices or threads.
    pub fn start(up: Impairment, down: Impairment, seed: u64) -> Result<Self, RelayError> {
        up.validate()?;
        down.validate()?;
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let names = [format!("remus-w{}-{n}a", std::process::id()), format!("remus-w{}-{n}b", std::process::id())];
        let wire = Self { pipes: Arc::new(Pipes::new(up, down, seed)), names };
        let mut tuns = Vec::new();
        for (name, (local, peer)) in wire.names.iter().zip([(ADDR_A, ADDR_B), (ADDR_B, ADDR_A)]) {
            ip(&["netns", "add", name])?;
            let tun = Arc::new(tun_in(name)?);
            ip(&["-n", name, "addr", "add", &local.to_string(), "peer", &peer.to_string(), "dev", "rw0"])?;
            ip(&["-n", name, "link", "set", "rw0", "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            tuns.push(tun);
        }
        let (a, b) = (Arc::clone(&tuns[0]), Arc::clone(&tuns[1]));
        let p = &wire.pipes;
        p.spawn(p, "wire-up-send", |w| w.up.run(&w.stop))?;
        p.spawn(p, "wire-down-send", |w| w.down.run(&w.stop))?;
        let (from_a, to_b) = (Arc::clone(&a), Sink::Tun(Arc::clone(&b)));
        p.spawn(p, "wire-read-a", move |w| read_into(&from_a, &w.up, &to_b, &w.stop))?;
        p.spawn(p, "wire-read-b", move |w| read_into(&b, &w.down, &Sink::Tun(a), &w.stop))?;
        Ok(wire)
    }

    /// Moves the calling thread into one end's namespace: sockets it
    /// opens from then on live there.
    ///
    /// # Errors
    /// The OS error.
    pub fn enter(&self, end: End) -> io::Result<()> {
        let name = &self.names[usize::from(end == End::B)];
        remus_sys::enter_net_namespace(&File::open(format!("/var/run/netns/{name}"))?)
    }

    /// Cuts (or heals) both directions.
    pub fn set_partitioned(&self, on: bool) {
        self.pipes.set_partitioned(on);
    }

    /// What one direction did so far.
    #[must_use]
    pub fn counters(&self, dir: Direction) -> Counters {
        self.pipes.pipe(dir).counters.snapshot()
    }
}

/// Reads packets from `tun` into `pipe` (for `sink`) until `stop`.
fn read_into(tun: &File, pipe: &Pipe, sink: &Sink, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        if !remus_sys::wait_readable(tun, 50) {
            continue;
        }
        match (&*tun).read(&mut buf) {
            Ok(n) if n > 0 => pipe.push(Instant::now(), &buf[..n], sink),
            _ => {}
        }
    }
}

impl Drop for TunWire {
    fn drop(&mut self) {
        self.pipes.stop();
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
