//! The guest's network, relayed through remus: output commit on the wire.
//!
//! QEMU's NIC backend is `-netdev stream` over a unix socket on which remus
//! listens; each Ethernet frame crosses it as a 4-byte big-endian length and
//! the frame. The other side is a TAP device on the host (created by the
//! operator, e.g. `ip tuntap add NAME mode tap`, and bridged as needed).
//!
//! - World to guest: frames pass at once.
//! - Guest to world, protected: each frame is held in the [`OutputBuffer`]
//!   under the epoch open when remus read it, and written to the TAP only
//!   when that epoch is acknowledged ([`NetRelay::release`]). A frame QEMU
//!   sent before a pause but remus read after it is tagged with the next
//!   epoch: released later, never earlier.
//! - Guest to world, direct: after a failover nothing is left to protect
//!   against, and frames pass at once.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use remus_capture::{CaptureError, OutputBuffer};

/// Largest frame accepted from QEMU (jumbo frames included).
const MAX_FRAME: usize = 65536;

/// An open TAP interface: one Ethernet frame per read or write.
pub struct Tap {
    file: File,
}

impl Tap {
    /// Attaches to the TAP interface `name` (creating a transient one if
    /// it does not exist and remus may).
    ///
    /// # Errors
    /// [`CaptureError::Config`] for a bad name, [`CaptureError::Io`] with
    /// the OS error (no `/dev/net/tun`, no permission, busy).
    pub fn open(name: &str) -> Result<Self, CaptureError> {
        if name.is_empty() || name.len() > 15 {
            return Err(CaptureError::Config(format!("tap name {name:?} must be 1..=15 bytes")));
        }
        let file = remus_sys::open_tap(name).map_err(|e| CaptureError::Io(format!("tap {name}: {e}")))?;
        Ok(Self { file })
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { file: self.file.try_clone()? })
    }
}

/// Where the guest's outgoing frames go.
#[derive(Clone)]
pub enum Egress {
    /// Held until the epoch that produced them is acknowledged.
    Held(Arc<OutputBuffer<Vec<u8>>>),
    /// Passed at once (an unprotected guest, after failover).
    Direct,
}

/// The relay between QEMU's netdev socket and the TAP.
pub struct NetRelay {
    tap: Mutex<Option<Tap>>,
    stop: Arc<AtomicBool>,
    world: Mutex<Option<std::thread::JoinHandle<()>>>,
    socket: std::path::PathBuf,
}

impl NetRelay {
    /// Listens on `socket` for QEMU and relays to `tap` (frames to the
    /// world are dropped when there is none) through `egress`.
    ///
    /// # Errors
    /// [`CaptureError::Io`] when the socket or TAP cannot be set up.
    pub fn start(socket: &Path, tap: Option<Tap>, egress: Egress) -> Result<Arc<Self>, CaptureError> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|e| CaptureError::Io(format!("netdev socket {}: {e}", socket.display())))?;
        let reader_tap = match &tap {
            Some(t) => Some(t.try_clone().map_err(|e| CaptureError::Io(format!("tap: {e}")))?),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let relay = Arc::new(Self { tap: Mutex::new(tap), stop: Arc::clone(&stop), world: Mutex::new(None), socket: socket.to_path_buf() });
        let guest_conn: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        {
            let relay = Arc::clone(&relay);
            let guest_conn = Arc::clone(&guest_conn);
            std::thread::Builder::new()
                .name("remus-net-guest".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if relay.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let Ok(writer) = conn.try_clone() else { continue };
                        *guest_conn.lock() = Some(writer);
                        if let Err(e) = relay.relay_from_guest(conn, &egress) {
                            tracing::debug!(error = %e, "netdev connection ended");
                        }
                        *guest_conn.lock() = None;
                    }
                })
                .map_err(|e| CaptureError::Io(e.to_string()))?;
        }
        if let Some(mut tap) = reader_tap {
            let stop = Arc::clone(&stop);
            let handle = std::thread::Builder::new()
                .name("remus-net-world".into())
                .spawn(move || {
                    let mut buf = vec![0u8; MAX_FRAME + 4];
                    loop {
                        // Wake up now and then to notice `stop`: the TAP
                        // must be closed for another process to attach.
                        let ready = remus_sys::wait_readable(&tap.file, 100);
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if !ready {
                            continue;
                        }
                        let n = match tap.file.read(&mut buf[4..]) {
                            Ok(0) => return,
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, "tap read failed; the guest no longer receives");
                                return;
                            }
                        };
                        buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
                        if let Some(c) = guest_conn.lock().as_mut() {
                            // A frame the guest cannot take is lost, as
                            // on any wire.
                            let _ = c.write_all(&buf[..4 + n]);
                        }
                    }
                })
                .map_err(|e| CaptureError::Io(e.to_string()))?;
            *relay.world.lock() = Some(handle);
        }
        Ok(relay)
    }

    /// Stops relaying and closes the TAP (waiting up to 100 ms for the
    /// reader to let go), so that another relay can attach to it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tap.lock().take();
        if let Some(h) = self.world.lock().take() {
            let _ = h.join();
        }
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.socket);
    }

    /// Writes released frames to the world, in order.
    pub fn release(&self, frames: &[Vec<u8>]) {
        let mut tap = self.tap.lock();
        let Some(tap) = tap.as_mut() else {
            return;
        };
        for f in frames {
            // A frame the host cannot take is lost, as on any wire; TCP
            // retransmits.
            if let Err(e) = tap.file.write_all(f) {
                tracing::debug!(error = %e, "tap write failed");
            }
        }
    }

    fn relay_from_guest(&self, mut conn: UnixStream, egress: &Egress) -> io::Result<()> {
        let mut len = [0u8; 4];
        loop {
            conn.read_exact(&mut len)?;
            let n = u32::from_be_bytes(len) as usize;
            if n > MAX_FRAME {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("netdev frame of {n} bytes")));
            }
            let mut frame = vec![0u8; n];
            conn.read_exact(&mut frame)?;
            match egress {
                Egress::Held(out) => {
                    out.push(frame);
                }
                Egress::Direct => self.release(std::slice::from_ref(&frame)),
            }
        }
    }
}
